"""Resuming from a checkpoint continues exactly as the uninterrupted run: same losses, same final weights.

Run A trains 6 steps straight through, saving checkpoint-3 and checkpoint-6. Run B starts in a new folder holding
only a copy of A's checkpoint-3 and resumes from it (--resume_from_checkpoint). Steps 4-6 of B must log A's
losses: that needs the weights, optimizer and scheduler state, the data order (step 4 begins a new, reshuffled
epoch: 4 samples, 1 per step) and the RNG state (LoRA dropout draws random masks) all restored.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "finetune_hf_trainer_hateful_memes.py")
EVAL_SIZE, NUM_TRAIN = 500, 4  # the recipe evaluates on train[:500] and trains on train[500:]
TOLERANCE = 1e-6

COMMON_FLAGS = [
    "--deepspeed", "none", "--num_crops", "1",
    "--batch_size", "1", "--batch_size_per_gpu", "1",
    "--max_train_samples", str(NUM_TRAIN), "--max_steps", "6",
    "--save_strategy", "steps", "--save_steps", "3", "--logging_steps", "1",
    "--learning_rate", "1e-3", "--warmup_steps", "2",  # warm-up then decay: the scheduler state matters
    "--skip_eval_before", "--max_eval_samples", "2", "--eval_batch_size", "2", "--max_new_tokens", "3",
    "--report_to", "none", "--dataloader_num_workers", "0", "--no_tqdm", "--seed", "0",
]
STRATEGIES = {
    "full": [],
    "frozen": ["--freeze_vision_model"],  # the frozen image embedding must stay frozen after resuming too
    "lora": ["--use_lora", "--lora_dropout", "0.1"],
}


def run_recipe(output_dir, *flags):
    command = [sys.executable, SCRIPT, "--output_dir", output_dir, *COMMON_FLAGS, *flags]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    with open(f"{output_dir}.log", "w") as f:  # beside the run, for a look after a failure
        f.write(result.stdout + result.stderr)
    assert result.returncode == 0, (
        f"{' '.join(command)}\nexit {result.returncode}:\n{(result.stdout + result.stderr)[-6000:]}"
    )
    return result.stdout


def losses(run_dir, step):
    with open(os.path.join(run_dir, f"checkpoint-{step}", "trainer_state.json")) as f:
        return {entry["step"]: entry["loss"] for entry in json.load(f)["log_history"] if "loss" in entry}


def printed_loss_logs(stdout):
    """How many steps the process itself trained: with --no_tqdm the Trainer prints one {'loss': ...} per step."""
    return len(re.findall(r"^\{'loss':", stdout, flags=re.MULTILINE))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from phi3v.synthetic import memes_rows, save_hf_dataset
    from phi3v.tiny import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("resume")
    model_dir = write_tiny_checkpoint(folder / "model", num_crops=1)
    distinct = memes_rows(NUM_TRAIN + 2)  # few distinct images, repeated: quick to write
    rows = [distinct[i % len(distinct)] for i in range(EVAL_SIZE + NUM_TRAIN)]
    data_dir = save_hf_dataset(rows, str(folder / "memes"))
    return {"folder": folder, "flags": ["--model_name_or_path", model_dir, "--dataset_path", data_dir]}


@pytest.fixture(scope="module", params=sorted(STRATEGIES))
def runs(request, data):
    strategy = request.param
    flags = data["flags"] + STRATEGIES[strategy]
    straight = str(data["folder"] / f"{strategy}-straight")
    resumed = str(data["folder"] / f"{strategy}-resumed")

    straight_stdout = run_recipe(straight, *flags)
    # A fresh folder with nothing but the step-3 checkpoint, as after a run killed between steps 3 and 4.
    shutil.copytree(os.path.join(straight, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    resumed_stdout = run_recipe(resumed, *flags, "--resume_from_checkpoint", os.path.join(resumed, "checkpoint-3"))
    return {"strategy": strategy, "straight": straight, "resumed": resumed,
            "straight_stdout": straight_stdout, "resumed_stdout": resumed_stdout}


def test_resumed_run_trains_only_the_remaining_steps(runs):
    # A run that ignored the checkpoint would train 6 steps and, being deterministic, log the same losses.
    assert printed_loss_logs(runs["straight_stdout"]) == 6
    assert printed_loss_logs(runs["resumed_stdout"]) == 3
    with open(os.path.join(runs["resumed"], "checkpoint-6", "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == 6


def test_resumed_losses_match_the_straight_run(runs):
    straight, resumed = losses(runs["straight"], 6), losses(runs["resumed"], 6)
    print(f"\n{runs['strategy']}: straight {straight}\n{runs['strategy']}: resumed  {resumed}")
    assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert abs(resumed[step] - straight[step]) <= TOLERANCE, (step, resumed[step], straight[step])
    assert len(set(straight.values())) == 6  # the losses move: the comparison is not of constants


def test_resumed_final_weights_match(runs):
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if runs["strategy"] == "lora" else "model.safetensors"
    straight = load_file(os.path.join(runs["straight"], name))
    resumed = load_file(os.path.join(runs["resumed"], name))
    assert straight.keys() == resumed.keys() and straight
    difference = max((straight[k].float() - resumed[k].float()).abs().max().item() for k in straight)
    assert difference <= TOLERANCE


def test_frozen_vision_tower_stays_the_base_models_through_the_resume(runs, data):
    import torch
    from safetensors.torch import load_file

    if runs["strategy"] != "frozen":
        pytest.skip("only the frozen strategy keeps the CLIP tower fixed")
    base = load_file(os.path.join(data["folder"], "model", "model.safetensors"))
    resumed = load_file(os.path.join(runs["resumed"], "model.safetensors"))
    # --freeze_vision_model freezes what the original recipe freezes: the whole image embedding (CLIP, projector,
    # separators) and the token embeddings
    frozen = [k for k in base if k.startswith("model.vision_embed_tokens.") or k == "model.embed_tokens.weight"]
    assert frozen and all(torch.equal(base[k], resumed[k]) for k in frozen)
    # ...while what does train moved: the language model's layers and lm_head
    for name in ("model.layers.0.self_attn.qkv_proj.weight", "lm_head.weight"):
        assert not torch.equal(base[name], resumed[name]), name

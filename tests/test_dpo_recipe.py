"""finetune_hf_trainer_dpo.py end to end (issue 23): 2-process DDP, ZeRO-2 and ZeRO-3 training, each killed with
SIGKILL and resumed; precomputed reference log-probabilities; bad records and flags; the saved folders; the
evaluations during, before and after training. The losses and the reference model themselves: tests/test_dpo.py.

Every run trains the same 4 preference pairs (phi3v.synthetic: memes, the right answer chosen) on the tiny model,
4 optimizer steps of 2 pairs (2 processes x 1 pair; 2 steps an epoch, so the resumed runs pick up in the middle of an
epoch and reshuffle for the next), checkpoints at every step, evaluating on the same pairs at steps 2 and 4 (the
training pairs: 4 steps move their preference measurably, a held-out set of 4 would not).

Three torchrun launches per strategy, through a wrapper of the recipe that SIGKILLs every rank once the checkpoint
of $KILL_AFTER_SAVE is complete and prints what each rank holds of the reference model:

    S  the uninterrupted run;  K  the same command, killed after checkpoint-1;  R  K resumed (auto)

    ddp     full fine-tuning, the reference a frozen copy (DDP's S is the run the others are compared with)
    zero2   --precompute_ref_log_probs (DDP where DeepSpeed cannot run here, with a warning)
    zero3   full fine-tuning, the frozen copy partitioned like the policy (TRL's prepare_deepspeed)

In-process: the same training on 1 process (2 accumulation steps) from a file with bad records and
--skip_bad_samples, a LoRA run with --merge_lora, and every refused record and flag (before the model loads).
DeepSpeed compiles its CPU communication op on first use; TORCH_EXTENSIONS_DIR keeps the build (tests/
test_distributed.py).
"""

import json
import math
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from test_distributed import deepspeed_unavailable, subprocess_env  # noqa: E402
from test_official_files import PHI35, check_official_form  # noqa: E402

import finetune_hf_trainer_dpo as recipe  # noqa: E402
import phi3v.model_setup  # noqa: E402
import phi3v.training  # noqa: E402
from phi3v.arguments import DS_CONFIGS  # noqa: E402
from phi3v.dpo import REFERENCE_FILE  # noqa: E402

SCRIPT = os.path.join(ROOT, "finetune_hf_trainer_dpo.py")
NUM_PAIRS, STEPS, KILL_STEP, EVAL_STEPS = 4, 4, 1, 2
IDS = [f"train-{i}" for i in range(NUM_PAIRS)]
BETA = 0.1  # the recipe's default
# A constant-free schedule (no warm-up, linear decay) and a large learning rate: every step moves the weights, so a
# difference between the strategies, or a resume that restored less than everything, shows in the losses.
FLAGS = [
    "--num_crops", "1", "--batch_size", "2", "--batch_size_per_gpu", "1", "--eval_batch_size", "2",
    "--learning_rate", "2e-3", "--warmup_steps", "0", "--max_steps", str(STEPS), "--logging_steps", "1",
    "--max_new_tokens", "2", "--report_to", "none", "--dataloader_num_workers", "0", "--no_tqdm", "--seed", "0",
]
# a checkpoint at every step (the newest 2 kept, the default) and an evaluation every 2
TORCHRUN_FLAGS = ["--ddp_backend", "gloo", *FLAGS, "--save_strategy", "steps", "--save_steps", "1",
                  "--eval_steps", str(EVAL_STEPS)]

# The recipe, SIGKILLing every rank right after the checkpoint of step $KILL_AFTER_SAVE is complete (all ranks
# past their part of the save first), and printing, as training starts, the reference model each rank holds: its
# class and how many of the reference's weights (elements) this rank holds.
WRAPPER = """
import os
import signal
import sys

import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, {root!r})
import finetune_hf_trainer_dpo as recipe


class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if str(state.global_step) == os.environ.get("KILL_AFTER_SAVE"):
            if dist.is_initialized():
                dist.barrier()
            os.kill(os.getpid(), signal.SIGKILL)


def say(line):  # one write of the whole line: the ranks share the pipe, and print's parts could interleave
    os.write(1, (line + "\\n").encode())


def report_reference(trainer, resume):
    reference = trainer.ref_model
    if reference is None:
        say(f"REFERENCE rank {{trainer.args.process_index}}: none")
    else:
        parameters = list(reference.parameters())
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in parameters)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in parameters)
        trainable = sum(p.requires_grad for p in parameters)
        say(f"REFERENCE rank {{trainer.args.process_index}}: {{type(reference).__name__}} holds {{held}} of "
            f"{{total}}, {{trainable}} trainable")
    return run_training(trainer, resume)


make_trainer, run_training = recipe.make_trainer, recipe.run_training
recipe.make_trainer = lambda *positional, **options: make_trainer(*positional, callbacks=[KillAfterSave()], **options)
recipe.run_training = report_reference
recipe.main()
"""


# ------------------------------------------------------------------------------------------------ helpers
def torchrun(wrapper, output_dir, flags, log_name, expect_killed=False, **extra_env):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
               "--output_dir", str(output_dir), *flags]
    env = dict(subprocess_env(), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra_env)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    with open(f"{output_dir}.{log_name}.log", "w") as f:  # beside the run, for a look after a failure
        f.write(log)
    if expect_killed:  # torchrun reports its workers' deaths and fails
        assert result.returncode != 0 and "Signal 9 (SIGKILL)" in log, f"exit {result.returncode}:\n{log[-6000:]}"
    else:
        assert result.returncode == 0, f"{' '.join(command)}\nexit {result.returncode}:\n{log[-6000:]}"
    return log


def read_json(path):
    with open(path) as f:
        return json.load(f)


def log_history(run_dir, step=STEPS):
    return read_json(os.path.join(run_dir, f"checkpoint-{step}", "trainer_state.json"))["log_history"]


def logged(history, key):
    """{step: value} of `key` in a log history."""
    return {entry["step"]: entry[key] for entry in history if key in entry}


def weights(path):
    from safetensors.torch import load_file

    return load_file(path)


def max_difference(a, b):
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def reference_lines(log):
    return sorted(re.findall(r"^REFERENCE rank (\d): (.*)$", log, flags=re.MULTILINE))


def pair_log_probs_of(model_dir, pairs_path, image_folder, batch_size=2):
    """[pairs, 2] log-probabilities (chosen, rejected) of every pair under a saved full model, as the recipe
    computes them (phi3v.dpo.dataset_log_probs, eval mode)."""
    from phi3v import Phi3VForCausalLM, Phi3VProcessor
    from phi3v.dpo import PreferenceCollator, dataset_log_probs

    processor = Phi3VProcessor.from_pretrained(model_dir, num_crops=1)
    model = Phi3VForCausalLM.from_pretrained(model_dir)
    dataset = preference_dataset(processor, pairs_path, image_folder)
    return dataset_log_probs(model, dataset, PreferenceCollator(processor.pad_token_id), batch_size)


def preference_dataset(processor, pairs_path, image_folder):
    from phi3v.preference import PreferenceDataset, parse_preference
    from phi3v.records import load_records

    records = load_records(pairs_path, image_folder, parse=parse_preference)
    return PreferenceDataset(records, processor, num_crops=1)


# ------------------------------------------------------------------------------------------------ the runs
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from phi3v.synthetic import preference_pairs
    from phi3v.tiny import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("dpo_recipe")
    model = write_tiny_checkpoint(folder / "model", num_crops=1)
    paths = preference_pairs(str(folder / "data"), train=NUM_PAIRS, test=1)
    wrapper = folder / "dpo_killed_after_a_save.py"
    wrapper.write_text(WRAPPER.format(root=ROOT))
    flags = ["--model_id", model, "--data_path", paths["train"], "--image_folder", paths["images"],
             "--eval_data_path", paths["train"]]
    return {"folder": folder, "model": model, "pairs": paths["train"], "images": paths["images"],
            "wrapper": wrapper, "flags": flags}


def strategy_runs(data, name, strategy_flags):
    """S, K (SIGKILLed after checkpoint-1) and R (K resumed with --resume_from_checkpoint auto)."""
    flags = [*data["flags"], *strategy_flags, *TORCHRUN_FLAGS]
    straight, killed = data["folder"] / f"{name}-straight", data["folder"] / f"{name}-killed"
    logs = {"straight": torchrun(data["wrapper"], straight, flags, "straight")}
    logs["killed"] = torchrun(data["wrapper"], killed, flags, "killed", expect_killed=True,
                              KILL_AFTER_SAVE=str(KILL_STEP))
    left = {name: sorted(os.listdir(killed / name)) for name in os.listdir(killed) if name.startswith("checkpoint-")}
    reference = killed / f"checkpoint-{KILL_STEP}" / REFERENCE_FILE  # R's checkpoints will rotate it away
    left_reference = torch.load(reference, weights_only=True) if os.path.exists(reference) else None
    logs["resumed"] = torchrun(data["wrapper"], killed, [*flags, "--resume_from_checkpoint", "auto"], "resumed")
    return {"straight": straight, "resumed": killed, "logs": logs, "left_by_kill": left,
            "reference_left_by_kill": left_reference}


@pytest.fixture(scope="module")
def ddp(data):
    return strategy_runs(data, "ddp", ["--deepspeed", "none"])


@pytest.fixture(scope="module")
def zero2(data):
    """--precompute_ref_log_probs under ZeRO-2; where DeepSpeed cannot run here, under DDP, saying why."""
    reason = deepspeed_unavailable()
    strategy = ["--deepspeed", os.path.join(DS_CONFIGS, "zero2.json")]
    if reason:
        message = f"DeepSpeed cannot run here ({reason}): the precomputed-reference runs use DDP instead of ZeRO-2"
        warnings.warn(message, stacklevel=2)
        print(f"\n{message}")
        strategy = ["--deepspeed", "none"]
    return strategy_runs(data, "zero2", [*strategy, "--precompute_ref_log_probs"]) | {"deepspeed": not reason}


@pytest.fixture(scope="module")
def zero3(data):
    reason = deepspeed_unavailable()
    if reason:
        pytest.skip(f"DeepSpeed cannot run here ({reason})")
    return strategy_runs(data, "zero3", ["--deepspeed", os.path.join(DS_CONFIGS, "zero3.json")])


STRATEGIES = ["ddp", "zero2", "zero3"]


def in_process(argv, captured=None):
    """The recipe's main() in this process; the Trainer it made goes into `captured` (a list)."""
    with pytest.MonkeyPatch.context() as patch:
        make_trainer = recipe.make_trainer

        def capture(*positional, **options):
            trainer = make_trainer(*positional, **options)
            if captured is not None:
                captured.append(trainer)
            return trainer

        patch.setattr(recipe, "make_trainer", capture)
        patch.setattr(sys, "argv", [SCRIPT])
        recipe.main([str(a) for a in argv])


# ------------------------------------------------------------------------------------------------ 1. strategies
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_deepspeed_trains_as_ddp(request, name, ddp):
    """Same pairs, seed and optimizer: ZeRO-2 (its precomputed reference against DDP's frozen copy) and ZeRO-3 (a
    partitioned policy and reference) log DDP's losses and end with DDP's weights, to float rounding."""
    run = request.getfixturevalue(name)
    # (the DPO metrics are logged rounded to 6 decimals: 1e-6 apart where rounding went the other way)
    for key, tolerance in (("loss", 1e-6), ("eval_loss", 1e-6), ("rewards/margins", 2e-6)):
        mine, reference = logged(log_history(run["straight"]), key), logged(log_history(ddp["straight"]), key)
        assert sorted(mine) == sorted(reference) == (list(range(1, STEPS + 1)) if key != "eval_loss" else [2, 4])
        for step in mine:
            assert mine[step] == pytest.approx(reference[step], rel=1e-5, abs=tolerance), (key, step)
    # the policy equals the reference at step 1: DPO's loss is exactly log 2 there, whichever the reference
    assert logged(log_history(run["straight"]), "loss")[1] == pytest.approx(math.log(2), abs=1e-7)
    final = weights(run["straight"] / "model.safetensors")
    assert max_difference(final, weights(ddp["straight"] / "model.safetensors")) < 1e-5


@pytest.mark.parametrize("name", STRATEGIES)
def test_the_reference_each_strategy_holds(request, name, data):
    """DDP: a frozen copy, whole on each rank; ZeRO-3: a DeepSpeed engine holding about half of the copy on each
    rank; precomputed: no second model at all. Every run of the strategy (S, K, R) holds the same."""
    from phi3v import Phi3VForCausalLM

    run = request.getfixturevalue(name)
    total = sum(p.numel() for p in Phi3VForCausalLM.from_pretrained(data["model"]).parameters())
    for log in run["logs"].values():
        lines = reference_lines(log)
        assert [rank for rank, _ in lines] == ["0", "1"], log[-3000:]
        for _, line in lines:
            if name == "ddp":
                assert line == f"Phi3VForCausalLM holds {total} of {total}, 0 trainable"
            elif name == "zero2":
                assert line == "none"
            else:
                held, of, trainable = map(int, re.fullmatch(r"DeepSpeedEngine holds (\d+) of (\d+), (\d+) trainable",
                                                            line).groups())
                assert (of, trainable) == (total, 0) and total / 2 <= held < total / 2 + 1000, line


@pytest.mark.parametrize("name", STRATEGIES)
def test_resumed_after_sigkill_trains_exactly_as_the_uninterrupted_run(request, name):
    run = request.getfixturevalue(name)
    straight, resumed = run["straight"], run["resumed"]
    # every rank died right after checkpoint-1 was complete; R took it up
    assert list(run["left_by_kill"]) == [f"checkpoint-{KILL_STEP}"]
    assert "trainer_state.json" in run["left_by_kill"][f"checkpoint-{KILL_STEP}"]
    assert f"resuming from {resumed / f'checkpoint-{KILL_STEP}'}" in run["logs"]["resumed"]
    printed = re.findall(r"^\{'loss':", run["logs"]["resumed"], flags=re.MULTILINE)
    assert len(printed) == STEPS - KILL_STEP  # R trained steps 2-4 itself
    a, b = log_history(straight), log_history(resumed)
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "eval_loss", "eval_rewards/margins"):
        resumed_values, straight_values = logged(b, key), logged(a, key)
        assert sorted(resumed_values) == sorted(straight_values) and resumed_values, key
        for step, value in resumed_values.items():
            assert value == pytest.approx(straight_values[step], rel=1e-6, abs=1e-6), (key, step)
    assert max_difference(weights(resumed / "model.safetensors"), weights(straight / "model.safetensors")) <= 1e-6
    after, expected = read_json(resumed / "eval_after.json"), read_json(straight / "eval_after.json")
    assert after["predictions"] == expected["predictions"]
    for key in ("preference_accuracy", "mean_margin", "logp_accuracy"):
        assert after[key] == pytest.approx(expected[key], abs=2e-6), key


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """One process, 2 accumulation steps, from a file where the 4 pairs stand among one bad record of each kind,
    with --skip_bad_samples (and --max_seq_length, for the too-long one); no evaluation."""
    folder = tmp_path_factory.mktemp("skip_bad")
    pairs = read_json(data["pairs"])
    bad = bad_records(pairs[0])
    mixed = [bad["missing chosen"], pairs[0], bad["empty rejected"], pairs[1], bad["chosen is rejected"],
             bad["tags and images"], pairs[2], bad["missing image"], bad["too long"], pairs[3]]
    path = folder / "mixed.json"
    path.write_text(json.dumps(mixed))
    captured = []
    in_process(["--model_id", data["model"], "--data_path", path, "--image_folder", data["images"],
                "--output_dir", folder / "run", "--deepspeed", "none", "--skip_bad_samples",
                "--max_seq_length", MAX_SEQ_LENGTH, *FLAGS, "--save_strategy", "no"], captured)
    return captured[0]


def test_one_process_with_bad_records_skipped_trains_as_ddp(single, ddp):
    """The pairs left after skipping every bad record are the 4 of the other runs, in their order: 1 process x 2
    accumulation steps then logs DDP's losses (the DPO loss is a mean over a micro-batch's pairs, which the Trainer
    divides by the accumulation steps: 2 processes x 1 pair and 1 process x 2 micro-batches take the same step)."""
    assert [single.train_dataset.record(i)["id"] for i in range(len(single.train_dataset))] == IDS
    assert single.args.gradient_accumulation_steps == 2 and single.args.world_size == 1
    mine, reference = logged(single.state.log_history, "loss"), logged(log_history(ddp["straight"]), "loss")
    assert sorted(mine) == sorted(reference) == list(range(1, STEPS + 1))
    for step in mine:
        assert mine[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    final = weights(os.path.join(single.args.output_dir, "model.safetensors"))
    assert max_difference(final, weights(ddp["straight"] / "model.safetensors")) < 1e-5


# ------------------------------------------------------------------------------------------------ 2. precomputed
def test_precomputed_reference_is_computed_once_and_kept_in_every_checkpoint(zero2, data, initial_log_probs):
    straight, killed = zero2["straight"], zero2["resumed"]
    logs = zero2["logs"]
    computed = "reference log-probabilities computed for 4 train pairs, 4 eval pairs"
    assert logs["straight"].count(computed) == 1 and "read from" not in logs["straight"]
    saved = torch.load(straight / REFERENCE_FILE, weights_only=True)
    assert sorted(saved) == ["eval", "train"] and saved["train"].shape == (NUM_PAIRS, 2)
    # the starting model's log-probabilities (the eval pairs are the training pairs)
    torch.testing.assert_close(saved["train"], initial_log_probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(saved["eval"], saved["train"], rtol=0, atol=0)
    checkpoints = sorted(name for name in os.listdir(straight) if name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-3", "checkpoint-4"]  # the newest 2 (--save_total_limit 2, the default)
    kept = [torch.load(straight / name / REFERENCE_FILE, weights_only=True) for name in checkpoints]
    kept.append(zero2["reference_left_by_kill"])  # K's checkpoint-1, which a SIGKILL came right after
    for values in kept:
        assert values is not None and values.keys() == saved.keys()
        assert all(torch.equal(values[k], saved[k]) for k in saved)
    # the resumed run read them (and computed nothing): it trains as S (test_resumed_after_sigkill_...)
    assert logs["resumed"].count(f"reference log-probabilities read from {killed / f'checkpoint-{KILL_STEP}'} "
                                 "(4 train pairs, 4 eval pairs)") == 1
    assert "reference log-probabilities computed" not in logs["resumed"]


def test_runs_with_a_frozen_copy_save_no_reference_file(ddp):
    for folder in (ddp["straight"], ddp["straight"] / f"checkpoint-{STEPS}"):
        assert not os.path.exists(folder / REFERENCE_FILE)


def test_resume_computes_only_the_reference_values_the_checkpoint_lacks(tmp_path, monkeypatch):
    """A checkpoint's values are read for the splits they fit; a split added since (or resized) is computed from
    the model as it is before training resumes (the starting model: the Trainer loads the checkpoint later)."""
    from types import SimpleNamespace

    import phi3v.dpo as dpo

    calls = []

    def fake_log_probs(model, dataset, collator, batch_size, adapters=True):
        calls.append((len(dataset), batch_size, adapters))
        return torch.full((len(dataset), 2), -1.0, dtype=torch.float64)

    monkeypatch.setattr(dpo, "dataset_log_probs", fake_log_probs)
    checkpoint = tmp_path / "checkpoint-3"
    stored = torch.tensor([[-2.0, -3.0]] * 4, dtype=torch.float64)
    dpo.save_reference({"train": stored, "eval": torch.zeros(5, 2, dtype=torch.float64)}, checkpoint)
    task = SimpleNamespace(precompute_ref_log_probs=True)
    training_args = SimpleNamespace(per_device_eval_batch_size=3, should_save=True, output_dir=str(tmp_path))
    reference = dpo.reference_for_training("model", None, task, training_args, "collator", [0] * 4, [0] * 2,
                                           str(checkpoint))
    assert calls == [(2, 3, False)]  # the eval set now has 2 pairs, not 5: computed, adapters disabled
    assert torch.equal(reference.log_probs["train"], stored)
    assert torch.equal(reference.log_probs["eval"], torch.full((2, 2), -1.0, dtype=torch.float64))
    on_disk = dpo.load_reference(tmp_path)  # the output folder's copy holds what the run uses
    assert all(torch.equal(on_disk[k], reference.log_probs[k]) for k in ("train", "eval"))


# ------------------------------------------------------------------------------------------------ 3. bad input
MAX_SEQ_LENGTH = 400  # a pair of the synthetic data is 310 tokens


def bad_records(good):
    long_answer = "word " * 200
    return {
        "missing chosen": {k: v for k, v in good.items() if k != "chosen"},
        "empty rejected": {**good, "rejected": "  "},
        "chosen is rejected": {**good, "rejected": good["chosen"] + " "},
        "tags and images": {**good, "prompt": "<image>\n<image>\nAre these hateful?"},
        "missing image": {**good, "image": "nowhere.png"},
        "too long": {**good, "chosen": long_answer},
    }


def pair_length(data, record) -> int:
    """Tokens of a pair's prompt and its longer answer, from the tokenized pair (nothing refused)."""
    from phi3v import Phi3VProcessor

    processor = Phi3VProcessor.from_pretrained(data["model"], num_crops=1)
    path = os.path.join(data["folder"], "one_pair.json")
    with open(path, "w") as f:
        json.dump([record], f)
    item = preference_dataset(processor, path, data["images"])[0]
    return len(item["prompt_ids"]) + max(map(len, item["completions"]))


def error_line(call) -> str:
    """The recipe's exit on a user error: exit status 2 and one line `finetune_hf_trainer_dpo.py: error: ...`;
    returns what follows `error: `."""
    with pytest.raises(SystemExit) as error:
        call()
    text = str(error.value)
    assert error.value.code == 2
    assert "\n" not in text and text.startswith("finetune_hf_trainer_dpo.py: error: "), text
    return text.removeprefix("finetune_hf_trainer_dpo.py: error: ")


@pytest.fixture
def no_model(monkeypatch):
    """Any model loading fails the test: every check below comes before it. (The script's name as its users see it
    in the messages: sys.argv[0].)"""
    def fail(*args, **kwargs):
        pytest.fail("the model loaded before the check")

    monkeypatch.setattr(sys, "argv", [SCRIPT])
    monkeypatch.setattr(phi3v.training, "load_model", fail)
    monkeypatch.setattr(phi3v.model_setup, "load_model", fail)


@pytest.mark.parametrize("kind, message", [
    ("missing chosen", "missing key 'chosen' (a preference pair has 'prompt', 'chosen' and 'rejected')"),
    ("empty rejected", "empty 'rejected'"),
    ("chosen is rejected", "'chosen' and 'rejected' are the same answer: nothing to prefer"),
    ("tags and images", "2 <image> tags but 1 images"),
    ("missing image", "image file not found: {images}/nowhere.png"),
    ("too long", "the pair is {length} tokens long (prompt and longer answer), more than max_seq_length 400"),
])
def test_each_bad_record_ends_the_recipe_in_one_line(data, tmp_path, no_model, kind, message):
    good = read_json(data["pairs"])[0]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([good, bad_records(good)[kind], good]))
    text = error_line(lambda: recipe.main([
        "--model_id", data["model"], "--data_path", str(path), "--image_folder", data["images"],
        "--output_dir", str(tmp_path / "out"), "--max_seq_length", str(MAX_SEQ_LENGTH), "--deepspeed", "none",
        "--num_crops", "1", "--report_to", "none"]))
    expected = message.format(images=data["images"], length=pair_length(data, bad_records(good)["too long"]))
    assert text.startswith(f"{path}[1]: ") and text.removeprefix(f"{path}[1]: ").startswith(expected), text
    assert not os.path.exists(tmp_path / "out")


def test_a_bad_record_of_the_evaluation_file_ends_the_recipe_in_one_line(data, tmp_path, no_model):
    good = read_json(data["pairs"])[0]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([good, good, bad_records(good)["chosen is rejected"]]))
    text = error_line(lambda: recipe.main([
        "--model_id", data["model"], "--data_path", data["pairs"], "--image_folder", data["images"],
        "--eval_data_path", str(path), "--output_dir", str(tmp_path / "out"), "--deepspeed", "none",
        "--num_crops", "1", "--report_to", "none"]))
    assert text == f"{path}[2]: 'chosen' and 'rejected' are the same answer: nothing to prefer"


@pytest.mark.parametrize("flags, message", [
    (["--loss_type", "kto"], "--loss_type kto: not a DPO loss; one of sigmoid, hinge, ipo, robust, exo_pair, "
                             "nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, sigmoid_norm, sft"),
    (["--loss_type", "sigmoid", "sft", "--rpo_alpha", "0.5"],
     "--rpo_alpha adds the sft term; --loss_type already has it: give one"),
    (["--loss_type", "robust", "--label_smoothing", "0.5"],
     "--label_smoothing must be in [0, 0.5) for the robust loss, got 0.5"),
    (["--loss_type", "robust", "--label_smoothing", "-0.1"],
     "--label_smoothing must be in [0, 0.5) for the robust loss, got -0.1"),
    (["--loss_type", "exo_pair"], "--label_smoothing is the exo_pair loss's epsilon and must be in (0, 1) (the EXO "
                                  "paper recommends 1e-3), got 0.0"),
    (["--beta", "0"], "--beta must be positive, got 0.0"),
    (["--beta", "-0.1"], "--beta must be positive, got -0.1"),
    (["--dpo_loss", "hinge", "--loss_type", "sigmoid"], "--dpo_loss hinge and --loss_type sigmoid differ; give one"),
    (["--loss_type", "sigmoid", "hinge", "--loss_weights", "1"], "--loss_weights has 1 weights for 2 --loss_type"),
    (["--bits", "4"], "--bits 4 trains a quantized model, which needs --lora_enable"),
])
def test_each_bad_flag_ends_the_recipe_in_one_line(data, tmp_path, no_model, flags, message):
    text = error_line(lambda: recipe.main([*data["flags"], "--output_dir", str(tmp_path / "out"), "--deepspeed",
                                           "none", "--report_to", "none", *flags]))
    assert text == message


@pytest.mark.parametrize("flags, loss_types, weights", [
    (["--dpo_loss", "hinge"], ("hinge",), (1.0,)),
    (["--dpo_loss", "ipo", "--loss_type", "ipo"], ("ipo",), (1.0,)),
    (["--rpo_alpha", "0.5"], ("sigmoid", "sft"), (1.0, 0.5)),
    (["--loss_type", "sigmoid", "bco_pair", "--loss_weights", "0.8", "0.2"], ("sigmoid", "bco_pair"), (0.8, 0.2)),
    (["--loss_type", "exo_pair", "--label_smoothing", "1e-3"], ("exo_pair",), (1.0,)),
])
def test_loss_flags_reach_the_trainer_settings(data, tmp_path, flags, loss_types, weights):
    _, task, _ = recipe.parse([*data["flags"], "--output_dir", str(tmp_path), "--deepspeed", "none",
                               "--report_to", "none", *flags])
    settings = task.settings()
    assert (settings.loss_types, settings.loss_weights, settings.beta) == (loss_types, weights, BETA)


# ------------------------------------------------------------------------------------------------ 4. saved folders
def test_full_run_saves_the_official_folder_with_the_trained_weights(ddp, data):
    from phi3v import Phi3VForCausalLM, Phi3VProcessor

    run = ddp["straight"]
    check_official_form(run, PHI35, num_crops=1)
    base_files = {name for name in os.listdir(data["model"])}
    assert base_files <= set(os.listdir(run)), base_files - set(os.listdir(run))
    saved = weights(run / "model.safetensors")
    initial = weights(os.path.join(data["model"], "model.safetensors"))
    assert saved.keys() == initial.keys()  # the policy alone: nothing of the reference copy
    assert max_difference(saved, initial) > 1e-4
    assert max_difference(saved, weights(run / f"checkpoint-{STEPS}" / "model.safetensors")) == 0
    model = Phi3VForCausalLM.from_pretrained(run)
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert Phi3VProcessor.from_pretrained(run).num_crops == 1


@pytest.fixture(scope="module")
def lora(data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("lora") / "run"
    captured = []
    in_process(["--model_id", data["model"], "--data_path", data["pairs"], "--image_folder", data["images"],
                "--output_dir", output_dir, "--deepspeed", "none", "--lora_enable", "--lora_rank", "4",
                "--lora_alpha", "8", "--merge_lora", *FLAGS, "--max_steps", "2", "--save_strategy", "no"], captured)
    return {"dir": output_dir, "trainer": captured[0]}


def test_lora_run_reference_is_the_base_and_its_folders_load(lora, data):
    """LoRA: the reference is the base (adapters disabled), so step 1's loss is exactly log 2 with no second model;
    the adapter folder loads onto the base with load_adapter and <out>/merged is an official full folder; both
    give the same log-probabilities, which are not the base's."""
    from phi3v import Phi3VForCausalLM
    from phi3v.model_setup import load_adapter

    trainer, run = lora["trainer"], lora["dir"]
    assert trainer.ref_model is None and not trainer.reference
    history = trainer.state.log_history
    assert logged(history, "loss")[1] == pytest.approx(math.log(2), abs=1e-7)
    assert logged(history, "rewards/margins")[1] == 0.0 and logged(history, "rewards/margins")[2] != 0.0
    assert os.path.isfile(run / "adapter_model.safetensors") and not os.path.exists(run / "model.safetensors")
    check_official_form(run / "merged", PHI35, num_crops=1)

    adapter = load_adapter(Phi3VForCausalLM.from_pretrained(data["model"]), run)
    trained = {name: value for name, value in trainer.model.state_dict().items() if "lora_B" in name}
    loaded = {name: value for name, value in adapter.state_dict().items() if "lora_B" in name}
    assert trained.keys() == loaded.keys() and trained
    assert all(torch.equal(loaded[name], trained[name]) for name in trained)
    assert max(value.abs().max().item() for value in loaded.values()) > 0  # B starts at zero: it trained

    from phi3v import Phi3VProcessor
    from phi3v.dpo import PreferenceCollator, dataset_log_probs

    processor = Phi3VProcessor.from_pretrained(run / "merged", num_crops=1)
    dataset = preference_dataset(processor, data["pairs"], data["images"])
    collator = PreferenceCollator(processor.pad_token_id)
    merged = dataset_log_probs(Phi3VForCausalLM.from_pretrained(run / "merged"), dataset, collator, 2)
    adapted = dataset_log_probs(adapter, dataset, collator, 2)
    base = dataset_log_probs(adapter, dataset, collator, 2, adapters=False)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-4)
    assert (merged - base).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ 5, 6. evaluation
@pytest.fixture(scope="module")
def initial_log_probs(data):
    return pair_log_probs_of(data["model"], data["pairs"], data["images"])


def test_evaluations_during_training_log_the_dpo_metrics_and_the_score(ddp):
    from finetune_hf_trainer_dpo import score

    run = ddp["straight"]
    history = log_history(run)
    evaluations = [entry for entry in history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]  # once each, not once per rank
    for entry in evaluations:
        keys = {"eval_loss", "eval_exact_match", "eval_anls", "eval_rewards/chosen", "eval_rewards/rejected",
                "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected"}
        assert keys <= entry.keys(), keys - entry.keys()
        written = read_json(run / f"eval_step_{entry['step']}.json")
        assert [p["id"] for p in written["predictions"]] == IDS
        _, exact, others = score(written["predictions"])
        assert entry["eval_exact_match"] == written["exact_match"] == exact
        assert entry["eval_anls"] == written["anls"] == others["anls"]
        assert entry["eval_loss"] == written["loss"] > 0
        assert entry["eval_rewards/margins"] == pytest.approx(
            entry["eval_rewards/chosen"] - entry["eval_rewards/rejected"], abs=2e-6)
        assert entry["eval_rewards/accuracies"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # of 4 pairs, each counted once
    # the last evaluation saw the final model: eval_after's preference numbers are its rewards (no ties left)
    after = read_json(run / "eval_after.json")
    assert after["preference_accuracy"] == evaluations[-1]["eval_rewards/accuracies"]
    assert after["mean_margin"] == pytest.approx(evaluations[-1]["eval_rewards/margins"], abs=2e-6)


def test_eval_before_and_after_hold_the_preference_numbers_and_the_answers(ddp, data, initial_log_probs):
    from finetune_hf_trainer_dpo import score
    from phi3v.dpo import preference_metrics

    run = ddp["straight"]
    pairs = read_json(data["pairs"])
    before, after = read_json(run / "eval_before.json"), read_json(run / "eval_after.json")
    for report in (before, after):
        assert set(report) == {"exact_match", "anls", "preference_accuracy", "mean_margin", "logp_accuracy",
                               "num_pairs", "num_samples", "predictions"}
        assert report["num_pairs"] == report["num_samples"] == NUM_PAIRS
        assert [(p["id"], p["answer"]) for p in report["predictions"]] == [(p["id"], p["chosen"]) for p in pairs]
        _, exact, others = score(report["predictions"])
        assert (report["exact_match"], report["anls"]) == (exact, others["anls"])
    # before training the policy is the reference: every pair a tie, chance exactly
    assert (before["preference_accuracy"], before["mean_margin"]) == (0.5, 0.0)
    chosen_higher = (initial_log_probs[:, 0] > initial_log_probs[:, 1]).double().mean().item()
    assert before["logp_accuracy"] == pytest.approx(chosen_higher, abs=1e-9)
    # after: the saved model against the starting one, as a single process computes it
    final = pair_log_probs_of(run, data["pairs"], data["images"])
    expected = preference_metrics(final, initial_log_probs, BETA)
    assert after["preference_accuracy"] == expected["preference_accuracy"] > 0.5
    assert after["logp_accuracy"] == expected["logp_accuracy"]
    assert after["mean_margin"] == pytest.approx(expected["mean_margin"], abs=2e-6) and after["mean_margin"] > 0


def test_dpo_launcher_trains_lora_with_its_flags(data, tmp_path):
    """scripts/finetune_dpo.sh: the DPO recipe under torchrun with the launcher's flags (LoRA, frozen CLIP, sigmoid at
    beta 0.1); extra flags pass through and win (here: a tiny LoRA rank, one step)."""
    output_dir = tmp_path / "launcher"
    env = dict(subprocess_env(), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MODEL=data["model"], DATA_PATH=data["pairs"],
               IMAGE_FOLDER=data["images"], OUTPUT_DIR=str(output_dir))
    flags = ["--num_crops", "1", "--batch_size", "2", "--batch_size_per_gpu", "2", "--max_steps", "1",
             "--lora_rank", "4", "--lora_alpha", "8", "--logging_steps", "1", "--report_to", "none",
             "--deepspeed", "none", "--dataloader_num_workers", "0", "--save_strategy", "no", "--skip_eval_before"]
    result = subprocess.run(["bash", "scripts/finetune_dpo.sh", *flags], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    config = read_json(output_dir / "run_config.json")
    assert os.path.isfile(output_dir / "adapter_model.safetensors")
    assert "--freeze_vision_tower" in config["command"] and "--lora_rank 4" in config["command"], config["command"]
    assert "'loss': '0.6931" in result.stdout + result.stderr or "'loss': 0.6931" in result.stdout + result.stderr

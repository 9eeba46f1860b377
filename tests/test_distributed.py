"""Two processes on CPU: torchrun x 2 running the hateful memes recipe under DeepSpeed ZeRO-2 (gloo), and plain DDP.

Checks what only a multi-process run exercises: the global batch split into per-GPU batch x GPUs x accumulation,
evaluation sharded across ranks and gathered back in dataset order, one report file written by rank 0, a saved
model that loads, and ZeRO-2 training exactly as DDP does (same losses, same weights). ZeRO-3 partitions the
weights from loading on: it must train, evaluate (before training too) and save exactly as DDP, in the official
layout, and resume from its own checkpoints. Every run also evaluates during training (at its last step, 3): the
metric of all the gathered predictions, logged once; the ZeRO-2 and DDP runs keep and reload the best checkpoint.

DeepSpeed compiles its CPU communication op on first use (about a minute); TORCH_EXTENSIONS_DIR keeps the build
(default ~/.cache/phi3v-torch-extensions) so later runs take seconds.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from phi3v.arguments import DS_CONFIGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "finetune_hf_trainer_hateful_memes.py")
EVAL_SIZE = 500  # the recipe evaluates on train[:500] and trains on train[500:]
NUM_EVAL, NUM_TRAIN = 4, 16
DISTINCT = 12  # distinct memes, repeated to fill the split
# The tiny random model answers nonsense before training and nothing after 3 steps at this learning rate (the end
# token first): neither names "yes" or "no". A metric that credits that fails.
UNTRAINED_ACCURACY = 0.0

# 3 optimizer steps of a global batch of 4 = 2 processes x 1 per GPU x 2 accumulation steps. A large constant
# learning rate makes every step move the weights, so a DDP / ZeRO-2 difference would show in the losses.
COMMON_FLAGS = [
    "--ddp_backend", "gloo",
    "--max_steps", "3", "--num_crops", "1",
    "--batch_size", "4", "--batch_size_per_gpu", "1",
    "--max_train_samples", str(NUM_TRAIN), "--max_eval_samples", str(NUM_EVAL),
    "--eval_batch_size", "2", "--max_new_tokens", "3",
    "--learning_rate", "2e-3", "--warmup_steps", "0",
    # A checkpoint at the last step keeps trainer_state.json (exact logged losses); stdout only has 4 digits.
    "--save_strategy", "steps", "--save_steps", "3", "--logging_steps", "1",
    "--report_to", "none", "--dataloader_num_workers", "0", "--no_tqdm", "--seed", "0",
    "--eval_steps", "3",  # an evaluation during training, at the last step
]
BEST = ["--load_best_model_at_end", "--metric_for_best_model", "accuracy"]  # (checkpoint-3: the final weights)


def subprocess_env():
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    cache = env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/phi3v-torch-extensions"))
    os.makedirs(cache, exist_ok=True)
    return env


def torchrun(output_dir, *flags, timeout=900):
    """Run the recipe on 2 CPU processes; a free rendezvous port (--standalone) lets other test runs coexist."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
               "--output_dir", output_dir, *flags]
    result = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    with open(f"{output_dir}.log", "w") as f:  # beside the run, for a look after a failure
        f.write(result.stdout + result.stderr)
    assert result.returncode == 0, (
        f"{' '.join(command)}\nexit {result.returncode}:\n{(result.stdout + result.stderr)[-6000:]}"
    )
    return result


def deepspeed_unavailable() -> str | None:
    """Why DeepSpeed cannot run here (None when it can): not installed, or its C++ ops cannot be compiled."""
    try:
        import deepspeed  # noqa: F401
    except Exception as error:  # an ImportError, or a broken install failing in its own way
        return f"deepspeed does not import: {error!r}"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts a ninja binary beside python)
        except ImportError:
            return "ninja is missing: DeepSpeed cannot compile its CPU ops"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}): DeepSpeed cannot compile its CPU ops"
    return None


def logged_losses(run_dir, step):
    with open(os.path.join(run_dir, f"checkpoint-{step}", "trainer_state.json")) as f:
        return {entry["step"]: entry["loss"] for entry in json.load(f)["log_history"] if "loss" in entry}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny checkpoint and 500 + 16 synthetic memes; 12 distinct images repeat, so writing them is quick."""
    from phi3v.synthetic import memes_rows, save_hf_dataset
    from phi3v.tiny import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("distributed")
    model_dir = write_tiny_checkpoint(folder / "model", num_crops=1)
    distinct = memes_rows(DISTINCT)
    rows = [distinct[i % len(distinct)] for i in range(EVAL_SIZE + NUM_TRAIN)]
    data_dir = save_hf_dataset(rows, str(folder / "memes"))
    return {
        "folder": folder,
        "model": model_dir,
        "flags": ["--model_name_or_path", model_dir, "--dataset_path", data_dir],
    }


@pytest.fixture(scope="module")
def zero2_run(data):
    """The 2-process ZeRO-2 run; where DeepSpeed cannot run on this machine, DDP instead, saying why."""
    run_dir = str(data["folder"] / "zero2")
    reason = deepspeed_unavailable()
    if reason:
        message = f"DeepSpeed cannot run here ({reason}): the 2-process test runs DDP instead of ZeRO-2"
        warnings.warn(message, stacklevel=2)
        print(f"\n{message}")
        torchrun(run_dir, *data["flags"], "--deepspeed", "none", *COMMON_FLAGS, *BEST)
    else:
        torchrun(run_dir, *data["flags"], "--deepspeed", os.path.join(DS_CONFIGS, "zero2.json"), *COMMON_FLAGS,
                 *BEST)
    return {"dir": run_dir, "deepspeed": reason is None}


@pytest.fixture(scope="module")
def zero3_runs(data):
    """ZeRO-3 (weights partitioned across the 2 ranks from loading on): a straight run saving every step, and a
    run resumed from its step-1 checkpoint in a fresh folder."""
    reason = deepspeed_unavailable()
    if reason:
        pytest.skip(f"DeepSpeed cannot run here ({reason})")
    zero3 = ["--deepspeed", os.path.join(DS_CONFIGS, "zero3.json"), *COMMON_FLAGS, "--save_steps", "1",
             "--save_total_limit", "3"]
    straight, resumed = str(data["folder"] / "zero3"), str(data["folder"] / "zero3-resumed")
    torchrun(straight, *data["flags"], *zero3)
    shutil.copytree(os.path.join(straight, "checkpoint-1"), os.path.join(resumed, "checkpoint-1"))
    torchrun(resumed, *data["flags"], *zero3, "--skip_eval_before", "--resume_from_checkpoint", "auto")
    return {"straight": straight, "resumed": resumed}


@pytest.fixture(scope="module")
def ddp_run(data):
    run_dir = str(data["folder"] / "ddp")
    torchrun(run_dir, *data["flags"], "--deepspeed", "none", "--skip_eval_before", *COMMON_FLAGS, *BEST)
    return run_dir


def test_zero2_really_ran_deepspeed(zero2_run):
    if not zero2_run["deepspeed"]:
        pytest.skip("DeepSpeed unavailable here; the run above was DDP (see the warning)")
    # DeepSpeed checkpoints hold the engine's own state: global_step<N>/ with one optimizer shard per rank.
    shards = glob.glob(os.path.join(zero2_run["dir"], "checkpoint-3", "global_step3", "*optim_states.pt"))
    assert len(shards) == 2


@pytest.mark.parametrize("name", ["eval_before", "eval_after"])
def test_reports_gathered_from_both_ranks(zero2_run, name):
    run_dir = zero2_run["dir"]
    # Rank 0 alone writes the report (through a temporary file): one file, nothing left over.
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, f"{name}*"))) == [f"{name}.json"]
    with open(os.path.join(run_dir, f"{name}.json")) as f:
        report = json.load(f)
    assert report["num_samples"] == NUM_EVAL
    # Each rank answered every other sample; gathered, they are all there once, in dataset order.
    ids = [p["id"] for p in report["predictions"]]
    assert ids == [f"hateful_memes-{i}" for i in range(NUM_EVAL)]
    from phi3v.metrics import gold_choice_accuracy
    from phi3v.synthetic import memes_rows

    assert [p["answer"] for p in report["predictions"]] == [
        row["texts"][0]["assistant"] for row in memes_rows(DISTINCT)[:NUM_EVAL]]
    # the metric of all the gathered predictions, scored once as a single process would
    assert report["accuracy"] == gold_choice_accuracy(report["predictions"]) == UNTRAINED_ACCURACY, report


@pytest.mark.parametrize("which", ["zero2", "ddp", "zero3", "zero3-resumed"])
def test_metric_during_training_gathered_and_logged_once(request, which, ddp_run):
    """The evaluation at step 3: rank 0 writes eval_step_3.json once, with every rank's answers in dataset order;
    the logged eval_accuracy is their score (a single process's) and appears once; the answers are DDP's whatever
    holds the weights (ZeRO-2's engine, ZeRO-3's partitions gathered for generation, also after a resume)."""
    from phi3v.metrics import gold_choice_accuracy

    if which.startswith("zero3"):
        run_dir = request.getfixturevalue("zero3_runs")["resumed" if which.endswith("resumed") else "straight"]
    else:
        run_dir = request.getfixturevalue("zero2_run")["dir"] if which == "zero2" else ddp_run
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "eval_step_*"))) == [
        "eval_step_3.json"]
    with open(os.path.join(run_dir, "eval_step_3.json")) as f:
        report = json.load(f)
    assert report["num_samples"] == NUM_EVAL and report["step"] == 3
    assert [p["id"] for p in report["predictions"]] == [f"hateful_memes-{i}" for i in range(NUM_EVAL)]
    assert report["accuracy"] == gold_choice_accuracy(report["predictions"])
    with open(os.path.join(run_dir, "checkpoint-3", "trainer_state.json")) as f:
        state = json.load(f)
    logged = [e for e in state["log_history"] if "eval_accuracy" in e]
    assert [(e["step"], e["eval_accuracy"], e["eval_loss"]) for e in logged] == [
        (3, report["accuracy"], report["loss"])]
    assert predictions(run_dir, "eval_step_3") == predictions(ddp_run, "eval_step_3")
    if which in ("zero2", "ddp"):  # --load_best_model_at_end: the evaluated checkpoint is the best
        assert (state["best_global_step"], state["best_metric"]) == (3, report["accuracy"])


def test_global_batch_split_over_two_processes(zero2_run):
    # --batch_size 4 on 2 processes with 1 sample per GPU -> 2 accumulation steps.
    args = torch.load(os.path.join(zero2_run["dir"], "training_args.bin"), weights_only=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size) == (1, 2, 2)
    with open(os.path.join(zero2_run["dir"], "checkpoint-3", "trainer_state.json")) as f:
        state = json.load(f)
    assert state["global_step"] == 3
    assert state["epoch"] == pytest.approx(3 * 4 / NUM_TRAIN)  # 3 steps of 4 samples out of 16


@pytest.mark.parametrize("per_gpu, accumulation", [(1, 4), (2, 2), (4, 1)])
def test_accumulation_on_one_process(monkeypatch, tmp_path, per_gpu, accumulation):
    # The 2-process case is the run above; more processes cannot be faked in-process (building
    # TrainingArguments with WORLD_SIZE > 1 sets up a process group and waits for the other ranks).
    from phi3v.arguments import parse_args

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--batch_size", "4", "--batch_size_per_gpu", str(per_gpu), "--output_dir", str(tmp_path),
            "--deepspeed", "none", "--report_to", "none"]
    _, _, training_args = parse_args(argv=argv)
    assert (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps) == (
        per_gpu, accumulation)


def test_saved_model_loads_and_was_trained(zero2_run, data):
    from phi3v import Phi3VForCausalLM, Phi3VProcessor

    trained = Phi3VForCausalLM.from_pretrained(zero2_run["dir"]).state_dict()
    initial = Phi3VForCausalLM.from_pretrained(data["model"]).state_dict()
    assert trained.keys() == initial.keys()
    changed = max((trained[k].float() - initial[k].float()).abs().max().item() for k in trained)
    assert changed > 1e-4  # a full model (every tensor, official names) with the trained weights
    Phi3VProcessor.from_pretrained(zero2_run["dir"])


def test_zero2_trains_as_ddp(zero2_run, ddp_run):
    if not zero2_run["deepspeed"]:
        pytest.skip("DeepSpeed unavailable here (see the warning): nothing to compare DDP with")
    zero2, ddp = logged_losses(zero2_run["dir"], 3), logged_losses(ddp_run, 3)
    print(f"\nlosses per step: ZeRO-2 {zero2}, DDP {ddp}")
    assert sorted(zero2) == sorted(ddp) == [1, 2, 3]
    # Same data, seed and optimizer: only the gradient reduction differs (ZeRO-2's buckets vs DDP's), so the
    # losses agree to float rounding (measured here: identical, or 2e-7 apart by step 3).
    for step in zero2:
        assert zero2[step] == pytest.approx(ddp[step], rel=1e-5, abs=1e-6), step

    from safetensors.torch import load_file

    a = load_file(os.path.join(zero2_run["dir"], "model.safetensors"))
    b = load_file(os.path.join(ddp_run, "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def predictions(run_dir, name):
    with open(os.path.join(run_dir, f"{name}.json")) as f:
        return [p["prediction"] for p in json.load(f)["predictions"]]


def test_zero3_trains_evaluates_and_saves_as_ddp(zero3_runs, zero2_run, ddp_run, data):
    from safetensors.torch import load_file

    run = zero3_runs["straight"]
    zero3, ddp = logged_losses(run, 3), logged_losses(ddp_run, 3)
    print(f"\nlosses per step: ZeRO-3 {zero3}, DDP {ddp}")
    for step in (1, 2, 3):
        assert zero3[step] == pytest.approx(ddp[step], rel=1e-5, abs=1e-6), step
    # Evaluation before training runs on weights gathered from the partitions; after training, through the
    # Trainer's engine. Both answer exactly as the unpartitioned model does.
    assert predictions(run, "eval_before") == predictions(zero2_run["dir"], "eval_before")
    assert predictions(run, "eval_after") == predictions(ddp_run, "eval_after")
    # The saved model is whole (gathered on saving), in the official layout, with DDP's weights.
    saved, initial = load_file(os.path.join(run, "model.safetensors")), load_file(
        os.path.join(data["model"], "model.safetensors"))
    assert saved.keys() == initial.keys()
    reference = load_file(os.path.join(ddp_run, "model.safetensors"))
    assert max((saved[k] - reference[k]).abs().max().item() for k in saved) < 1e-5


def test_zero3_resume_continues_the_same_losses(zero3_runs):
    straight, resumed = logged_losses(zero3_runs["straight"], 3), logged_losses(zero3_runs["resumed"], 3)
    for step in (2, 3):  # trained by the resumed run, from the DeepSpeed checkpoint of step 1
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-6), step
    assert not os.path.exists(os.path.join(zero3_runs["resumed"], "eval_before.json"))


@pytest.mark.parametrize("cores, local_processes, workers", [(128, 8, 4), (16, 1, 4), (16, 8, 2), (2, 1, 2), (4, 8, 1)])
def test_default_dataloader_workers_per_process(monkeypatch, cores, local_processes, workers):
    from phi3v.arguments import default_dataloader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_processes))
    assert default_dataloader_workers() == workers

"""A run that dies costs minutes, not the run: complete checkpoints, resume after SIGKILL (at a random step, and in
the middle of a save), a clean stop on SIGTERM, and non-finite gradients caught before they reach the weights.

The end-to-end tests run the real hateful-memes recipe as a subprocess on a tiny model. The recipe's wiring of
phi3v.checkpoints (resume auto, the callbacks, exiting after SIGTERM) is applied by a small wrapper, WRAPPER below,
the way the recipe does it.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from phi3v.callbacks import NonFiniteCallback
from phi3v.checkpoints import (
    check_output_dir,
    is_complete,
    latest_complete_checkpoint,
    prepare_resume,
    remove_incomplete_checkpoints,
    resolve_resume,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
MAX_STEPS = 8

# The recipe with phi3v.checkpoints wired in (what the task scripts do).
# With PAUSE_AFTER_STEP=N it waits after step N (for a signal from the test) so that the test is deterministic.
WRAPPER = """
import logging
import os
import sys
import time

from transformers import TrainerCallback

sys.path.insert(0, {root!r})
import finetune_hf_trainer_hateful_memes as recipe
from phi3v.callbacks import NonFiniteCallback, SigtermCallback
from phi3v.checkpoints import prepare_resume

sigterm = SigtermCallback()


class Pause(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if str(state.global_step) == os.environ.get("PAUSE_AFTER_STEP"):
            open(os.environ["PAUSE_MARKER"], "w").close()
            deadline = time.time() + 120
            while not sigterm.received and time.time() < deadline:
                time.sleep(0.05)


# A kill in the middle of a save: stop right after checkpoint-<PAUSE_IN_SAVE>'s weights are written (the Trainer then
# writes the optimizer, scheduler, RNG state and, last, trainer_state.json).
from phi3v import Phi3VForCausalLM

save_pretrained = Phi3VForCausalLM.save_pretrained


def save_pretrained_then_pause(self, save_directory, *positional, **options):
    save_pretrained(self, save_directory, *positional, **options)
    if os.path.basename(str(save_directory)) == "checkpoint-" + os.environ.get("PAUSE_IN_SAVE", "none"):
        open(os.environ["PAUSE_MARKER"], "w").close()
        time.sleep(120)


Phi3VForCausalLM.save_pretrained = save_pretrained_then_pause
parse_args, make_trainer, save_outputs = recipe.parse_args, recipe.make_trainer, recipe.save_outputs


def parse_and_resolve(*positional, **defaults):  # the recipe's parse_args(TaskArguments, **SCRIPT_DEFAULTS)
    args, task_args, training_args = parse_args(*positional, **defaults)
    training_args.resume_from_checkpoint = prepare_resume(training_args, args.overwrite_output_dir)
    return args, task_args, training_args


def make_trainer_with_callbacks(*positional, **options):
    return make_trainer(*positional, callbacks=[Pause(), sigterm, NonFiniteCallback()], **options)


def save_unless_stopped(trainer, processor, args):
    if sigterm.stopped:  # no final save nor evaluation: the checkpoint is the result
        logging.getLogger("recipe").warning(sigterm.message)
        sys.exit(0)
    save_outputs(trainer, processor, args)


recipe.parse_args, recipe.make_trainer, recipe.save_outputs = (
    parse_and_resolve,
    make_trainer_with_callbacks,
    save_unless_stopped,
)
recipe.main()
"""


# ------------------------------------------------------------------------------------------------ fake folders
def fake_checkpoint(output_dir, step, state="complete"):
    path = os.path.join(output_dir, f"checkpoint-{step}")
    os.makedirs(path)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"weights")
    text = json.dumps({"global_step": step, "log_history": []})
    if state == "truncated":
        text = text[: len(text) // 2]
    if state != "no_state":
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            f.write(text)
    return path


def test_complete_means_a_readable_trainer_state(tmp_path):
    assert is_complete(fake_checkpoint(tmp_path, 2))
    assert not is_complete(fake_checkpoint(tmp_path, 4, "no_state"))
    assert not is_complete(fake_checkpoint(tmp_path, 6, "truncated"))
    assert not is_complete(tmp_path / "checkpoint-8")


def test_latest_complete_checkpoint_by_step_number(tmp_path):
    assert latest_complete_checkpoint(tmp_path / "missing") is None
    assert latest_complete_checkpoint(tmp_path) is None
    fake_checkpoint(tmp_path, 9)
    newest = fake_checkpoint(tmp_path, 10)  # "10" sorts before "9" as text
    fake_checkpoint(tmp_path, 12, "no_state")
    fake_checkpoint(tmp_path, 14, "truncated")
    (tmp_path / "checkpoint-16").write_text("a file, not a checkpoint")
    assert latest_complete_checkpoint(tmp_path) == newest


def test_resolve_resume(tmp_path, caplog):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume(False, tmp_path) is None
    with caplog.at_level("WARNING"):
        assert resolve_resume("auto", tmp_path) is None
    assert "starting fresh" in caplog.text
    good = fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4, "no_state")
    for value in ("auto", "true", "True", True):
        assert resolve_resume(value, tmp_path) == good
    assert resolve_resume(good, "elsewhere") == good
    with pytest.raises(ValueError, match="checkpoint-4.*trainer_state.json is missing"):
        resolve_resume(os.path.join(tmp_path, "checkpoint-4"), tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_resume(os.path.join(tmp_path, "checkpoint-6"), tmp_path)


def test_check_output_dir(tmp_path):
    check_output_dir(tmp_path / "new", overwrite=False, resuming=False)
    check_output_dir(tmp_path, overwrite=False, resuming=False)  # exists but empty
    (tmp_path / "eval_before.json").write_text("{}")
    with pytest.raises(ValueError, match="--resume_from_checkpoint auto.*--overwrite_output_dir"):
        check_output_dir(tmp_path, overwrite=False, resuming=False)
    check_output_dir(tmp_path, overwrite=True, resuming=False)
    check_output_dir(tmp_path, overwrite=False, resuming=True)


def test_prepare_resume(tmp_path):
    def training_args(resume):
        return TrainingArguments(output_dir=str(tmp_path), resume_from_checkpoint=resume, report_to="none",
                                 use_cpu=True)

    assert prepare_resume(training_args(None), overwrite_output_dir=False) is None  # empty folder
    good = fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4, "no_state")
    with pytest.raises(ValueError, match="is not empty"):
        prepare_resume(training_args(None), overwrite_output_dir=False)
    assert prepare_resume(training_args("auto"), overwrite_output_dir=True) == good  # resuming wins
    assert os.listdir(tmp_path) == ["checkpoint-2"]  # the incomplete one is gone
    (tmp_path / "eval_before.json").write_text("{}")
    assert prepare_resume(training_args(None), overwrite_output_dir=True) is None
    assert os.listdir(tmp_path) == ["eval_before.json"]  # a later `auto` cannot pick the old run's checkpoint


def test_remove_incomplete_checkpoints(tmp_path):
    keep = [fake_checkpoint(tmp_path, 2), fake_checkpoint(tmp_path, 4)]
    drop = [fake_checkpoint(tmp_path, 6, "no_state"), fake_checkpoint(tmp_path, 8, "truncated")]
    (tmp_path / "eval_before.json").write_text("{}")
    assert sorted(remove_incomplete_checkpoints(tmp_path)) == sorted(drop)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4", "eval_before.json"]
    assert all(is_complete(path) for path in keep)


# ------------------------------------------------------------------------------------------------ non-finite
def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))


def call_pre_optimizer_step(callback, model, global_step=6):
    state, control = TrainerState(global_step=global_step), TrainerControl()
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    callback.on_train_begin(args, state, control)
    callback.on_step_begin(args, state, control)
    callback.remember_batch_ids(["memes-3", "memes-9"])
    return callback.on_pre_optimizer_step(args, state, control, model=model)


def test_nonfinite_gradients_raise_with_step_and_samples():
    model = small_model()
    model(torch.ones(2, 3)).sum().backward()
    call_pre_optimizer_step(NonFiniteCallback(), model)  # finite: nothing happens
    model[1].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"at step 7 .*1\.weight.*memes-3, memes-9"):
        call_pre_optimizer_step(NonFiniteCallback(), model)


def test_nonfinite_gradients_skipped_and_counted():
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    callback = NonFiniteCallback(skip=True)
    model(torch.ones(2, 3)).sum().backward()
    model[0].bias.grad[1] = float("inf")
    call_pre_optimizer_step(callback, model)
    assert all(p.grad is None for p in model.parameters())
    optimizer.step()  # no gradients: no update at all (not even weight decay or momentum)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert callback.skipped_steps == 1

    logs, state = {"loss": 1.0}, TrainerState(global_step=7, log_history=[{"loss": 1.0, "step": 7}])
    callback.on_log(None, state, TrainerControl(), logs=logs)
    assert logs["nonfinite_steps"] == 1 and state.log_history[-1]["nonfinite_steps"] == 1

    callback.max_consecutive_skips = 1
    model(torch.ones(2, 3)).sum().backward()
    model[0].bias.grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match="2 steps in a row"):
        call_pre_optimizer_step(callback, model)


def test_nonfinite_callback_in_a_trainer(tmp_path):
    """The Trainer calls the hook before its optimizer step: a NaN sample leaves the weights as they were."""
    from transformers import Trainer

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 1)

        def forward(self, x, y):
            return {"loss": ((self.linear(x).squeeze(-1) - y) ** 2).mean()}

    data = [{"x": torch.tensor([1.0, 2.0]), "y": torch.tensor(float("nan"))}] * 2
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1, use_cpu=True,
                             report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True)
    model = Regression()
    before = model.linear.weight.detach().clone()
    callback = NonFiniteCallback(skip=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert callback.skipped_steps == 2
    assert torch.equal(model.linear.weight, before)
    assert [entry.get("nonfinite_steps") for entry in trainer.state.log_history if "loss" in entry] == [1, 2]

    with pytest.raises(FloatingPointError, match="at step 1"):
        Trainer(model=Regression(), args=args, train_dataset=data, callbacks=[NonFiniteCallback()]).train()


# ------------------------------------------------------------------------------------------------ real runs
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, synthetic memes (500 eval rows + 20 train rows sharing 4 images) and the wrapper script."""
    from phi3v.synthetic import memes_rows, save_hf_dataset
    from phi3v.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("reliability")
    model = write_tiny_checkpoint(os.path.join(root, "model"), num_crops=1)
    images = memes_rows(4)
    data = save_hf_dataset([images[i % 4] for i in range(520)], os.path.join(root, "memes"))
    wrapper = root / "recipe_with_checkpoints.py"
    wrapper.write_text(WRAPPER.format(root=ROOT))
    return {"root": root, "model": model, "data": data, "wrapper": str(wrapper)}


def start(setup, output_dir, *extra, pause_after_step=None, pause_in_save=None):
    command = [
        sys.executable, setup["wrapper"], "--model_name_or_path", setup["model"], "--dataset_path", setup["data"],
        "--output_dir", str(output_dir), "--max_steps", str(MAX_STEPS), "--save_strategy", "steps",
        "--save_steps", "2", "--batch_size", "1", "--batch_size_per_gpu", "1", "--learning_rate", "1e-2",
        "--warmup_steps", "0", "--seed", "0", "--max_eval_samples", "2", "--eval_batch_size", "2",
        "--max_new_tokens", "1", "--skip_eval_before", "--num_crops", "1", "--dataloader_num_workers", "0",
        "--report_to", "none", "--no-tqdm", "--deepspeed", "none", "--logging_steps", "1", *extra,
    ]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(PAUSE_MARKER=f"{output_dir}.paused")
    if pause_after_step is not None:
        env.update(PAUSE_AFTER_STEP=str(pause_after_step))
    if pause_in_save is not None:
        env.update(PAUSE_IN_SAVE=str(pause_in_save))
    log = open(f"{output_dir}.log", "w")  # a file, not a pipe: nobody has to read it while the run goes on
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process, output_dir):
    try:
        returncode = process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        returncode = "timeout"
    with open(f"{output_dir}.log") as f:
        return returncode, f.read()


def wait_for(condition, process, output_dir, what):
    deadline = time.time() + TIMEOUT_S
    while not condition():
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            _, log = finish(process, output_dir)
            raise AssertionError(f"the run ended before {what}:\n{log[-4000:]}")
        time.sleep(0.05)


def step_logs(output_dir, step=MAX_STEPS):
    with open(os.path.join(output_dir, f"checkpoint-{step}", "trainer_state.json")) as f:
        return {entry["step"]: entry for entry in json.load(f)["log_history"] if "loss" in entry}


@pytest.fixture(scope="module")
def reference(setup):
    """Per-step logs of an uninterrupted run."""
    output_dir = setup["root"] / "uninterrupted"
    returncode, log = finish(start(setup, output_dir), output_dir)
    assert returncode == 0, log[-4000:]
    return step_logs(output_dir)


def kill_when_paused(process, output_dir, what):
    marker = f"{output_dir}.paused"
    wait_for(lambda: os.path.exists(marker), process, output_dir, what)
    process.send_signal(signal.SIGKILL)
    process.wait()
    os.remove(marker)


def test_resume_auto_after_sigkill_at_a_random_step_and_during_a_save(setup, reference):
    output_dir = setup["root"] / "killed"
    kill_step = random.randint(2, MAX_STEPS - 1)  # a different step every run; any must resume the same
    print(f"\nSIGKILL after step {kill_step}")
    kept = os.path.join(output_dir, f"checkpoint-{kill_step - kill_step % 2}")  # --save_steps 2
    kill_when_paused(start(setup, output_dir, pause_after_step=kill_step), output_dir, f"step {kill_step}")
    assert latest_complete_checkpoint(output_dir) == kept

    # Resumed, then killed again while writing the next checkpoint: its weights are on disk, the rest is not.
    next_save = kill_step - kill_step % 2 + 2
    half_saved = os.path.join(output_dir, f"checkpoint-{next_save}")
    process = start(setup, output_dir, "--resume_from_checkpoint", "auto", pause_in_save=next_save)
    kill_when_paused(process, output_dir, f"the save of {half_saved}")
    assert os.path.isfile(os.path.join(half_saved, "model.safetensors"))
    assert not os.path.exists(os.path.join(half_saved, "trainer_state.json"))
    assert latest_complete_checkpoint(output_dir) == kept

    returncode, log = finish(start(setup, output_dir, "--resume_from_checkpoint", "auto"), output_dir)
    assert returncode == 0, log[-4000:]
    assert f"removing incomplete checkpoint {half_saved}" in log
    assert f"resuming from {kept}" in log

    resumed = step_logs(output_dir)
    assert sorted(resumed) == list(range(1, MAX_STEPS + 1))
    for k in range(kill_step - kill_step % 2 + 1, MAX_STEPS + 1):
        assert resumed[k]["loss"] == pytest.approx(reference[k]["loss"], abs=1e-6), (kill_step, k)
        assert resumed[k]["grad_norm"] == pytest.approx(reference[k]["grad_norm"], abs=1e-6), (kill_step, k)
    assert os.path.isfile(os.path.join(output_dir, "eval_after.json"))


def test_sigterm_saves_and_stops_cleanly(setup):
    output_dir = setup["root"] / "preempted"
    process = start(setup, output_dir, "--save_strategy", "no", pause_after_step=2)
    wait_for(lambda: os.path.exists(f"{output_dir}.paused"), process, output_dir, "step 2")
    process.send_signal(signal.SIGTERM)  # in step 3
    returncode, log = finish(process, output_dir)
    assert returncode == 0, log[-4000:]
    # Step 3 ends, is saved (although --save_strategy no) and the run stops: no final save nor evaluation.
    assert os.listdir(output_dir) == ["checkpoint-3"] and is_complete(os.path.join(output_dir, "checkpoint-3"))
    assert "stopped by SIGTERM at step 3; resume with --resume_from_checkpoint auto" in log

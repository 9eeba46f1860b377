"""Checkpoints a run can trust, resuming with `--resume_from_checkpoint auto`, SIGTERM and non-finite gradients.

When is a checkpoint complete? transformers' `Trainer._save_checkpoint` (5.24; tests/test_compat.py checks the
order) writes the model (`save_model`), the optimizer and scheduler, the grad scaler, the RNG state, then
`trainer_state.json`, and only after that rotates old checkpoints (`rotate_checkpoints`, save_total_limit). So a
checkpoint folder whose `trainer_state.json` exists and parses holds everything, and a run killed during a save
leaves a folder without it (or with a truncated one: the file is not written atomically). Rotation runs after the
new checkpoint is complete, so it never removes the last complete one (a kill during rotation can only leave a
half-deleted *older* folder, which `auto` never picks). Rotation counts every `checkpoint-*` folder though, so
incomplete leftovers of an earlier crash are removed before a run starts (`remove_incomplete_checkpoints`).
"""

import json
import logging
import os
import re
import shutil
import signal

import torch
from transformers import TrainerCallback

from phi3v.errors import InputError

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(output_dir) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-N folder in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def missing_part(checkpoint_dir) -> str | None:
    """Why checkpoint_dir cannot be resumed from, or None if it is complete."""
    if not os.path.isdir(checkpoint_dir):
        return "the folder does not exist"
    state_path = os.path.join(checkpoint_dir, TRAINER_STATE)
    if not os.path.isfile(state_path):
        return f"{TRAINER_STATE} is missing (the run stopped while saving it)"
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{TRAINER_STATE} is unreadable ({error}); the run stopped while writing it"
    if not isinstance(state, dict) or "global_step" not in state:
        return f"{TRAINER_STATE} has no global_step"
    return None


def is_complete(checkpoint_dir) -> bool:
    return missing_part(checkpoint_dir) is None


def latest_complete_checkpoint(output_dir) -> str | None:
    """The complete checkpoint with the highest step number in output_dir, or None."""
    for _, path in reversed(_checkpoints(output_dir)):
        if is_complete(path):
            return path
    return None


def resolve_resume(resume_from_checkpoint, output_dir) -> str | None:
    """The checkpoint folder to resume from, for a --resume_from_checkpoint value.

    None / False / "" -> None (a new run); "auto" / "true" / True -> the newest complete checkpoint in output_dir,
    or None when there is none yet (a new run); a path -> that path, which must be a complete checkpoint.
    """
    if resume_from_checkpoint in (None, False, ""):
        return None
    if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in ("auto", "true"):
        latest = latest_complete_checkpoint(output_dir)
        if latest is None:
            logger.warning("no complete checkpoint in %s: starting fresh", output_dir)
        else:
            logger.warning("resuming from %s", latest)
        return latest
    path = os.fspath(resume_from_checkpoint)
    problem = missing_part(path)
    if problem is not None:
        raise ValueError(
            f"cannot resume from {path}: {problem}. "
            "Use --resume_from_checkpoint auto to take the newest complete checkpoint of --output_dir."
        )
    return path


def check_output_dir(output_dir, overwrite: bool, resuming: bool) -> None:
    """Refuse a new run into a non-empty output_dir: it would mix with (and rotate away) another run's files."""
    if overwrite or resuming or not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return
    raise InputError(
        f"--output_dir {output_dir} is not empty. To continue the run saved there, pass "
        "--resume_from_checkpoint auto; to start over and replace it, pass --overwrite_output_dir."
    )


def remove_incomplete_checkpoints(output_dir) -> list[str]:
    """Delete the incomplete checkpoint-N folders a crash left behind; returns their paths. Main process only."""
    removed = []
    for _, path in _checkpoints(output_dir):
        problem = missing_part(path)
        if problem is not None:
            logger.warning("removing incomplete checkpoint %s: %s", path, problem)
            shutil.rmtree(path)
            removed.append(path)
    return removed


def prepare_resume(training_args, overwrite_output_dir: bool) -> str | None:
    """Everything a recipe does about earlier runs before training; returns the checkpoint to resume from.

    Checks the output folder, removes incomplete checkpoints (all of an earlier run's checkpoints with
    --overwrite_output_dir, so that a later `auto` cannot pick one of them) on the main process before the others
    look, and resolves --resume_from_checkpoint (auto / true / a path).
    """
    output_dir = training_args.output_dir
    requested = training_args.resume_from_checkpoint
    resuming = requested not in (None, False, "")
    check_output_dir(output_dir, overwrite_output_dir, resuming)
    with training_args.main_process_first(desc="checking checkpoints"):
        if training_args.should_save:
            if overwrite_output_dir and not resuming:
                for _, path in _checkpoints(output_dir):
                    logger.warning("--overwrite_output_dir: removing the earlier run's %s", path)
                    shutil.rmtree(path)
            remove_incomplete_checkpoints(output_dir)
        return resolve_resume(requested, output_dir)


def _any_process(flag: bool, device) -> bool:
    """True when flag is true on any process: every rank must take the same decision at the same step."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


class SigtermCallback(TrainerCallback):
    """On SIGTERM (a scheduler's notice before preemption), save a checkpoint at the end of the step and stop.

    The signal handler only sets a flag: saving from inside a handler could interrupt a half-done step. After
    `trainer.train()` returns, `stopped` tells the recipe to exit without its final evaluation and save.
    """

    def __init__(self):
        self.received = False
        self.stopped = False
        self.step = None
        self._previous_handler = None

    def _handle(self, signum, frame):
        self.received = True
        logger.warning("SIGTERM received: saving a checkpoint at the end of this step, then stopping")

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous_handler = signal.signal(signal.SIGTERM, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if _any_process(self.received, args.device):
            control.should_save = True
            control.should_training_stop = True
            self.stopped, self.step = True, state.global_step
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # After training a SIGTERM should end the process as usual.
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    @property
    def message(self) -> str:
        return f"stopped by SIGTERM at step {self.step}; resume with --resume_from_checkpoint auto"


class NonFiniteCallback(TrainerCallback):
    """Stop (or skip the step) when the gradients are not finite, before the optimizer spreads NaNs into the weights.

    Runs in `on_pre_optimizer_step`, after gradient clipping: a NaN or inf gradient makes the clipped gradients
    non-finite too. Default: raise FloatingPointError naming the step, the first parameters concerned and, when the
    trainer passes them (`remember_batch_ids`), the samples of the batch. With skip=True the step's gradients are
    dropped (set to None, so the optimizer leaves those weights and its moments alone), the count goes into the
    logs as `nonfinite_steps`, and more than `max_consecutive_skips` skipped steps in a row raise anyway (a run
    that only skips is not training).

    Not active with --fp16 (the loss scaler already skips overflowing steps, and needs their gradients) nor under
    DeepSpeed (ZeRO keeps gradients off `param.grad`).
    """

    def __init__(self, skip: bool = False, max_consecutive_skips: int = 10):
        self.skip = skip
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self.consecutive = 0
        self.current_ids: list = []
        self._disabled_reason = None

    def remember_batch_ids(self, ids) -> None:
        """Sample ids of a micro-batch of the current step (called by the trainer's compute_loss)."""
        self.current_ids.extend(ids)

    def on_train_begin(self, args, state, control, **kwargs):
        if args.fp16:
            self._disabled_reason = "--fp16: the loss scaler skips non-finite steps itself"
        elif args.deepspeed:
            self._disabled_reason = "DeepSpeed keeps gradients where this check cannot see them"
        if self._disabled_reason:
            logger.info("non-finite gradient check off (%s)", self._disabled_reason)

    def on_step_begin(self, args, state, control, **kwargs):
        self.current_ids = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._disabled_reason or model is None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            self.consecutive = 0
            return
        step = state.global_step + 1  # the step being taken; global_step counts the finished ones
        description = self._describe(model, step)
        if not self.skip:
            raise FloatingPointError(
                f"{description}. Lower the learning rate, check those samples, or skip such steps "
                "(--skip_nonfinite_steps)."
            )
        self.consecutive += 1
        if self.consecutive > self.max_consecutive_skips:
            raise FloatingPointError(f"{description}, {self.consecutive} steps in a row: training has diverged")
        for parameter in model.parameters():
            parameter.grad = None
        self.skipped_steps += 1
        logger.warning("%s: step skipped (%d so far)", description, self.skipped_steps)

    def _describe(self, model, step) -> str:
        names = [name for name, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
        text = f"non-finite gradients at step {step} in {len(names)} parameter(s) ({', '.join(names[:3])}"
        text += ", ...)" if len(names) > 3 else ")"
        if self.current_ids:
            text += f"; samples of the batch: {', '.join(map(str, self.current_ids))}"
        return text

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.skip or self._disabled_reason or logs is None:
            return
        logs["nonfinite_steps"] = self.skipped_steps
        # The Trainer stored a copy of these logs in log_history (trainer_state.json) before calling us.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["nonfinite_steps"] = self.skipped_steps

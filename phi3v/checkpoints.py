"""Checkpoints a run can trust and resuming with `--resume_from_checkpoint auto` (the SIGTERM callback, which saves
one and stops, is in phi3v.callbacks).

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

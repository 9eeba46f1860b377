"""The Trainer callbacks every recipe installs, and the one way they add numbers to a log.

    SigtermCallback          SIGTERM: save a checkpoint at the end of the step, then stop (resume with `auto`)
    NonFiniteCallback        NaN / inf gradients: stop naming the step and samples, or skip the step
    ThroughputCallback       images/s, tokens/s, steps/s and peak memory in every training log
    LearningRateLogCallback  learning_rate_<part> in every training log (the custom recipe's lr groups)

Trainer.log appends a copy of a log to state.log_history (trainer_state.json, the end-of-run plots) before it hands
the log to the callbacks: `add_to_log` puts a callback's numbers in both.
"""

import logging
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def add_to_log(state, logs: dict, values: dict) -> None:
    """Add `values` to the log being handed to the callbacks (so the reporters after this callback see them) and
    to its copy that Trainer.log already appended to state.log_history."""
    logs.update(values)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(values)


# ------------------------------------------------------------------------------------------------ SIGTERM, NaN
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

    def on_save(self, args, state, control, **kwargs):
        # The checkpoint (its trainer_state.json names the best checkpoint so far) is written. The Trainer would now
        # end the run as a finished one: reload the best checkpoint (--load_best_model_at_end) and, with
        # --save_total_limit 1, delete every other checkpoint, this one among them. Neither is wanted when the run
        # is to be resumed: forget the best checkpoint for the rest of this process.
        if self.stopped:
            state.best_model_checkpoint = None

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
        add_to_log(state, logs, {"nonfinite_steps": self.skipped_steps})


# ------------------------------------------------------------------------------------------------ throughput
def peak_memory_gb() -> float:
    """Peak memory of this process in GiB: allocated GPU memory on a GPU, else the maximum resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


class ThroughputCallback(TrainerCallback):
    """Adds images/s, tokens/s, steps/s and peak memory to the training logs (and so to TensorBoard, log_history).

    Images and tokens are counted where batches enter the model: a forward pre-hook (registered at train begin)
    reads `image_sizes` (one row per image or video frame) and `attention_mask` (real tokens, padding excluded) of
    every training-mode forward. Counting there, not in the collator, stays right with DataLoader worker processes,
    gradient accumulation and any data pipeline. Evaluation (generation runs the model in eval mode) is not counted.

    Each training log gets the rates over the wall time since the previous log (`images_per_second`,
    `tokens_per_second`, `steps_per_second`) and `peak_memory_gb`; the end-of-training summary gets whole-run
    averages (`train_images_per_second`, `train_tokens_per_second`). The time of evaluations during training
    (their `eval_runtime`) is left out of both: the rates are training's. Counts are summed over all ranks. Logs
    only reach the callbacks after this one, so install it first (see `install_first`) for TensorBoard to see them.
    """

    def __init__(self):
        self._hook = None
        self._start = None  # set at train begin
        self._window = [0, 0]  # images, tokens since the last log (tokens may be a device tensor: no sync per step)
        self._total = [0, 0]
        self._eval_time = [0.0, 0.0]  # seconds spent evaluating since the last log, and in the whole run

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._hook is not None:
            self._hook.remove()
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        self._window, self._total, self._eval_time = [0, 0], [0, 0], [0.0, 0.0]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # the training peak, not the evaluation's before it
        self._start = self._last_time = time.perf_counter()
        self._start_step = self._last_step = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _count(self, module, args, kwargs):
        if not module.training:
            return
        image_sizes, mask = kwargs.get("image_sizes"), kwargs.get("attention_mask")
        images = 0 if image_sizes is None else image_sizes.shape[0]
        if mask is not None:
            tokens = mask.sum()
        else:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            tokens = 0 if input_ids is None else input_ids.numel()
        for counts in (self._window, self._total):
            counts[0] += images
            counts[1] += tokens

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        runtime = float((metrics or {}).get("eval_runtime", 0.0))
        self._eval_time = [self._eval_time[0] + runtime, self._eval_time[1] + runtime]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self._start is None:
            return
        now = time.perf_counter()
        if "loss" in logs:  # a training log: rates since the previous one
            images, tokens = _sum_over_ranks(self._window, args.device)
            elapsed, steps = now - self._last_time - self._eval_time[0], state.global_step - self._last_step
            self._window, self._last_time, self._last_step = [0, 0], now, state.global_step
            self._eval_time[0] = 0.0
            prefix = ""
        elif "train_runtime" in logs:  # the end-of-training summary: whole-run averages
            images, tokens = _sum_over_ranks(self._total, args.device)
            elapsed, steps = now - self._start - self._eval_time[1], state.global_step - self._start_step
            prefix = "train_"
        else:  # evaluation logs
            return
        new = {
            f"{prefix}images_per_second": round(images / max(elapsed, 1e-9), 3),
            f"{prefix}tokens_per_second": round(tokens / max(elapsed, 1e-9), 3),
            "peak_memory_gb": round(peak_memory_gb(), 3),
        }
        if not prefix:  # the summary already has train_steps_per_second
            new["steps_per_second"] = round(steps / max(elapsed, 1e-9), 4)
        add_to_log(state, logs, new)

    @staticmethod
    def install_first(trainer) -> "ThroughputCallback":
        """Add a ThroughputCallback to `trainer` ahead of its reporting callbacks (TensorBoard, W&B, ...).

        Trainer passes the same `logs` dict to every callback in order, so only those after this one see the
        numbers it adds.
        """
        callback = trainer.pop_callback(ThroughputCallback) or ThroughputCallback()
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback


def _sum_over_ranks(counts, device) -> tuple[int, int]:
    """(images, tokens) summed over every rank (Trainer logs on all ranks, so the collective is matched)."""
    values = torch.tensor([float(c) for c in counts], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return int(values[0]), int(values[1])


# ------------------------------------------------------------------------------------------------ learning rates
def group_learning_rates(optimizer) -> dict[str, float]:
    """{"learning_rate_<group name>": lr} for each named group (a no-decay twin has its part's lr: left out)."""
    return {
        f"learning_rate_{group['name']}": float(group["lr"])
        for group in optimizer.param_groups
        if group.get("name") and not group["name"].endswith("_no_decay")
    }


class LearningRateLogCallback(TrainerCallback):
    """Adds `learning_rate_<group>` to every training log, so each part of the model has its own lr curve.

    The values are the lrs of the last optimizer step, read before the scheduler moves on, which is what the
    Trainer logs as "learning_rate". The Trainer appends a log to state.log_history before the callbacks run, so
    they are added there too; reporters (TensorBoard, W&B) that run after this callback see them as well: put it
    first, see `add_learning_rate_logging`.
    """

    def __init__(self):
        self.last_step_rates = {}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self.last_step_rates = group_learning_rates(optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "learning_rate" not in logs or not self.last_step_rates:  # only training logs have an lr
            return
        add_to_log(state, logs, self.last_step_rates)


def add_learning_rate_logging(trainer) -> None:
    """Register LearningRateLogCallback ahead of the reporting callbacks, which then log the group lrs too."""
    trainer.callback_handler.callbacks.insert(0, LearningRateLogCallback())

"""What a run leaves beside its model besides the weights: throughput in the logs, run_config.json, and plots.

    ThroughputCallback      images/s, tokens/s, steps/s and peak memory in every training log
    save_run_config         run_config.json: every argument, library versions, the command line
    write_end_of_run_plots  training_curves.png, eval_comparison.png, confusion_matrix.png

Plots use matplotlib's object API (Figure + Agg canvas), never pyplot, so they need no display and leave no global
state behind.
"""

import dataclasses
import json
import os
import platform
import resource
import shlex
import sys
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from phi3v.metrics import parse_choice

OTHER = "other"  # the confusion-matrix column of answers that match no class


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
    averages (`train_images_per_second`, `train_tokens_per_second`). Counts are summed over all ranks. Logs only
    reach the callbacks after this one, so install it first (see `install_first`) for TensorBoard to see them.
    """

    def __init__(self):
        self._hook = None
        self._start = None  # set at train begin
        self._window = [0, 0]  # images, tokens since the last log (tokens may be a device tensor: no sync per step)
        self._total = [0, 0]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._hook is not None:
            self._hook.remove()
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        self._window, self._total = [0, 0], [0, 0]
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

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self._start is None:
            return
        now = time.perf_counter()
        if "loss" in logs:  # a training log: rates since the previous one
            images, tokens = _sum_over_ranks(self._window, args.device)
            elapsed, steps = now - self._last_time, state.global_step - self._last_step
            self._window, self._last_time, self._last_step = [0, 0], now, state.global_step
            prefix = ""
        elif "train_runtime" in logs:  # the end-of-training summary: whole-run averages
            images, tokens = _sum_over_ranks(self._total, args.device)
            elapsed, steps = now - self._start, state.global_step - self._start_step
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
        logs.update(new)
        # Trainer.log appended a copy of `logs` to log_history before calling the callbacks: complete it too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(new)

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


# ------------------------------------------------------------------------------------------------ run_config.json
def save_run_config(output_dir, recipe_args, task_args, training_args) -> str:
    """Write run_config.json: the three argument sets as dicts, library versions and the command line."""
    config = {
        "command": shlex.join([sys.executable] + sys.argv),
        "versions": _versions(),
        "recipe_args": _as_dict(recipe_args),
        "task_args": _as_dict(task_args),
        "training_args": _as_dict(training_args),
    }
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "run_config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, default=str)  # default=str: enums, paths, dtypes
        f.write("\n")
    os.replace(tmp, path)
    return path


def _as_dict(args):
    if args is None:
        return None
    if hasattr(args, "to_dict"):  # TrainingArguments: enums as values, tokens hidden
        return args.to_dict()
    if dataclasses.is_dataclass(args):
        return dataclasses.asdict(args)
    if isinstance(args, dict):
        return dict(args)
    return dict(vars(args))  # an argparse Namespace


def _versions() -> dict:
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        versions["peft"] = None
    versions["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    return versions


# ------------------------------------------------------------------------------------------------ plots
def _figure(ncols=1, width=6.0, height=4.0):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * ncols, height), layout="constrained")
    return figure, figure.subplots(1, ncols, squeeze=False)[0]


def _series(log_history, key) -> tuple[list, list]:
    entries = [e for e in log_history if key in e and "step" in e]
    return [e["step"] for e in entries], [float(e[key]) for e in entries]


def plot_training_curves(log_history, path) -> dict:
    """training_curves.png: loss, learning rate and grad norm against the optimizer step.

    log_history: Trainer's `state.log_history`. The learning rate is one curve per optimizer parameter group when
    the logs carry `learning_rate_<group>` keys, else the single `learning_rate`. Evaluation loss, when logged, is
    drawn on the loss panel. Returns what was plotted, {name: (steps, values)}; raises ValueError when the logs
    hold no training step.
    """
    train_logs = [e for e in log_history if "loss" in e]  # per-step training logs (not eval, not the summary)
    if not train_logs:
        raise ValueError("no training-step logs to plot (is logging_steps larger than the number of steps?)")
    lr_keys = sorted({k for e in train_logs for k in e if k.startswith("learning_rate_")}) or ["learning_rate"]
    panels = {
        "loss": ["loss", "eval_loss"],
        "learning rate": lr_keys,
        "gradient norm": ["grad_norm"],
    }
    series = {}
    for keys in panels.values():
        for key in keys:
            steps, values = _series(log_history if key == "eval_loss" else train_logs, key)
            if steps:
                series[key] = (steps, values)
    panels = {title: [k for k in keys if k in series] for title, keys in panels.items()}
    panels = {title: keys for title, keys in panels.items() if keys}

    figure, axes = _figure(ncols=len(panels), width=5.0)
    for ax, (title, keys) in zip(axes, panels.items()):
        for key in keys:
            steps, values = series[key]
            label = key.removeprefix("learning_rate_") if key.startswith("learning_rate_") else key
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label)
        ax.set_title(title)
        ax.xaxis.get_major_locator().set_params(integer=True)  # steps, not 12.5
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(keys) > 1 or keys[0].startswith("learning_rate_"):  # name the curves (or the one param group)
            ax.legend()
    figure.suptitle("Training curves")
    figure.savefig(path, dpi=120)
    return series


def plot_eval_comparison(before, after, metric_name, path) -> dict:
    """eval_comparison.png: the metric before and after fine-tuning as two bars.

    before / after: evaluation reports ({metric_name: value, ...}, as phi3v.evaluation.write_report returns);
    `before` may be None (evaluation before training skipped). Returns {"before": value, "after": value}.
    """
    values = {name: float(report[metric_name]) for name, report in (("before", before), ("after", after))
              if report is not None}
    if not values:
        raise ValueError("no evaluation report to plot")
    figure, (ax,) = _figure(width=4.5)
    bars = ax.bar(list(values), list(values.values()), color=["#9aa5b1", "#2b7bba"][-len(values):], width=0.6)
    ax.bar_label(bars, fmt="%.3f", padding=3)
    ax.set_ylim(0, max(1.0, max(values.values())) * 1.12)  # room for the labels; most metrics are in [0, 1]
    ax.set_ylabel(metric_name)
    ax.set_title(f"{metric_name} before and after fine-tuning")
    figure.savefig(path, dpi=120)
    return values


def confusion_matrix(predictions, classes) -> list[list[int]]:
    """Counts [gold class][predicted class or "other"]: rows follow `classes`, the last column is "other".

    predictions: [{"prediction", "answer"}] as phi3v.evaluation.generate_answers returns. Both sides go through
    phi3v.metrics.parse_choice, the parser that accuracy uses; a gold answer that is none of the classes is an error.
    """
    columns = {c: j for j, c in enumerate(classes)}
    matrix = [[0] * (len(classes) + 1) for _ in classes]
    for item in predictions:
        gold = parse_choice(item["answer"], classes)
        if gold is None:
            raise ValueError(f"gold answer {item['answer']!r} is none of the classes {list(classes)}")
        predicted = parse_choice(item["prediction"], classes)
        matrix[columns[gold]][columns[predicted] if predicted is not None else len(classes)] += 1
    return matrix


def plot_confusion_matrix(predictions, classes, path) -> list[list[int]]:
    """confusion_matrix.png for a classification task (see `confusion_matrix`); returns the matrix."""
    classes = list(classes)
    matrix = confusion_matrix(predictions, classes)
    size = 1.2 + 0.6 * (len(classes) + 1)
    figure, (ax,) = _figure(width=size + 1.5, height=size)
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    figure.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(len(classes) + 1), classes + [OTHER], rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"Confusion matrix ({len(predictions)} samples)")
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    figure.savefig(path, dpi=120)
    return matrix


def write_end_of_run_plots(
    output_dir, trainer_log_history, eval_before, eval_after, metric_name, classes=None
) -> list[str]:
    """Write every plot that the run has data for into output_dir; return the paths written.

    eval_before / eval_after: the evaluation reports (either may be None); classes: the class names of a
    classification task, for the confusion matrix of eval_after's predictions.
    """
    os.makedirs(output_dir, exist_ok=True)
    written = []
    if any("loss" in e for e in trainer_log_history):
        path = os.path.join(output_dir, "training_curves.png")
        plot_training_curves(trainer_log_history, path)
        written.append(path)
    if eval_before is not None or eval_after is not None:
        path = os.path.join(output_dir, "eval_comparison.png")
        plot_eval_comparison(eval_before, eval_after, metric_name, path)
        written.append(path)
    if classes and eval_after is not None and eval_after.get("predictions"):
        path = os.path.join(output_dir, "confusion_matrix.png")
        plot_confusion_matrix(eval_after["predictions"], classes, path)
        written.append(path)
    return written

"""What a run leaves beside its model besides the weights: run_config.json and plots (the throughput in its logs
comes from phi3v.callbacks.ThroughputCallback).

    save_run_config         run_config.json: every argument, library versions, the command line
    write_end_of_run_plots  training_curves.png (with DPO's or GRPO's rewards when logged), eval_curve.png (the task
                            metric at each evaluation during training, best point marked), eval_comparison.png,
                            confusion_matrix.png

Plots use matplotlib's object API (Figure + Agg canvas), never pyplot, so they need no display and leave no global
state behind.
"""

import dataclasses
import json
import os
import platform
import re
import shlex
import sys

import torch

from phi3v.metrics import parse_choice

OTHER = "other"  # the confusion-matrix column of answers that match no class


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
def _figure(ncols=1, width=6.0, height=4.0, nrows=1):
    """A figure of nrows x ncols panels, each width x height inches; the axes in reading order."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return figure, list(figure.subplots(nrows, ncols, squeeze=False).flat)


def _series(log_history, key) -> tuple[list, list]:
    entries = [e for e in log_history if key in e and "step" in e]
    return [e["step"] for e in entries], [float(e[key]) for e in entries]


# Panels of training_curves.png after loss, learning rate and grad norm, each drawn when the logs have its keys
# (TRL's names; an evaluation's eval_ ones dashed beside them): DPO's implicit rewards, GRPO's rewards (the total and
# one rewards/<function>/mean per reward function), their spread within groups, KL, clipping and answer length.
REWARD_PANELS = {
    "rewards": ["rewards/chosen", "rewards/rejected", "rewards/margins"],
    "reward accuracy": ["rewards/accuracies"],
    "reward": ["reward"],  # + rewards/<function>/mean
    "reward spread in groups": ["reward_std", "frac_reward_zero_std"],
    "KL to the reference": ["kl"],
    "clip ratio": ["clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean"],
    "completion length": ["completions/mean_length"],
}
PANELS_PER_ROW = 3


def training_panels(log_history) -> dict:
    """{panel title: [keys]} of what the logs have: loss (and eval_loss), the learning rate (one key per optimizer
    parameter group when `learning_rate_<group>` keys are logged, else `learning_rate`), grad norm, then each of
    REWARD_PANELS with its training keys and their eval_ counterparts. A panel without any logged key is left out."""
    train_logs = [e for e in log_history if "loss" in e]  # per-step training logs (not eval, not the summary)
    lr_keys = sorted({k for e in train_logs for k in e if k.startswith("learning_rate_")}) or ["learning_rate"]
    panels = {"loss": ["loss", "eval_loss"], "learning rate": lr_keys, "gradient norm": ["grad_norm"]}
    logged = {k for e in log_history for k in e}
    functions = sorted(k for k in logged if re.fullmatch(r"rewards/.+/mean", k))  # GRPO's reward functions
    for title, keys in REWARD_PANELS.items():
        keys = keys + functions if title == "reward" else keys
        panels[title] = keys + [f"eval_{k}" for k in keys]
    panels = {title: [k for k in keys if k in logged] for title, keys in panels.items()}
    return {title: keys for title, keys in panels.items() if keys}


def plot_training_curves(log_history, path) -> dict:
    """training_curves.png: loss, learning rate and grad norm against the optimizer step, and DPO's or GRPO's
    rewards and their companions when logged (training_panels); three panels a row.

    log_history: Trainer's `state.log_history`. Evaluation values (eval_ keys) come from the evaluations' entries
    and are drawn dashed beside their training curve. Returns what was plotted, {name: (steps, values)}; raises
    ValueError when the logs hold no training step.
    """
    train_logs = [e for e in log_history if "loss" in e]
    if not train_logs:
        raise ValueError("no training-step logs to plot (is logging_steps larger than the number of steps?)")
    series = {}
    panels = {}
    for title, keys in training_panels(log_history).items():
        for key in keys:
            steps, values = _series(log_history if key.startswith("eval_") else train_logs, key)
            if steps:
                series[key] = (steps, values)
        panels[title] = [k for k in keys if k in series]
    panels = {title: keys for title, keys in panels.items() if keys}

    ncols = min(len(panels), PANELS_PER_ROW)
    figure, axes = _figure(ncols=ncols, width=5.0, nrows=-(-len(panels) // ncols))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes, panels.items()):
        for key in keys:
            steps, values = series[key]
            label = key.removeprefix("learning_rate_") if key.startswith("learning_rate_") else key
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label,
                    linestyle="--" if key.startswith("eval_") else "-")
        ax.set_title(title)
        ax.xaxis.get_major_locator().set_params(integer=True)  # steps, not 12.5
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if title == "rewards":
            ax.axhline(0, color="#555555", linewidth=0.8)  # the reference model's reward
        if title == "reward accuracy":
            ax.set_ylim(-0.05, 1.05)
        if len(keys) > 1 or keys[0].startswith("learning_rate_"):  # name the curves (or the one param group)
            ax.legend()
    figure.suptitle("Training curves")
    figure.savefig(path, dpi=120)
    return series


def best_evaluation(steps, values, greater_is_better=True, best_step=None) -> tuple[int, float] | None:
    """(step, value) of the best evaluation: at `best_step` (the Trainer's state.best_global_step, which follows
    --metric_for_best_model) when it is among `steps`, else the first highest value (lowest with
    greater_is_better False); None without evaluations."""
    if not steps:
        return None
    if best_step in steps:
        index = steps.index(best_step)
    else:  # the first of the best values, as the Trainer keeps the first (a later equal value is no improvement)
        sign = 1 if greater_is_better else -1
        index = max(range(len(values)), key=lambda i: (sign * values[i], -i))
    return steps[index], values[index]


def plot_eval_curve(log_history, metric_name, path, before=None, best_step=None, greater_is_better=True,
                    best_by=None) -> dict:
    """eval_curve.png: the task metric at each evaluation during training (`eval_<metric_name>` in the Trainer's
    log_history) against the optimizer step, the best evaluation marked; `before` (the eval_before report) adds
    the metric before training at step 0. The Trainer's best step (`best_step`, see best_evaluation) is the one
    marked when the run kept a best checkpoint, whatever metric chose it (`best_by`, named when not this one).

    Returns {"steps", "values", "best": (step, value)}; raises ValueError when the logs hold no such evaluation."""
    steps, values = _series(log_history, f"eval_{metric_name}")
    if not steps:
        raise ValueError(f"no evaluation of {metric_name} during training in the logs (--eval_strategy)")
    best = best_evaluation(steps, values, greater_is_better, best_step)
    figure, (ax,) = _figure(width=6.0)
    if before is not None and metric_name in before:
        ax.plot([0], [float(before[metric_name])], marker="s", linestyle="none", color="#9aa5b1",
                label="before training")
    ax.plot(steps, values, marker="o" if len(steps) < 40 else None, markersize=4, color="#2b7bba",
            label=f"eval_{metric_name}")
    label = "best checkpoint" if best_step in steps else "best"
    if best_step in steps and best_by and best_by.removeprefix("eval_") != metric_name:
        label += f" (by {best_by})"
    ax.plot([best[0]], [best[1]], marker="*", markersize=16, linestyle="none", color="#e8a33d",
            label=f"{label}: {best[1]:.3f} at step {best[0]}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric_name)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{metric_name} during training")
    figure.savefig(path, dpi=120)
    return {"steps": steps, "values": values, "best": best}


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
    output_dir, trainer_log_history, eval_before, eval_after, metric_name, classes=None, best_step=None,
    greater_is_better=True, best_by=None,
) -> list[str]:
    """Write every plot that the run has data for into output_dir; return the paths written.

    eval_before / eval_after: the evaluation reports (either may be None); classes: the class names of a
    classification task, for the confusion matrix of eval_after's predictions; best_step, greater_is_better,
    best_by: which evaluation during training was the best, by which metric (see plot_eval_curve).
    """
    os.makedirs(output_dir, exist_ok=True)
    written = []
    if any("loss" in e for e in trainer_log_history):
        path = os.path.join(output_dir, "training_curves.png")
        plot_training_curves(trainer_log_history, path)
        written.append(path)
    if metric_name and any(f"eval_{metric_name}" in e for e in trainer_log_history):
        path = os.path.join(output_dir, "eval_curve.png")
        plot_eval_curve(trainer_log_history, metric_name, path, before=eval_before, best_step=best_step,
                        greater_is_better=greater_is_better, best_by=best_by)
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

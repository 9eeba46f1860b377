"""phi3v.reporting: throughput logs from a real (toy) Trainer run, run_config.json, and the end-of-run plots."""

import dataclasses
import json
import os

import pytest
import torch
from PIL import Image
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from phi3v.callbacks import ThroughputCallback
from phi3v.reporting import (
    best_evaluation,
    confusion_matrix,
    plot_confusion_matrix,
    plot_eval_comparison,
    plot_eval_curve,
    plot_training_curves,
    save_run_config,
    training_panels,
    write_end_of_run_plots,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_size=(300, 200)):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_size[0] and image.height >= min_size[1]


# ------------------------------------------------------------------------------------------------ throughput
class ToyModel(nn.Module):
    """Takes the batch keys of Phi3VForCausalLM; every example has 3 real tokens (of 5) and 2 images."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, input_ids, attention_mask=None, image_sizes=None, labels=None):
        return {"loss": self.linear(input_ids.float().mean(1, keepdim=True)).pow(2).mean()}


def toy_collate(examples):
    batch = len(examples)
    return {
        "input_ids": torch.ones(batch, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0]] * batch),
        "image_sizes": torch.full((2 * batch, 2), 336),
        "labels": torch.ones(batch, 5, dtype=torch.long),
    }


class Recorder(TrainerCallback):
    """Stands for TensorBoard: a reporting callback that only sees what is in `logs` when its turn comes."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def test_throughput_callback_logs_rates_and_memory(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, logging_steps=2,
                             learning_rate=0.1, report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0)
    recorder = Recorder()
    trainer = Trainer(model=ToyModel(), args=args, train_dataset=[{}] * 8, data_collator=toy_collate,
                      callbacks=[recorder, ThroughputCallback()])
    ThroughputCallback.install_first(trainer)
    assert isinstance(trainer.callback_handler.callbacks[0], ThroughputCallback)
    trainer.train()

    step_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in step_logs] == [2, 4]
    for entry in step_logs:
        assert entry["images_per_second"] > 0 and entry["steps_per_second"] > 0 and entry["peak_memory_gb"] > 0
        # same window for both counts: 3 tokens per 2 images
        assert entry["tokens_per_second"] / entry["images_per_second"] == pytest.approx(1.5, rel=1e-2)
    summary = trainer.state.log_history[-1]
    assert "train_runtime" in summary and summary["train_images_per_second"] > 0
    assert summary["train_tokens_per_second"] / summary["train_images_per_second"] == pytest.approx(1.5, rel=1e-2)
    # a callback after it (TensorBoard's place) got the numbers too
    assert all("tokens_per_second" in logs for logs in recorder.seen if "loss" in logs)


def test_throughput_leaves_evaluations_out():
    """The rates are training's: the time of an evaluation between two logs (its eval_runtime) is not counted."""
    import time

    from transformers import TrainerControl, TrainerState

    callback, state, control = ThroughputCallback(), TrainerState(global_step=0), TrainerControl()
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    callback.on_train_begin(args, state, control, model=nn.Linear(1, 1))
    time.sleep(0.4)  # an evaluation of 0.4 s: the window holds almost nothing else
    callback.on_evaluate(args, state, control, metrics={"eval_loss": 1.0, "eval_runtime": 0.4})
    state.global_step = 1
    logs = {"loss": 1.0}
    callback.on_log(args, state, control, logs=logs)
    assert logs["steps_per_second"] > 10  # 2.5 with the evaluation counted
    logs = {"train_runtime": 0.5}
    callback.on_log(args, state, control, logs=logs)
    assert callback._eval_time == [0.0, 0.4]


# ------------------------------------------------------------------------------------------------ run_config.json
@dataclasses.dataclass
class TaskArguments:
    full_train: bool = False


def test_run_config_round_trips(tmp_path):
    from phi3v.arguments import parse_args

    argv = ["--output_dir", str(tmp_path), "--use_lora", "--lora_rank", "8", "--report_to", "none"]
    recipe_args, _, training_args = parse_args(argv=argv)
    path = save_run_config(tmp_path, recipe_args, TaskArguments(full_train=True), training_args)
    assert path == str(tmp_path / "run_config.json")
    config = json.loads((tmp_path / "run_config.json").read_text())
    assert config["recipe_args"]["use_lora"] is True and config["recipe_args"]["lora_rank"] == 8
    assert config["task_args"] == {"full_train": True}
    assert config["training_args"]["output_dir"] == str(tmp_path)
    assert config["training_args"]["learning_rate"] == training_args.learning_rate
    assert set(config["versions"]) >= {"torch", "transformers", "peft"}
    assert config["versions"]["torch"] == torch.__version__
    assert config["command"]


# ------------------------------------------------------------------------------------------------ plots
LOG_HISTORY = [
    {"loss": 2.0, "grad_norm": 5.0, "learning_rate": 1e-5, "learning_rate_vision": 1e-6, "epoch": 0.1, "step": 10},
    {"loss": 1.5, "grad_norm": 3.0, "learning_rate": 2e-5, "learning_rate_vision": 2e-6, "epoch": 0.2, "step": 20},
    {"eval_loss": 1.7, "epoch": 0.2, "step": 20},
    {"loss": 1.0, "grad_norm": 2.5, "learning_rate": 1e-5, "learning_rate_vision": 1e-6, "epoch": 0.3, "step": 30},
    {"train_runtime": 12.0, "train_loss": 1.5, "epoch": 0.3, "step": 30},
]


def test_training_curves_plot_the_logged_values(tmp_path):
    series = plot_training_curves(LOG_HISTORY, tmp_path / "training_curves.png")
    assert_png(tmp_path / "training_curves.png")
    assert series["loss"] == ([10, 20, 30], [2.0, 1.5, 1.0])
    assert series["eval_loss"] == ([20], [1.7])
    assert series["grad_norm"] == ([10, 20, 30], [5.0, 3.0, 2.5])
    # per-group learning rates replace the single one
    assert series["learning_rate_vision"] == ([10, 20, 30], [1e-6, 2e-6, 1e-6]) and "learning_rate" not in series

    single = [{k: v for k, v in e.items() if k != "learning_rate_vision"} for e in LOG_HISTORY]
    series = plot_training_curves(single, tmp_path / "single.png")
    assert series["learning_rate"] == ([10, 20, 30], [1e-5, 2e-5, 1e-5])
    with pytest.raises(ValueError, match="no training-step logs"):
        plot_training_curves(LOG_HISTORY[-1:], tmp_path / "none.png")


DPO_LOGS = [  # what DPOTrainer logs (TRL's names), with an evaluation's eval_ values between the steps
    {"loss": 0.69, "grad_norm": 0.5, "learning_rate": 1e-3, "rewards/chosen": 0.0, "rewards/rejected": 0.0,
     "rewards/margins": 0.0, "rewards/accuracies": 0.0, "logps/chosen": -50.0, "step": 2},
    {"eval_loss": 0.66, "eval_rewards/chosen": 0.02, "eval_rewards/rejected": -0.03, "eval_rewards/margins": 0.05,
     "eval_rewards/accuracies": 0.75, "step": 2},
    {"loss": 0.6, "grad_norm": 0.7, "learning_rate": 8e-4, "rewards/chosen": 0.1, "rewards/rejected": -0.2,
     "rewards/margins": 0.3, "rewards/accuracies": 1.0, "logps/chosen": -49.0, "step": 4},
    {"train_runtime": 30.0, "train_loss": 0.64, "step": 4},
]


def test_dpo_rewards_get_their_panels(tmp_path):
    """A panel a group of logged keys: DPO's rewards (eval_ ones beside them) and reward accuracy appear after the
    usual three; logs without them keep the usual three."""
    assert training_panels(DPO_LOGS) == {
        "loss": ["loss", "eval_loss"],
        "learning rate": ["learning_rate"],
        "gradient norm": ["grad_norm"],
        "rewards": ["rewards/chosen", "rewards/rejected", "rewards/margins", "eval_rewards/chosen",
                    "eval_rewards/rejected", "eval_rewards/margins"],
        "reward accuracy": ["rewards/accuracies", "eval_rewards/accuracies"],
    }
    assert list(training_panels(LOG_HISTORY)) == ["loss", "learning rate", "gradient norm"]
    without_eval = [e for e in DPO_LOGS if "eval_loss" not in e]
    assert training_panels(without_eval)["reward accuracy"] == ["rewards/accuracies"]
    only_margins = [{k: v for k, v in e.items() if k not in ("rewards/chosen", "rewards/rejected",
                                                             "rewards/accuracies")} for e in without_eval]
    panels = training_panels(only_margins)
    assert panels["rewards"] == ["rewards/margins"] and "reward accuracy" not in panels

    series = plot_training_curves(DPO_LOGS, tmp_path / "training_curves.png")
    assert series["rewards/margins"] == ([2, 4], [0.0, 0.3])
    assert series["rewards/accuracies"] == ([2, 4], [0.0, 1.0])
    assert series["eval_rewards/accuracies"] == ([2], [0.75])
    assert "logps/chosen" not in series  # no panel of its own
    # five panels: two rows of three (the sixth place left empty), so the figure is taller than the usual one
    assert_png(tmp_path / "training_curves.png")
    plot_training_curves(LOG_HISTORY, tmp_path / "usual.png")
    with Image.open(tmp_path / "training_curves.png") as five, Image.open(tmp_path / "usual.png") as three:
        assert five.width == three.width and five.height > 1.8 * three.height


EVAL_LOGS = [  # accuracy at each evaluation during training, beside the training logs
    {"loss": 2.0, "learning_rate": 1e-5, "step": 10},
    {"eval_loss": 1.9, "eval_accuracy": 0.25, "step": 10},
    {"eval_loss": 1.5, "eval_accuracy": 0.75, "step": 20},
    {"eval_loss": 1.2, "eval_accuracy": 0.5, "step": 30},
    {"eval_loss": 1.1, "eval_accuracy": 0.75, "step": 40},
]


def test_eval_curve_marks_the_best_evaluation(tmp_path):
    curve = plot_eval_curve(EVAL_LOGS, "accuracy", tmp_path / "eval_curve.png", before={"accuracy": 0.0})
    assert_png(tmp_path / "eval_curve.png")
    assert (curve["steps"], curve["values"]) == ([10, 20, 30, 40], [0.25, 0.75, 0.5, 0.75])
    assert curve["best"] == (20, 0.75)  # the first of the best, as the Trainer keeps it
    # the Trainer's best step wins (it may follow another metric, here eval_loss: step 40)
    assert plot_eval_curve(EVAL_LOGS, "accuracy", tmp_path / "b.png", best_step=40)["best"] == (40, 0.75)
    assert best_evaluation([10, 20, 30], [3.0, 1.0, 1.0], greater_is_better=False) == (20, 1.0)
    assert best_evaluation([], []) is None
    with pytest.raises(ValueError, match="no evaluation of anls during training"):
        plot_eval_curve(EVAL_LOGS, "anls", tmp_path / "none.png")
    written = write_end_of_run_plots(tmp_path / "run", EVAL_LOGS, None, {"accuracy": 0.75}, "accuracy")
    assert [os.path.basename(path) for path in written] == [
        "training_curves.png", "eval_curve.png", "eval_comparison.png"]


def test_eval_comparison(tmp_path):
    values = plot_eval_comparison({"accuracy": 0.25}, {"accuracy": 0.75}, "accuracy", tmp_path / "cmp.png")
    assert values == {"before": 0.25, "after": 0.75}
    assert_png(tmp_path / "cmp.png", min_size=(200, 200))
    assert plot_eval_comparison(None, {"anls": 0.5}, "anls", tmp_path / "after_only.png") == {"after": 0.5}


def test_confusion_matrix_counts(tmp_path):
    predictions = [
        {"prediction": "yes", "answer": "yes"},
        {"prediction": "Yes, it is.", "answer": "yes"},
        {"prediction": "no", "answer": "yes"},
        {"prediction": "no.", "answer": "no"},
        {"prediction": "YES", "answer": "no"},
        {"prediction": "maybe", "answer": "no"},  # matches no class: "other"
    ]
    expected = [[2, 1, 0],  # gold yes: predicted yes, no, other
                [1, 1, 1]]  # gold no
    assert confusion_matrix(predictions, ["yes", "no"]) == expected
    assert plot_confusion_matrix(predictions, ["yes", "no"], tmp_path / "cm.png") == expected
    assert_png(tmp_path / "cm.png", min_size=(200, 200))
    with pytest.raises(ValueError, match="none of the classes"):
        confusion_matrix([{"prediction": "yes", "answer": "perhaps"}], ["yes", "no"])


def test_write_end_of_run_plots(tmp_path):
    before = {"accuracy": 0.5, "predictions": []}
    after = {"accuracy": 1.0,
             "predictions": [{"prediction": "yes", "answer": "yes"}, {"prediction": "no", "answer": "no"}]}
    written = write_end_of_run_plots(tmp_path, LOG_HISTORY, before, after, "accuracy", classes=["yes", "no"])
    names = ["training_curves.png", "eval_comparison.png", "confusion_matrix.png"]
    assert written == [str(tmp_path / name) for name in names]
    for path in written:
        assert_png(path, min_size=(200, 200))
    # no training logs and no classes: only the comparison
    written = write_end_of_run_plots(tmp_path / "b", [], None, after, "accuracy")
    assert written == [str(tmp_path / "b" / "eval_comparison.png")]


GRPO_LOGS = [  # what GRPOTrainer logs (TRL's names): two reward functions, no reference (beta 0: no kl)
    {"loss": 0.0, "grad_norm": 0.1, "learning_rate": 1e-6, "reward": 0.5, "rewards/accuracy_reward/mean": 0.25,
     "rewards/brevity_reward/mean": 0.5, "reward_std": 0.4, "frac_reward_zero_std": 0.5,
     "clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.0, "clip_ratio/region_mean": 0.0,
     "completions/mean_length": 3.5, "completions/clipped_ratio": 0.0, "step": 1},
    {"loss": 0.01, "grad_norm": 0.2, "learning_rate": 5e-7, "reward": 1.25, "rewards/accuracy_reward/mean": 0.75,
     "rewards/brevity_reward/mean": 1.0, "reward_std": 0.3, "frac_reward_zero_std": 0.25,
     "clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.0, "clip_ratio/region_mean": 0.0,
     "completions/mean_length": 2.0, "completions/clipped_ratio": 0.0, "step": 2},
]


def test_grpo_rewards_get_their_panels(tmp_path):
    """GRPO's logs: the total reward with one curve per reward function, its spread within groups, clipping and
    answer length; no KL panel without a reference (nothing logged under kl)."""
    panels = training_panels(GRPO_LOGS)
    assert list(panels) == ["loss", "learning rate", "gradient norm", "reward", "reward spread in groups",
                            "clip ratio", "completion length"]
    assert panels["reward"] == ["reward", "rewards/accuracy_reward/mean", "rewards/brevity_reward/mean"]
    assert panels["reward spread in groups"] == ["reward_std", "frac_reward_zero_std"]
    with_kl = [{**e, "kl": 0.01 * e["step"]} for e in GRPO_LOGS]
    assert training_panels(with_kl)["KL to the reference"] == ["kl"]
    series = plot_training_curves(with_kl, tmp_path / "training_curves.png")
    assert series["rewards/brevity_reward/mean"] == ([1, 2], [0.5, 1.0])
    assert series["kl"] == ([1, 2], [0.01, 0.02])
    assert_png(tmp_path / "training_curves.png")

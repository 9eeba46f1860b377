"""Evaluation during training (--eval_strategy / --eval_steps): the recipe's own metric at every evaluation, the best
checkpoint kept and reloaded, early stopping, and a resume after SIGKILL that ends exactly as the run it replaces.

Three runs of the hateful-memes recipe on a tiny model (a module fixture, one after the other): S goes straight
through; K is the same command killed (SIGKILL, from a callback right after a checkpoint is complete) after the
evaluation at which the early-stopping count first becomes 1; R resumes K with --resume_from_checkpoint auto. One run
of the custom recipe covers LoRA, --packing, the custom recipe's --eval_data_path and a --metric_for_best_model other
than the first. The flag checks run in-process. tests/test_distributed.py checks the metric of 2-process DDP, ZeRO-2
and ZeRO-3 runs, tests/test_recipes.py each task recipe's metric during training.
"""

import glob
import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the recipes' score functions are imported from their scripts
SCRIPT = os.path.join(ROOT, "finetune_hf_trainer_hateful_memes.py")
CUSTOM = os.path.join(ROOT, "finetune_hf_trainer_custom.py")
TIMEOUT_S = 300
EVAL_SIZE, NUM_TRAIN, NUM_EVAL = 500, 64, 4
EVAL_STEPS, MAX_STEPS, PATIENCE = 2, 20, 2
FLAGS = [
    "--deepspeed", "none", "--num_crops", "1", "--batch_size", "2", "--batch_size_per_gpu", "2",
    "--learning_rate", "5e-3", "--warmup_steps", "0", "--max_steps", str(MAX_STEPS),
    "--max_train_samples", str(NUM_TRAIN), "--max_eval_samples", str(NUM_EVAL), "--eval_batch_size", str(NUM_EVAL),
    "--max_new_tokens", "2", "--skip_eval_before", "--logging_steps", "1",
    "--dataloader_num_workers", "0", "--no_tqdm", "--seed", "0",
    # what this file tests: evaluations every 2 steps (checkpoints follow them), the best one reloaded at the end,
    # stopping after 2 evaluations without a better accuracy
    "--eval_steps", str(EVAL_STEPS), "--load_best_model_at_end", "--early_stopping_patience", str(PATIENCE),
]

# The recipe, with a callback that SIGKILLs the process once the checkpoint of step $KILL_AFTER_SAVE is complete.
WRAPPER = """
import os
import signal
import sys

from transformers import TrainerCallback

sys.path.insert(0, {root!r})
import finetune_hf_trainer_hateful_memes as recipe


class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):  # after the Trainer wrote trainer_state.json and rotated
        if str(state.global_step) == os.environ.get("KILL_AFTER_SAVE"):
            os.kill(os.getpid(), signal.SIGKILL)


make_trainer = recipe.make_trainer
recipe.make_trainer = lambda *positional, **options: make_trainer(*positional, callbacks=[KillAfterSave()], **options)
recipe.main()
"""


def env(**extra):
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                OMP_NUM_THREADS="1", **extra)


def run(command, output_dir, expect=0, **extra_env):
    result = subprocess.run(command + ["--output_dir", str(output_dir)], cwd=ROOT, env=env(**extra_env),
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    with open(f"{output_dir}.log", "w") as f:  # beside the run, for a look after a failure
        f.write(result.stdout + result.stderr)
    assert result.returncode == expect, f"exit {result.returncode}:\n{(result.stdout + result.stderr)[-5000:]}"
    return result.stdout + result.stderr


def trainer_state(run_dir):
    """The trainer_state.json of the run's newest checkpoint."""
    newest = max(glob.glob(os.path.join(run_dir, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
    with open(os.path.join(newest, "trainer_state.json")) as f:
        return json.load(f)


def evaluations(run_dir, key="eval_accuracy"):
    """{step: the value of `key` logged at the evaluation of that step}, from the newest checkpoint's state."""
    return {e["step"]: e[key] for e in trainer_state(run_dir)["log_history"] if key in e}


def report(run_dir, name):
    with open(os.path.join(run_dir, f"{name}.json")) as f:
        return json.load(f)


def patience_rule(values: dict, patience: int, threshold: float = 0.0):
    """transformers' EarlyStoppingCallback on evaluations {step: accuracy} (greater is better), written out:
    (the step it stops at or None, {step: its count of evaluations without improvement})."""
    best, count, counts = None, 0, {}
    for step in sorted(values):
        if best is None or (values[step] > best and values[step] - best > threshold):
            count = 0
        else:
            count += 1
        best = values[step] if best is None else max(best, values[step])
        counts[step] = count
        if count >= patience:
            return step, counts
    return None, counts


def weights(path):
    from safetensors.torch import load_file

    return load_file(path)


def max_difference(a, b):
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def memes(tmp_path_factory):
    from phi3v.synthetic import memes_rows, save_hf_dataset
    from phi3v.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("eval_during_training")
    model = write_tiny_checkpoint(root / "model", num_crops=1)
    # the recipe evaluates on rows [:500] (the first NUM_EVAL here) and trains on rows [500:]
    distinct = memes_rows(NUM_EVAL + NUM_TRAIN)
    filler = [distinct[i % NUM_EVAL] for i in range(EVAL_SIZE - NUM_EVAL)]
    data = save_hf_dataset(distinct[:NUM_EVAL] + filler + distinct[NUM_EVAL:], str(root / "memes"))
    wrapper = root / "recipe_killed_after_a_save.py"
    wrapper.write_text(WRAPPER.format(root=ROOT))
    return {"root": root, "command": [sys.executable, str(wrapper), "--model_name_or_path", model,
                                      "--dataset_path", data, *FLAGS]}


@pytest.fixture(scope="module")
def runs(memes):
    """S (straight, TensorBoard on), K (killed after the checkpoint of the evaluation before S's last, where the
    count of evaluations without improvement is PATIENCE - 1: a resume that forgot it would stop one evaluation
    late) and R (K resumed)."""
    root = memes["root"]
    straight = root / "straight"
    run(memes["command"] + ["--report_to", "tensorboard"], straight)
    stop, counts = patience_rule(evaluations(straight), PATIENCE)
    print(f"\naccuracy at each evaluation: {evaluations(straight)}; stopped at step {stop}")
    assert stop is not None, f"the straight run did not stop early: {evaluations(straight)}"
    kill_step = stop - EVAL_STEPS
    assert counts[kill_step] == PATIENCE - 1 >= 1
    killed = root / "killed"
    run(memes["command"] + ["--report_to", "none"], killed, expect=-signal.SIGKILL, KILL_AFTER_SAVE=str(kill_step))
    with open(killed / f"checkpoint-{kill_step}" / "trainer_state.json") as f:  # R rotates it away later
        left = json.load(f)
    log = run(memes["command"] + ["--report_to", "none", "--resume_from_checkpoint", "auto"], killed)
    assert f"resuming from {killed / f'checkpoint-{kill_step}'}" in log
    return {"straight": straight, "resumed": killed, "stop": stop, "kill_step": kill_step, "left_by_kill": left}


def test_each_evaluation_logs_the_score_of_its_written_predictions(runs):
    from finetune_hf_trainer_hateful_memes import score

    straight = runs["straight"]
    accuracy, loss = evaluations(straight), evaluations(straight, "eval_loss")
    assert sorted(accuracy) == list(range(EVAL_STEPS, runs["stop"] + 1, EVAL_STEPS))
    for step, value in accuracy.items():
        written = report(straight, f"eval_step_{step}")
        assert written["num_samples"] == NUM_EVAL and written["step"] == step
        assert [p["id"] for p in written["predictions"]] == [f"hateful_memes-{i}" for i in range(NUM_EVAL)]
        # exact: the logged metric is the recipe's score of the predictions written beside it
        assert value == written["accuracy"] == score(written["predictions"])[1]
        assert loss[step] == written["loss"] > 0
    assert len(set(loss.values())) == len(loss)  # the loss pass ran on the model of each step
    assert sorted(glob.glob(str(straight / "eval_step_*"))) == sorted(
        str(straight / f"eval_step_{step}.json") for step in accuracy)  # one file each, no temporary left over
    assert os.path.isfile(straight / "eval_curve.png")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(glob.glob(str(straight / "runs" / "*"))[0])
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("eval/accuracy")}
    assert logged == pytest.approx(accuracy)


def test_training_stops_where_the_patience_rule_says(runs):
    state = trainer_state(runs["straight"])
    assert state["global_step"] == runs["stop"] < MAX_STEPS
    count = state["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"]
    assert count == PATIENCE


def test_best_checkpoint_kept_and_reloaded(runs):
    straight, values = runs["straight"], evaluations(runs["straight"])
    best_step = min(step for step, value in values.items() if value == max(values.values()))  # the first best
    state = trainer_state(straight)
    assert (state["best_global_step"], state["best_metric"]) == (best_step, values[best_step])
    assert state["best_model_checkpoint"] == str(straight / f"checkpoint-{best_step}")
    # --save_total_limit 2 (the default) keeps the best checkpoint and the newest
    kept = {name for name in os.listdir(straight) if name.startswith("checkpoint-")}
    assert kept == {f"checkpoint-{best_step}", f"checkpoint-{runs['stop']}"}
    final = weights(straight / "model.safetensors")
    assert max_difference(final, weights(straight / f"checkpoint-{best_step}" / "model.safetensors")) == 0
    assert best_step != runs["stop"]
    assert max_difference(final, weights(straight / f"checkpoint-{runs['stop']}" / "model.safetensors")) > 1e-4
    # the evaluation after training is the best step's model answering again
    after, at_best = report(straight, "eval_after"), report(straight, f"eval_step_{best_step}")
    assert after["predictions"] == at_best["predictions"] and after["accuracy"] == values[best_step]


def test_resumed_after_sigkill_ends_as_the_straight_run(runs):
    straight, resumed = runs["straight"], runs["resumed"]
    # K died right after the checkpoint of kill_step; that checkpoint carried the count of evaluations without
    # improvement (and the Trainer's best metric), which R needed to stop where S stopped
    saved = runs["left_by_kill"]
    assert saved["global_step"] == runs["kill_step"] and saved["best_metric"] == max(evaluations(straight).values())
    counter = saved["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"]
    assert counter == PATIENCE - 1
    assert trainer_state(resumed)["global_step"] == runs["stop"]
    assert evaluations(resumed) == evaluations(straight)
    assert evaluations(resumed, "eval_loss") == pytest.approx(evaluations(straight, "eval_loss"), abs=1e-6)
    for key in ("best_global_step", "best_metric"):
        assert trainer_state(resumed)[key] == trainer_state(straight)[key]
    assert max_difference(weights(resumed / "model.safetensors"), weights(straight / "model.safetensors")) <= 1e-6
    assert report(resumed, "eval_after")["predictions"] == report(straight, "eval_after")["predictions"]


# ------------------------------------------------------------------------------------------------ custom recipe
@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    """The custom recipe, LoRA, packed micro-batches, evaluating on --eval_data_path every 2 steps and keeping the
    best ANLS (its score's second metric)."""
    from PIL import Image

    from phi3v.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("custom_eval")
    for name, colour in (("red.png", (220, 30, 30)), ("blue.png", (30, 30, 220))):
        Image.new("RGB", (48, 40), colour).save(root / name)

    def records(n):
        return [{"id": str(i), "image": f"{colour}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": colour}]}
            for i, colour in zip(range(n), ["red", "blue"] * n)]

    for name, n in (("train", 16), ("eval", 4)):
        (root / f"{name}.json").write_text(json.dumps(records(n)))
    output_dir = root / "run"
    run([sys.executable, CUSTOM, "--model_name_or_path", write_tiny_checkpoint(root / "model", num_crops=1),
         "--data_path", str(root / "train.json"), "--eval_data_path", str(root / "eval.json"),
         "--image_folder", str(root), "--lora_enable", "--lora_rank", "4", "--packing", "--batch_size", "4",
         "--batch_size_per_gpu", "4", "--num_crops", "1", "--learning_rate", "1e-2", "--max_steps", "4",
         "--eval_steps", "2", "--load_best_model_at_end", "--metric_for_best_model", "anls", "--eval_batch_size", "4",
         "--max_new_tokens", "2", "--skip_eval_before", "--deepspeed", "none", "--report_to", "none",
         "--dataloader_num_workers", "0", "--no_tqdm", "--seed", "0"], output_dir)
    return output_dir


def test_custom_recipe_lora_packing_keeps_the_best_adapter(custom_run):
    from finetune_hf_trainer_custom import score

    state = trainer_state(custom_run)
    for step in (2, 4):
        written = report(custom_run, f"eval_step_{step}")
        _, exact, others = score(written["predictions"])
        logged = next(e for e in state["log_history"] if e.get("step") == step and "eval_anls" in e)
        assert (logged["eval_exact_match"], logged["eval_anls"]) == (exact, others["anls"])
        assert (written["exact_match"], written["anls"]) == (exact, others["anls"])
    assert state["best_metric"] == max(e["eval_anls"] for e in state["log_history"] if "eval_anls" in e)
    best = state["best_model_checkpoint"]
    # LoRA: the checkpoints and the result are adapters; the result is the best checkpoint's adapter
    assert os.path.isfile(os.path.join(best, "adapter_model.safetensors"))
    final = weights(custom_run / "adapter_model.safetensors")
    assert max_difference(final, weights(os.path.join(best, "adapter_model.safetensors"))) == 0


# ------------------------------------------------------------------------------------------------ flags
def parse(*flags, recipe_class=None):
    from phi3v.arguments import parse_args

    base = ["--output_dir", "unused", "--deepspeed", "none", "--report_to", "none"]
    return parse_args(argv=base + list(flags), recipe_class=recipe_class)


@pytest.mark.parametrize("flags, expected", [
    # --eval_steps alone evaluates every N steps; --load_best_model_at_end then saves at each evaluation
    (["--eval_steps", "20"], dict(eval_strategy="steps", eval_steps=20, save_steps=500)),
    (["--eval_steps", "20", "--load_best_model_at_end"], dict(save_strategy="steps", save_steps=20)),
    (["--eval_steps", "20", "--load_best_model_at_end", "--save_steps", "60"], dict(save_steps=60)),
    # --eval_strategy steps alone: every --save_steps steps (not the Trainer's every --logging_steps)
    (["--eval_strategy", "steps", "--save_steps", "100"], dict(eval_steps=100)),
    (["--eval_strategy", "epoch", "--load_best_model_at_end"], dict(save_strategy="epoch")),
    # the loss pass runs in batches of --eval_batch_size, unless --per_device_eval_batch_size says otherwise
    (["--eval_steps", "5", "--eval_batch_size", "3"], dict(per_device_eval_batch_size=3)),
    (["--eval_steps", "5", "--eval_batch_size", "3", "--per_device_eval_batch_size", "2"],
     dict(per_device_eval_batch_size=2)),
    # early stopping keeps its count across a resume
    (["--eval_steps", "5", "--early_stopping_patience", "3"], dict(restore_callback_states_from_checkpoint=True)),
    (["--eval_steps", "5", "--early_stopping_patience", "3", "--restore_callback_states_from_checkpoint", "False"],
     dict(restore_callback_states_from_checkpoint=False)),
])
def test_derived_evaluation_flags(flags, expected):
    _, _, training_args = parse(*flags)
    for name, value in expected.items():
        actual = getattr(training_args, name)
        assert getattr(actual, "value", actual) == value, name


@pytest.mark.parametrize("flags, message", [
    (["--load_best_model_at_end"], "--load_best_model_at_end needs evaluations during training: add --eval_strategy "
                                   "steps --eval_steps N (or --eval_strategy epoch)"),
    (["--early_stopping_patience", "2"], "--early_stopping_patience needs evaluations during training"),
    (["--metric_for_best_model", "accuracy"], "--metric_for_best_model needs evaluations during training"),
    (["--eval_steps", "20", "--load_best_model_at_end", "--save_steps", "30"],
     "--load_best_model_at_end reloads a checkpoint of an evaluated step, but --save_steps 30 is not a multiple of "
     "--eval_steps 20: save at evaluations (drop --save_steps to save at each one)"),
    (["--eval_strategy", "epoch", "--load_best_model_at_end", "--save_strategy", "steps"],
     "--save_strategy steps differs from --eval_strategy epoch"),
    (["--eval_steps", "5", "--early_stopping_patience", "0"], "--early_stopping_patience must be 1 or more"),
    (["--eval_steps", "5", "--early_stopping_threshold", "0.1"], "--early_stopping_threshold applies to early "
                                                                 "stopping: add --early_stopping_patience N"),
])
def test_flags_that_cannot_work_together_are_one_line(flags, message):
    from phi3v.errors import InputError

    with pytest.raises(InputError) as error:
        parse(*flags)
    assert message in str(error.value) and "\n" not in str(error.value)


class Records:
    """An evaluation set with the SFTDataset calls that recipe_evaluation makes (len, record)."""

    def __init__(self, answers=("yes",)):
        self.answers = answers

    def __len__(self):
        return 1

    def record(self, index):
        messages = [{"role": "user", "content": "<|image_1|>\nQ?"}, {"role": "assistant", "content": "blue"}]
        return {"id": "0", "messages": messages, "answers": list(self.answers)}


def custom_score(predictions):  # the custom recipe's kind: a main metric and others
    from phi3v.metrics import mean_anls, mean_exact_match

    texts, golds = [p["prediction"] for p in predictions], [p.get("answers") or [p["answer"]] for p in predictions]
    return "exact_match", mean_exact_match(texts, golds), {"anls": mean_anls(texts, golds)}


@pytest.mark.parametrize("flags, metric, greater", [
    ([], None, None),  # no --load_best_model_at_end nor early stopping: nothing to choose by
    (["--load_best_model_at_end"], "exact_match", True),  # the task's metric, not the Trainer's "loss"
    (["--early_stopping_patience", "2"], "exact_match", True),
    (["--load_best_model_at_end", "--metric_for_best_model", "eval_anls"], "eval_anls", True),
    (["--load_best_model_at_end", "--metric_for_best_model", "anls", "--greater_is_better", "False"], "anls", False),
    (["--load_best_model_at_end", "--metric_for_best_model", "loss"], "loss", False),
    (["--metric_for_best_model", "eval_loss"], "eval_loss", False),
])
def test_metric_for_best_model_follows_the_score(flags, metric, greater):
    from phi3v.training import recipe_evaluation

    args, _, training_args = parse("--eval_steps", "4", *flags)
    evaluation = recipe_evaluation(Records(["blue", "navy"]), custom_score, args, training_args)
    assert evaluation.metric_names() == ["exact_match", "anls"]
    assert (training_args.metric_for_best_model, training_args.greater_is_better) == (metric, greater)


def test_metric_the_recipe_does_not_produce_names_the_ones_it_does():
    from phi3v.errors import InputError
    from phi3v.training import recipe_evaluation

    args, _, training_args = parse("--eval_steps", "4", "--load_best_model_at_end", "--metric_for_best_model", "bleu")
    with pytest.raises(InputError) as error:
        recipe_evaluation(Records(), custom_score, args, training_args)
    assert str(error.value) == ("--metric_for_best_model bleu: this recipe's evaluation gives eval_loss, "
                                "eval_exact_match, eval_anls (with or without the eval_ prefix)")


def test_evaluating_during_training_needs_an_evaluation_set():
    from phi3v.errors import InputError
    from phi3v.training import recipe_evaluation

    args, _, training_args = parse("--eval_steps", "4")
    with pytest.raises(InputError, match="--eval_strategy steps evaluates during training, which needs an evaluation "
                                         r"set \(--eval_data_path\)"):
        recipe_evaluation(None, custom_score, args, training_args)
    args, _, training_args = parse()
    assert recipe_evaluation(None, custom_score, args, training_args) is None


def test_metric_names_come_from_the_score_of_a_perfect_prediction():
    from phi3v.evaluation import Evaluation

    seen = []

    def score(predictions):
        seen.extend(predictions)
        return "accuracy", 1.0

    assert Evaluation(Records(), score, "unused").metric_names() == ["accuracy"]
    assert seen == [{"id": "-", "prediction": "blue", "answer": "blue", "answers": ["yes"]}]
    # a set without the record API (or whose first record cannot be read) still names its metrics
    assert Evaluation(object(), custom_score, "unused").metric_names() == ["exact_match", "anls"]


# ------------------------------------------------------------------------------------------------ SIGTERM
def test_sigterm_checkpoint_survives_the_best_model_bookkeeping(tmp_path):
    """A run stopped by SIGTERM is to be resumed, not finished: the Trainer must neither reload the best checkpoint
    nor, with --save_total_limit 1, delete the checkpoint that SIGTERM just saved (a toy Trainer)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from phi3v.callbacks import SigtermCallback

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 1)

        def forward(self, x, y):
            return {"loss": ((self.linear(x).squeeze(-1) - y) ** 2).mean()}

    class TermAtStep3(TrainerCallback):  # what the signal handler does, at a known step
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                sigterm._handle(signal.SIGTERM, None)

    sigterm = SigtermCallback()
    data = [{"x": torch.tensor([1.0, 2.0]), "y": torch.tensor(3.0)}] * 4
    # greater_is_better on a falling loss: the first evaluation stays the best, never the newest checkpoint
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=1, use_cpu=True,
                             report_to="none", eval_strategy="steps", eval_steps=1, save_steps=1, save_total_limit=1,
                             load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,
                             learning_rate=0.05, disable_tqdm=True, label_names=["y"])
    trainer = Trainer(model=Regression(), args=args, train_dataset=data, eval_dataset=data[:1],
                      callbacks=[sigterm, TermAtStep3()])
    trainer.train()
    assert sigterm.stopped and sigterm.step == 3
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-3"]  # the best and SIGTERM's
    with open(tmp_path / "checkpoint-3" / "trainer_state.json") as f:
        assert json.load(f)["best_model_checkpoint"] == str(tmp_path / "checkpoint-1")  # a resume knows it
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    assert torch.equal(saved["linear.weight"], trainer.model.linear.weight.detach())  # step 3's, not the best's

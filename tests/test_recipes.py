"""Every task script runs end to end as a user runs it: a subprocess, a tiny checkpoint, synthetic data of the task's
real shape. The four runs start together (module fixture) and each test waits for its own."""

import json
import os
import subprocess
import sys

import pytest
from conftest import finished_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAULDRON_EVAL_SIZE = 500  # the cauldron recipes evaluate on train[:500] and train on train[500:]
TRAIN, EVAL = 8, 4
METRICS = {"hateful_memes": "accuracy", "nlvr2": "accuracy", "docvqa": "anls", "ucf101": "accuracy"}
COMMON_ARGS = [
    "--num_crops", "1", "--max_steps", "3", "--batch_size", "2", "--batch_size_per_gpu", "2",
    "--max_train_samples", str(TRAIN), "--max_eval_samples", str(EVAL), "--eval_batch_size", str(EVAL),
    "--max_new_tokens", "3", "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0",
    "--no-tqdm", "--deepspeed", "none",
    "--eval_steps", "3",  # an evaluation during training too, at the last step
]
TIMEOUT_S = 600
# What the tiny random model scores before and after 3 steps at the default learning rate: it answers nonsense
# ("istische países Ком"), which names no class and is nowhere near a gold answer. A metric that credits nonsense fails.
UNTRAINED_SCORE = 0.0


def script(task):
    return os.path.join(ROOT, f"finetune_hf_trainer_{task}.py")


def load_recipe(task):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{task}_recipe", script(task))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def evaluation_split(task, root):
    """[(id, answer)] of the first EVAL records of the task's evaluation split, from the data the run was given."""
    import datasets

    from phi3v.synthetic import docvqa_rows

    if task in ("hateful_memes", "nlvr2"):  # the cauldron recipes evaluate on train[:500]
        rows = datasets.load_from_disk(os.path.join(root, "memes" if task == "hateful_memes" else task))["train"]
        return [(f"{task}-{i}", rows[i]["texts"][0]["assistant"]) for i in range(EVAL)]
    if task == "docvqa":
        return [(row["id"], row["answers"][0]) for row in docvqa_rows(EVAL, seed=1)]
    with open(os.path.join(root, "ucf101", "ucf101_test.jsonl")) as f:
        lines = [json.loads(line) for line in f][:EVAL]
    return [(line["id"], line["conversations"][-1]["assistant"]) for line in lines]


def subprocess_env():
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["OMP_NUM_THREADS"] = "1"  # four runs share the CPU cores: one thread each (2x faster than contending)
    return env


def write_data(root):
    """Synthetic data for each task, as the command-line flags that point the script at it."""
    import datasets

    from phi3v.synthetic import docvqa_rows, memes_rows, nlvr2_rows, save_hf_dataset, write_ucf101_folder

    docvqa = os.path.join(root, "docvqa")
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(docvqa_rows(TRAIN, seed=0)),
        "test": datasets.Dataset.from_list(docvqa_rows(EVAL, seed=1)),
    }).save_to_disk(docvqa)
    return {
        "hateful_memes": ["--dataset_path", save_hf_dataset(memes_rows(CAULDRON_EVAL_SIZE + TRAIN),
                                                            os.path.join(root, "memes"))],
        "nlvr2": ["--dataset_path", save_hf_dataset(nlvr2_rows(CAULDRON_EVAL_SIZE + TRAIN),
                                                    os.path.join(root, "nlvr2"))],
        "docvqa": ["--dataset_path", docvqa],
        "ucf101": ["--data_dir", write_ucf101_folder(os.path.join(root, "ucf101"), {"train": TRAIN, "test": EVAL})],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every recipe at once; {task: (process, output_dir, log_path)}."""
    from phi3v.tiny import write_tiny_checkpoint

    root = str(tmp_path_factory.mktemp("recipes"))
    model = write_tiny_checkpoint(os.path.join(root, "model"), num_crops=1)
    started = {}
    for task, data_args in write_data(root).items():
        output_dir, log_path = os.path.join(root, f"run_{task}"), os.path.join(root, f"{task}.log")
        command = [sys.executable, script(task), "--model_name_or_path", model, *data_args,
                   "--output_dir", output_dir, *COMMON_ARGS]
        with open(log_path, "w") as log:  # a file, not a pipe: nobody reads the others' output while waiting
            process = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        started[task] = (process, output_dir, log_path)
    yield started
    for process, _, _ in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("task", list(METRICS))
def test_recipe_end_to_end(runs, task):
    import torch
    from PIL import Image

    from phi3v import Phi3VForCausalLM, Phi3VProcessor

    process, output_dir, log_path = runs[task]
    log = finished_run(process, log_path, task, TIMEOUT_S)

    score = load_recipe(task).score
    for name in ("eval_before", "eval_step_3", "eval_after"):
        with open(os.path.join(output_dir, f"{name}.json")) as f:
            report = json.load(f)
        predictions = report["predictions"]
        # the evaluation split, in order, each with its gold answer
        assert [(p["id"], p["answer"]) for p in predictions] == evaluation_split(task, os.path.dirname(output_dir))
        assert report["num_samples"] == EVAL
        # the number written is the recipe's metric of the predictions written beside it
        assert report[METRICS[task]] == score(predictions)[1] == UNTRAINED_SCORE, report
    if task == "docvqa":  # every gold answer travels with the prediction, for ANLS
        assert all(len(p["answers"]) == 2 for p in report["predictions"])
    # the evaluation during training (step 3, the last) scored the model that eval_after scored, and the Trainer
    # logged its metric beside the loss
    with open(os.path.join(output_dir, "eval_step_3.json")) as f:
        assert json.load(f)["predictions"] == report["predictions"]
    assert f"'eval_{METRICS[task]}': '{UNTRAINED_SCORE:g}'" in log and "'eval_loss':" in log

    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "tokenizer.json"):
        assert os.path.isfile(os.path.join(output_dir, name)), f"{name} missing from {os.listdir(output_dir)}"
    model = Phi3VForCausalLM.from_pretrained(output_dir).eval()
    processor = Phi3VProcessor.from_pretrained(output_dir)
    prompt = processor.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat is shown?"}],
                                           add_generation_prompt=True)
    inputs = processor(prompt, [Image.new("RGB", (96, 64), (200, 30, 30))], num_crops=1)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("task, predictions, expected", [
    ("hateful_memes", [("Yes.", "yes"), ("no", "yes"), ("The answer is no", "no"), ("maybe", "no")], 0.5),
    ("nlvr2", [("True", "True"), ("false.", "False"), ("True or False", "False")], 2 / 3),
    ("ucf101", [("MovingLeft", "MovingLeft"), ("it is movingright", "MovingRight"), ("Moving", "MovingLeft"),
                ("MovingLeftward", "MovingRight")], 0.5),
    # ANLS: exact (after case and the end period), one edit in four characters, too far
    ("docvqa", [("Red.", ["red", "red box"]), ("blu", ["blue", "blue box"]), ("green", ["red", "red box"])],
     (1 + 0.75 + 0) / 3),
])
def test_recipe_metric_on_known_answers(task, predictions, expected):
    items = [{"id": str(i), "prediction": prediction, "answer": gold[0] if isinstance(gold, list) else gold,
              **({"answers": gold} if isinstance(gold, list) else {})}
             for i, (prediction, gold) in enumerate(predictions)]
    name, value, *_ = load_recipe(task).score(items)
    assert (name, value) == (METRICS[task], pytest.approx(expected))


def test_docvqa_to_record_reads_every_row_shape():
    recipe = load_recipe("docvqa")
    subset_row = {"id": 7, "image": "page", "query": {"en": "Who signed?", "de": "Wer?"}, "answers": ["Ann", "ann b"]}
    full_row = {"questionId": 9, "image": "page", "question": "Who signed?", "answers": ["Ann", "ann b"]}
    for row, expected_id in ((subset_row, "7"), (full_row, "9")):
        record = recipe.to_record(row, 0)
        assert record["id"] == expected_id and record["images"] == ["page"]
        assert record["messages"] == [{"role": "user", "content": "<|image_1|>\nWho signed?\nAnswer briefly."},
                                      {"role": "assistant", "content": "Ann"}]
        assert record["answers"] == ["Ann", "ann b"]
    # --full_train: the_cauldron's docvqa rows, every question of the page one turn of a conversation
    cauldron_row = {"images": ["page"], "texts": [
        {"user": "Who signed?\nGive a very brief answer.", "assistant": "Ann"},
        {"user": "When?\nGive a very brief answer.", "assistant": "1998"}]}
    record = recipe.to_record(cauldron_row, 3)
    assert record["id"] == "docvqa-3" and record["images"] == ["page"]
    assert record["messages"] == [
        {"role": "user", "content": "<|image_1|>\nWho signed?\nGive a very brief answer."},
        {"role": "assistant", "content": "Ann"},
        {"role": "user", "content": "When?\nGive a very brief answer."},
        {"role": "assistant", "content": "1998"},
    ]


def test_ucf101_missing_train_file_is_one_line_error(tmp_path):
    data_dir = tmp_path / "not_converted"
    data_dir.mkdir()
    result = subprocess.run(
        [sys.executable, script("ucf101"), "--model_name_or_path", "unused", "--data_dir", str(data_dir),
         "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--deepspeed", "none"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(data_dir) in errors[0] and "ucf101_train.jsonl" in errors[0], result.stderr

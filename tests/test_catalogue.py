"""The bad-input catalogue: every entry gets a clear error naming the data file and line (or the sample / row), or
is counted and skipped with --skip_bad_samples, and nothing already written is lost.

Where each entry is tested ("here": this file; test_the_catalogue_names_existing_tests reads this table and checks
that every test it names exists, in the file it names):

| entry | tests |
|---|---|
| missing image file | test_data: test_missing_image_file, test_missing_image_file_project_format, test_open_image_missing; test_training: test_dataset_skips_bad_samples; here (in evaluation): test_bad_evaluation_sample_names_itself_or_is_skipped_and_counted |
| truncated / corrupt image | test_data: test_open_image_truncated_jpeg, test_open_image_not_an_image; here: test_hub_image_that_does_not_decode_names_the_row_or_is_skipped, test_in_memory_truncated_image_and_bomb |
| 1x1 image, decompression bomb | test_data: test_open_image_too_small, test_open_image_decompression_bomb; here: test_in_memory_truncated_image_and_bomb |
| CMYK / palette / alpha | test_data: test_open_image_modes_to_rgb, test_open_image_transparent_palette (converted, alpha on white) |
| line not JSON, missing keys | test_data: test_line_that_is_not_json, test_broken_json_list, test_missing_keys; here: test_hub_row_missing_a_key_names_the_row, test_line_with_a_lone_surrogate_names_file_and_line |
| empty answer | test_data: test_empty_answer, test_skip_bad_samples_reports |
| image tags vs images | test_data: test_tag_count_mismatch, test_image_tag_without_image, test_tags_out_of_order, test_project_explicit_tags_wrong_numbers; test_processor: test_bad_tags_are_refused; test_fuzz: test_processor_refuses_invalid_inputs_with_documented_messages |
| longer than max_seq_length | test_training: test_bad_conversations; here: test_too_long_sample_is_refused_or_skipped_never_truncated; test_fuzz: test_collator_and_dataset_refuse_invalid_conversations_with_documented_messages |
| empty split | test_data: test_empty_file, test_all_records_skipped; here: test_empty_split_* |
| model folder: no weights / mismatched config | test_model: test_model_folder_without_weights_or_with_a_mismatched_config; test_predict: test_folder_without_weights_errors_clearly |
| LoRA adapter of another base model | test_adapters: test_adapter_of_a_wider_model_is_refused_with_the_first_bad_tensor, test_adapter_of_another_vocabulary_is_refused, test_adapter_for_layers_the_base_lacks_is_refused |
| untrusted files: safetensors or weights_only | test_adapters: test_pickled_adapter_loads_weights_only; here: test_no_unsafe_deserialisation_in_the_project |
| data path is a folder, one JSON object, trailing comma | test_flags: test_data_path_errors_are_one_line, test_one_json_object_is_one_record |
| bad media file found before the model loads | test_flags: test_bad_media_is_found_before_the_model_loads; test_custom: test_bad_input_is_a_one_line_error |
| bad flag (unknown, misspelled, refused combination) | test_flags: test_no_abbreviations_lora_alpha_in_task_recipes, test_custom_flag_errors, test_2u1_refusals_are_one_line, test_lora_with_nothing_to_wrap_names_the_flags |
| split too small for the recipe's evaluation split | test_flags: test_500_rows_or_fewer_says_the_first_500_are_the_evaluation_split |
| preference pair: missing / empty chosen or rejected, chosen == rejected, tags vs images, missing media, too long | test_dpo_recipe: test_each_bad_record_ends_the_recipe_in_one_line, test_a_bad_record_of_the_evaluation_file_ends_the_recipe_in_one_line, test_one_process_with_bad_records_skipped_trains_as_ddp |
| DPO / GRPO flag combinations | test_dpo_recipe: test_each_bad_flag_ends_the_recipe_in_one_line; test_grpo: test_bad_flags_end_in_one_line_before_the_model_loads, test_unknown_flags_are_named |
| reward file: syntax error, no *_reward function, raises, wrong length or type | test_grpo: test_bad_reward_files_end_in_one_line_before_the_model_loads, test_a_reward_failing_in_training_ends_in_one_line |
| nothing already written is lost | here: test_bad_sample_mid_run_keeps_the_checkpoints_and_resumes_with_skip; test_reliability: test_check_output_dir, test_resume_auto_after_sigkill_at_a_random_step_and_during_a_save; test_adapters: test_predict_and_merge_lora_refuse_in_one_line_and_write_nothing |
"""

import ast
import fnmatch
import io
import json
import logging
import os
import re
import shutil

import datasets
import pytest
import torch
from PIL import Image
from transformers import TrainerCallback, TrainingArguments

from phi3v import Phi3VForCausalLM
from phi3v.checkpoints import is_complete, latest_complete_checkpoint
from phi3v.dataset import SFTDataset
from phi3v.media import open_image
from phi3v.records import BadSampleError, load_records
from phi3v.splits import load_split, rows_name, take
from phi3v.training import make_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = [{"role": "user", "content": "<|image_1|>\nColour?"}, {"role": "assistant", "content": "red"}]


def catalogue() -> dict[str, dict[str, list[str]]]:
    """The table of this module's docstring: {entry: {test file: [test names]}} ("here" is this file; a remark in
    parentheses is not a name)."""
    rows = [line.strip("|").split("|") for line in __doc__.splitlines() if line.startswith("| ")]
    table = {}
    for entry, where in rows[1:]:  # rows[0]: the header
        files = table.setdefault(entry.strip(), {})
        for part in re.sub(r"\([^)]*\)", "", where).split(";"):
            name, _, tests = part.partition(":")
            name = "test_catalogue" if name.strip() == "here" else name.strip()
            files.setdefault(f"{name}.py", []).extend(t.strip() for t in tests.split(",") if t.strip())
    return table


def test_the_catalogue_names_existing_tests():
    table = catalogue()
    assert len(table) == __doc__.count("\n| ") - 1 == 20  # every row read (less the header)
    for entry, files in table.items():
        assert any(files.values()), f"{entry}: no test named"
        for name, tests in files.items():
            with open(os.path.join(ROOT, "tests", name)) as f:
                defined = {node.name for node in ast.walk(ast.parse(f.read())) if isinstance(node, ast.FunctionDef)}
            missing = [test for test in tests if not fnmatch.filter(defined, test)]  # "test_empty_split_*": a family
            assert tests and not missing, (entry, name, missing)


def png_bytes(size=(64, 48), noise=False):
    image = Image.effect_noise(size, 60).convert("RGB") if noise else Image.new("RGB", size, (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def hub_rows(images, texts):
    """A hub-style split (like the_cauldron's) with an Image column that decodes when a row is read."""
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    info = datasets.DatasetInfo(dataset_name="memes", config_name="hateful_memes", features=features)
    return datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "text": texts},
                                      features=features, info=info, split="train")


def hub_record(row, index):
    return {"id": f"memes-{index}", "source": f"memes[{index}]", "images": [row["image"]], "video": None,
            "messages": [{"role": "user", "content": "<|image_1|>\n" + row["text"]},
                         {"role": "assistant", "content": "red"}]}


# ------------------------------------------------------------------------------------------------ images
def test_hub_image_that_does_not_decode_names_the_row_or_is_skipped(processor, caplog):
    good, broken = png_bytes(noise=True), png_bytes(noise=True)
    rows = hub_rows([good, broken[: len(broken) // 2]], ["Colour?", "Colour?"])
    strict = SFTDataset(rows, processor, to_record=hub_record, num_crops=1)
    assert strict[0]["sample_id"] == "memes-0"
    with pytest.raises(BadSampleError) as error:
        strict[1]
    assert re.fullmatch(r"memes hateful_memes train row 1: cannot read the sample \(OSError: .*truncated.*\)",
                        str(error.value)), str(error.value)

    lenient = SFTDataset(rows, processor, to_record=hub_record, num_crops=1, skip_bad_samples=True)
    with caplog.at_level(logging.WARNING, logger="phi3v.dataset"):
        assert lenient[1]["sample_id"] == "memes-0" and lenient[1]["input_ids"] == strict[0]["input_ids"]
    assert lenient.bad_samples == {1}  # counted once, however often it is met
    assert caplog.records[0].getMessage().startswith("skipping bad sample (1 bad so far): memes hateful_memes train "
                                                     "row 1: cannot read the sample (OSError: ")


def test_in_memory_truncated_image_and_bomb(monkeypatch):
    data = png_bytes(size=(256, 256), noise=True)
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))  # header fine, pixels cut: fails only when decoded
    with pytest.raises(BadSampleError) as error:
        open_image(lazy, "memes[7]")
    assert str(error.value) == "memes[7]: corrupt or truncated image: <in-memory image> (image file is truncated)"

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadSampleError) as error:
        open_image(Image.new("RGB", (50, 21)), "memes[8]")
    assert str(error.value) == ("memes[8]: image too large, refused as a possible decompression bomb: <in-memory image> "
                                "(50x21 pixels, more than PIL.Image.MAX_IMAGE_PIXELS 1000)")
    assert open_image(Image.new("RGB", (50, 20)), "memes[9]").size == (50, 20)  # at the limit: fine


# ------------------------------------------------------------------------------------------------ records
def test_hub_row_missing_a_key_names_the_row(processor):
    rows = hub_rows([png_bytes()], ["Colour?"])
    dataset = SFTDataset(rows, processor, to_record=lambda row, index: {"id": row["id"]}, num_crops=1)
    with pytest.raises(BadSampleError) as error:
        dataset[0]
    assert str(error.value) == "memes hateful_memes train row 0: cannot read the sample (KeyError: 'id')"


def test_line_with_a_lone_surrogate_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"  # json.dumps escapes the surrogate as "\ud800", which json.loads accepts
    path.write_text(json.dumps({"conversations": [{"user": "abc\ud800", "assistant": "x"}]}) + "\n")
    with pytest.raises(BadSampleError) as error:
        load_records(path)
    assert str(error.value) == f"{path}:1: user text is not valid Unicode: lone surrogate '\\ud800' at character 3"


def test_too_long_sample_is_refused_or_skipped_never_truncated(processor, caplog):
    image = Image.new("RGB", (500, 500), (10, 200, 10))  # num_crops 4: 757 image tokens
    long = {"id": "long", "source": "d.jsonl:1", "images": [image], "video": None, "messages": QUESTION}
    short = {"id": "short", "source": "d.jsonl:2", "images": [], "video": None,
             "messages": [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "red"}]}
    full = SFTDataset([long], processor, num_crops=4)[0]
    assert full["input_ids"].count(-1) == 757
    length = len(full["input_ids"])

    strict = SFTDataset([long, short], processor, num_crops=4, max_length=length - 1)
    with pytest.raises(BadSampleError) as error:
        strict[0]
    assert str(error.value) == f"d.jsonl:1: the example is {length} tokens long, more than max_seq_length {length - 1}"

    lenient = SFTDataset([long, short], processor, num_crops=4, max_length=length - 1, skip_bad_samples=True)
    with caplog.at_level(logging.WARNING, logger="phi3v.dataset"):
        example = lenient[0]
    assert example["sample_id"] == "short" and -1 not in example["input_ids"]  # the next sample, whole
    assert lenient.bad_samples == {0} and "1 bad so far" in caplog.text
    assert SFTDataset([long], processor, num_crops=4, max_length=length)[0]["input_ids"] == full["input_ids"]


# ------------------------------------------------------------------------------------------------ empty splits
def test_empty_split_of_a_local_copy(tmp_path):
    folder = str(tmp_path / "copy")
    features = datasets.Features({"text": datasets.Value("string")})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": []}, features=features),
                          "test": datasets.Dataset.from_dict({"text": ["a"]}, features=features)}).save_to_disk(folder)
    with pytest.raises(ValueError) as error:  # datasets itself fails on it with an IndexError
        load_split("some/dataset", None, "train", folder)
    assert str(error.value) == f"{folder}: split 'train' is empty"
    assert len(load_split("some/dataset", None, "test", folder)) == 1  # the other split still loads
    with pytest.raises(ValueError) as error:
        load_split("some/dataset", None, "validation", folder)
    assert str(error.value) == f"{folder} has splits ['train', 'test'], not 'validation'"
    single = str(tmp_path / "single")
    datasets.Dataset.from_dict({"text": []}, features=features).save_to_disk(single)
    with pytest.raises(ValueError, match=f"^{re.escape(single)}: split 'train' is empty$"):
        load_split("some/dataset", None, "train", single)


def test_empty_split_after_the_recipes_slice(tmp_path):
    rows = hub_rows([png_bytes()] * 3, ["a", "b", "c"])
    assert rows_name(rows) == "memes hateful_memes train"
    with pytest.raises(ValueError) as error:  # the memes/nlvr2 recipes train on rows 500: of their split
        take(rows, 500, None)
    assert str(error.value) == "memes hateful_memes train has 3 rows: none from row 500 on, nothing to take"
    records = [{"source": f"{tmp_path}/d.jsonl:{i}"} for i in (1, 2)]
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path))}/d.jsonl has 2 rows: none from row 2 on"):
        take(records, 2)
    assert len(take(rows, 0, 0)) == 0 and len(take(rows, 1, 500)) == 2  # asking for nothing, or less, is fine


def test_empty_split_reaching_the_trainer_or_all_bad(processor, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    with pytest.raises(ValueError) as error:
        make_trainer(None, args, SFTDataset([], processor), processor)
    assert str(error.value) == "the training split is empty"
    assert not (tmp_path / "out").exists()

    bad = [{"id": f"b{i}", "source": f"{tmp_path}/d.jsonl:{i}", "images": [str(tmp_path / "gone.jpg")],
            "video": None, "messages": QUESTION} for i in (1, 2)]
    with pytest.raises(BadSampleError) as error:
        SFTDataset(bad, processor, num_crops=1, skip_bad_samples=True)[0]
    assert str(error.value) == f"every sample of {tmp_path}/d.jsonl is bad (2 samples)"


# ------------------------------------------------------------------------------------------------ nothing is lost
class BreakImagesAfterStep(TrainerCallback):
    """Truncates every image file once step `step` is done: a disk going bad under a running job."""

    def __init__(self, paths, step):
        self.paths, self.step = paths, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            for path in self.paths:
                data = open(path, "rb").read()
                open(path, "wb").write(data[: len(data) // 2])


def test_bad_sample_mid_run_keeps_the_checkpoints_and_resumes_with_skip(tiny_checkpoint, processor, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i in range(4):
        paths.append(str(folder / f"{i}.png"))
        Image.effect_noise((64, 48), 40 + i).convert("RGB").save(paths[-1])
    spare = str(folder / "spare.png")
    shutil.copy(paths[0], spare)  # never broken: what the resumed run can still train on
    records = [{"id": f"s{i}", "source": f"d.jsonl:{i + 1}", "images": [p], "video": None, "messages": QUESTION}
               for i, p in enumerate(paths + [spare])]
    output_dir = str(tmp_path / "run")

    def trainer(skip, callbacks=()):
        torch.manual_seed(0)
        args = TrainingArguments(output_dir=output_dir, max_steps=3, save_strategy="steps", save_steps=1,
                                 per_device_train_batch_size=1, learning_rate=1e-3, report_to=[], use_cpu=True,
                                 dataloader_num_workers=0, logging_steps=1, disable_tqdm=True, seed=0)
        dataset = SFTDataset(records, processor, num_crops=1, skip_bad_samples=skip)
        return make_trainer(Phi3VForCausalLM.from_pretrained(tiny_checkpoint), args, dataset, processor,
                            callbacks=list(callbacks)), dataset

    strict, _ = trainer(skip=False, callbacks=[BreakImagesAfterStep(paths, step=1)])
    with pytest.raises(BadSampleError) as error:
        strict.train()
    assert re.fullmatch(r"d\.jsonl:\d: corrupt or truncated image: .*/images/\d\.png \(.*\)", str(error.value))
    saved = latest_complete_checkpoint(output_dir)
    assert saved is not None and is_complete(saved)  # what was written before the bad sample is all there
    step = int(saved.rsplit("-", 1)[1])
    assert 1 <= step < 3

    resumed, dataset = trainer(skip=True)
    resumed.train(resume_from_checkpoint=saved)
    assert resumed.state.global_step == 3 and is_complete(os.path.join(output_dir, "checkpoint-3"))
    assert dataset.bad_samples  # met, counted and skipped
    assert is_complete(saved)


# ------------------------------------------------------------------------------------------------ untrusted files
def unsafe_loads(source: str):
    """Calls that can run code from a file: torch.load without weights_only=True, pickle/dill/joblib/marshal
    loads, np.load with allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}

        def true(key, keywords=keywords):
            return isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True

        name = f"{owner}.{node.func.attr}"
        if name == "torch.load" and not true("weights_only"):
            found.append((node.lineno, name))
        elif owner in ("pickle", "dill", "joblib", "marshal", "cloudpickle") and node.func.attr in ("load", "loads"):
            found.append((node.lineno, name))
        elif name in ("np.load", "numpy.load") and true("allow_pickle"):
            found.append((node.lineno, name))
    return found


def test_no_unsafe_deserialisation_in_the_project():
    assert unsafe_loads("torch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\n"
                        "np.load(p, allow_pickle=True)\ntorch.load(p, weights_only=True)\nnp.load(p)\n") == [
        (1, "torch.load"), (2, "torch.load"), (3, "pickle.loads"), (4, "np.load")]
    files = [os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")]
    for folder in ("phi3v", "scripts", "benchmarks", "examples"):
        for directory, _, names in os.walk(os.path.join(ROOT, folder)):
            files += [os.path.join(directory, name) for name in names if name.endswith(".py")]
    assert len(files) > 20
    offenders = {}
    for path in files:
        with open(path) as f:
            found = unsafe_loads(f.read())
        if found:
            offenders[os.path.relpath(path, ROOT)] = found
    assert offenders == {}


def test_bad_evaluation_sample_names_itself_or_is_skipped_and_counted(tiny_checkpoint, processor, tmp_path, caplog):
    from types import SimpleNamespace

    from phi3v.evaluation import evaluate, generate_answers

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    records = [{"id": str(i), "source": f"eval.jsonl:{i + 1}", "images": [str(tmp_path / name)], "video": None,
                "messages": [{"role": "user", "content": "<|image_1|>\nColour?"},
                             {"role": "assistant", "content": "red"}]}
               for i, name in enumerate(["red.png", "gone.png", "red.png"])]
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint).eval()
    strict = SFTDataset(records, processor=processor, num_crops=1)
    with pytest.raises(BadSampleError, match=r"eval.jsonl:2: image file not found: .*gone.png"):
        generate_answers(model, processor, strict, batch_size=2, max_new_tokens=2, progress=False)

    lenient = SFTDataset(records, processor=processor, num_crops=1, skip_bad_samples=True)
    args = SimpleNamespace(eval_batch_size=2, max_new_tokens=2, no_tqdm=True)
    with caplog.at_level(logging.WARNING):
        report = evaluate(model, processor, lenient, lambda p: ("accuracy", 0.5), args,
                          SimpleNamespace(output_dir=str(tmp_path)), "eval_before")
    assert [p["id"] for p in report["predictions"]] == ["0", "2"]  # the rest answered, in order
    assert report["skipped_bad_samples"] == 1 and report["num_samples"] == 2
    assert "eval_before: skipping bad sample: eval.jsonl:2: image file not found" in caplog.text
    # The stand-in that kept the batch's size changed nothing: sample 0's answer is the one it gets alone.
    alone = generate_answers(model, processor, SFTDataset(records[:1], processor=processor, num_crops=1),
                             batch_size=1, max_new_tokens=2, progress=False)
    assert report["predictions"][0]["prediction"] == alone[0]["prediction"]

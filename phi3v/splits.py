"""A recipe's splits: where its data comes from (a hub dataset, its local `save_to_disk` copy, or a records file:
phi3v.records), the rows it takes, and their name in messages."""

import json
import os

from phi3v.errors import InputError
from phi3v.media import check_media
from phi3v.processing import image_tag_block
from phi3v.records import load_records, parse_record


def load_split(
    hub_id: str, config_name: str | None, split: str, dataset_path: str | None = None, skip_bad_samples=False
):
    """Rows of one split: a datasets.Dataset (hub or save_to_disk copy) or a list of records (jsonl / JSON).

    Records are already in the project's form; Dataset rows go through the recipe's own `to_record`. A records
    file's images and videos are looked at now (phi3v.media.check_media), before the model loads.
    """
    if dataset_path and os.path.isfile(dataset_path):
        return check_media(load_records(dataset_path, skip_bad_samples=skip_bad_samples), skip_bad_samples)
    import datasets

    if dataset_path:
        name, data = dataset_path, _load_saved_split(dataset_path, split)
    else:
        name = f"{hub_id} ({config_name or 'default'})"
        try:
            data = datasets.load_dataset(hub_id, config_name, split=split)
        except Exception as error:  # offline or unknown: say how to work without the hub
            reason = " ".join(str(error).split())
            raise InputError(
                f"could not load {name} from the Hugging Face hub: {reason}. Without network, save a copy elsewhere "
                "with `datasets.load_dataset(...).save_to_disk(folder)` and pass --dataset_path folder."
            ) from error
    if data is None or len(data) == 0:
        raise InputError(f"{name}: split {split!r} is empty")
    return data


def _load_saved_split(dataset_path, split):
    """One split of a save_to_disk folder (a Dataset, or a DatasetDict holding `split`); None if it has no rows."""
    import datasets

    if not os.path.isdir(dataset_path):
        raise InputError(f"--dataset_path {dataset_path} does not exist")
    folder = dataset_path
    dict_file = os.path.join(dataset_path, "dataset_dict.json")
    if os.path.isfile(dict_file):  # a DatasetDict copy: load only the split asked for
        with open(dict_file) as f:
            splits = json.load(f).get("splits", [])
        if split not in splits:
            raise InputError(f"{dataset_path} has splits {splits}, not {split!r}")
        folder = os.path.join(dataset_path, split)
    # datasets cannot load a split saved with no rows (an IndexError deep inside)
    return None if _saved_without_rows(folder) else datasets.load_from_disk(folder)


def _saved_without_rows(folder) -> bool:
    """Whether a save_to_disk Dataset folder holds no data files (what saving a split with no rows leaves)."""
    try:
        with open(os.path.join(folder, "state.json")) as f:
            return json.load(f).get("_data_files") == []
    except (OSError, ValueError):
        return False


def take(rows, start: int = 0, stop: int | None = None, note: str = ""):
    """rows[start:stop] for a Dataset (select) or a list of records.

    Starting at or past the end is an error (a recipe that trains on rows 500: of a split with 500 rows or fewer
    would otherwise load the model and evaluate before finding it has nothing to train on); `note` says why the
    recipe starts there."""
    if start > 0 and start >= len(rows):
        raise InputError(f"{rows_name(rows)} has {len(rows)} rows: none from row {start} on, nothing to take"
                         + (f"; {note}" if note else ""))
    stop = len(rows) if stop is None else min(stop, len(rows))
    if isinstance(rows, list):
        return rows[start:stop]
    return rows.select(range(start, stop))


def split_off_eval(rows, eval_size: int, max_train_samples=None, max_eval_samples=None, script: str = ""):
    """(train rows, eval rows) of one split whose first `eval_size` rows evaluate and the rest train (the original
    recipe's train[500:] / train[:500]), each cut to --max_train_samples / --max_eval_samples. script: the recipe
    file, named in the error for a split of eval_size rows or fewer."""
    train = take(rows, eval_size, None if max_train_samples is None else eval_size + max_train_samples,
                 note=f"the first {eval_size} rows are the evaluation split and training takes the rest: give more "
                      f"than {eval_size} rows, or change EVAL_SIZE at the top of {os.path.basename(script)}")
    return train, take(rows, 0, min(eval_size, max_eval_samples or eval_size))


def is_record(row) -> bool:
    return isinstance(row, dict) and "messages" in row and "source" in row


def cauldron_record(row, index: int, dataset: str, config: str) -> dict:
    """A HuggingFaceM4/the_cauldron row ({"images": [...], "texts": [{"user", "assistant"}, ...]}) -> a record.

    The first user turn starts with one tag line per image: "<|image_1|>\n<|image_2|>\n" + question.
    """
    if is_record(row):  # already a record (jsonl --dataset_path)
        return row
    tags = image_tag_block(range(1, len(row["images"]) + 1))
    messages = []
    for turn, text in enumerate(row["texts"]):
        messages.append({"role": "user", "content": (tags if turn == 0 else "") + text["user"]})
        messages.append({"role": "assistant", "content": text["assistant"]})
    return {"id": f"{config}-{index}", "source": f"{dataset}/{config}[{index}]", "images": row["images"],
            "video": None, "messages": messages}


def rows_name(rows) -> str:
    """What the rows are, for messages: "HuggingFaceM4/the_cauldron hateful_memes train" for a hub split, the
    data file for records."""
    info = getattr(rows, "info", None)
    if info is not None:
        parts = [info.dataset_name or info.builder_name, info.config_name, str(rows.split or "") or None]
        return " ".join(p for p in parts if p and p != "default") or "the dataset"
    if isinstance(rows, list) and rows and isinstance(rows[0], dict) and isinstance(rows[0].get("source"), str):
        return rows[0]["source"].rsplit(":", 1)[0].split("[")[0]  # "data/train.jsonl:3" -> "data/train.jsonl"
    return "the dataset"


def records_split(path, image_folder=None, skip_bad_samples=False, max_samples=None, parse=parse_record):
    """The first max_samples records of a data file (--data_path, --eval_data_path), each record and its media
    files checked (phi3v.records, phi3v.media.check_media) before the model loads."""
    records = take(load_records(path, image_folder, skip_bad_samples, parse=parse), 0, max_samples)
    return check_media(records, skip_bad_samples)

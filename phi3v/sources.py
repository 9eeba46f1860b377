"""Where a recipe's data comes from: a hub dataset, its local copy (`save_to_disk` folder), or a jsonl file."""

import os

from phi3v.data import load_records
from phi3v.processing import image_tag_block


def load_split(hub_id: str, config_name: str | None, split: str, dataset_path: str | None = None, skip_bad_samples=False):
    """Rows of one split: a datasets.Dataset (hub or save_to_disk copy) or a list of records (jsonl / JSON).

    Records are already in the project's form; Dataset rows go through the recipe's own `to_record`.
    """
    if dataset_path and os.path.isfile(dataset_path):
        return load_records(dataset_path, skip_bad_samples=skip_bad_samples)
    import datasets

    if dataset_path:
        if not os.path.isdir(dataset_path):
            raise FileNotFoundError(f"--dataset_path {dataset_path} does not exist")
        data = datasets.load_from_disk(dataset_path)
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"{dataset_path} has splits {list(data)}, not {split!r}")
            data = data[split]
        return data
    try:
        return datasets.load_dataset(hub_id, config_name, split=split)
    except Exception as error:  # offline or unknown: say how to work without the hub
        raise OSError(
            f"could not load {hub_id} ({config_name or 'default'}) from the Hugging Face hub: {error}. "
            "Without network, save a copy elsewhere with `datasets.load_dataset(...).save_to_disk(folder)` and "
            "pass --dataset_path folder."
        ) from error


def take(rows, start: int = 0, stop: int | None = None):
    """rows[start:stop] for a Dataset (select) or a list of records."""
    stop = len(rows) if stop is None else min(stop, len(rows))
    if isinstance(rows, list):
        return rows[start:stop]
    return rows.select(range(start, stop))


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

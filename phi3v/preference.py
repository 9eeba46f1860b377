"""Preference pairs for DPO: the community's data format, each pair checked before the model loads, and the dataset
of tokenized pairs (one prompt, two answers continuing from it: phi3v.shared_prefix).

The format is 2U1/Qwen-VL-Series-Finetune's DPO data (a JSON list, one record per line, or one record), paths
relative to the image folder:

    {"id": "1", "image": "cat.jpg", "prompt": "<image>\\nWhat is this?", "chosen": "A cat.", "rejected": "A dog."}

"image" may be a list (one <image> tag each, in order; untagged images go before the first question), or "video"
(one <video> tag; frames sampled as everywhere else); a pair may have no media at all. "conversations" (optional)
holds earlier turns in LLaVA form ({"from": "human" | "gpt", "value"}), before the compared one: the prompt is then
the next human turn. A pair is read as the LLaVA conversation "history + prompt + chosen" (phi3v.records: tags,
paths, video, the text checks) with its rejected answer kept beside it, so every check of the SFT data applies.
"""

import logging

from phi3v.conversation import completion_ids, tokenize_prompt, turn_ids
from phi3v.dataset import SFTDataset
from phi3v.media import load_record_images, media_sizes
from phi3v.processing import check_text
from phi3v.records import MAX_REASONS_LOGGED, BadSampleError, parse_record

logger = logging.getLogger(__name__)


def parse_preference(obj, source, default_id, image_folder, data_path):
    """One JSON object -> a checked record whose last message is the chosen answer, with "rejected" beside it."""
    if not isinstance(obj, dict):
        raise BadSampleError(f"{source}: record must be a JSON object, got {type(obj).__name__}")
    texts = {}
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            raise BadSampleError(f"{source}: missing key {key!r} (a preference pair has 'prompt', 'chosen' and "
                                 "'rejected')")
        if not isinstance(obj[key], str):
            raise BadSampleError(f"{source}: {key!r} must be a str, got {type(obj[key]).__name__}")
        if not obj[key].strip():
            raise BadSampleError(f"{source}: empty {key!r}")
        try:
            check_text(obj[key])
        except ValueError as error:
            raise BadSampleError(f"{source}: {key!r} {error}") from None
        texts[key] = obj[key]
    if texts["chosen"].strip() == texts["rejected"].strip():
        raise BadSampleError(f"{source}: 'chosen' and 'rejected' are the same answer: nothing to prefer")
    history = obj.get("conversations") or []
    if not isinstance(history, list):
        raise BadSampleError(f"{source}: 'conversations' (the turns before 'prompt') must be a list")
    if history and isinstance(history[-1], dict) and history[-1].get("from", "").lower() in ("human", "user"):
        raise BadSampleError(f"{source}: 'conversations' holds the turns before 'prompt' and must end with an answer "
                             "(the prompt is the next question)")
    conversation = [*history, {"from": "human", "value": texts["prompt"]}, {"from": "gpt", "value": texts["chosen"]}]
    llava = {key: obj[key] for key in ("id", "image", "video") if key in obj}
    record = parse_record({**llava, "conversations": conversation}, source, default_id, image_folder, data_path)
    record["rejected"] = texts["rejected"]
    return record


def check_pair_lengths(records, processor, num_crops, max_length, max_num_frames=10, skip_bad_samples=False):
    """Refuse every pair longer than max_length (its prompt and longer answer), or with skip_bad_samples leave it out
    (logged), before the model loads: the images' token counts come from their sizes (file headers, a video's
    stream), nothing is decoded. Returns the records kept."""
    if max_length is None:
        return records
    kept, reasons = [], []
    for record in records:
        try:
            sizes, messages = media_sizes(record, max_num_frames)
            counts = [processor.image_processor.num_image_tokens(w, h, num_crops) for w, h in sizes]
            try:
                prompt = turn_ids(processor, messages[:-1], counts, answered=False)["input_ids"]
                answers = [completion_ids(processor, text) for text in (messages[-1]["content"], record["rejected"])]
            except ValueError as error:
                raise BadSampleError(f"{record['source']}: {error}") from None
            check_pair_length(record, len(prompt), answers, max_length)
            kept.append(record)
        except BadSampleError as error:
            if not skip_bad_samples:
                raise
            reasons.append(str(error))
    if reasons:
        logger.warning("skipped %d pair(s) longer than max_seq_length %d, kept %d. First reasons:\n  %s",
                       len(reasons), max_length, len(kept), "\n  ".join(reasons[:MAX_REASONS_LOGGED]))
        if not kept:
            raise BadSampleError(f"no usable pairs: all {len(reasons)} are too long (first: {reasons[0]})")
    return kept


def check_pair_length(record, prompt_length, answers, max_length) -> None:
    length = prompt_length + max(map(len, answers))
    if max_length is not None and length > max_length:
        raise BadSampleError(f"{record['source']}: the pair is {length} tokens long (prompt and longer answer), more "
                             f"than max_seq_length {max_length}")


class PreferenceDataset(SFTDataset):
    """Map-style dataset of tokenized preference pairs: {"prompt_ids", "completions": [chosen ids, rejected ids],
    "pixel_values", "image_sizes", "sample_id", "index"}, images opened and processed when an item is read.

    The prompt is the conversation up to the compared answer, tokenized as the SFT example of the same conversation
    (so prompt + chosen is exactly the SFT example ending with the chosen answer). A pair longer than max_length
    (prompt + its longer answer) is refused, never truncated. Evaluation asks `generation_example` (the prompt, the
    chosen answer as gold) and the bad-sample handling is SFTDataset's."""

    def example(self, index) -> dict:
        record = self.record(index)
        images, messages = load_record_images(record, self.max_num_frames)
        try:
            prompt = tokenize_prompt(self.processor, messages[:-1], images, self.num_crops)
            completions = [completion_ids(self.processor, messages[-1]["content"]),
                           completion_ids(self.processor, record["rejected"])]
        except ValueError as error:
            raise BadSampleError(f"{record['source']}: {error}") from None
        check_pair_length(record, len(prompt["prompt_ids"]), completions, self.max_length)
        return {**prompt, "completions": completions, "sample_id": record["id"], "index": index}

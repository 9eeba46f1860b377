"""SFTDataset: records (or any rows plus a function that turns a row into a record) -> training examples, and the
generation example of a record (its prompt up to the last answer) that evaluation and predict.py answer."""

import logging

import torch

from phi3v.conversation import generation_prompt, tokenize_conversation
from phi3v.media import load_record_images
from phi3v.records import BadSampleError
from phi3v.splits import rows_name

logger = logging.getLogger(__name__)


def generation_example(processor, record, max_num_frames=10) -> dict:
    """What the model is asked for a record: {"id", "prompt" (the conversation up to its last answer, with the
    generation prompt), "images", "answer" (the last answer), "answers" (every gold answer, when the record has
    several)}. BadSampleError, naming the record, when it cannot be read."""
    images, messages = load_record_images(record, max_num_frames)
    try:
        prompt, answer = generation_prompt(processor, messages)
    except ValueError as error:
        raise BadSampleError(f"{record['source']}: {error}") from None
    example = {"id": record["id"], "prompt": prompt, "images": images, "answer": answer}
    if record.get("answers") is not None:  # several gold answers (DocVQA)
        example["answers"] = list(record["answers"])
    return example


class SFTDataset(torch.utils.data.Dataset):
    """Map-style dataset of tokenized conversations; images are opened and processed when an item is read.

    rows: records (phi3v.records) or anything indexable whose items `to_record` turns into records (for
    example a Hugging Face dataset split, whose images stay undecoded until used).
    With skip_bad_samples, an item that fails (corrupt image, too long, ...) is logged and replaced by the
    next good one, so a single bad file does not stop a long run; `bad_samples` counts the distinct bad items
    this process has met (each DataLoader worker counts its own), and every warning says how many so far.
    A row that cannot be read or made into a record at all (a hub row with a missing key or an image that does
    not decode) is a BadSampleError naming the row, like any other bad sample.
    """

    def __init__(
        self,
        rows,
        processor,
        to_record=None,
        num_crops=None,
        max_length=None,
        max_num_frames=10,
        skip_bad_samples=False,
    ):
        self.rows = rows
        self.processor = processor
        self.to_record = to_record
        self.num_crops = num_crops
        self.max_length = max_length
        self.max_num_frames = max_num_frames
        self.skip_bad_samples = skip_bad_samples
        self.bad_samples = set()  # indices found bad (in this process)

    def __len__(self):
        return len(self.rows)

    def record(self, index) -> dict:
        try:
            row = self.rows[index]  # a hub dataset decodes the row's images here
            return self.to_record(row, index) if self.to_record is not None else row
        except BadSampleError:
            raise
        except Exception as error:  # someone else's data: a missing key, a None, an image that does not decode
            raise BadSampleError(
                f"{rows_name(self.rows)} row {index}: cannot read the sample ({type(error).__name__}: {error})"
            ) from error

    def example(self, index) -> dict:
        record = self.record(index)
        images, messages = load_record_images(record, self.max_num_frames)
        try:
            example = tokenize_conversation(self.processor, messages, images, self.num_crops, self.max_length)
        except ValueError as error:
            raise BadSampleError(f"{record['source']}: {error}") from None
        example["sample_id"] = record["id"]  # names the samples of a batch in error messages
        return example

    def generation_example(self, index) -> dict:
        """Item `index` as evaluation asks it (see generation_example); BadSampleError if it cannot be read."""
        return generation_example(self.processor, self.record(index), self.max_num_frames)

    def __getitem__(self, index):
        if not self.skip_bad_samples:
            return self.example(index)
        for attempt in range(len(self)):
            try:
                return self.example((index + attempt) % len(self))
            except BadSampleError as error:
                self.bad_samples.add((index + attempt) % len(self))
                logger.warning("skipping bad sample (%d bad so far): %s", len(self.bad_samples), error)
        raise BadSampleError(f"every sample of {rows_name(self.rows)} is bad ({len(self)} samples)")

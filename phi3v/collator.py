"""Conversation -> training example (ids with labels on the answers only), and the padding (or packing) collator.

All tokenization and image processing happens per example (in the dataset, so in the DataLoader's workers);
the collator only pads (or packs) and concatenates.
"""

import itertools
from dataclasses import dataclass

import torch

from phi3v.processing import IMAGE_TAG, Phi3VProcessor, as_id_list, pad_sequences

IGNORE_INDEX = -100
# Every answer ends the assistant turn and the text, as in the official recipe (docs/DESIGN.md §4.4).
ANSWER_SUFFIX = "<|end|>\n<|endoftext|>"


def tokenize_conversation(
    processor: Phi3VProcessor, messages: list[dict], images: list, num_crops=None, max_length=None
) -> dict:
    """input_ids and labels of a conversation (-100 everywhere but the assistant answers), with its images.

    Each assistant turn is preceded by the chat-template prompt of the messages before it. BOS stands only
    where the processor puts it: at the start and after each image block; a later turn gets no BOS of its own.
    """
    for message in messages:  # checked first: a bad message would otherwise fail deep inside with a TypeError
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"a message must be a dict with role 'system', 'user' or 'assistant', got {message!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message content must be a string with inline image tags, got {message!r}")
    features = processor.image_processor(images, num_crops=num_crops) if images else None
    token_counts = features["num_img_tokens"] if features is not None else []
    input_ids, labels, pending, next_image = [], [], [], 1
    for message in messages:
        if message["role"] != "assistant":
            pending.append(message)
            continue
        if not pending:
            raise ValueError("two assistant turns in a row: every answer needs a user turn before it")
        prompt = processor.apply_chat_template(pending, add_generation_prompt=True)
        num_tags = len(IMAGE_TAG.findall(prompt))
        counts = token_counts[next_image - 1 : next_image - 1 + num_tags]
        if len(counts) != num_tags:
            raise ValueError(f"the conversation has more image tags than its {len(images)} image(s)")
        prompt_ids = processor.encode_prompt(prompt, counts, first_image=next_image)
        if input_ids:
            prompt_ids = prompt_ids[1:]
        answer_ids = processor.encode_text(message["content"] + ANSWER_SUFFIX)
        input_ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        next_image += num_tags
        pending = []
    if pending or not input_ids:
        raise ValueError("the conversation must end with an assistant answer")
    if next_image - 1 != len(images):
        raise ValueError(f"the conversation has {next_image - 1} image tag(s) but {len(images)} image(s)")
    if max_length is not None and len(input_ids) > max_length:
        # Never truncate: a cut through the image tokens would silently misalign images and text.
        raise ValueError(f"the example is {len(input_ids)} tokens long, more than max_seq_length {max_length}")
    example = {"input_ids": input_ids, "labels": labels}
    if features is not None:
        example["pixel_values"] = features["pixel_values"]
        example["image_sizes"] = features["image_sizes"]
    return example


def generation_prompt(processor: Phi3VProcessor, messages: list[dict]) -> tuple[str, str]:
    """(prompt up to the last assistant turn, that turn's answer): what evaluation asks and expects."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the conversation must end with an assistant answer")
    return processor.apply_chat_template(messages[:-1], add_generation_prompt=True), messages[-1]["content"]


@dataclass
class Phi3VDataCollator:
    """Right-pads input_ids (pad id), labels (-100) and the attention mask; concatenates all images.

    With `packing`, the micro-batch becomes one row with no padding at all: the samples one after another,
    `position_ids` restarting at 0 for each, no attention mask, and the sample boundaries as transformers' varlen
    arguments (`cu_seq_lens_q/k`, `max_length_q/k`); the model keeps attention within each sample. The first label
    of every sample is -100 (it never is a target: it is the prompt's first token), so no sample's last token is
    trained to predict the next sample.

    Both ways the batch also carries what the model would otherwise have to read back from the GPU (each a sync):
    `image_grids` (crops per image as [rows, cols], Python ints: non-tensor entries stay on the host, the Trainer
    moves tensors only), `image_positions` (flat indices of the image slots in input_ids) and `loss_positions`
    (flat indices of the positions whose next label is supervised).
    """

    pad_token_id: int
    packing: bool = False

    def __call__(self, examples: list[dict]) -> dict:
        ids = [as_id_list(e["input_ids"]) for e in examples]
        labels = [as_id_list(e["labels"]) for e in examples]
        if self.packing:
            lengths = [len(seq) for seq in ids]
            starts = [0, *itertools.accumulate(lengths)][:-1]
            labels = [[IGNORE_INDEX] * min(1, len(seq)) + seq[1:] for seq in labels]  # no target across samples
            batch = {
                "input_ids": torch.tensor([[i for seq in ids for i in seq]], dtype=torch.long),
                "labels": torch.tensor([[i for seq in labels for i in seq]], dtype=torch.long),
                "position_ids": torch.tensor([[p for n in lengths for p in range(n)]], dtype=torch.long),
                "cu_seq_lens_q": torch.tensor(starts + [sum(lengths)], dtype=torch.int32),
                "max_length_q": max(lengths),
            }
            batch["cu_seq_lens_k"], batch["max_length_k"] = batch["cu_seq_lens_q"], batch["max_length_q"]
        else:
            batch = {
                "input_ids": pad_sequences(ids, self.pad_token_id, "right"),
                "labels": pad_sequences(labels, IGNORE_INDEX, "right"),
                "attention_mask": pad_sequences([[1] * len(seq) for seq in ids], 0, "right"),
            }
            width = batch["input_ids"].shape[1]
            starts = [row * width for row in range(len(ids))]
        batch["image_positions"] = torch.tensor(
            [start + t for start, seq in zip(starts, ids) for t, i in enumerate(seq) if i < 0], dtype=torch.long
        )
        batch["loss_positions"] = torch.tensor(
            [start + t for start, seq in zip(starts, labels) for t in range(len(seq) - 1) if seq[t + 1] != IGNORE_INDEX],
            dtype=torch.long,
        )
        if all("sample_id" in e for e in examples):
            batch["sample_ids"] = [e["sample_id"] for e in examples]  # not a model input: Phi3VTrainer takes it
        with_images = [e for e in examples if "pixel_values" in e]
        if with_images:
            batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
            batch["image_sizes"] = torch.cat([e["image_sizes"] for e in with_images])
            crop = batch["pixel_values"].shape[-1]
            batch["image_grids"] = [[h // crop, w // crop] for h, w in batch["image_sizes"].tolist()]
        return batch

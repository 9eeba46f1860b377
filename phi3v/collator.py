"""The padding (or packing) collator of training examples.

All tokenization and image processing happens per example (phi3v.conversation, called in the dataset, so in the
DataLoader's workers); the collator only pads (or packs) and concatenates.
"""

import itertools
from dataclasses import dataclass

import torch

from phi3v.conversation import IGNORE_INDEX
from phi3v.processing import as_id_list, pad_sequences


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
            [start + t for start, seq in zip(starts, labels) for t in range(len(seq) - 1)
             if seq[t + 1] != IGNORE_INDEX],
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

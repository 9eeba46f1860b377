"""Shared-prefix rows: several completions of one prompt (DPO's chosen and rejected, GRPO's sampled answers) scored in
one padding-free row where the prompt, images included, runs once (docs/DESIGN.md §12).

Row layout, for each group in turn: the prompt's ids (image slots negative, as the processor makes them), then
completion 1's ids, ..., completion k's. Every completion's positions continue the prompt's (P, P+1, ...) and its
`branch_ids` are its number i (0 on the prompt), so the model's mask lets it see its prompt and itself only.
`two_sequence_batch` builds the usual layout of the same data (prompt + completion_i as padded rows, CLIP run per
row) for the equality tests and the speed benchmarks. All bookkeeping is done here, on the host, with Python ints:
the forward reads nothing back from the GPU.
"""

import torch

from phi3v.collator import Phi3VDataCollator
from phi3v.conversation import IGNORE_INDEX
from phi3v.processing import as_id_list

# Batch entries that are not model inputs: what a recipe's loss needs to sum and pair the completions.
BOOKKEEPING_KEYS = ("completion_index", "num_completions", "completion_lengths", "sample_ids")


def checked_groups(examples: list[dict]) -> list[tuple[list[int], list[list[int]]]]:
    """[(prompt ids, [completion ids, ...])] as lists of ints; ValueError for an empty prompt, a group without
    completions, an empty completion, or an image slot (negative id) in a completion."""
    groups = []
    for index, example in enumerate(examples):
        prompt = as_id_list(example["prompt_ids"])
        completions = [as_id_list(c) for c in example["completions"]]
        if not prompt or not completions or not all(completions):
            raise ValueError(f"example {index}: a shared-prefix group needs a prompt and non-empty completions")
        if any(i < 0 for c in completions for i in c):
            raise ValueError(f"example {index}: a completion has image slots (negative ids); images go in the prompt")
        groups.append((prompt, completions))
    return groups


def completion_entries(examples: list[dict], groups) -> dict:
    """The entries both layouts share: the targets, which completion each belongs to (completions numbered
    group-major), the completions' count and lengths, and sample_ids (one per group) when every example has one."""
    completions = [c for _, group_completions in groups for c in group_completions]
    batch = {
        "logp_targets": torch.tensor([i for c in completions for i in c], dtype=torch.long),
        "completion_index": torch.tensor([n for n, c in enumerate(completions) for _ in c], dtype=torch.long),
        "num_completions": len(completions),
        "completion_lengths": torch.tensor([len(c) for c in completions], dtype=torch.long),
    }
    if all("sample_id" in e for e in examples):
        batch["sample_ids"] = [e["sample_id"] for e in examples]
    return batch


def shared_prefix_batch(examples: list[dict], pad_token_id: int) -> dict:
    """One padding-free row of groups: each example's prompt once, then its completions.

    examples: [{"prompt_ids", "completions" (k >= 1 lists of ids), optional "pixel_values", "image_sizes" (as
    tokenize_prompt returns them), optional "sample_id"}]. Returns the model inputs input_ids, position_ids,
    branch_ids, max_sequence_length (the longest prompt + completion, for the length limit), image_positions,
    pixel_values, image_sizes, image_grids (with images), logp_positions and logp_targets, plus BOOKKEEPING_KEYS.
    The first target of every completion is predicted by its prompt's last token, target j > 0 by the completion's
    token j - 1. pad_token_id is unused (nothing is padded); it keeps the call two_sequence_batch's.
    """
    groups = checked_groups(examples)
    ids, positions, branches, image_positions, logp_positions = [], [], [], [], []
    for prompt, completions in groups:
        prompt_start, prompt_length = len(ids), len(prompt)
        image_positions += [prompt_start + t for t, i in enumerate(prompt) if i < 0]
        ids += prompt
        positions += range(prompt_length)
        branches += [0] * prompt_length
        for branch, completion in enumerate(completions, start=1):
            start = len(ids)
            logp_positions += [prompt_start + prompt_length - 1] + [start + j for j in range(len(completion) - 1)]
            ids += completion
            positions += range(prompt_length, prompt_length + len(completion))
            branches += [branch] * len(completion)
    batch = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "branch_ids": torch.tensor([branches], dtype=torch.long),
        "max_sequence_length": max(len(prompt) + len(c) for prompt, completions in groups for c in completions),
        "image_positions": torch.tensor(image_positions, dtype=torch.long),
        "logp_positions": torch.tensor(logp_positions, dtype=torch.long),
    }
    with_images = [e for e in examples if "pixel_values" in e]
    if with_images:
        image_sizes = torch.cat([e["image_sizes"] for e in with_images])
        crop = with_images[0]["pixel_values"].shape[-1]
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
        batch["image_sizes"] = image_sizes
        batch["image_grids"] = [[h // crop, w // crop] for h, w in image_sizes.tolist()]
    return batch | completion_entries(examples, groups)


def two_sequence_batch(examples: list[dict], pad_token_id: int) -> dict:
    """The reference layout of the same examples: one right-padded row per (group, completion), prompt +
    completion, with an attention_mask and the group's images repeated for each of its rows (CLIP runs once per
    row). The same entries as shared_prefix_batch but position_ids, branch_ids and max_sequence_length, in the same
    completion order; logp_positions index [rows x width]."""
    groups = checked_groups(examples)
    images = [{k: e[k] for k in ("pixel_values", "image_sizes") if k in e} for e in examples]
    rows = [
        {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion, **group_images}
        for (prompt, completions), group_images in zip(groups, images)
        for completion in completions
    ]
    batch = Phi3VDataCollator(pad_token_id)(rows)
    del batch["labels"]
    # The padding collator's supervised positions are those predicting a completion token, in row order.
    batch["logp_positions"] = batch.pop("loss_positions")
    return batch | completion_entries(examples, groups)


def sequence_log_probs(token_log_probs: torch.Tensor, completion_index: torch.Tensor, num_completions: int):
    """[num_completions] sums of the token log-probabilities of each completion (the model's token_log_probs and
    the batch's completion_index), on the device, without reading anything back."""
    sums = token_log_probs.new_zeros(num_completions)
    return sums.index_add(0, completion_index, token_log_probs)


def model_inputs(batch: dict) -> dict:
    """The batch without BOOKKEEPING_KEYS: what the model's forward takes."""
    return {k: v for k, v in batch.items() if k not in BOOKKEEPING_KEYS}

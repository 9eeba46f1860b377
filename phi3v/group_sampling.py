"""Sampling a group of G answers per prompt (GRPO's groups) with each prompt's images and prefill run once
(docs/DESIGN.md §14).

`sample_groups` left-pads the prompts, runs CLIP and the decoder over all but the last prompt token once per
prompt, copies the resulting KV cache G times along the batch into a preallocated `StaticCache` (decoding writes
each new token in place instead of concatenating the whole cache at every step; both paths use one) and lets
transformers' `generate` continue from it with the prompt ids repeated G times: its first step runs only the last
prompt token of each of the B * G rows, then it samples as usual. (When a step passes LongRoPE's switch the model
re-runs the whole sequence without the cache: then both paths keep transformers' DynamicCache.) `sample_groups_repeated`
is the usual layout (every prompt repeated G times, CLIP and the prefill run G times: TRL's), the reference for the
equality tests and the benchmark. With the same torch seed both return the same completions: the rows are in the
same order and generate draws its samples with the same logits processors from tensors of the same shapes; only
the floating-point rounding of the prompt's keys and values and of its last logits can differ (other kernel shapes),
by far too little to change a token in the tests.

Both return a `SampledGroups`: per prompt, the G completions (generated ids up to and including the first stop
token) and whether each was truncated (max_completion_length reached without a stop token). `group_examples`
turns them into the examples `phi3v.shared_prefix.shared_prefix_batch` takes.
"""

import contextlib
import functools
from typing import NamedTuple

import torch
from transformers import StaticCache

from phi3v.compat import GENERATION_CACHE_KWARG
from phi3v.processing import STOP_TOKEN_IDS, as_id_list


class SampledGroups(NamedTuple):
    """completions[p][g]: the ids sample g of prompt p generated, up to and including its first stop token (never
    anything after it); truncated[p][g]: it reached max_completion_length without a stop token."""

    completions: list[list[list[int]]]
    truncated: list[list[bool]]


def sample_groups(
    model,
    prompts: list[dict],
    num_generations: int,
    max_completion_length: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
    pad_token_id: int = 32000,
    stop_token_ids=STOP_TOKEN_IDS,
    share_prompt: bool = True,
) -> SampledGroups:
    """num_generations answers to each prompt, the prompt (images included) run once and its KV cache shared.

    share_prompt=False is the usual layout, for reference (sample_groups_repeated): each prompt repeated
    num_generations times (its images with it, in row order) and one `generate` call, so CLIP and the prefill run G
    times per prompt; with the same torch seed, the same completions.

    prompts: [{"prompt_ids" (image slots negative), optional "pixel_values", "image_sizes"}] as
    `conversation.tokenize_prompt` returns them. Sampling uses transformers' logits processors with temperature,
    top_k (0: off) and top_p (1.0: off) as GenerationConfig takes them; do_sample=False is greedy (G equal answers).
    The model runs in eval mode without gradients and gets its previous mode back. Under DeepSpeed ZeRO-3 gather
    the weights around the call (`phi3v.evaluation.full_weights(model)`), as for evaluation.

    LongRoPE (docs/DESIGN.md §6): when prompt + answer passes original_max_position_embeddings during sampling,
    the model's generation hook drops the cache and re-runs the whole sequence with the images; for that step the
    images are passed for all B * G rows (each prompt's G times, in row order), only when the step can happen.
    """
    batch = _PromptBatch(prompts, pad_token_id, num_generations, max_completion_length)
    options = _generation_options(max_completion_length, temperature, top_p, top_k, do_sample, pad_token_id,
                                  stop_token_ids)
    limit = model.config.original_max_position_embeddings
    # A generation step passes the LongRoPE switch with the short-factor cache: the model drops the cache then and
    # re-runs the whole sequence (one forward over B * G rows, with every row's images).
    switches = batch.width <= limit + 1 <= batch.width + max_completion_length - 1
    if not share_prompt or batch.width < 2:  # a one-token prompt has nothing to share
        with _sampling(model) as (device, dtype):
            rows = batch.rows()
            images = batch.images(rows)
            inputs = {
                "input_ids": batch.input_ids[rows],
                "attention_mask": batch.attention_mask[rows],
                **{k: images[k] for k in ("pixel_values", "image_sizes") if k in images},
            }
            if not switches:  # generate's prefill fills it, as the shared path's copy below
                inputs[GENERATION_CACHE_KWARG] = StaticCache(config=model.config,
                                                             max_cache_len=batch.width + max_completion_length)
            generated = model.generate(**_on(inputs, device, dtype), **options)
        return _completions(generated, batch, stop_token_ids)
    with _sampling(model) as (device, dtype):
        prefix = batch.width - 1
        prefill_inputs = {
            "input_ids": batch.input_ids[:, :prefix],
            "position_ids": batch.position_ids[:, :prefix],
            # generate drops an all-ones mask (and so does the reference path's prefill): the same kernels here
            "attention_mask": batch.attention_mask[:, :prefix] if batch.padded else None,
            **batch.images(range(batch.size), prefix),
        }
        prefill = model(**_on(prefill_inputs, device, dtype), use_cache=True, logits_to_keep=1)
        cache = prefill.cache
        del prefill
        rows = batch.rows()
        inputs = {
            "input_ids": batch.input_ids[rows],
            # explicit, also without padding: generate would take a prompt's <|endoftext|> (a history answer's end,
            # also the pad id) for padding
            "attention_mask": batch.attention_mask[rows],
        }
        if switches:  # the re-run needs every row's images
            cache.batch_repeat_interleave(num_generations)  # [B, ...] -> [B * G, ...], prompt-major like the rows
            images = batch.images(rows)
            inputs.update({k: images[k] for k in ("pixel_values", "image_sizes") if k in images})
        else:
            cache = _repeated_static(cache, num_generations, model.config, prefix + max_completion_length)
        inputs[GENERATION_CACHE_KWARG] = cache  # "cache" in transformers 5.24 (past_key_values before)
        generated = model.generate(**_on(inputs, device, dtype), **options)
    return _completions(generated, batch, stop_token_ids)




# The usual layout (prompts repeated G times), for equality tests and benchmarks.
sample_groups_repeated = functools.partial(sample_groups, share_prompt=False)


def group_examples(prompts: list[dict], sampled: SampledGroups) -> list[dict]:
    """The examples `shared_prefix_batch` takes: each prompt (ids and images) with its sampled completions."""
    return [{**prompt, "completions": completions} for prompt, completions in zip(prompts, sampled.completions)]


def split_completions(rows: list[list[int]], stop_token_ids) -> tuple[list[list[int]], list[bool]]:
    """The generated part of generate's rows -> (each row up to and including its first stop token, whether a row
    has none: it ran to the length limit). Finished rows are padded after their stop token; that is dropped."""
    stops = set(stop_token_ids)
    completions, truncated = [], []
    for row in rows:
        end = next((t + 1 for t, token in enumerate(row) if token in stops), None)
        completions.append(row if end is None else row[:end])
        truncated.append(end is None)
    return completions, truncated


# ------------------------------------------------------------------------------------------------ internals
class _PromptBatch:
    """The prompts left-padded on the host: input_ids, attention_mask and position_ids [B, width] (CPU tensors;
    position ids as generate derives them from the mask), and each prompt's images."""

    def __init__(self, prompts, pad_token_id: int, num_generations: int, max_completion_length: int):
        if not isinstance(num_generations, int) or num_generations < 1:
            raise ValueError(f"num_generations must be a positive int, got {num_generations!r}")
        if not isinstance(max_completion_length, int) or max_completion_length < 1:
            raise ValueError(f"max_completion_length must be a positive int, got {max_completion_length!r}")
        if not prompts:
            raise ValueError("no prompts to sample answers for")
        self.ids = [as_id_list(p["prompt_ids"]) for p in prompts]
        for index, ids in enumerate(self.ids):
            if not ids or ids[-1] < 0:
                raise ValueError(f"prompt {index}: the prompt must be non-empty and end with a text token")
            if any(i < 0 for i in ids) != ("pixel_values" in prompts[index]):
                raise ValueError(f"prompt {index}: image slots (negative ids) and pixel_values go together")
        self.prompts = prompts
        self.size, self.num_generations = len(prompts), num_generations
        self.width = max(map(len, self.ids))
        self.padded = any(len(ids) < self.width for ids in self.ids)
        pads = [self.width - len(ids) for ids in self.ids]
        self.input_ids = torch.tensor([[pad_token_id] * p + ids for p, ids in zip(pads, self.ids)], dtype=torch.long)
        self.attention_mask = torch.tensor([[0] * p + [1] * len(ids) for p, ids in zip(pads, self.ids)])
        self.position_ids = torch.tensor([[0] * p + list(range(len(ids))) for p, ids in zip(pads, self.ids)])

    def rows(self) -> torch.Tensor:
        """The prompt of each of the B * G rows: 0, 0, ..., 1, 1, ... (generate's repeat_interleave order)."""
        return torch.arange(self.size).repeat_interleave(self.num_generations)

    def images(self, rows, prefix: int | None = None) -> dict:
        """pixel_values and image_sizes of the given rows' prompts, in row order ({} without images). With
        `prefix` (the rows are the B prompts run up to that many tokens), also image_grids and image_positions,
        the host-side metadata that spares the embedding its own GPU reads."""
        rows = [int(r) for r in rows]
        with_images = [r for r in rows if "pixel_values" in self.prompts[r]]
        if not with_images:
            return {}
        pixel_values = [self.prompts[r]["pixel_values"] for r in with_images]
        slots = max(p.shape[1] for p in pixel_values)  # crop slots: zero padding is never run (docs/DESIGN.md §9.7)
        pixel_values = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, slots - p.shape[1]))
                                  for p in pixel_values])
        image_sizes = torch.cat([torch.as_tensor(self.prompts[r]["image_sizes"]) for r in with_images])
        images = {"pixel_values": pixel_values, "image_sizes": image_sizes}
        if prefix is not None:
            crop = pixel_values.shape[-1]
            images["image_grids"] = [[h // crop, w // crop] for h, w in image_sizes.tolist()]
            images["image_positions"] = torch.tensor(
                [b * prefix + t for b in rows for t, i in enumerate(self.input_ids[b, :prefix].tolist()) if i < 0],
                dtype=torch.long,
            )
        return images


def _generation_options(max_new_tokens, temperature, top_p, top_k, do_sample, pad_token_id, stop_token_ids) -> dict:
    """generate's arguments, the same for both paths: transformers' own logits processors and stopping."""
    options = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "eos_token_id": list(stop_token_ids),
        "pad_token_id": pad_token_id,
    }
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)
    return options


@contextlib.contextmanager
def _sampling(model):
    """Eval mode and no gradients for the duration; yields the model's device and floating dtype."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
            yield device, dtype
    finally:
        model.train(was_training)


def _repeated_static(cache, repeats: int, config, max_cache_len: int) -> StaticCache:
    """The prompts' cache [B, ...] copied into a preallocated StaticCache of B * repeats rows (prompt-major, like
    the rows): each decoding step then writes its token in place, where a DynamicCache concatenates, copying the
    whole cache of every row at every step (on a CPU that copy took half the decoding time of 8 answers to a
    DocVQA-sized prompt; benchmarks/README.md). The same values, so the same samples."""
    static = StaticCache(config=config, max_cache_len=max_cache_len)
    for index, layer in enumerate(cache.layers):
        positions = torch.arange(layer.keys.shape[-2], device=layer.keys.device)
        static.update(layer.keys.repeat_interleave(repeats, dim=0), layer.values.repeat_interleave(repeats, dim=0),
                      index, {"cache_position": positions})
    return static


def _on(inputs: dict, device, dtype) -> dict:
    """Tensors on the model's device, pixel values in its floating dtype (ids and ints unchanged)."""
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if "pixel_values" in moved:
        moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return moved


def _completions(generated: torch.Tensor, batch: _PromptBatch, stop_token_ids) -> SampledGroups:
    """generate's [B * G, width + new] sequences -> SampledGroups (one read of the new ids back to the host)."""
    rows, truncated = split_completions(generated[:, batch.width :].tolist(), stop_token_ids)
    g = batch.num_generations
    return SampledGroups(
        completions=[rows[p * g : (p + 1) * g] for p in range(batch.size)],
        truncated=[truncated[p * g : (p + 1) * g] for p in range(batch.size)],
    )


__all__ = ["SampledGroups", "sample_groups", "sample_groups_repeated", "group_examples", "split_completions"]

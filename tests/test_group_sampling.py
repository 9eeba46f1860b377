"""Group sampling (docs/DESIGN.md §14): G answers per prompt with the prompt's images and prefill run once and its
KV cache copied G times, checked token for token against the usual layout (every prompt repeated G times) under the
same seed, with sampling and greedy, across LongRoPE's cache reset, and against greedy decoding by hand."""

import functools

import pytest
import torch
from test_packing import random_image

from phi3v import Phi3VForCausalLM
from phi3v.conversation import tokenize_prompt
from phi3v.group_sampling import (
    group_examples,
    sample_groups,
    sample_groups_repeated,
    split_completions,
)
from phi3v.processing import STOP_TOKEN_IDS
from phi3v.shared_prefix import shared_prefix_batch
from phi3v.tiny import tiny_config

PAD = 32000
G = 4
MAX_NEW = 8
# A random tiny model spreads its probability over all 32064 ids: it would never stop and rarely repeat itself.
# Its lm_head rows of these 20 ids (the stop tokens among them) are scaled up so that sampling mostly picks among
# them: answers that stop at varying lengths, some truncated, some alike.
PEAKED_IDS = [32007, 32000, *range(300, 318)]
PEAK = 40.0


def user(content):
    return {"role": "user", "content": content}


@pytest.fixture(scope="module")
def tiny_model():
    """tiny_model(original_max_position_embeddings): the same random tiny model (sdpa) for every limit, built once
    per limit, in training mode (sampling must put it in eval mode and back)."""

    @functools.cache
    def build(original_max_position_embeddings: int = 4096) -> Phi3VForCausalLM:
        torch.manual_seed(0)
        config = tiny_config(original_max_position_embeddings=original_max_position_embeddings,
                             max_position_embeddings=4 * original_max_position_embeddings)
        model = Phi3VForCausalLM(config)
        with torch.no_grad():
            model.lm_head.weight[PEAKED_IDS] *= PEAK
        return model.train()

    return build


def image_prompts(processor, seed=1):
    """One image; text only after a history turn (whose answer ends with <|endoftext|>, the pad id); two images:
    different images and prompt lengths (329, 27, 643 ids), so the batch is left-padded."""
    return [
        tokenize_prompt(processor, [user("<|image_1|>\nWhat colour is it?")], [random_image(400, 300, seed)],
                        num_crops=1),
        tokenize_prompt(processor, [user("Describe it."), {"role": "assistant", "content": "Sure."}, user("Now?")],
                        []),
        tokenize_prompt(processor, [user("<|image_1|>\n<|image_2|>\nAre they the same?")],
                        [random_image(200, 500, 2), random_image(300, 300, 3)], num_crops=1),
    ]


@pytest.fixture(scope="module")
def prompts(processor):
    return image_prompts(processor)


def sample_both(model, prompts, seed, **options):
    """(sample_groups, sample_groups_repeated) of the same prompts, each after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    shared = sample_groups(model, prompts, G, MAX_NEW, **options)
    torch.manual_seed(seed)
    return shared, sample_groups_repeated(model, prompts, G, MAX_NEW, **options)


def check_completions(sampled, num_prompts, max_new=MAX_NEW):
    """The result's shape, and every completion cut at its first stop token, which it includes, unless flagged
    truncated: then it has max_new ids and no stop token."""
    assert len(sampled.completions) == len(sampled.truncated) == num_prompts
    for completions, truncated in zip(sampled.completions, sampled.truncated):
        assert len(completions) == len(truncated) == G
        for ids, cut in zip(completions, truncated):
            assert ids and all(isinstance(i, int) and 0 <= i < 32064 for i in ids)
            assert not any(i in STOP_TOKEN_IDS for i in ids[:-1])  # nothing after the first stop token
            assert (ids[-1] not in STOP_TOKEN_IDS) == cut
            assert len(ids) <= max_new and (not cut or len(ids) == max_new)


class Recorder:
    """Counts what runs: the crops CLIP sees per call and the [rows, tokens] the first decoder layer sees per call."""

    def __init__(self, model):
        self.crops, self.decoder = [], []
        self.hooks = [
            model.model.vision_embed_tokens.vision_model.embeddings.register_forward_pre_hook(
                lambda module, args: self.crops.append(args[0].shape[0])),
            model.model.layers[0].register_forward_pre_hook(
                lambda module, args: self.decoder.append(tuple(args[0].shape[:2]))),
        ]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


# ------------------------------------------------------------------------------------------------ same completions
@pytest.mark.parametrize("options", [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 5, "top_p": 0.9},
    {"do_sample": False},
], ids=["sample", "sample-t0.7-topk-topp", "greedy"])
def test_same_completions_as_the_repeated_path(tiny_model, prompts, options):
    model = tiny_model()
    shared, repeated = sample_both(model, prompts, seed=2, **options)
    assert shared == repeated  # token ids and truncation flags, every prompt, every sample
    check_completions(shared, len(prompts))
    assert model.training  # back in its previous mode
    completions = [c for group in shared.completions for c in group]
    # Different prompts give different answers; the equality is not between empty or constant answers.
    assert len({tuple(group[0]) for group in shared.completions}) == len(prompts)
    assert max(map(len, completions)) == MAX_NEW
    if options.get("do_sample", True):
        assert all(len({tuple(c) for c in group}) > 1 for group in shared.completions)  # varied samples per prompt
    else:
        assert all(len({tuple(c) for c in group}) == 1 for group in shared.completions)  # greedy: G equal answers
    if options == {"temperature": 1.0}:
        flags = [t for group in shared.truncated for t in group]
        assert any(flags) and not all(flags)  # some stopped (stop token included), some ran to MAX_NEW
        assert {c[-1] for c in completions if c[-1] in STOP_TOKEN_IDS} == set(STOP_TOKEN_IDS)  # both stop ids
        # What the GRPO trainer does next: the groups as shared-prefix rows.
        batch = shared_prefix_batch(group_examples(prompts, shared), PAD)
        assert batch["num_completions"] == len(prompts) * G
        assert batch["logp_targets"].tolist() == [i for c in completions for i in c]
        assert torch.equal(batch["pixel_values"], torch.cat([prompts[0]["pixel_values"], prompts[2]["pixel_values"]]))


def test_completions_depend_on_the_seed_and_the_images(tiny_model, prompts, processor):
    """The equality above is not that of outputs that ignore their inputs: another seed gives other samples, another
    image (same size, so the same ids) other answers to its prompt and the same to the others."""
    model = tiny_model()
    torch.manual_seed(2)
    first = sample_groups(model, prompts, G, MAX_NEW)
    torch.manual_seed(3)
    assert sample_groups(model, prompts, G, MAX_NEW) != first
    other = image_prompts(processor, seed=7)
    assert other[0]["prompt_ids"] == prompts[0]["prompt_ids"]
    torch.manual_seed(2)
    changed = sample_groups(model, other, G, MAX_NEW)
    assert changed.completions[0] != first.completions[0] and changed.completions[1:] == first.completions[1:]


def test_greedy_equals_decoding_by_hand(tiny_model, prompts):
    """Greedy answers = argmax of the model's last logits over each prompt + answer so far, one prompt at a time,
    without padding, cache or generate: left padding, position ids, the mask (a history's <|endoftext|> is not
    padding) and the images of each prompt all right."""
    model = tiny_model()
    sampled = sample_groups(model, prompts, G, MAX_NEW, do_sample=False)
    model.eval()
    try:
        for prompt, completions in zip(prompts, sampled.completions):
            ids = list(prompt["prompt_ids"])
            images = {k: prompt[k] for k in ("pixel_values", "image_sizes") if k in prompt}
            answer = []
            with torch.no_grad():
                while len(answer) < MAX_NEW and (not answer or answer[-1] not in STOP_TOKEN_IDS):
                    logits = model(input_ids=torch.tensor([ids + answer]), **images, logits_to_keep=1).logits
                    answer.append(int(logits[0, -1].argmax()))
            assert completions == [answer] * G
    finally:
        model.train()


def test_text_only_prompts(tiny_model, processor):
    model = tiny_model()
    prompts = [tokenize_prompt(processor, [user(text)], []) for text in ("Hi?", "A longer question, in more words?")]
    with Recorder(model) as recorder:
        shared, repeated = sample_both(model, prompts, seed=0)
    assert shared == repeated
    check_completions(shared, 2)
    assert recorder.crops == []
    assert all(len({tuple(c) for c in group}) > 1 for group in shared.completions)


# ------------------------------------------------------------------------------------------------ what runs
def test_clip_and_prefill_run_once_per_prompt(tiny_model, prompts):
    model = tiny_model()
    width = max(len(p["prompt_ids"]) for p in prompts)
    crops = 2 + 2 * 2  # the global view and one crop per image (num_crops=1): one image, none, two
    with Recorder(model) as recorder:
        sample_groups(model, prompts, G, 3, do_sample=False)
    # CLIP: each prompt's images once. Decoder: the prompts but their last token once, then the last prompt token
    # of the B * G rows on the copied cache (which samples the first answer token), then one token per row and step.
    assert recorder.crops == [crops]
    assert recorder.decoder == [(3, width - 1), (3 * G, 1), (3 * G, 1), (3 * G, 1)]
    with Recorder(model) as recorder:
        sample_groups_repeated(model, prompts, G, 3, do_sample=False)
    assert recorder.crops == [G * crops]
    assert recorder.decoder == [(3 * G, width), (3 * G, 1), (3 * G, 1)]


def test_split_completions():
    rows = [[5, 32007, 32000, 32000], [5, 6, 7, 8], [32000, 32000, 32000, 32000], [5, 6, 7, 32007], [32007, 9, 9, 9]]
    assert split_completions(rows, STOP_TOKEN_IDS) == (
        [[5, 32007], [5, 6, 7, 8], [32000], [5, 6, 7, 32007], [32007]],
        [False, True, False, False, False],
    )
    assert split_completions([[5, 6, 7]], [6]) == ([[5, 6]], [False])


def test_bad_arguments_are_refused(tiny_model, prompts):
    model = tiny_model()
    with pytest.raises(ValueError, match="num_generations must be a positive int"):
        sample_groups(model, prompts, 0, MAX_NEW)
    with pytest.raises(ValueError, match="max_completion_length must be a positive int"):
        sample_groups(model, prompts, G, 0)
    with pytest.raises(ValueError, match="prompt 0: image slots .negative ids. and pixel_values go together"):
        sample_groups(model, [{"prompt_ids": prompts[0]["prompt_ids"]}], G, MAX_NEW)
    with pytest.raises(ValueError, match="must be non-empty and end with a text token"):
        sample_groups(model, [{"prompt_ids": []}], G, MAX_NEW)


# ------------------------------------------------------------------------------------------------ LongRoPE
@pytest.mark.parametrize("offset", [-1, 2], ids=["reset-at-the-first-step", "reset-later"])
def test_longrope_cache_reset_with_copied_rows(tiny_model, prompts, offset):
    """The switch to the long factors during sampling drops the cache and re-runs the whole sequence with every
    row's images (docs/DESIGN.md §6): still the repeated path's completions. With the limit one below the prompt
    width the shared prefill (all but the last token) still runs with the short factors and the reset comes at
    generate's first step, where the repeated path runs its prefill with the long factors from the start; with the
    limit two above, both paths reset at the same later step."""
    width, max_new = max(len(p["prompt_ids"]) for p in prompts), 5  # the later reset comes at the 4th step
    model = tiny_model(width + offset)
    rotary = model.model.rotary_emb
    with Recorder(model) as recorder:
        torch.manual_seed(0)
        shared = sample_groups(model, prompts, G, max_new)
    assert torch.equal(rotary.inv_freq, rotary.long_inv_freq)  # the last step ran with the long factors
    reset = (3 * G, width + offset + 1)  # the whole sequence, every row, once past the limit
    assert recorder.decoder[0] == (3, width - 1) and reset in recorder.decoder
    assert recorder.crops == [6, 6 * G]  # the prefill's images, then every row's for the re-run
    torch.manual_seed(0)
    repeated = sample_groups_repeated(model, prompts, G, max_new)
    assert shared == repeated
    check_completions(shared, len(prompts), max_new)
    assert all(len({tuple(c) for c in group}) > 1 for group in shared.completions)

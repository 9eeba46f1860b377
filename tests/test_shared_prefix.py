"""Shared-prefix rows (docs/DESIGN.md §12): several completions of one prompt in one padding-free row, the prompt and
its images run once. Checked against the two-sequence layout (prompt + completion_i as padded rows) and against
each sequence run alone."""

import functools

import pytest
import torch
import torch.nn.functional as F
from test_packing import HostSyncRecorder, random_image

from phi3v import Phi3VForCausalLM
from phi3v.conversation import check_length, completion_ids, tokenize_conversation, tokenize_prompt
from phi3v.shared_prefix import model_inputs, sequence_log_probs, shared_prefix_batch, two_sequence_batch
from phi3v.tiny import tiny_config

PAD = 32000
DPO_BETA = 0.1
REFERENCE_LOG_PROBS = (-7.5, -9.25)  # fixed stand-ins for the reference model's chosen / rejected log-probs
GROUP_WEIGHTS = (0.5, -1.0, 1.5, -0.25)  # GRPO-like advantages of the k = 4 group


def user(content):
    return {"role": "user", "content": content}


@pytest.fixture(scope="module")
def groups(processor):
    """Two groups with different images and prompt lengths: k = 2 (a DPO pair) and k = 4 (with a history turn)."""
    first = tokenize_prompt(processor, [user("<|image_1|>\nWhat colour is it?")], [random_image(400, 300, 1)],
                            num_crops=2)
    second = tokenize_prompt(
        processor,
        [user("Describe the next picture."), {"role": "assistant", "content": "Sure."},
         user("<|image_1|>\nWhat is in it?")],
        [random_image(200, 500, 2)], num_crops=2,
    )
    first["completions"] = [completion_ids(processor, text) for text in ("Red.", "It is a dark, reddish brown.")]
    second["completions"] = [completion_ids(processor, text)
                             for text in ("Noise.", "Coloured noise, nothing else.", "A cat?", "Pixels")]
    first["sample_id"], second["sample_id"] = "a", "b"
    return [first, second]


@pytest.fixture(scope="module")
def tiny_model():
    """tiny_model(implementation, original_max_position_embeddings): a random tiny model (the same weights for
    every implementation) in training mode with activation checkpointing, as the recipes train; built once."""

    @functools.cache
    def build(implementation: str, original_max_position_embeddings: int) -> Phi3VForCausalLM:
        torch.manual_seed(0)
        config = tiny_config(attn_implementation=implementation,
                             original_max_position_embeddings=original_max_position_embeddings,
                             max_position_embeddings=4 * original_max_position_embeddings)
        model = Phi3VForCausalLM(config).train()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model

    return build


def completion_log_probs(model, batch):
    out = model(**model_inputs(batch))
    assert out.logits is None and out.loss is None
    return sequence_log_probs(out.token_log_probs, batch["completion_index"], batch["num_completions"])


def preference_loss(log_probs):
    """A DPO sigmoid loss on the k = 2 group plus a weighted sum over the k = 4 group."""
    chosen, rejected = log_probs[0] - REFERENCE_LOG_PROBS[0], log_probs[1] - REFERENCE_LOG_PROBS[1]
    dpo = -F.logsigmoid(DPO_BETA * (chosen - rejected))
    return dpo - (log_probs[2:] * torch.tensor(GROUP_WEIGHTS)).sum()


def log_probs_and_gradients(model, batch):
    model.zero_grad()
    log_probs = completion_log_probs(model, batch)
    preference_loss(log_probs).backward()
    return log_probs.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------------ layout and mask
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_hand_made_row_layout_and_mask(tiny_model, implementation):
    examples = [
        {"prompt_ids": [11, 12, 13], "completions": [[31, 32], [33]]},
        {"prompt_ids": [21, 22], "completions": [[41], [42, 43]]},
    ]
    batch = shared_prefix_batch(examples, PAD)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 31, 32, 33, 21, 22, 41, 42, 43]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3]]
    assert batch["branch_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 0, 0, 1, 2, 2]]
    # Each completion's first token is predicted by its prompt's last token (2, 7), the next ones by its own.
    assert batch["logp_positions"].tolist() == [2, 3, 2, 7, 7, 9]
    assert batch["logp_targets"].tolist() == [31, 32, 33, 41, 42, 43]
    assert batch["completion_index"].tolist() == [0, 0, 1, 2, 3, 3]
    assert batch["num_completions"] == 4 and batch["completion_lengths"].tolist() == [2, 1, 1, 2]
    assert batch["max_sequence_length"] == 5 and batch["image_positions"].tolist() == []

    model = tiny_model(implementation, 4096)
    mask = model.model.packed_attention_mask(torch.zeros(1, 11, 64), batch["position_ids"], batch["branch_ids"])[0, 0]
    allowed = mask if implementation == "sdpa" else mask == 0  # eager: additive, 0 where attended
    assert mask.dtype == (torch.bool if implementation == "sdpa" else torch.float32)
    expected = torch.tensor([
        # p  p  p  a  a  b  q  q  c  d  d
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # group 0 prompt
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # completion a
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0],  # completion b: the prompt and itself, not a
        [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],  # group 1 prompt: nothing of group 0
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0],  # completion c
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 0],  # completion d
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    # Without branch_ids the same function is plain packing's mask: causal within each sample.
    packed = model.model.packed_attention_mask(torch.zeros(1, 5, 64), torch.tensor([[0, 1, 2, 0, 1]]))[0, 0]
    assert torch.equal(packed if implementation == "sdpa" else packed == 0, torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool))


def test_two_sequence_layout(groups):
    batch = two_sequence_batch(groups, PAD)
    shared = shared_prefix_batch(groups, PAD)
    rows = [g["prompt_ids"] + c for g in groups for c in g["completions"]]
    width = max(map(len, rows))
    assert batch["input_ids"].tolist() == [row + [PAD] * (width - len(row)) for row in rows]
    assert batch["attention_mask"].sum(1).tolist() == [len(row) for row in rows]
    completions = [c for g in groups for c in g["completions"]]
    assert batch["logp_positions"].tolist() == [  # the positions before each completion token, row by row
        r * width + t for r, (row, c) in enumerate(zip(rows, completions)) for t in range(len(row) - len(c) - 1,
                                                                                          len(row) - 1)
    ]
    for key in ("logp_targets", "completion_index", "completion_lengths"):
        assert torch.equal(batch[key], shared[key]), key
    assert batch["num_completions"] == shared["num_completions"] == 6
    assert batch["sample_ids"] == shared["sample_ids"] == ["a", "b"]
    # The images: once per group in the shared row, once per row here.
    assert shared["pixel_values"].shape[0] == 2 and batch["pixel_values"].shape[0] == 6
    assert shared["image_grids"] == [[1, 1], [2, 1]]
    assert batch["image_grids"] == [[1, 1]] * 2 + [[2, 1]] * 4
    assert shared["max_sequence_length"] == width


# ------------------------------------------------------------------------------------------------ same numbers
@pytest.mark.parametrize("rope", ["short", "long"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_shared_prefix_equals_two_sequences(tiny_model, groups, implementation, rope):
    """The same per-completion log-probs and, through a DPO + weighted-sum loss, the same gradients of every
    trainable parameter (CLIP, projector, language model), on both sides of LongRoPE's factor switch: the longest
    sequence at original_max_position_embeddings (short factors, though the row is far longer) or one past it."""
    shared = shared_prefix_batch(groups, PAD)
    longest = shared["max_sequence_length"]
    model = tiny_model(implementation, longest if rope == "short" else longest - 1)
    assert shared["input_ids"].shape[1] > longest  # the row itself is past the switch in both cases
    rotary = model.model.rotary_emb

    reference, reference_grads = log_probs_and_gradients(model, two_sequence_batch(groups, PAD))
    factors = rotary.original_inv_freq if rope == "short" else rotary.long_inv_freq  # the latter made by a forward
    assert torch.equal(rotary.inv_freq, factors)
    log_probs, grads = log_probs_and_gradients(model, shared)
    assert torch.equal(rotary.inv_freq, factors)  # the same choice as the padded rows'

    assert log_probs.shape == (6,) and bool((log_probs < 0).all())
    worst = max(grads, key=lambda n: (grads[n] - reference_grads[n]).abs().max())
    print(f"{implementation} {rope}: max |log-prob difference| {(log_probs - reference).abs().max():.3g}; "
          f"max |gradient difference| {(grads[worst] - reference_grads[worst]).abs().max():.3g} ({worst}, "
          f"whose largest gradient entry is {reference_grads[worst].abs().max():.3g})")
    torch.testing.assert_close(log_probs, reference, rtol=0, atol=1e-5)
    assert grads.keys() == reference_grads.keys()
    assert any("vision_model.encoder.layers.0" in n for n in grads) and any("img_projection" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_clip_runs_once_per_group_shared_and_once_per_completion_otherwise(tiny_model, groups):
    model = tiny_model("sdpa", 4096)
    crops = []
    hook = model.model.vision_embed_tokens.vision_model.embeddings.register_forward_pre_hook(
        lambda module, args: crops.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            for build in (shared_prefix_batch, two_sequence_batch):
                model(**model_inputs(build(groups, PAD)))
    finally:
        hook.remove()
    per_group = [2, 3]  # the global view plus 1x1 and 2x1 crops
    assert crops == [sum(per_group), 2 * per_group[0] + 4 * per_group[1]]


def test_log_probs_equal_each_sequence_alone_at_a_temperature(tiny_model, processor):
    """token_log_probs = log_softmax(logits / t) at the targets, from the full logits of each prompt + completion
    run alone; sequence_log_probs sums them per completion."""
    model = tiny_model("sdpa", 4096)
    prompts = [tokenize_prompt(processor, [user("Two words?")], [])["prompt_ids"],
               tokenize_prompt(processor, [user("A longer question, in more words?")], [])["prompt_ids"]]
    examples = [{"prompt_ids": prompts[0], "completions": [completion_ids(processor, "Yes no."),
                                                           completion_ids(processor, "Maybe")]},
                {"prompt_ids": prompts[1], "completions": [completion_ids(processor, "An answer, longer.")]}]
    full = shared_prefix_batch(examples, PAD)
    batch = model_inputs(full)
    for temperature in (1.0, 0.7):
        expected_tokens, expected_sums = [], []
        with torch.no_grad():
            for example in examples:
                for completion in example["completions"]:
                    ids = torch.tensor([example["prompt_ids"] + completion])
                    logits = model(input_ids=ids).logits[0, len(example["prompt_ids"]) - 1 : -1].float()
                    token = (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
                    expected_tokens.append(token)
                    expected_sums.append(token.sum())
            out = model(**batch, logp_temperature=temperature)
            sums = sequence_log_probs(out.token_log_probs, full["completion_index"], full["num_completions"])
        assert out.token_log_probs.dtype == torch.float32
        torch.testing.assert_close(out.token_log_probs, torch.cat(expected_tokens), rtol=0, atol=1e-5)
        torch.testing.assert_close(sums, torch.stack(expected_sums), rtol=0, atol=1e-5)
    # The temperature matters: 0.7 gives other numbers than 1.0.
    with torch.no_grad():
        assert not torch.allclose(model(**batch).token_log_probs, out.token_log_probs)


# ------------------------------------------------------------------------------------------------ tokenising
def test_prompt_plus_completion_is_the_training_example(processor):
    images = [random_image(300, 200, 3), random_image(200, 300, 4), random_image(336, 336, 5)]
    messages = [
        {"role": "system", "content": "Answer briefly."},
        user("<|image_1|>\nWhat is this?"),
        {"role": "assistant", "content": "Noise."},
        user("<|image_2|>\n<|image_3|>\nAnd these two?"),
    ]
    prompt = tokenize_prompt(processor, messages, images, num_crops=1)
    answer = "More noise, twice."
    example = tokenize_conversation(processor, messages + [{"role": "assistant", "content": answer}], images,
                                    num_crops=1)
    assert prompt["prompt_ids"] + completion_ids(processor, answer) == example["input_ids"]
    assert [i for i in sorted(set(prompt["prompt_ids"])) if i < 0] == [-3, -2, -1]
    assert torch.equal(prompt["pixel_values"], example["pixel_values"])
    assert torch.equal(prompt["image_sizes"], example["image_sizes"])
    assert completion_ids(processor, "A cat.") == [319, 6635, 29889, 32007, 29871, 13, 32000]
    assert set(tokenize_prompt(processor, [user("No image.")], [])) == {"prompt_ids"}


def test_prompt_errors_and_length_limit(processor):
    with pytest.raises(ValueError, match="must end with the user turn to answer"):
        tokenize_prompt(processor, [user("Hi"), {"role": "assistant", "content": "Hello."}], [])
    with pytest.raises(ValueError, match="must end with an assistant answer"):
        tokenize_conversation(processor, [user("Hi")], [])
    prompt = tokenize_prompt(processor, [user("<|image_1|>\nHi")], [random_image(64, 64, 6)], num_crops=1)
    shortest = len(prompt["prompt_ids"]) + len(completion_ids(processor, ""))  # the answer suffix alone
    tokenize_prompt(processor, [user("<|image_1|>\nHi")], [random_image(64, 64, 6)], num_crops=1,
                    max_length=shortest)
    with pytest.raises(ValueError, match=f"{shortest} tokens long, more than max_seq_length {shortest - 1}"):
        tokenize_prompt(processor, [user("<|image_1|>\nHi")], [random_image(64, 64, 6)], num_crops=1,
                        max_length=shortest - 1)
    check_length(shortest + 3, shortest + 3)  # a prompt + its longest completion, the caller's check
    with pytest.raises(ValueError, match="more than max_seq_length"):
        check_length(shortest + 4, shortest + 3)


# ------------------------------------------------------------------------------------------------ the forward
def test_length_limit_is_per_sequence_and_flash_attention_is_refused():
    torch.manual_seed(0)
    model = Phi3VForCausalLM(tiny_config(original_max_position_embeddings=16, max_position_embeddings=32)).eval()
    prompt = list(range(100, 120))
    fits = shared_prefix_batch([{"prompt_ids": prompt, "completions": [[5] * 12, [6] * 10, [7] * 11]}], PAD)
    assert fits["input_ids"].shape[1] == 53 and fits["max_sequence_length"] == 32
    with torch.no_grad():
        assert torch.isfinite(model(**model_inputs(fits)).token_log_probs).all()
    too_long = shared_prefix_batch([{"prompt_ids": prompt, "completions": [[5] * 13]}], PAD)
    with pytest.raises(ValueError, match="33 tokens long, more than the model's limit of 32"):
        model(**model_inputs(too_long))
    with pytest.raises(ValueError, match="max_sequence_length as an int"):
        model(**{k: v for k, v in model_inputs(fits).items() if k != "max_sequence_length"})
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash attention cannot take: load the model with attn_implementation='sdpa'"):
        model(**model_inputs(fits))


def test_bad_groups_are_refused():
    for bad in ({"prompt_ids": [], "completions": [[1]]}, {"prompt_ids": [1], "completions": []},
                {"prompt_ids": [1], "completions": [[2], []]}):
        with pytest.raises(ValueError, match="needs a prompt and non-empty completions"):
            shared_prefix_batch([bad], PAD)
    with pytest.raises(ValueError, match="a completion has image slots"):
        two_sequence_batch([{"prompt_ids": [1], "completions": [[2, -1]]}], PAD)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_forward_and_backward_of_a_shared_row_make_no_host_sync(tiny_model, groups, implementation):
    model = tiny_model(implementation, 4096)
    batch = shared_prefix_batch(groups, PAD)
    model.zero_grad()
    with HostSyncRecorder() as forward:
        loss = preference_loss(completion_log_probs(model, batch))
    with HostSyncRecorder() as backward:
        loss.backward()
    assert forward.hits == [] and backward.hits == []
    # The recorder sees syncs: the same row without the builder's image metadata has the embedding's own.
    with HostSyncRecorder() as forward, torch.no_grad():
        completion_log_probs(model, {k: v for k, v in batch.items() if k not in ("image_grids", "image_positions")})
    assert forward.hits

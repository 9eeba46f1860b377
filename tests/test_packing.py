"""Throughput paths of training: padding-free packing (--packing), host-side batch metadata (no GPU syncs in the
forward and backward), the frozen vision tower without autograd. Each is checked against the plain computation."""

import traceback

import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from phi3v import Phi3VForCausalLM
from phi3v.collator import Phi3VDataCollator
from phi3v.conversation import IGNORE_INDEX, tokenize_conversation
from phi3v.model_setup import freeze_vision_tower
from phi3v.tiny import tiny_config

METADATA = ("image_grids", "image_positions", "loss_positions")


def random_image(width, height, seed):
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy())


def turn(user, answer):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def examples(processor):
    """Three samples of different lengths: two images (1x1 and 2x1 crops), text only, one image (1x2) and two turns."""
    conversations = [
        (turn("<|image_1|>\n<|image_2|>\nAre they the same?", "No, they differ."), [random_image(400, 300, 1),
                                                                                     random_image(200, 500, 2)]),
        (turn("Just text, please.", "Fine."), []),
        (turn("<|image_1|>\nWhat is it?", "A picture of noise.") + turn("Sure?", "Yes."), [random_image(700, 336, 3)]),
    ]
    return [tokenize_conversation(processor, messages, images, num_crops=2) for messages, images in conversations]


def model_inputs(batch, metadata=True):
    return {k: v for k, v in batch.items() if k != "sample_ids" and (metadata or k not in METADATA)}


def loss_and_gradients(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------------ the collator
def test_collator_metadata_and_packed_layout(processor, examples):
    padded = Phi3VDataCollator(processor.pad_token_id)(examples)
    packed = Phi3VDataCollator(processor.pad_token_id, packing=True)(examples)
    ids, labels = padded["input_ids"], padded["labels"]
    # Host metadata of the padded batch = what the model would read from the tensors.
    assert padded["image_positions"].tolist() == (ids.flatten() < 0).nonzero().squeeze(1).tolist()
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # label of the next position
    assert padded["loss_positions"].tolist() == (shifted.flatten() != IGNORE_INDEX).nonzero().squeeze(1).tolist()
    assert padded["image_grids"] == (padded["image_sizes"] // 336).tolist() == [[1, 1], [2, 1], [1, 2]]
    assert all(isinstance(v, int) for grid in padded["image_grids"] for v in grid)  # stays on the host

    lengths = [len(e["input_ids"]) for e in examples]
    assert "attention_mask" not in packed
    assert packed["input_ids"].tolist() == [sum((e["input_ids"] for e in examples), [])]
    assert packed["position_ids"].tolist() == [sum((list(range(n)) for n in lengths), [])]
    assert packed["cu_seq_lens_q"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert packed["cu_seq_lens_q"].dtype == torch.int32 and packed["max_length_q"] == max(lengths)
    # Labels unchanged but the first of each sample (a prompt token anyway): no target across a sample boundary.
    expected_labels = sum(([IGNORE_INDEX] + e["labels"][1:] for e in examples), [])
    assert packed["labels"].tolist() == [expected_labels]
    assert packed["image_positions"].tolist() == (packed["input_ids"].flatten() < 0).nonzero().squeeze(1).tolist()
    assert len(packed["loss_positions"]) == len(padded["loss_positions"]) == (labels[:, 1:] != IGNORE_INDEX).sum()
    assert (
        torch.equal(packed["pixel_values"], padded["pixel_values"]) and packed["image_grids"] == padded["image_grids"]
    )


def test_host_metadata_stays_on_the_host_when_the_trainer_moves_the_batch(processor, examples):
    """The Trainer (accelerate's send_to_device, then Trainer._prepare_input) moves tensors only."""
    from accelerate.utils import send_to_device
    from transformers import Trainer, TrainingArguments

    packed = Phi3VDataCollator(processor.pad_token_id, packing=True)(examples)
    moved = send_to_device(packed, "meta")
    assert moved["input_ids"].device.type == moved["cu_seq_lens_q"].device.type == "meta"
    assert moved["max_length_q"] == packed["max_length_q"] and moved["image_grids"] == packed["image_grids"]
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=TrainingArguments(output_dir="unused", use_cpu=True,
                                                                          report_to="none"))
    prepared = trainer._prepare_input(packed)
    assert prepared["max_length_q"] == packed["max_length_q"] and prepared["image_grids"] == packed["image_grids"]
    assert all(isinstance(v, int) for grid in prepared["image_grids"] for v in grid)


# ------------------------------------------------------------------------------------------------ same numbers
def test_host_metadata_gives_bit_identical_loss_and_gradients(tiny_checkpoint, processor, examples):
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint).train()
    batch = Phi3VDataCollator(processor.pad_token_id)(examples)
    plain_loss, plain_grads = loss_and_gradients(model, model_inputs(batch, metadata=False))
    loss, grads = loss_and_gradients(model, model_inputs(batch))
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and any("encoder.layers.0" in n for n in grads)
    for name in grads:
        assert torch.equal(grads[name], plain_grads[name]), name
    with torch.no_grad():  # with the Trainer's token count too
        assert torch.equal(model(**model_inputs(batch), num_items_in_batch=torch.tensor(37)).loss,
                           model(**model_inputs(batch, metadata=False), num_items_in_batch=torch.tensor(37)).loss)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_the_padded_batch(tiny_checkpoint, processor, examples, implementation):
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation=implementation).train()
    for subset in (examples, examples[1:]):  # 3 and 2 samples, with 0-2 images each
        padded = Phi3VDataCollator(processor.pad_token_id)(subset)
        packed = Phi3VDataCollator(processor.pad_token_id, packing=True)(subset)
        padded_loss, padded_grads = loss_and_gradients(model, model_inputs(padded, metadata=False))
        packed_loss, packed_grads = loss_and_gradients(model, model_inputs(packed))
        torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)
        assert packed_grads.keys() == padded_grads.keys()
        for name in padded_grads:
            torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_no_token_attends_across_samples(tiny_checkpoint, processor, examples, implementation):
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation=implementation).eval()
    packed = Phi3VDataCollator(processor.pad_token_id, packing=True)(examples)
    inputs = {k: v for k, v in model_inputs(packed).items() if k not in ("labels", "loss_positions")}
    with torch.no_grad():
        embeds = model.model.embed(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"])
        hidden = model.model(
            inputs_embeds=embeds,
            attention_mask=model.model.packed_attention_mask(embeds, inputs["position_ids"]),
            position_ids=inputs["position_ids"],
        ).last_hidden_state[0]
        bounds = packed["cu_seq_lens_q"].tolist()
        for index, example in enumerate(examples):  # each sample alone gives the same hidden states
            single = Phi3VDataCollator(processor.pad_token_id)([example])
            expected = model.model(
                inputs_embeds=model.model.embed(single["input_ids"], single.get("pixel_values"),
                                                single.get("image_sizes")),
            ).last_hidden_state[0]
            torch.testing.assert_close(hidden[bounds[index] : bounds[index + 1]], expected, rtol=1e-5, atol=1e-5)
    # The mask itself: causal within a sample, nothing across (eager: 0 / large negative; sdpa: True / False).
    position_ids = torch.tensor([[0, 1, 2, 0, 1]])
    mask = model.model.packed_attention_mask(torch.zeros(1, 5, 1), position_ids)[0, 0]
    allowed = mask if mask.dtype == torch.bool else mask == 0
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    ).bool()
    assert torch.equal(allowed, expected)


def test_flash_attention_gets_the_sample_boundaries_and_no_mask(tiny_checkpoint, processor, examples):
    """A flash-style attention (any implementation named *flash*, here a reference one made of per-sample SDPA
    calls, since flash-attn needs a GPU) is called with transformers' varlen arguments from the collator and no mask:
    the same loss as SDPA's block-diagonal mask."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    calls = []

    def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                         max_length_q=None, **kwargs):
        if cu_seq_lens_q is None:  # CLIP
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        calls.append((attention_mask, cu_seq_lens_q.tolist(), max_length_q))
        bounds = cu_seq_lens_q.tolist()
        out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling)
            for a, b in zip(bounds, bounds[1:])], dim=2)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("test_flash_varlen", varlen_attention)
    AttentionMaskInterface.register("test_flash_varlen", flash_attention_mask)
    packed = model_inputs(Phi3VDataCollator(processor.pad_token_id, packing=True)(examples))
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint).train()
    sdpa_loss, sdpa_grads = loss_and_gradients(model, packed)
    model.config._attn_implementation = "test_flash_varlen"  # loading would look for a flash-attn kernel
    forward, backward = syncs_of_a_training_step(model, packed)
    loss, grads = loss_and_gradients(model, packed)
    layers = model.config.num_hidden_layers
    assert calls[:layers] == [(None, packed["cu_seq_lens_q"].tolist(), packed["max_length_q"])] * layers
    torch.testing.assert_close(loss, sdpa_loss, rtol=1e-5, atol=1e-5)
    for name in sdpa_grads:
        torch.testing.assert_close(grads[name], sdpa_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # The reference kernel's own .tolist() aside (flash-attn takes the boundaries on the device), at most
    # transformers' packed-sequence check (it runs when the forward has no cache object, e.g. use_cache=False).
    forward = [(name, place) for name, place in forward if not place.startswith(__file__)]
    assert backward == [] and all("transformers/masking_utils.py" in place for _, place in forward), forward


def test_packed_longrope_choice_is_the_padded_batchs(processor):
    """transformers picks LongRoPE's short or long factors per forward from max(position_ids) + 1: for a packed row
    (positions restarting per sample) that is the longest sample, as for the right-padded batch of the same samples;
    so packing changes nothing, on either side of original_max_position_embeddings (64 here)."""
    torch.manual_seed(0)
    model = Phi3VForCausalLM(tiny_config(original_max_position_embeddings=64, max_position_embeddings=1024)).train()
    rotary = model.model.rotary_emb

    def example(words, answer):
        return tokenize_conversation(processor, turn(" ".join(["word"] * words), answer), [])

    short, other_short, long = example(20, "yes"), example(30, "no idea"), example(80, "a longer answer")
    assert max(len(e["input_ids"]) for e in (short, other_short)) <= 64 < len(long["input_ids"])
    assert len(short["input_ids"]) + len(other_short["input_ids"]) > 64  # the packed row itself is longer than 64
    for samples, factors in (([short, other_short], rotary.original_inv_freq), ([short, long], None)):
        padded = Phi3VDataCollator(processor.pad_token_id)(samples)
        packed = Phi3VDataCollator(processor.pad_token_id, packing=True)(samples)
        padded_loss, padded_grads = loss_and_gradients(model, model_inputs(padded, metadata=False))
        padded_inv_freq = rotary.inv_freq.clone()
        packed_loss, packed_grads = loss_and_gradients(model, model_inputs(packed))
        assert torch.equal(rotary.inv_freq, padded_inv_freq)  # the same factors were chosen
        if factors is not None:
            assert torch.equal(rotary.inv_freq, factors)  # short factors: the row's length did not count
        else:
            assert torch.equal(rotary.inv_freq, rotary.long_inv_freq)
        torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)
        for name in padded_grads:
            torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_rows_check_the_length_limit_per_sample(processor):
    model = Phi3VForCausalLM(tiny_config(original_max_position_embeddings=16, max_position_embeddings=32)).eval()
    samples = [tokenize_conversation(processor, turn("word " * 5, "ok"), [])] * 3  # 3 x ~20 tokens: a 60-token row
    packed = Phi3VDataCollator(processor.pad_token_id, packing=True)(samples)
    assert packed["input_ids"].shape[1] > 32 >= packed["max_length_q"]
    with torch.no_grad():
        assert torch.isfinite(model(**model_inputs(packed)).loss)
    too_long = Phi3VDataCollator(processor.pad_token_id, packing=True)(
        [tokenize_conversation(processor, turn("word " * 30, "ok"), [])])
    with pytest.raises(ValueError, match="more than the model's limit of 32"):
        model(**model_inputs(too_long))


def test_training_with_packing_follows_the_padded_run(tiny_checkpoint, processor, examples, tmp_path):
    """Two optimizer steps through the recipes' code path (parse_args -> make_trainer), packed and padded:
    the same logged losses and the same weights."""
    from phi3v.arguments import parse_args
    from phi3v.training import make_trainer, model_for_training

    weights, losses = {}, {}
    for packing in (False, True):
        argv = ["--model_name_or_path", tiny_checkpoint, "--output_dir", str(tmp_path / f"run{packing}"),
                "--deepspeed", "none", "--report_to", "none", "--save_strategy", "no", "--max_steps", "2",
                "--batch_size", "3", "--batch_size_per_gpu", "3", "--learning_rate", "1e-3", "--warmup_steps", "0",
                "--logging_steps", "1", "--dataloader_num_workers", "0", "--train_sampling_strategy", "sequential",
                "--no_tqdm"] + (["--packing"] if packing else [])
        args, _, training_args = parse_args(argv=argv)
        assert args.packing is packing
        model = model_for_training(args, training_args)
        trainer = make_trainer(model, training_args, examples, processor, packing=args.packing)
        assert trainer.data_collator.packing is packing
        trainer.train()
        losses[packing] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        weights[packing] = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    for name in weights[False]:
        torch.testing.assert_close(weights[True][name], weights[False][name], rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ no host syncs
class HostSyncRecorder(TorchFunctionMode):
    """Records every operation that makes the host wait for the GPU when the tensors live there: reading values
    (.item(), .tolist(), bool/int of a tensor), and ops whose output size depends on the data (nonzero, boolean-mask
    indexing, masked_select, masked_scatter's backward). Runs on a CPU: it flags the operations themselves."""

    METHODS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero}

    def __init__(self):
        super().__init__()
        self.hits = []  # (operation, innermost file:line outside torch)
        recorder = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                aten = torch.ops.aten
                bool_index = func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
                if bool_index or func.overloadpacket in (aten._local_scalar_dense, aten.nonzero, aten.masked_select,
                                                         aten.masked_scatter_backward, aten.is_nonzero):
                    recorder.record(str(func.overloadpacket))
                return func(*args, **(kwargs or {}))

        self.dispatch = Dispatch()

    def record(self, name):
        frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename
                  and f.name not in ("record", "__torch_function__", "__torch_dispatch__")]
        self.hits.append((name, f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.METHODS:
            self.record(func.__name__)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        super().__enter__()
        self.dispatch.__enter__()
        return self

    def __exit__(self, *exc):
        self.dispatch.__exit__(*exc)
        return super().__exit__(*exc)


def syncs_of_a_training_step(model, batch):
    with HostSyncRecorder() as forward:
        loss = model(**batch).loss
    with HostSyncRecorder() as backward:
        loss.backward()
    return forward.hits, backward.hits


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_training_forward_and_backward_make_no_host_sync(tiny_checkpoint, processor, examples, implementation):
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation=implementation).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    padded = Phi3VDataCollator(processor.pad_token_id)(examples)
    packed = Phi3VDataCollator(processor.pad_token_id, packing=True)(examples)

    # The recorder works: without the collator's metadata it finds the model's own syncs.
    forward, backward = syncs_of_a_training_step(model, model_inputs(padded, metadata=False))
    places = {place.split("/")[-1].split(":")[0] for _, place in forward + backward}
    assert {"image_embedding.py", "modeling.py"} <= places, forward + backward
    assert any(name == "aten.masked_scatter_backward" for name, _ in backward)

    # Packed rows: not one, forward (vision tower, embedding, mask, decoder, loss) or backward.
    assert syncs_of_a_training_step(model, model_inputs(packed)) == ([], [])

    # Padded rows: nothing of ours; SDPA's mask preparation in transformers reads the attention mask (may it use
    # is_causal instead of a mask?), eager's does not.
    forward, backward = syncs_of_a_training_step(model, model_inputs(padded))
    assert backward == [] and all("transformers/masking_utils.py" in place for _, place in forward), forward
    assert bool(forward) == (implementation == "sdpa")


# ------------------------------------------------------------------------------------------------ frozen tower
def test_frozen_vision_tower_runs_without_autograd(tiny_checkpoint, processor, examples):
    batch = model_inputs(Phi3VDataCollator(processor.pad_token_id)(examples))
    frozen = Phi3VForCausalLM.from_pretrained(tiny_checkpoint).train()
    freeze_vision_tower(frozen)
    trained = Phi3VForCausalLM.from_pretrained(tiny_checkpoint).train()  # same weights, CLIP trainable
    grad_modes = []
    frozen.model.vision_embed_tokens.vision_model.encoder.layers[0].register_forward_hook(
        lambda module, args, output: grad_modes.append(torch.is_grad_enabled()))
    frozen_loss, frozen_grads = loss_and_gradients(frozen, batch)
    trained_loss, trained_grads = loss_and_gradients(trained, batch)
    assert grad_modes == [False]
    assert torch.equal(frozen_loss, trained_loss)
    assert not any("img_processor" in name for name in frozen_grads)
    for name, grad in frozen_grads.items():  # projector, separators, language model: the same gradients
        assert torch.equal(grad, trained_grads[name]), name


# ------------------------------------------------------------------------------------------------ the benchmark
def test_benchmark_counts_the_same_tokens_and_flops_for_packed_rows(processor, examples, monkeypatch):
    """bench_train.py's counters read a packed row's sample lengths from its boundaries: the same tokens, images
    and model FLOPs (attention: the sum of squared sample lengths, not the row's length squared) as padded."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_train.py")
    monkeypatch.syspath_prepend(os.path.dirname(path))  # its sibling modules, as when it runs as a script
    spec = importlib.util.spec_from_file_location("bench_train_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    class Training(torch.nn.Module):
        training = True

    config = tiny_config()
    counts = {}
    for packing in (False, True):
        batch = model_inputs(Phi3VDataCollator(processor.pad_token_id, packing=packing)(examples))
        timer = bench.StepTimer(warmup=0, flops=bench.ModelFlops(config, layers_used=1, strategy="full"),
                                breakdown=False)
        timer.measuring = True
        timer._count(Training(), (), batch)
        counts[packing] = (timer.images, int(timer.tokens), timer.flops.total())
    assert counts[True] == counts[False]
    assert counts[False][1] == sum(len(e["input_ids"]) for e in examples)

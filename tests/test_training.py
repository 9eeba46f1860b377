"""Shared training parts: label masking, collator, strategies (full, frozen vision, LoRA, QLoRA), saving."""

import importlib.util
import os

import pytest
import torch
from PIL import Image

from phi3v import Phi3VForCausalLM
from phi3v.arguments import parse_args, split_global_batch
from phi3v.collator import Phi3VDataCollator
from phi3v.conversation import IGNORE_INDEX, generation_prompt, tokenize_conversation
from phi3v.dataset import SFTDataset
from phi3v.model_setup import apply_lora, freeze_vision_tower, load_model, lora_target_modules


def image(colour=(200, 10, 10), size=(336, 336)):
    return Image.new("RGB", size, colour)


def test_labels_cover_only_the_answers(processor):
    messages = [
        {"role": "user", "content": "<|image_1|>\nWhat is shown?"},
        {"role": "assistant", "content": "A cat."},
    ]
    example = tokenize_conversation(processor, messages, [image()], num_crops=1)
    prompt = [1, 32010, 29871, 13] + [-1] * 313 + [1, 29871, 13, 5618, 338, 4318, 29973, 32007, 29871, 13, 32001]
    answer = [319, 6635, 29889, 32007, 29871, 13, 32000]  # "A cat.<|end|>\n<|endoftext|>", no BOS
    assert example["input_ids"] == prompt + answer
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert example["pixel_values"].shape == (1, 2, 3, 336, 336)


def test_multi_turn_numbering_and_no_extra_bos(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<|image_1|>\nColour?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "<|image_2|>\nAnd this one?"},
        {"role": "assistant", "content": "Blue."},
    ]
    example = tokenize_conversation(processor, messages, [image(), image((0, 0, 255))], num_crops=1)
    ids, labels = example["input_ids"], example["labels"]
    assert ids[0] == 1 and ids.count(-1) == 313 and ids.count(-2) == 313
    # BOS only at the start and right after each image block (the processor's rule), none per turn.
    bos_positions = [i for i, t in enumerate(ids) if t == 1]
    assert bos_positions == [0, ids.index(-1) + 313, ids.index(-2) + 313]
    supervised = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert supervised == processor.encode_text("Red.<|end|>\n<|endoftext|>") + processor.encode_text(
        "Blue.<|end|>\n<|endoftext|>"
    )
    # The second turn's prompt starts right after the first answer with <|user|>.
    first_answer_end = ids.index(32000)
    assert ids[first_answer_end + 1] == 32010
    assert all(label == IGNORE_INDEX for label in labels[: ids.index(-1)])


def test_bad_conversations(processor):
    with pytest.raises(ValueError, match="must end with an assistant answer"):
        tokenize_conversation(processor, [{"role": "user", "content": "hi"}], [])
    with pytest.raises(ValueError, match="more image tags than its 0 image"):
        tokenize_conversation(
            processor, [{"role": "user", "content": "<|image_1|>"}, {"role": "assistant", "content": "x"}], []
        )
    with pytest.raises(ValueError, match="1 image tag\\(s\\) but 2 image\\(s\\)"):
        tokenize_conversation(
            processor,
            [{"role": "user", "content": "<|image_1|>"}, {"role": "assistant", "content": "x"}],
            [image(), image()],
        )
    with pytest.raises(ValueError, match="more than max_seq_length 100"):  # refused, never cut through the image
        tokenize_conversation(
            processor, [{"role": "user", "content": "<|image_1|>"}, {"role": "assistant", "content": "x"}], [image()],
            num_crops=1, max_length=100,
        )


def test_generation_prompt(processor):
    messages = [{"role": "user", "content": "<|image_1|>\nQ?"}, {"role": "assistant", "content": "A."}]
    assert generation_prompt(processor, messages) == ("<|user|>\n<|image_1|>\nQ?<|end|>\n<|assistant|>\n", "A.")


def test_collator_pads_right_and_concatenates_images(processor):
    convs = [
        (
            [{"role": "user", "content": "<|image_1|>\n<|image_2|>\nSame?"}, {"role": "assistant", "content": "yes"}],
            [image(), image()],
        ),
        ([{"role": "user", "content": "Just text"}, {"role": "assistant", "content": "ok"}], []),
        ([{"role": "user", "content": "<|image_1|>\nHi"}, {"role": "assistant", "content": "hello there"}], [image()]),
    ]
    examples = [tokenize_conversation(processor, m, i, num_crops=1) for m, i in convs]
    batch = Phi3VDataCollator(processor.pad_token_id)(examples)
    longest = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == e["input_ids"]
        assert (batch["input_ids"][row, n:] == 32000).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
    assert batch["pixel_values"].shape == (3, 2, 3, 336, 336)
    assert batch["image_sizes"].tolist() == [[336, 336]] * 3


def test_dataset_skips_bad_samples(processor, tmp_path):
    good = {"id": "good", "source": "mem[0]", "images": [image()], "video": None,
            "messages": [{"role": "user", "content": "<|image_1|>\nQ"}, {"role": "assistant", "content": "A"}]}
    bad = dict(good, id="bad", source="mem[1]", images=[str(tmp_path / "missing.jpg")])
    strict = SFTDataset([good, bad], processor, num_crops=1)
    with pytest.raises(ValueError, match="mem\\[1\\]: .*missing.jpg"):
        strict[1]
    lenient = SFTDataset([good, bad], processor, num_crops=1, skip_bad_samples=True)
    assert lenient[1]["input_ids"] == strict[0]["input_ids"]


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_frozen_vision_keeps_projector_and_embeddings_trainable(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    freeze_vision_tower(model)
    names = trainable_names(model)
    assert not any("img_processor" in n for n in names)
    assert "model.embed_tokens.weight" in names
    assert "model.vision_embed_tokens.img_projection.0.weight" in names
    assert "model.vision_embed_tokens.glb_GN" in names


def test_unused_clip_layers_are_frozen_after_loading(tiny_checkpoint):
    names = trainable_names(Phi3VForCausalLM.from_pretrained(tiny_checkpoint))
    assert "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1.weight" in names
    assert not any("encoder.layers.1." in n or "post_layernorm" in n for n in names)


def test_lora_targets(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    everything = lora_target_modules(model, vision=True)
    assert "lm_head" not in everything and "lm_head" in lora_target_modules(model, vision=True, lm_head=True)
    assert "model.layers.0.self_attn.qkv_proj" in everything and "model.layers.1.mlp.down_proj" in everything
    assert "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.self_attn.q_proj" in everything
    assert "model.vision_embed_tokens.img_projection.0" in everything
    assert not any("encoder.layers.1." in n for n in everything)  # the unused CLIP layer
    language_only = lora_target_modules(model, vision=False)
    assert not any("vision" in n for n in language_only)
    last = lora_target_modules(model, vision=False, num_layers=1)
    assert set(last) == {f"model.layers.1.{m}" for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                                         "mlp.down_proj")}
    # exclude drops a layer that is a target without it, and only that one
    assert set(lora_target_modules(model, vision=False, num_layers=1, exclude=["o_proj"])) == set(last) - {
        "model.layers.1.self_attn.o_proj"}
    projector = {"model.vision_embed_tokens.img_projection.0", "model.vision_embed_tokens.img_projection.2"}
    assert projector <= set(everything)
    assert set(lora_target_modules(model, vision=True, exclude=["img_projection"])) == set(everything) - projector


def one_step_loss_decreases(model, batch, lr=1e-2, steps=5):
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def train_batch(processor):
    convs = [
        ([{"role": "user", "content": "<|image_1|>\nColour?"}, {"role": "assistant", "content": "red"}], [image()]),
        (
            [{"role": "user", "content": "<|image_1|>\nColour?"}, {"role": "assistant", "content": "blue"}],
            [image((0, 0, 250))],
        ),
    ]
    return Phi3VDataCollator(processor.pad_token_id)(
        [tokenize_conversation(processor, m, i, num_crops=1) for m, i in convs]
    )


def test_lora_trains_saves_and_reloads(tiny_checkpoint, train_batch, tmp_path):
    model = apply_lora(
        load_model(tiny_checkpoint), 8, 16, 0.0, lora_target_modules(load_model(tiny_checkpoint), vision=True)
    )
    assert all("lora_" in n for n in trainable_names(model))
    losses = one_step_loss_decreases(model, train_batch)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        expected = model(**{k: v for k, v in train_batch.items() if k != "labels"}).logits
    model.save_pretrained(tmp_path / "adapter")
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(Phi3VForCausalLM.from_pretrained(tiny_checkpoint), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**{k: v for k, v in train_batch.items() if k != "labels"}).logits, expected)
    merged = reloaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    again = Phi3VForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**{k: v for k, v in train_batch.items() if k != "labels"}).logits, expected,
                                   rtol=1e-4, atol=1e-4)


def bitsandbytes_runs_on_cpu() -> str | None:
    """None when 4-bit bitsandbytes works here, else the reason."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer = layer.to("cpu") if not torch.cuda.is_available() else layer.cuda()
        layer(torch.randn(2, 64, dtype=torch.bfloat16, device=layer.weight.device))
    except Exception as error:  # pragma: no cover - depends on the machine
        return f"bitsandbytes 4-bit does not run here: {error}"
    return None


def test_qlora_trains_on_cpu(tiny_checkpoint, train_batch):
    reason = bitsandbytes_runs_on_cpu()
    if reason:
        print(f"QLoRA test skipped: {reason}")
        pytest.skip(reason)
    from phi3v.model_setup import prepare_for_kbit_training

    model = load_model(tiny_checkpoint, bits=4)  # QLoRA's base
    import bitsandbytes as bnb

    assert isinstance(model.model.layers[0].self_attn.qkv_proj, bnb.nn.Linear4bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    model = prepare_for_kbit_training(model)
    model = apply_lora(model, 8, 16, 0.0, lora_target_modules(model, vision=True))
    losses = one_step_loss_decreases(model, train_batch, lr=3e-3)
    print("QLoRA losses:", losses)
    assert losses[-1] < losses[0]


def test_global_batch_size_derivation():
    assert split_global_batch(16, 2, 2) == {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}
    assert split_global_batch(64, 1, 8) == {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8}
    assert split_global_batch(4, 8, 1) == {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}
    args, _, training_args = parse_args(
        argv=["--output_dir", "/tmp/x", "--batch_size", "16", "--batch_size_per_gpu", "2", "--report_to", "none"]
    )
    assert training_args.per_device_train_batch_size == 2 and training_args.gradient_accumulation_steps == 8
    assert (training_args.adam_beta1, training_args.adam_beta2, training_args.adam_epsilon) == (0.9, 0.95, 1e-7)
    assert training_args.warmup_steps == 50 and training_args.lr_scheduler_type == "linear"
    assert training_args.weight_decay == 0.01 and training_args.learning_rate == 4e-5
    args, _, training_args = parse_args(
        argv=["--output_dir", "/tmp/x", "--wd", "0.1", "--no-tqdm", "--use_qlora", "--report_to", "none"]
    )
    assert training_args.weight_decay == 0.1 and training_args.disable_tqdm and args.use_lora


def test_lora_init_follows_the_seed_alone(tiny_checkpoint):
    """The adapters' random init depends on --seed only, not on the random numbers loading drew before it (ZeRO-3
    loading draws some, plain loading none): otherwise the same run under ZeRO-2 and ZeRO-3 trains differently."""
    def lora_a(seed, draws_before):
        model = load_model(tiny_checkpoint)
        torch.rand(draws_before)
        adapted = apply_lora(model, 8, 16, 0.0, lora_target_modules(model, vision=True), seed=seed)
        return {n: p.detach().clone() for n, p in adapted.named_parameters() if "lora_A" in n}

    a, b, c = lora_a(0, 0), lora_a(0, 1000), lora_a(1, 0)
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in a)

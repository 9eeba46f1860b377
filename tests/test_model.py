"""Phi3VForCausalLM: official layout, image feature placement, loss, cache, LongRoPE, attention backends."""

import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import OFFICIAL
from PIL import Image
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from phi3v import Phi3VConfig, Phi3VForCausalLM
from phi3v.tiny import tiny_config


def random_image(width, height, seed):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Phi3VForCausalLM.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="module")
def batch(processor):
    """Sample 0 has two images, sample 1 one image (three images in all, of different grids)."""
    prompts = [
        "<|user|>\n<|image_1|>\n<|image_2|>\nSame?<|end|>\n<|assistant|>\n",
        "<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\n",
    ]
    images = [[random_image(400, 300, 1), random_image(200, 500, 2)], [random_image(336, 336, 3)]]
    return processor(prompts, images, num_crops=2, padding_side="right")


def official_tensor_shapes(num_layers=32, num_vision_layers=24) -> dict:
    """Every tensor of the official checkpoint with its shape (docs/DESIGN.md §1.2)."""
    shapes = {"model.embed_tokens.weight": (32064, 3072), "model.norm.weight": (3072,), "lm_head.weight": (32064, 3072)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.qkv_proj.weight": (9216, 3072), p + "self_attn.o_proj.weight": (3072, 3072),
            p + "mlp.gate_up_proj.weight": (16384, 3072), p + "mlp.down_proj.weight": (3072, 8192),
            p + "input_layernorm.weight": (3072,), p + "post_attention_layernorm.weight": (3072,),
        })
    v = "model.vision_embed_tokens."
    shapes.update({
        v + "glb_GN": (1, 1, 4096), v + "sub_GN": (1, 1, 1, 4096),
        v + "img_projection.0.weight": (3072, 4096), v + "img_projection.0.bias": (3072,),
        v + "img_projection.2.weight": (3072, 3072), v + "img_projection.2.bias": (3072,),
    })
    c = v + "img_processor.vision_model."
    shapes.update({
        c + "embeddings.class_embedding": (1024,), c + "embeddings.patch_embedding.weight": (1024, 3, 14, 14),
        c + "embeddings.position_embedding.weight": (577, 1024),
        c + "pre_layrnorm.weight": (1024,), c + "pre_layrnorm.bias": (1024,),
        c + "post_layernorm.weight": (1024,), c + "post_layernorm.bias": (1024,),
    })
    for j in range(num_vision_layers):
        p = c + f"encoder.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (1024, 1024)
            shapes[p + f"self_attn.{proj}.bias"] = (1024,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[p + f"{norm}.weight"] = (1024,)
            shapes[p + f"{norm}.bias"] = (1024,)
        shapes.update({p + "mlp.fc1.weight": (4096, 1024), p + "mlp.fc1.bias": (4096,),
                       p + "mlp.fc2.weight": (1024, 4096), p + "mlp.fc2.bias": (1024,)})
    return shapes


def test_full_size_model_has_exactly_the_official_592_tensors():
    config = Phi3VConfig.from_pretrained(os.path.join(OFFICIAL, "phi-3.5-vision-instruct"))
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    expected = official_tensor_shapes()
    assert len(expected) == 592
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(p.numel() for p in model.parameters()) == 4_146_621_440
    # A state dict with every official name loads strictly: no missing, no unexpected keys.
    with torch.device("meta"):
        fresh = Phi3VForCausalLM(config)
    result = fresh.load_state_dict(
        {k: torch.empty(s, device="meta") for k, s in expected.items()}, strict=True, assign=True
    )
    assert not result.missing_keys and not result.unexpected_keys


def test_official_config_reads_as_is():
    for name in ("phi-3.5-vision-instruct", "phi-3-vision-128k-instruct"):
        path = os.path.join(OFFICIAL, name)
        config = AutoConfig.from_pretrained(path)  # auto_map in the file, no trust_remote_code
        assert isinstance(config, Phi3VConfig)
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        assert config.rope_parameters["rope_type"] == "longrope"
        assert config.rope_parameters["short_factor"] == raw["rope_scaling"]["short_factor"]
        assert config.rope_parameters["long_factor"] == raw["rope_scaling"]["long_factor"]
        assert config.max_position_embeddings == 131072 and config.original_max_position_embeddings == 4096
        assert config.vision_config.num_hidden_layers == 24 and config.vision_config.hidden_size == 1024
        assert config.pad_token_id == 32000 and not config.tie_word_embeddings
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        _, mscale = ROPE_INIT_FUNCTIONS["longrope"](config)
        assert mscale == pytest.approx(1.1902380714238083, abs=1e-15)  # sqrt(1 + ln 32 / ln 4096), docs/DESIGN.md §6


def test_tiny_checkpoint_uses_official_names(tiny_checkpoint):
    with safe_open(os.path.join(tiny_checkpoint, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len(keys) == 15 + (7 + 16 * 2) + 6 == 60  # docs/DESIGN.md §7: LM 3 + 6/layer, CLIP 7 + 16/layer, extras 6
    assert "model.vision_embed_tokens.img_processor.vision_model.post_layernorm.weight" in keys
    assert "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.1.mlp.fc2.bias" in keys
    with open(os.path.join(tiny_checkpoint, "config.json")) as f:  # official form (tests/test_official_files.py)
        assert json.load(f)["auto_map"]["AutoConfig"] == (
            "microsoft/Phi-3.5-vision-instruct--configuration_phi3_v.Phi3VConfig"
        )


def test_auto_model_loads_folder_with_remote_code_hooks(tiny_checkpoint, tmp_path):
    folder = tmp_path / "with_auto_map"
    shutil.copytree(tiny_checkpoint, folder)
    with open(folder / "config.json") as f:
        config = json.load(f)
    config["auto_map"] = {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                          "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"}
    config["_attn_implementation"] = "flash_attention_2"  # baked into the official file
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, Phi3VForCausalLM)
    assert model.config._attn_implementation == "sdpa"


def test_image_features_land_at_their_slots_in_order(model, batch):
    ids, pixels, sizes = batch["input_ids"], batch["pixel_values"], batch["image_sizes"]
    with torch.no_grad():
        embeds = model.model.embed(ids, pixels, sizes)
        # Each image embedded on its own, in batch order: sample 0's two images, then sample 1's.
        per_image = [model.model.vision_embed_tokens(pixels[i : i + 1], sizes[i : i + 1]) for i in range(3)]
        text = model.model.embed_tokens(ids.clamp(min=0))
    slots = [(0, -1), (0, -2), (1, -1)]
    for (row, tag), features in zip(slots, per_image):
        positions = (ids[row] == tag).nonzero().squeeze(1)
        assert len(positions) == features.shape[0]
        torch.testing.assert_close(embeds[row, positions], features)
    text_positions = ids >= 0
    torch.testing.assert_close(embeds[text_positions], text[text_positions])
    assert (ids == batch["input_ids"]).all()  # inputs are never mutated


def test_image_token_count_matches_processor(model, processor):
    out = processor("<|image_1|>", [random_image(1280, 720, 0)], num_crops=16)
    with torch.no_grad():
        features = model.model.vision_embed_tokens(out["pixel_values"], out["image_sizes"])
    assert features.shape == (2353, 64) == ((out["input_ids"] < 0).sum().item(), 64)


def test_loss_equals_hand_computed_shifted_cross_entropy(model, batch):
    labels = batch["input_ids"].clone()
    labels[labels < 0] = -100
    labels[batch["attention_mask"] == 0] = -100
    labels[:, :5] = -100
    with torch.no_grad():
        logits = model(**batch).logits
        loss = model(**batch, labels=labels).loss
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    keep = shift_labels != -100
    expected = F.cross_entropy(shift_logits[keep], shift_labels[keep])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # with the Trainer's token count (gradient accumulation): sum / count
        summed = model(**batch, labels=labels, num_items_in_batch=1000).loss
    torch.testing.assert_close(summed, expected * keep.sum() / 1000, rtol=1e-5, atol=1e-6)


def test_save_load_gives_identical_logits(model, batch, tmp_path):
    model.save_pretrained(tmp_path)
    again = Phi3VForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)


def test_bf16_load_has_bf16_weights(tiny_checkpoint):
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_generate_with_cache_equals_greedy_without(model, processor):
    prompts = [
        "<|user|>\n<|image_1|>\nDescribe.<|end|>\n<|assistant|>\n",
        "<|user|>\nHi there, who are you?<|end|>\n<|assistant|>\n",
    ]
    inputs = processor(prompts, [[random_image(300, 200, 5)], []], num_crops=1, padding_side="left")
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None, use_cache=True)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(6):  # greedy decoding, recomputing the whole sequence every step
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                           pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                           use_cache=False).logits
            next_ids = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_ids], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
    assert torch.equal(cached, ids)


def test_longrope_short_factors_up_to_original_length_then_long():
    config = tiny_config(original_max_position_embeddings=64, max_position_embeddings=256)
    model = Phi3VForCausalLM(config).eval()
    head_dim, theta = 16, 10000.0
    mscale = math.sqrt(1 + math.log(256 / 64) / math.log(64))
    rotary = model.model.rotary_emb
    x = torch.zeros(1, 1, 64)

    def expected(factors, length):
        inv = 1.0 / (torch.tensor(factors) * theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        freqs = torch.arange(length).float()[:, None] * inv
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * mscale, emb.sin() * mscale

    for length, factors in ((64, config.rope_parameters["short_factor"]), (65, config.rope_parameters["long_factor"])):
        cos, sin = rotary(x, torch.arange(length)[None])
        exp_cos, exp_sin = expected(factors, length)
        torch.testing.assert_close(cos[0], exp_cos, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sin[0], exp_sin, rtol=1e-5, atol=1e-5)


def test_generation_across_the_longrope_switch_matches_full_recompute():
    """The cache is dropped and the prefix re-run once the sequence passes original_max_position_embeddings."""
    torch.manual_seed(0)
    model = Phi3VForCausalLM(tiny_config(original_max_position_embeddings=64, max_position_embeddings=256)).eval()
    ids = torch.randint(3, 32000, (1, 60))
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                eos_token_id=None)
        full = ids
        for _ in range(10):
            next_id = model(input_ids=full, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            full = torch.cat([full, next_id], dim=1)
    assert torch.equal(cached, full)


def test_eager_and_sdpa_agree(tiny_checkpoint, batch):
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation=implementation).eval()
        assert model.model.vision_embed_tokens.vision_model.config._attn_implementation == implementation
        with torch.no_grad():
            out = model(**batch).logits
        logits[implementation] = out[batch["attention_mask"].bool()]
    difference = (logits["eager"] - logits["sdpa"]).abs().max().item()
    print(f"max |eager - sdpa| logit difference: {difference:.3g}")
    assert difference < 1e-4


def test_gradient_checkpointing_gives_the_same_gradients(tiny_checkpoint, batch):
    labels = batch["input_ids"].masked_fill(batch["input_ids"] < 0, -100)
    grads = []
    for checkpointing in (False, True):
        model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**batch, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("vision_model.encoder.layers.0" in n for n in grads[0])  # the vision tower is trained too
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_bad_model_inputs(model, batch):
    with pytest.raises(ValueError, match="pixel_values were given without image_sizes"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match="image slots \\(negative ids\\) but no pixel_values"):
        model(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="image slots but the images give"):
        model(
            input_ids=batch["input_ids"][:1],
            pixel_values=batch["pixel_values"][:1],
            image_sizes=batch["image_sizes"][:1],
        )
    short = Phi3VForCausalLM(tiny_config(max_position_embeddings=32, original_max_position_embeddings=16))
    with pytest.raises(ValueError, match="40 tokens long, more than the model's limit of 32"):
        short(input_ids=torch.ones(1, 40, dtype=torch.long))


def test_model_folder_without_weights_or_with_a_mismatched_config(tiny_checkpoint, tmp_path):
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_checkpoint, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(OSError, match="no file named model.safetensors.*no_weights"):
        Phi3VForCausalLM.from_pretrained(no_weights)
    extra_layer = tmp_path / "extra_layer"  # same shapes, one layer more: would load with a random layer
    shutil.copytree(tiny_checkpoint, extra_layer)
    config = json.loads((extra_layer / "config.json").read_text())
    (extra_layer / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="6 weight tensor\\(s\\) .* not in the checkpoint .*model.layers.2.*"
                                         "does config.json belong to these weights"):
        Phi3VForCausalLM.from_pretrained(extra_layer)
    wider = tmp_path / "wider"
    shutil.copytree(tiny_checkpoint, wider)
    (wider / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # size mismatches: transformers refuses
        Phi3VForCausalLM.from_pretrained(wider)

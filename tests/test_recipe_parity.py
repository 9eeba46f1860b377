"""The four task recipes train what the original Microsoft recipe trains (issue 15, part 1).

The expected sets are written out here from the original's rules, name by name, for the tiny test model (language
model 2 layers, CLIP 2 layers of which the first is used), not derived from the code under test:

- weight decay: the original's Trainer (transformers 4.45) decays every parameter except biases and the weights of
  torch.nn.LayerNorm modules (CLIP's pre_layrnorm / layer_norm1 / layer_norm2 / post_layernorm). Phi-3's RMSNorm is
  no LayerNorm, so input_layernorm, post_attention_layernorm and model.norm ARE decayed.
- --freeze_vision_model: `model.model.vision_embed_tokens.requires_grad_(False)`; the official image embedding
  holds CLIP, img_projection, glb_GN, sub_GN and the token embedding table (`wte`, the same module as embed_tokens).
- LoRA (create_lora_config): qkv_proj, o_proj, down_proj, gate_up_proj, lm_head; unless the vision model is frozen
  also CLIP's q/k/v/out_proj, fc1, fc2 (its last layer is deleted first: patch_clip_for_lora) and img_projection.0/.2.
  Only the adapters train.

Each case runs the recipes' own path: parse_args -> model_for_training -> make_trainer -> the Trainer's optimizer.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the recipe scripts

from phi3v.arguments import parse_args
from phi3v.training import make_trainer, model_for_training

CLIP = "model.vision_embed_tokens.img_processor.vision_model."
EMBED = "model.vision_embed_tokens."
RMS_NORMS = {"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
             "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
             "model.norm.weight"}
LANGUAGE_LINEAR = {f"model.layers.{i}.{m}.weight" for i in (0, 1)
                   for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
LANGUAGE = LANGUAGE_LINEAR | RMS_NORMS | {"model.embed_tokens.weight", "lm_head.weight"}  # 15 tensors
PROJECTOR = {EMBED + "glb_GN", EMBED + "sub_GN", EMBED + "img_projection.0.weight", EMBED + "img_projection.0.bias",
             EMBED + "img_projection.2.weight", EMBED + "img_projection.2.bias"}


def clip_layer(i):
    return {CLIP + f"encoder.layers.{i}.{m}.{p}" for p in ("weight", "bias")
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                      "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")}


CLIP_USED = {CLIP + "embeddings.class_embedding", CLIP + "embeddings.patch_embedding.weight",
             CLIP + "embeddings.position_embedding.weight", CLIP + "pre_layrnorm.weight",
             CLIP + "pre_layrnorm.bias"} | clip_layer(0)
CLIP_UNUSED = clip_layer(1) | {CLIP + "post_layernorm.weight", CLIP + "post_layernorm.bias"}
# Biases and LayerNorm weights among the trainable CLIP / projector tensors: the original's no-decay set.
LAYER_NORMS_AND_BIASES = {n for n in CLIP_USED | PROJECTOR
                          if n.endswith(".bias") or ".layer_norm" in n or "pre_layrnorm" in n}
assert len(LAYER_NORMS_AND_BIASES) == 2 + 6 + 4 + 2  # pre_layrnorm, 6 layer biases, 2 layer norms, 2 proj biases

LANGUAGE_LORA = {f"model.layers.{i}.{m}" for i in (0, 1)
                 for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
CLIP_LORA = {CLIP + f"encoder.layers.0.{m}" for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")}
PROJECTOR_LORA = {EMBED + "img_projection.0", EMBED + "img_projection.2"}


def lora_tensors(modules):
    return {f"base_model.model.{m}.{part}.default.weight" for m in modules for part in ("lora_A", "lora_B")}


def strategy(tiny_checkpoint, processor, tmp_path, *flags):
    """(trainable names, decayed names, not-decayed names, LoRA-adapted module names) of the recipes' Trainer."""
    argv = ["--model_name_or_path", tiny_checkpoint, "--output_dir", str(tmp_path), "--deepspeed", "none",
            "--report_to", "none", "--wd", "0.1", "--no_tqdm", *flags]
    args, _, training_args = parse_args(argv=argv)
    model = model_for_training(args, training_args)
    trainer = make_trainer(model, training_args, [{"unused": 0}], processor,
                           exempt_norms_from_decay=args.exempt_norms_from_decay)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, not_decayed = set(), set()
    for group in optimizer.param_groups:
        (decayed if group["weight_decay"] == 0.1 else not_decayed).update(names[id(p)] for p in group["params"])
        assert group["weight_decay"] in (0.0, 0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | not_decayed == trainable and not decayed & not_decayed
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    return trainable, decayed, not_decayed, adapted


def test_full_fine_tuning_decays_the_rmsnorm_weights_as_the_original(tiny_checkpoint, processor, tmp_path):
    trainable, decayed, not_decayed, _ = strategy(tiny_checkpoint, processor, tmp_path)
    # The original leaves the unused last CLIP layer and post_layernorm trainable, but they never get a gradient
    # (AdamW skips them, decay included); here they are frozen: the same training.
    assert trainable == LANGUAGE | CLIP_USED | PROJECTOR
    assert len(trainable) == 42 and not trainable & CLIP_UNUSED
    assert not_decayed == LAYER_NORMS_AND_BIASES
    assert decayed == trainable - LAYER_NORMS_AND_BIASES
    assert RMS_NORMS <= decayed and len(decayed) == 28


def test_exempt_norms_from_decay_opts_into_the_norm_exemption(tiny_checkpoint, processor, tmp_path):
    trainable, decayed, not_decayed, _ = strategy(tiny_checkpoint, processor, tmp_path, "--exempt_norms_from_decay")
    assert trainable == LANGUAGE | CLIP_USED | PROJECTOR
    assert not_decayed == LAYER_NORMS_AND_BIASES | RMS_NORMS
    assert len(decayed) == 23


def test_freeze_vision_model_freezes_the_image_embedding_and_token_embeddings(tiny_checkpoint, processor, tmp_path):
    trainable, decayed, not_decayed, _ = strategy(tiny_checkpoint, processor, tmp_path, "--freeze_vision_model")
    assert trainable == LANGUAGE - {"model.embed_tokens.weight"}
    assert len(trainable) == 14  # the original's count on this model (21 with the CLIP-only freeze)
    assert decayed == trainable and not not_decayed  # no biases, no LayerNorm left; RMSNorm decayed


def test_freeze_clip_only_keeps_projector_separators_and_embeddings_training(tiny_checkpoint, processor, tmp_path):
    for flags in (["--freeze_clip_only"], ["--freeze_vision_model", "--freeze_clip_only"]):
        trainable, decayed, not_decayed, _ = strategy(tiny_checkpoint, processor, tmp_path, *flags)
        assert trainable == LANGUAGE | PROJECTOR and len(trainable) == 21
        assert not_decayed == {EMBED + "img_projection.0.bias", EMBED + "img_projection.2.bias"}


@pytest.mark.parametrize("flags, modules", [
    ([], LANGUAGE_LORA | {"lm_head"} | CLIP_LORA | PROJECTOR_LORA),
    (["--freeze_vision_model"], LANGUAGE_LORA | {"lm_head"}),
    (["--freeze_clip_only"], LANGUAGE_LORA | {"lm_head"} | PROJECTOR_LORA),
    (["--lora_exclude_lm_head"], LANGUAGE_LORA | CLIP_LORA | PROJECTOR_LORA),
    (["--freeze_vision_model", "--lora_exclude_lm_head"], LANGUAGE_LORA),
], ids=["all", "frozen-vision", "clip-only", "no-lm-head", "frozen-no-lm-head"])
def test_lora_adapts_the_original_targets_and_only_the_adapters_train(tiny_checkpoint, processor, tmp_path,
                                                                     flags, modules):
    trainable, decayed, not_decayed, adapted = strategy(tiny_checkpoint, processor, tmp_path, "--use_lora",
                                                        "--lora_rank", "4", *flags)
    assert adapted == modules
    assert trainable == lora_tensors(modules)
    assert decayed == trainable and not not_decayed  # LoRA weights are decayed (no bias in LoRA)


def test_lora_layers_are_gaussian_initialised_with_the_original_rank_and_alpha(tiny_checkpoint, processor, tmp_path):
    argv = ["--model_name_or_path", tiny_checkpoint, "--output_dir", str(tmp_path), "--deepspeed", "none",
            "--report_to", "none", "--use_lora", "--lora_rank", "8", "--lora_alpha_ratio", "2", "--lora_dropout", "0.1"]
    args, _, training_args = parse_args(argv=argv)
    model = model_for_training(args, training_args)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.init_lora_weights) == (8, 16, 0.1, "gaussian")
    lm_head = model.base_model.model.lm_head
    assert float(lm_head.lora_B["default"].weight.detach().abs().sum()) == 0.0  # B = 0: the model is unchanged
    assert float(lm_head.lora_A["default"].weight.detach().std()) == pytest.approx(1 / 8, rel=0.2)  # gaussian, 1/r
    # alpha is round(rank x ratio), as create_lora_config: rank 4 x 0.3 gives alpha 1 (scaling 0.25, not 0.3)
    args, _, training_args = parse_args(argv=argv[:-6] + ["--lora_rank", "4", "--lora_alpha_ratio", "0.3"])
    assert model_for_training(args, training_args).peft_config["default"].lora_alpha == 1


def test_lora_exclude_lm_head_without_lora_is_refused_in_one_line(tmp_path):
    from phi3v.errors import InputError

    with pytest.raises(InputError, match="--lora_exclude_lm_head applies to LoRA runs only"):
        parse_args(argv=["--output_dir", str(tmp_path), "--report_to", "none", "--lora_exclude_lm_head"])


def test_custom_recipe_keeps_its_own_flags(tmp_path):
    """The custom recipe reads RecipeArguments: the task recipes' opt-in flags are not its flags."""
    import finetune_hf_trainer_custom as custom
    from phi3v.errors import InputError

    with pytest.raises((InputError, SystemExit), match="--freeze_clip_only"):  # refused, in one line
        custom.parse(["--data_path", "x.json", "--output_dir", str(tmp_path), "--freeze_clip_only"])
    # --freeze_vision_model means the original recipe's frozen set in the task recipes: refused here, naming the
    # custom recipe's (2U1's) flag, rather than read as --freeze_vision_tower
    with pytest.raises(SystemExit, match="--freeze_vision_model is a flag of the four task recipes.*"
                                         "use --freeze_vision_tower"):
        custom.parse(["--data_path", "x.json", "--output_dir", str(tmp_path), "--freeze_vision_model"])
    args, task, _ = custom.parse(["--data_path", "x.json", "--output_dir", str(tmp_path), "--freeze_vision_tower"])
    assert task.freeze_vision_tower and not hasattr(args, "freeze_clip_only")


def test_full_size_counts_follow_the_original_rules():
    """The full-size model (meta device), counted by hand from the original's rules. 592 tensors: CLIP 391 (3
    embeddings, pre_layrnorm 2, 24 layers x 16, post_layernorm 2), projector and separators 6, language model 195
    (embed_tokens, 32 layers x 6, norm, lm_head). The last CLIP layer (16) and post_layernorm (2) never run.
    No decay (original): 24 x 6 CLIP biases + 24 x 4 LayerNorm tensors + pre/post_layrnorm 4 + 2 projector biases =
    246 of 592; among the 574 tensors that get a gradient, 234 (the unused layer's 10 + post_layernorm's 2 go)."""
    import torch

    from phi3v import Phi3VConfig, Phi3VForCausalLM
    from phi3v.model_setup import apply_lora, freeze_vision_embedding, lora_target_modules
    from phi3v.optim import decay_parameter_names, original_decay_parameter_names

    config = Phi3VConfig.from_pretrained(os.path.join(os.path.dirname(__file__), "..", "phi3v", "assets",
                                                      "phi-3.5-vision-instruct"))

    def fresh():
        with torch.device("meta"):
            return Phi3VForCausalLM(config)

    def counts(model, rule=original_decay_parameter_names):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        decayed = trainable & rule(model)
        return len(trainable), len(decayed), len(trainable - decayed)

    model = fresh()
    assert len(dict(model.named_parameters())) == 592
    assert len(original_decay_parameter_names(model)) == 346  # the original's decayed set, all 592 trainable
    assert counts(model) == (574, 340, 234)
    assert counts(model, decay_parameter_names) == (574, 275, 299)  # --exempt_norms_from_decay: 65 RMSNorm weights
    model = fresh()
    freeze_vision_embedding(model)
    assert counts(model) == (32 * 6 + 2, 194, 0)
    for kwargs, modules in (({"vision": True, "lm_head": True}, 32 * 4 + 1 + 23 * 6 + 2),
                            ({"vision": False, "lm_head": True}, 32 * 4 + 1)):
        model = fresh()
        peft_model = apply_lora(model, 64, 128, 0.0, lora_target_modules(model, **kwargs))
        assert counts(peft_model) == (2 * modules, 2 * modules, 0)

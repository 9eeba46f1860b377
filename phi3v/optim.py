"""AdamW with one learning rate per part of the model (vision tower, projector, language model).

Groups are named "vision", "projector", "language", each split into a weight-decay group and a "<name>_no_decay"
group. Which parameters skip weight decay is transformers 5's Trainer rule (biases, LayerNorm / RMSNorm weights),
so switching to this optimizer changes the learning rates only. (The four task recipes keep the original recipe's
rule instead, which decays RMSNorm weights: `original_decay_parameter_names`.) The Trainer's scheduler multiplies
each group's base lr by the same factor, so every group follows the same schedule at its own scale.
The lr of each group goes into the logs by phi3v.callbacks.LearningRateLogCallback.
"""

import logging
import re

import torch
from torch import nn

from phi3v.compat import get_parameter_names

logger = logging.getLogger(__name__)

# The patterns transformers' Trainer.get_decay_parameter_names uses (on lower-cased names), plus nn.LayerNorm modules.
NO_DECAY_NAME_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]

# By parameter name, which also places LoRA weights: "...img_processor.<...>.q_proj.lora_A.default.weight" is a
# vision parameter because it adapts a CLIP layer.
VISION_PATTERN = re.compile(r"(?:^|\.)vision_embed_tokens\.img_processor\.")
PROJECTOR_PATTERN = re.compile(r"(?:^|\.)vision_embed_tokens\.(?:img_projection\.|glb_GN$|sub_GN$)")
GROUP_NAMES = ("language", "vision", "projector")


def parameter_group(name: str) -> str:
    """'vision' (CLIP tower), 'projector' (img_projection and the glb_GN / sub_GN separators) or 'language'."""
    if VISION_PATTERN.search(name):
        return "vision"
    if PROJECTOR_PATTERN.search(name):
        return "projector"
    return "language"


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay, as transformers 5's Trainer picks them: all but biases and the
    weights of LayerNorm and RMSNorm layers (by name). The custom recipe's rule, and the four task recipes' with
    --exempt_norms_from_decay."""
    return set(get_parameter_names(model, [nn.LayerNorm], NO_DECAY_NAME_PATTERNS))


def original_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters the original recipe decays: its Trainer's rule (transformers 4.45), every parameter
    but biases and the weights of torch.nn.LayerNorm modules. Phi-3's RMSNorm is no LayerNorm, so the language
    model's input_layernorm, post_attention_layernorm and final norm weights ARE decayed; CLIP's LayerNorms are not.
    The four task recipes' rule by default (their published results were trained with it)."""
    return {name for name in get_parameter_names(model, [nn.LayerNorm]) if "bias" not in name}


def build_optimizer(model: nn.Module, training_args, vision_lr=None, projector_lr=None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, one group per (part, decay / no decay).

    lr: `vision_lr` / `projector_lr` for those parts (None: `training_args.learning_rate`), learning_rate for the
    language model; betas, eps and weight decay from training_args. Empty groups are left out.
    """
    lrs = {
        "language": training_args.learning_rate,
        "vision": training_args.learning_rate if vision_lr is None else vision_lr,
        "projector": training_args.learning_rate if projector_lr is None else projector_lr,
    }
    decay = decay_parameter_names(model)
    buckets = {(group, decays): [] for group in GROUP_NAMES for decays in (True, False)}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            buckets[parameter_group(name), name in decay].append(parameter)

    param_groups = []
    for (group, decays), params in buckets.items():
        if params:
            param_groups.append({
                "name": group if decays else f"{group}_no_decay",
                "params": params,
                "lr": lrs[group],
                "weight_decay": training_args.weight_decay if decays else 0.0,
            })
    if not param_groups:
        raise ValueError("nothing to train: every parameter is frozen (check the freeze / LoRA options)")

    for group in param_groups:
        logger.info("optimizer group %-20s lr %.3g, weight decay %g, %s parameters", group["name"], group["lr"],
                    group["weight_decay"], f"{sum(p.numel() for p in group['params']):,}")
    # Fused kernels only when asked for (the GPU default) and every parameter already sits on the GPU.
    fused = "fused" in str(training_args.optim) and all(p.is_cuda for g in param_groups for p in g["params"])
    return torch.optim.AdamW(
        param_groups,
        lr=training_args.learning_rate,
        betas=(training_args.adam_beta1, training_args.adam_beta2),
        eps=training_args.adam_epsilon,
        fused=fused or None,
    )

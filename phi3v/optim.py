"""AdamW with one learning rate per part of the model (vision tower, projector, language model).

Groups are named "vision", "projector", "language", each split into a weight-decay group and a "<name>_no_decay"
group. Which parameters skip weight decay is transformers 5's Trainer rule (biases, LayerNorm / RMSNorm weights),
so switching to this optimizer changes the learning rates only. (The four task recipes keep the original recipe's
rule instead, which decays RMSNorm weights: `original_decay_parameter_names`.) The Trainer's scheduler multiplies each group's
base lr by the same factor, so every group follows the same schedule at its own scale.
"""

import re

import torch
from torch import nn
from transformers import TrainerCallback

from phi3v.compat import get_parameter_names

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

    # Fused kernels only when asked for (the GPU default) and every parameter already sits on the GPU.
    fused = "fused" in str(training_args.optim) and all(p.is_cuda for g in param_groups for p in g["params"])
    return torch.optim.AdamW(
        param_groups,
        lr=training_args.learning_rate,
        betas=(training_args.adam_beta1, training_args.adam_beta2),
        eps=training_args.adam_epsilon,
        fused=fused or None,
    )


def group_learning_rates(optimizer) -> dict[str, float]:
    """{"learning_rate_<group name>": lr} for each named group (a no-decay twin has its part's lr: left out)."""
    return {
        f"learning_rate_{group['name']}": float(group["lr"])
        for group in optimizer.param_groups
        if group.get("name") and not group["name"].endswith("_no_decay")
    }


class LearningRateLogCallback(TrainerCallback):
    """Adds `learning_rate_<group>` to every training log, so each part of the model has its own lr curve.

    The values are the lrs of the last optimizer step, read before the scheduler moves on, which is what the
    Trainer logs as "learning_rate". The Trainer appends a log to state.log_history before the callbacks run, so
    they are added there too; reporters (TensorBoard, W&B) that run after this callback see them as well: put it
    first, see `add_learning_rate_logging`.
    """

    def __init__(self):
        self.last_step_rates = {}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self.last_step_rates = group_learning_rates(optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "learning_rate" not in logs or not self.last_step_rates:  # only training logs have an lr
            return
        logs.update(self.last_step_rates)
        last = state.log_history[-1] if state.log_history else {}
        if last.get("step") == state.global_step and "learning_rate" in last:
            last.update(self.last_step_rates)


def add_learning_rate_logging(trainer) -> None:
    """Register LearningRateLogCallback ahead of the reporting callbacks, which then log the group lrs too."""
    trainer.callback_handler.callbacks.insert(0, LearningRateLogCallback())

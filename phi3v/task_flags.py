"""The original recipe's flag family (microsoft/Phi-3CookBook's vision fine-tuning scripts), which the four task
recipes take: its flags, what they mean, and the model plan they make.

    full fine-tuning         (no flag)                every weight (the CLIP layers that never run stay frozen)
    --freeze_vision_model    the original's frozen set: CLIP, projector, separators and the token embeddings
    --use_lora / --use_qlora adapters on the language model's linear layers and lm_head, and on CLIP and the
                             projector unless --freeze_vision_model; QLoRA on a 4-bit nf4 base

Their published accuracies were trained so. Three flags opt into current practice instead (README, "Strategies"):
--freeze_clip_only, --exempt_norms_from_decay, --lora_exclude_lm_head.
"""

from dataclasses import dataclass, field
from typing import ClassVar

from phi3v.arguments import RecipeArguments
from phi3v.errors import InputError
from phi3v.model_setup import ModelPlan, freeze_vision_embedding, freeze_vision_tower, lora_target_modules


@dataclass
class TaskRecipeArguments(RecipeArguments):
    """The four task recipes' flags (the original recipe's, and this project's opt-outs of its choices)."""

    dataset_path: str | None = field(
        default=None,
        metadata={"help": "local copy of the data: a datasets save_to_disk folder, or a jsonl file (project format)"},
    )
    use_lora: bool = field(
        default=False,
        metadata={"help": "LoRA on the language model's linear layers and lm_head, and on CLIP and the projector "
                          "unless --freeze_vision_model (the original recipe's targets)"},
    )
    use_qlora: bool = field(default=False, metadata={"help": "4-bit nf4 base model + LoRA"})
    freeze_vision_model: bool = field(
        default=False,
        metadata={"help": "freeze the image embedding (CLIP, projector, separators) and the token embeddings, as the "
                          "original recipe; --freeze_clip_only freezes CLIP alone"},
    )
    lora_alpha_ratio: float = field(
        default=2.0, metadata={"help": "LoRA alpha = rank x this, rounded to a whole number (as the original recipe)"}
    )
    freeze_clip_only: bool = field(
        default=False,
        metadata={"help": "freeze only the CLIP tower: the projector, its separators and the token embeddings train "
                          "(with LoRA: the projector is adapted, CLIP is not)"},
    )
    exempt_norms_from_decay: bool = field(
        default=False,
        metadata={"help": "no weight decay on the RMSNorm weights either (transformers 5's rule); the original "
                          "recipe exempts only biases and LayerNorm weights"},
    )
    lora_exclude_lm_head: bool = field(
        default=False,
        metadata={"help": "leave lm_head out of LoRA (the original recipe adapts it; PEFT then also stores lm_head's "
                          "base weight in the adapter, ~200 MB in bf16)"},
    )

    flag_hints: ClassVar[dict] = {
        "--lora_alpha": "unknown flag {flag}: this recipe sets LoRA alpha as --lora_alpha_ratio x --lora_rank (alpha "
                        "16 at rank 64 is --lora_alpha_ratio 0.25)",
    }

    def resolve(self, recipe_args) -> None:
        """QLoRA is LoRA on a quantized base; --lora_exclude_lm_head needs LoRA."""
        if self.use_qlora:
            self.use_lora = True
        if self.lora_exclude_lm_head and not self.use_lora:
            raise InputError("--lora_exclude_lm_head applies to LoRA runs only: add --use_lora (or --use_qlora), or "
                             "drop it")

    def model_plan(self) -> ModelPlan:
        """full, frozen vision, LoRA or QLoRA, as the original recipe (see the module docstring)."""
        frozen = self.freeze_vision_model or self.freeze_clip_only
        freeze = freeze_vision_tower if self.freeze_clip_only else freeze_vision_embedding if frozen else None
        lora = None
        if self.use_lora:  # alpha as the original's create_lora_config
            lora = dict(rank=self.lora_rank, alpha=round(self.lora_rank * self.lora_alpha_ratio),
                        dropout=self.lora_dropout, use_dora=self.use_dora)

        def targets(model):
            return lora_target_modules(model, vision=not frozen, projector=not frozen or self.freeze_clip_only,
                                       lm_head=not self.lora_exclude_lm_head)

        return ModelPlan(load={"bits": 4 if self.use_qlora else 16}, freeze=freeze, lora=lora, lora_targets=targets)

"""The community recipe's flag family (2U1/Phi3-Vision-Finetune, its train.py: configure_llm, configure_vision_tower,
find_target_linear_names), which the custom, DPO and GRPO recipes take: its flags, what they mean, and the model
plan they make.

  * without --lora_enable, every part trains fully unless frozen: the language model unless --freeze_llm, the CLIP
    tower unless --freeze_vision_tower, the projector (img_projection) with --tune_img_projector (default True), the
    two image separators always;
  * --lora_enable adds LoRA adapters to the language model's linear layers, whose own weights stay frozen (2U1
    requires --freeze_llm True with it; here it is implied, and --freeze_llm False is refused); the CLIP tower and the
    projector still train fully (PEFT modules_to_save), unless
  * --vision_lora, which puts the adapters on the CLIP layers and the projector's linear layers as well, their own
    weights frozen (2U1 requires --freeze_vision_tower True; implied here);
  * --num_lora_modules N keeps only the last N of those linear modules (in the official checkpoint's module order);
    --lora_namespan_exclude drops every module whose name contains one of its strings ('embed_tokens' meaning the
    language model's token embedding only);
  * --bits 4 / 8 quantizes the base (CLIP and the projector stay unquantized); --lora_weight_path warm-starts the
    adapters from a saved adapter folder.

A recipe of this family puts CommunityArguments in its own flags' dataclass (`class MyArguments(CommunityArguments)`,
with `@dataclass(kw_only=True)` when it adds a required flag), parses with `recipe_class=RecipeArguments`, and builds
its model with `model_for_training(args, training_args, task_args.model_plan(args))`.
"""

import ast
import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from phi3v.errors import InputError
from phi3v.model_setup import ModelPlan, check_adapter_fits, excluded, flash_attention_available

logger = logging.getLogger(__name__)

EMBED_TOKENS, LM_HEAD = "model.embed_tokens", "lm_head"  # module names in the official layout
# Where each part's modules come in the official checkpoint's module order (embed_tokens, the image embedding, the
# decoder layers, the final norm, lm_head), which --num_lora_modules counts in; this package registers the image
# embedding after the decoder layers.
OFFICIAL_ORDER = ("model.embed_tokens", "model.vision_embed_tokens.", "model.layers.", "model.norm", "lm_head")
# The four task recipes' flags, refused here with what this family calls the same thing.
TASK_RECIPE_FLAGS = {
    "use_lora": "--lora_enable", "use_qlora": "--lora_enable --bits 4", "freeze_vision_model": "--freeze_vision_tower",
    "lora_alpha_ratio": "--lora_alpha (LoRA alpha itself, not a ratio)", "dataset_path": "--data_path",
    "freeze_clip_only": None, "exempt_norms_from_decay": None, "lora_exclude_lm_head": None,
}


@dataclass
class CommunityArguments:
    """The community recipe's model and strategy flags (2U1's ModelArguments / TrainingArguments additions)."""

    model_id: str | None = field(default=None, metadata={"help": "alias of --model_name_or_path"})
    freeze_vision_tower: bool = field(
        default=False, metadata={"help": "do not train the CLIP tower's own weights (implied by --vision_lora)"})
    tune_img_projector: bool = field(
        default=True, metadata={"help": "train the projector (img_projection) fully; without it, it is frozen (with "
                                        "--vision_lora it gets LoRA adapters instead)"}
    )
    freeze_llm: bool = field(
        default=False, metadata={"help": "do not train the language model's own weights (with its embeddings and "
                                         "lm_head); implied by --lora_enable, which trains adapters on it"})
    vision_lr: float | None = field(default=None, metadata={"help": "CLIP tower lr (default: --learning_rate)"})
    projector_lr: float | None = field(default=None, metadata={"help": "projector lr (default: --learning_rate)"})
    lora_enable: bool = field(
        default=False,
        metadata={"help": "LoRA adapters on the language model's linear layers (its own weights frozen); the CLIP "
                          "tower and projector train as without LoRA unless --vision_lora"},
    )
    vision_lora: bool = field(
        default=False, metadata={"help": "LoRA adapters on the CLIP layers and the projector too (their own weights "
                                         "frozen); needs --lora_enable"})
    lora_alpha: float = field(default=256, metadata={"help": "LoRA alpha (this recipe's; not a ratio)"})
    num_lora_modules: int = field(
        default=-1, metadata={"help": "-1: LoRA on every target; N: only the last N linear modules (official order)"}
    )
    lora_namespan_exclude: str = field(
        default="['lm_head', 'embed_tokens']",
        metadata={"help": "Python list of strings: LoRA skips every module whose name contains one, e.g. "
                          "\"['o_proj','layers.0.']\"; 'embed_tokens' means the language model's token embedding "
                          "only. The default leaves out lm_head and embed_tokens (adapting embed_tokens requires "
                          "lm_head)"},
    )
    lora_bias: str = field(default="none", metadata={"help": "biases that train with LoRA: none, all or lora_only"})
    lora_weight_path: str = field(
        default="", metadata={"help": "start the LoRA adapters from this adapter folder's weights (same targets "
                                      "and rank)"})
    bits: int = field(default=16, metadata={"help": "16, or 8 / 4: quantized base model (with --lora_enable)"})
    double_quant: bool = field(default=True, metadata={"help": "4-bit: double-quantize the quantization constants"})
    quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 or fp4"})
    cache_dir: str | None = field(default=None, metadata={"help": "where hub downloads of the model go"})
    disable_flash_attn2: bool = field(
        default=False, metadata={"help": "SDPA attention instead of flash-attn 2 (which is used, as in 2U1, when it "
                                         "is installed and a GPU is there)"})
    max_num_frames: int = field(default=10, metadata={"help": "frames sampled from each video"})
    lazy_preprocess: bool = field(
        default=False, metadata={"help": "accepted for the community recipe's scripts; changes nothing (samples are "
                                         "always read and processed when the DataLoader asks for them)"})

    flag_hints: ClassVar[dict] = {
        f"--{flag}": "{flag} is a flag of the four task recipes, not of {program}" + (f"; use {instead}" if instead
                                                                                        else "")
        for flag, instead in TASK_RECIPE_FLAGS.items()
    }

    def resolve(self, recipe_args) -> None:
        """2U1's rules for the combinations (its train.py refuses the others), and what the flags imply; fills in the
        shared settings they decide (the model path, the attention)."""
        if self.model_id is not None:
            if "model_name_or_path" in recipe_args.given and recipe_args.model_name_or_path != self.model_id:
                raise InputError(f"--model_id {self.model_id} and --model_name_or_path "
                                 f"{recipe_args.model_name_or_path} differ; give one")
            recipe_args.model_name_or_path = self.model_id
        # 2U1: flash attention unless --disable_flash_attn2, where it can run (--use_flash_attention falls back to
        # SDPA with a warning where it cannot)
        wanted = recipe_args.use_flash_attention or flash_attention_available()
        recipe_args.use_flash_attention = wanted and not self.disable_flash_attn2

        if self.bits not in (16, 8, 4):
            raise InputError(f"--bits must be 16, 8 or 4, got {self.bits}")
        if self.bits < 16 and not self.lora_enable:
            raise InputError(f"--bits {self.bits} trains a quantized model, which needs --lora_enable")
        if self.quant_type not in ("nf4", "fp4"):
            raise InputError(f"--quant_type must be nf4 or fp4, got {self.quant_type!r}")
        if self.lora_bias not in ("none", "all", "lora_only"):
            raise InputError(f"--lora_bias must be none, all or lora_only, got {self.lora_bias!r}")
        if self.vision_lora and not self.lora_enable:
            raise InputError("--vision_lora needs --lora_enable")
        given = set(recipe_args.given)
        if self.lora_enable and "freeze_llm" in given and not self.freeze_llm:
            raise InputError("--lora_enable trains LoRA adapters on the frozen language model (2U1 requires "
                             "--freeze_llm True with it); drop --freeze_llm False, or drop --lora_enable to train the "
                             "whole language model")
        if self.vision_lora and "freeze_vision_tower" in given and not self.freeze_vision_tower:
            raise InputError("--vision_lora trains LoRA adapters on the frozen vision tower (2U1 requires "
                             "--freeze_vision_tower True with it); drop --freeze_vision_tower False, or drop "
                             "--vision_lora to train the whole tower")
        self.freeze_llm = self.freeze_llm or self.lora_enable
        self.freeze_vision_tower = self.freeze_vision_tower or self.vision_lora
        if not self.lora_enable and self.freeze_llm and self.freeze_vision_tower and not self.tune_img_projector:
            raise InputError("--freeze_llm, --freeze_vision_tower and --tune_img_projector False leave nothing to "
                             "train (but the two image separator vectors)")
        if self.lora_weight_path and not self.lora_enable:
            raise InputError("--lora_weight_path starts LoRA adapters from saved ones, which needs --lora_enable")
        self.lora_namespan_exclude = parse_name_list(self.lora_namespan_exclude)
        if self.lora_enable:
            adapted = [name for name in (EMBED_TOKENS, LM_HEAD) if not excluded(name, self.lora_namespan_exclude)]
            if adapted == [EMBED_TOKENS]:
                raise InputError("tuning embed_tokens with LoRA requires lm_head too")

    def model_plan(self, recipe_args) -> ModelPlan:
        """The flags as a plan for phi3v.training.model_for_training: the quantisation, the LoRA targets and options,
        then exactly the parts to train left trainable (see set_trainable)."""
        # As 2U1: a quantized base keeps the CLIP tower and the projector unquantized (they may train fully).
        skip = ("lm_head", "model.vision_embed_tokens.img_projection", "model.vision_embed_tokens.img_processor")
        load = dict(bits=self.bits, quant_type=self.quant_type, double_quant=self.double_quant, skip_modules=skip,
                    cache_dir=self.cache_dir)
        lora = None
        if self.lora_enable:
            lora = dict(rank=recipe_args.lora_rank, alpha=self.lora_alpha, dropout=recipe_args.lora_dropout,
                        use_dora=recipe_args.use_dora, bias=self.lora_bias,
                        modules_to_save=fully_trained_with_lora(self) or None)

        def targets(model):
            names = lora_targets(model, self)
            if not names:
                raise InputError(empty_lora_message(self))
            return names

        def finish(model):
            if self.lora_weight_path:
                warm_start_adapters(model, self.lora_weight_path)
            if self.vision_lora and not self.tune_img_projector:
                logger.warning("--tune_img_projector False has no effect with --vision_lora (as in 2U1, the projector "
                               "gets LoRA adapters): add 'img_projection' to --lora_namespan_exclude to leave it out")
            set_trainable(model, self)

        return ModelPlan(load=load, lora=lora, lora_targets=targets, finish=finish)


def parse_name_list(text) -> list[str]:
    """"['lm_head', 'embed_tokens']" -> ['lm_head', 'embed_tokens'] (a bare name is a list of one)."""
    try:
        value = ast.literal_eval(text) if text.strip() else []
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InputError("--lora_namespan_exclude must be a Python list of strings like "
                         f"\"['lm_head','embed_tokens']\", got {text!r}")
    return list(value)


def official_position(name) -> int:
    return next((i for i, prefix in enumerate(OFFICIAL_ORDER) if name.startswith(prefix)), len(OFFICIAL_ORDER))


def lora_targets(model, flags: CommunityArguments) -> list[str]:
    """Full names of the modules LoRA wraps: 2U1's find_target_linear_names. Every nn.Linear and nn.Embedding, in
    the official module order, whose name no --lora_namespan_exclude fragment is part of (without --vision_lora
    also not the vision tower's and the projector's); with --num_lora_modules N the last N of them. Modules of the
    CLIP layers that never run (after the feature layer) are then left out: they would get no gradient."""
    fragments = list(flags.lora_namespan_exclude)
    if not flags.vision_lora:
        fragments += ["vision_model", "img_projection"]
    modules = sorted(((name, module) for name, module in model.named_modules()), key=lambda m: official_position(m[0]))
    names = [name for name, module in modules
             if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and not excluded(name, fragments)]
    if flags.num_lora_modules > 0:
        names = names[-flags.num_lora_modules:]
    return [name for name in names if not unused_clip_module(model, name)]


def unused_clip_module(model, name) -> bool:
    """Whether `name` is in a CLIP layer after the feature layer (never run) or CLIP's unused post_layernorm."""
    used = model.model.vision_embed_tokens.layers_used
    marker = "vision_model.encoder.layers."
    if marker in name:
        return int(name.split(marker, 1)[1].split(".", 1)[0]) >= used
    return "vision_model.post_layernorm" in name


def empty_lora_message(flags: CommunityArguments) -> str:
    why = [f"--lora_namespan_exclude {flags.lora_namespan_exclude}"]
    if flags.num_lora_modules > 0:
        why.append(f"--num_lora_modules {flags.num_lora_modules}")
    scope = "" if flags.vision_lora else " (without --vision_lora the vision tower and projector are no LoRA targets)"
    return f"--lora_enable: no module left for LoRA to wrap: {' and '.join(why)} excluded them all{scope}"


def part_of(name) -> str:
    """'adapter' (LoRA weights), 'vision' (CLIP), 'projector' (img_projection), 'separator' (glb_GN, sub_GN) or
    'language' (the rest: embed_tokens, decoder layers, norm, lm_head), for a parameter name (PeftModel's too)."""
    if ".lora_" in name:
        return "adapter"
    if ".img_processor." in name:
        return "vision"
    if ".img_projection." in name:
        return "projector"
    if name.endswith(("glb_GN", "sub_GN")):
        return "separator"
    return "language"


def fully_trained_with_lora(flags: CommunityArguments) -> list[str]:
    """The parts a LoRA run trains fully besides its adapters (2U1: without --vision_lora, CLIP unless
    --freeze_vision_tower, the projector with --tune_img_projector): PEFT's modules_to_save, so that the adapter
    folder keeps them (and merging and loading the adapter bring them back)."""
    if not flags.lora_enable or flags.vision_lora:
        return []
    vision = ["model.vision_embed_tokens.img_processor.vision_model"] if not flags.freeze_vision_tower else []
    # the projector's two linear layers one by one: the image embedding indexes its nn.Sequential
    projector = [f"model.vision_embed_tokens.img_projection.{i}" for i in (0, 2)] if flags.tune_img_projector else []
    return vision + projector


def set_trainable(model, flags: CommunityArguments) -> None:
    """2U1's configure_llm / configure_vision_tower. Without LoRA: language model unless --freeze_llm, CLIP unless
    --freeze_vision_tower, img_projection with --tune_img_projector, the separators always. With LoRA, PEFT has
    left trainable the adapters and the trainable copies of fully_trained_with_lora's parts. The CLIP layers that
    never run stay frozen either way."""
    if not flags.lora_enable:
        wanted = {"vision": not flags.freeze_vision_tower, "projector": flags.tune_img_projector,
                  "language": not flags.freeze_llm, "separator": True}
    elif not flags.vision_lora:  # configure_vision_tower runs after PEFT: frozen parts lose --lora_bias's biases too
        wanted = {"vision": False} if flags.freeze_vision_tower else {}
        wanted.update({"projector": False} if not flags.tune_img_projector else {})
    else:
        wanted = {}
    for name, parameter in model.named_parameters():
        part = part_of(name)
        if part in wanted:
            parameter.requires_grad_(wanted[part])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.model.vision_embed_tokens.freeze_unused_layers()


def warm_start_adapters(model, adapter_dir) -> None:
    """--lora_weight_path: the adapters (and the parts a LoRA run trains fully) start from a saved adapter folder's
    weights; refused, naming the first tensor, unless it holds exactly this run's tensors (check_adapter_fits)."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    settings = "this run's LoRA settings (targets, rank, --vision_lora, --freeze_vision_tower, --tune_img_projector)"
    try:
        check_adapter_fits(model, adapter_dir, settings)
    except ValueError as error:
        raise InputError(f"--lora_weight_path {error}") from None
    set_peft_model_state_dict(model, load_peft_weights(adapter_dir, device="cpu"))
    logger.info("LoRA adapters start from %s", adapter_dir)

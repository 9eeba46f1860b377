"""Fine-tune Phi-3.5-vision on your own data: LLaVA-style JSON (or the project's jsonl), images, several images or a
video per conversation; optionally evaluating before and after on a second file.

Data: --data_path, a LLaVA-style JSON list (or one record per line, or one record) or the project's jsonl
(phi3v.records), media paths relative to --image_folder. A LLaVA record:

    {"id": "1", "image": "cats/1.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."},
                       {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Grey."}]}

"image" may be a list (one <image> tag per image, in order) or be replaced by "video" (frames are sampled evenly,
--max_num_frames of them). Training learns every assistant turn.
Metric (--eval_data_path): the last assistant turn is generated; exact match and ANLS (phi3v.metrics).

    torchrun --nproc_per_node=8 finetune_hf_trainer_custom.py --data_path train.json --image_folder images --bf16
    torchrun --nproc_per_node=1 finetune_hf_trainer_custom.py --data_path train.json --image_folder images \\
        --bf16 --lora_enable --vision_lora --num_crops 4

The flags are the community recipe's (2U1/Phi3-Vision-Finetune) and mean what they mean there:
  * without --lora_enable, every part trains fully unless frozen: the language model unless --freeze_llm, the CLIP
    tower unless --freeze_vision_tower, the projector (img_projection) with --tune_img_projector (default True);
  * --lora_enable adds LoRA adapters to the language model's linear layers, whose own weights stay frozen (2U1
    requires --freeze_llm True with it; here it is implied, and --freeze_llm False is refused); lm_head and
    embed_tokens are adapted too unless --lora_namespan_exclude names them (by default it does). The CLIP tower
    and the projector still train fully, as above, unless
  * --vision_lora, which puts the adapters on the CLIP layers and the projector's linear layers as well, their own
    weights frozen (2U1 requires --freeze_vision_tower True; implied here);
  * --num_lora_modules N keeps only the last N of those linear modules (in the official checkpoint's module order);
    --lora_namespan_exclude drops every module whose name contains one of its strings ('embed_tokens' meaning the
    language model's token embedding only).
Each part has its own learning rate (--vision_lr, --projector_lr, --learning_rate), logged as learning_rate_<part>.
The launchers in scripts/ run the common set-ups.
"""

import argparse
import ast
import importlib.util
import logging
import sys
from dataclasses import MISSING, dataclass, field, fields

import torch

from phi3v import Phi3VProcessor
from phi3v.arguments import RecipeArguments, parse_args
from phi3v.callbacks import add_learning_rate_logging
from phi3v.checkpoints import prepare_resume
from phi3v.dataset import SFTDataset
from phi3v.errors import InputError, exit_on_input_error, exit_with_error, one_line
from phi3v.evaluation import evaluate
from phi3v.metrics import mean_anls, mean_exact_match
from phi3v.model_setup import adapter_tensor_shapes, excluded
from phi3v.optim import build_optimizer
from phi3v.records import check_media, load_records
from phi3v.splits import take
from phi3v.training import (
    ModelPlan,
    make_trainer,
    model_for_training,
    run_training,
    save_outputs,
    setup_logging,
    write_run_summary,
)

logger = logging.getLogger(__name__)

EMBED_TOKENS, LM_HEAD = "model.embed_tokens", "lm_head"  # module names in the official layout
# Defaults of this script where they differ from the other recipes' (the community recipe's values).
SCRIPT_DEFAULTS = dict(lora_rank=128, lora_dropout=0.05, num_crops=16)
OPTIONAL_BOOL = {"nargs": "?", "const": True}  # `--flag`, `--flag True` and `--flag False` all work; unset: None


# ------------------------------------------------------------------------------------------------ the task
@dataclass
class CustomArguments:
    data_path: str = field(metadata={"help": "training data: LLaVA-style JSON / jsonl, or the project's jsonl"})
    image_folder: str | None = field(default=None, metadata={"help": "root of the relative image / video paths"})
    eval_data_path: str | None = field(
        default=None, metadata={"help": "evaluate before and after training on this file (same formats)"}
    )
    model_id: str | None = field(default=None, metadata={"help": "alias of --model_name_or_path"})
    freeze_vision_tower: bool | None = field(
        default=None, metadata={"help": "do not train the CLIP tower's own weights (implied by --vision_lora)",
                                **OPTIONAL_BOOL})
    tune_img_projector: bool = field(
        default=True, metadata={"help": "train the projector (img_projection) fully; without it, it is frozen (with "
                                        "--vision_lora it gets LoRA adapters instead)"}
    )
    freeze_llm: bool | None = field(
        default=None, metadata={"help": "do not train the language model's own weights (with its embeddings and "
                                        "lm_head); implied by --lora_enable, which trains adapters on it",
                                **OPTIONAL_BOOL})
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


# Flags of the shared argument set this recipe honours; the others belong to the four task recipes and are refused
# here (with the flag this recipe uses instead), so that none of them is silently ignored.
SHARED_FLAGS = {
    "model_name_or_path", "use_flash_attention", "batch_size", "batch_size_per_gpu", "num_crops", "wd", "no_tqdm",
    "lora_rank", "lora_dropout", "merge_lora", "max_seq_length", "skip_bad_samples", "packing", "eval_batch_size",
    "max_new_tokens", "max_train_samples", "max_eval_samples", "skip_eval_before", "skip_nonfinite_steps",
    "overwrite_output_dir", "use_dora", "warmup_ratio", "logging_dir",
}
INSTEAD = {
    "use_lora": "--lora_enable", "use_qlora": "--lora_enable --bits 4", "freeze_vision_model": "--freeze_vision_tower",
    "lora_alpha_ratio": "--lora_alpha (LoRA alpha itself, not a ratio)", "dataset_path": "--data_path",
}


def fail(message):
    """A user error: `finetune_hf_trainer_custom.py: error: <message>` on stderr, exit status 2 (phi3v.errors)."""
    exit_with_error(message)


def parse(argv=None):
    """(recipe args, task args, training args) with the aliases resolved and the option combinations checked."""
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = dict(SCRIPT_DEFAULTS)
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--bits", type=int, default=16)
    if peek.parse_known_args(argv)[0].bits < 16:
        defaults["deepspeed"] = None  # quantized weights are not ZeRO-partitioned: DDP (an explicit flag still wins)
    try:
        args, task, training_args = parse_args(CustomArguments, argv, recipe_class=RecipeArguments, **defaults)
    except InputError as error:
        fail(error)
    for f in fields(args):
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        if f.name not in SHARED_FLAGS and getattr(args, f.name) != default:
            instead = f"; use {INSTEAD[f.name]}" if f.name in INSTEAD else ""
            fail(f"--{f.name} is a flag of the four task recipes, not of finetune_hf_trainer_custom.py{instead}")

    if task.model_id is not None:
        given = any(a == "--model_name_or_path" or a.startswith("--model_name_or_path=") for a in argv)
        if given and args.model_name_or_path != task.model_id:
            fail(f"--model_id {task.model_id} and --model_name_or_path {args.model_name_or_path} differ; give one")
        args.model_name_or_path = task.model_id
    args.use_flash_attention = flash_attention_wanted(task.disable_flash_attn2, args.use_flash_attention)

    if task.bits not in (16, 8, 4):
        fail(f"--bits must be 16, 8 or 4, got {task.bits}")
    if task.bits < 16 and not task.lora_enable:
        fail(f"--bits {task.bits} trains a quantized model, which needs --lora_enable")
    if task.quant_type not in ("nf4", "fp4"):
        fail(f"--quant_type must be nf4 or fp4, got {task.quant_type!r}")
    if task.lora_bias not in ("none", "all", "lora_only"):
        fail(f"--lora_bias must be none, all or lora_only, got {task.lora_bias!r}")
    # 2U1's rules (its train.py refuses the other combinations): LoRA trains adapters on frozen weights.
    if task.vision_lora and not task.lora_enable:
        fail("--vision_lora needs --lora_enable")
    if task.lora_enable and task.freeze_llm is False:
        fail("--lora_enable trains LoRA adapters on the frozen language model (2U1 requires --freeze_llm True with "
             "it); drop --freeze_llm False, or drop --lora_enable to train the whole language model")
    if task.vision_lora and task.freeze_vision_tower is False:
        fail("--vision_lora trains LoRA adapters on the frozen vision tower (2U1 requires --freeze_vision_tower True "
             "with it); drop --freeze_vision_tower False, or drop --vision_lora to train the whole tower")
    task.freeze_llm = bool(task.freeze_llm) or task.lora_enable
    task.freeze_vision_tower = bool(task.freeze_vision_tower) or task.vision_lora
    if not task.lora_enable and task.freeze_llm and task.freeze_vision_tower and not task.tune_img_projector:
        fail("--freeze_llm, --freeze_vision_tower and --tune_img_projector False leave nothing to train (but the two "
             "image separator vectors)")
    if task.lora_weight_path and not task.lora_enable:
        fail("--lora_weight_path starts LoRA adapters from saved ones, which needs --lora_enable")
    task.lora_namespan_exclude = parse_name_list(task.lora_namespan_exclude)
    if task.lora_enable:
        adapted = [name for name in (EMBED_TOKENS, LM_HEAD) if not excluded(name, task.lora_namespan_exclude)]
        if adapted == [EMBED_TOKENS]:
            fail("tuning embed_tokens with LoRA requires lm_head too")
    # The other recipes' names of the same settings, for the shared code (saving, merging).
    args.use_lora = task.lora_enable
    args.use_qlora = task.bits < 16  # save_outputs: a quantized base is not merged in place
    return args, task, training_args


def flash_attention_wanted(disable: bool, asked: bool) -> bool:
    """2U1: flash attention unless --disable_flash_attn2; here when flash-attn is installed and a GPU is there (or
    --use_flash_attention asks for it, which falls back to SDPA with a warning where it cannot run)."""
    available = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    return (asked or available) and not disable


def parse_name_list(text) -> list[str]:
    """"['lm_head', 'embed_tokens']" -> ['lm_head', 'embed_tokens'] (a bare name is a list of one)."""
    try:
        value = ast.literal_eval(text) if text.strip() else []
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        fail(f"--lora_namespan_exclude must be a Python list of strings like \"['lm_head','embed_tokens']\", "
             f"got {text!r}")
    return list(value)


# Where each part's modules come in the official checkpoint's module order (embed_tokens, the image embedding, the
# decoder layers, the final norm, lm_head), which --num_lora_modules counts in; this package registers the image
# embedding after the decoder layers.
OFFICIAL_ORDER = ("model.embed_tokens", "model.vision_embed_tokens.", "model.layers.", "model.norm", "lm_head")


def official_position(name) -> int:
    return next((i for i, prefix in enumerate(OFFICIAL_ORDER) if name.startswith(prefix)), len(OFFICIAL_ORDER))


def lora_targets(model, task) -> list[str]:
    """Full names of the modules LoRA wraps: 2U1's find_target_linear_names. Every nn.Linear and nn.Embedding, in
    the official module order, whose name no --lora_namespan_exclude fragment is part of (without --vision_lora
    also not the vision tower's and the projector's); with --num_lora_modules N the last N of them. Modules of the
    CLIP layers that never run (after the feature layer) are then left out: they would get no gradient."""
    fragments = list(task.lora_namespan_exclude)
    if not task.vision_lora:
        fragments += ["vision_model", "img_projection"]
    modules = sorted(((name, module) for name, module in model.named_modules()), key=lambda m: official_position(m[0]))
    names = [name for name, module in modules
             if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and not excluded(name, fragments)]
    if task.num_lora_modules > 0:
        names = names[-task.num_lora_modules:]
    return [name for name in names if not unused_clip_module(model, name)]


def unused_clip_module(model, name) -> bool:
    """Whether `name` is in a CLIP layer after the feature layer (never run) or CLIP's unused post_layernorm."""
    used = model.model.vision_embed_tokens.layers_used
    marker = "vision_model.encoder.layers."
    if marker in name:
        return int(name.split(marker, 1)[1].split(".", 1)[0]) >= used
    return "vision_model.post_layernorm" in name


def empty_lora_message(task) -> str:
    why = [f"--lora_namespan_exclude {task.lora_namespan_exclude}"]
    if task.num_lora_modules > 0:
        why.append(f"--num_lora_modules {task.num_lora_modules}")
    scope = "" if task.vision_lora else " (without --vision_lora the vision tower and projector are no LoRA targets)"
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


def fully_trained_with_lora(task) -> list[str]:
    """The parts a LoRA run trains fully besides its adapters (2U1: without --vision_lora, CLIP unless
    --freeze_vision_tower, the projector with --tune_img_projector): PEFT's modules_to_save, so that the adapter
    folder keeps them (and merging and loading the adapter bring them back)."""
    if not task.lora_enable or task.vision_lora:
        return []
    vision = ["model.vision_embed_tokens.img_processor.vision_model"] if not task.freeze_vision_tower else []
    # the projector's two linear layers one by one: the image embedding indexes its nn.Sequential
    projector = [f"model.vision_embed_tokens.img_projection.{i}" for i in (0, 2)] if task.tune_img_projector else []
    return vision + projector


def set_trainable(model, task) -> None:
    """2U1's configure_llm / configure_vision_tower. Without LoRA: language model unless --freeze_llm, CLIP unless
    --freeze_vision_tower, img_projection with --tune_img_projector, the separators always. With LoRA, PEFT has
    left trainable the adapters and the trainable copies of fully_trained_with_lora's parts. The CLIP layers that
    never run stay frozen either way."""
    if not task.lora_enable:
        wanted = {"vision": not task.freeze_vision_tower, "projector": task.tune_img_projector,
                  "language": not task.freeze_llm, "separator": True}
    elif not task.vision_lora:  # configure_vision_tower runs after PEFT: frozen parts lose --lora_bias's biases too
        wanted = {"vision": False} if task.freeze_vision_tower else {}
        wanted.update({"projector": False} if not task.tune_img_projector else {})
    else:
        wanted = {}
    for name, parameter in model.named_parameters():
        part = part_of(name)
        if part in wanted:
            parameter.requires_grad_(wanted[part])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.model.vision_embed_tokens.freeze_unused_layers()


def load_lora_weights(model, adapter_dir) -> None:
    """--lora_weight_path: the adapters (and the parts a LoRA run trains fully) start from a saved adapter folder's
    weights; refused, naming the first tensor, unless it holds exactly this run's tensors with the same shapes."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    try:
        found = adapter_tensor_shapes(adapter_dir)  # safetensors header, or tensors only (weights_only)
    except ValueError as error:
        fail(f"--lora_weight_path: {one_line(error)}")
    own = {name.replace(".default", "").replace(".modules_to_save", ""): tuple(p.shape)
           for name, p in model.named_parameters() if ".lora_" in name or ".modules_to_save." in name}
    problems = [(key, found.get(key), shape) for key, shape in own.items() if found.get(key) != shape]
    problems += [(key, shape, None) for key, shape in found.items() if key not in own]
    if problems:
        key, there, here = problems[0]
        fail(f"--lora_weight_path {adapter_dir}: its adapter does not match this run's LoRA settings (targets, rank, "
             f"--vision_lora, --freeze_vision_tower, --tune_img_projector), first {key}: "
             f"{there if there is not None else 'absent'} there, {here if here is not None else 'absent'} here")
    set_peft_model_state_dict(model, load_peft_weights(adapter_dir, device="cpu"))
    logger.info("LoRA adapters start from %s", adapter_dir)


def model_plan(args, task) -> ModelPlan:
    """2U1's flags as a plan for the shared model set-up (phi3v.training.model_for_training): the quantisation,
    the LoRA targets and options, then exactly the parts to train left trainable (see set_trainable)."""
    # As 2U1: a quantized base keeps the CLIP tower and the projector unquantized (they may train fully).
    skip = ("lm_head", "model.vision_embed_tokens.img_projection", "model.vision_embed_tokens.img_processor")
    load = dict(bits=task.bits, quant_type=task.quant_type, double_quant=task.double_quant, skip_modules=skip,
                cache_dir=task.cache_dir)
    lora = None
    if task.lora_enable:
        lora = dict(rank=args.lora_rank, alpha=task.lora_alpha, dropout=args.lora_dropout, use_dora=args.use_dora,
                    bias=task.lora_bias, modules_to_save=fully_trained_with_lora(task) or None)

    def targets(model):
        names = lora_targets(model, task)
        if not names:
            fail(empty_lora_message(task))
        return names

    def finish(model):
        if task.lora_weight_path:
            load_lora_weights(model, task.lora_weight_path)
        if task.vision_lora and not task.tune_img_projector:
            logger.warning("--tune_img_projector False has no effect with --vision_lora (as in 2U1, the projector "
                           "gets LoRA adapters): add 'img_projection' to --lora_namespan_exclude to leave it out")
        set_trainable(model, task)

    return ModelPlan(load=load, lora=lora, lora_targets=targets, finish=finish)


def build_model(args, task, training_args):
    """The model with exactly the parts to train left trainable: the shared set-up with this recipe's plan."""
    return model_for_training(args, training_args, model_plan(args, task))


def score(predictions):
    """Exact match and ANLS against every gold answer of a prediction, both on phi3v.metrics.normalise_answer."""
    texts, golds = [p["prediction"] for p in predictions], [p.get("answers") or [p["answer"]] for p in predictions]
    return "exact_match", mean_exact_match(texts, golds), {"anls": mean_anls(texts, golds)}


# ------------------------------------------------------------------------------------------------ the recipe
def run(argv=None):
    args, task, training_args = parse(argv)
    setup_logging(training_args)
    if task.lazy_preprocess:
        logger.info("--lazy_preprocess changes nothing here: samples are always read when the DataLoader asks")
    resume = prepare_resume(training_args, args.overwrite_output_dir)  # 'auto': newest complete checkpoint

    # Data: every record and media file is checked before the model loads
    train_rows = take(load_records(task.data_path, task.image_folder, args.skip_bad_samples), 0, args.max_train_samples)
    train_rows = check_media(train_rows, args.skip_bad_samples)
    eval_rows = None
    if task.eval_data_path:
        eval_rows = take(load_records(task.eval_data_path, task.image_folder, args.skip_bad_samples),
                         0, args.max_eval_samples)
        eval_rows = check_media(eval_rows, args.skip_bad_samples)
    processor = Phi3VProcessor.from_pretrained(args.model_name_or_path, num_crops=args.num_crops,
                                               **({"cache_dir": task.cache_dir} if task.cache_dir else {}))
    dataset_options = dict(processor=processor, num_crops=args.num_crops, max_length=args.max_seq_length,
                           max_num_frames=task.max_num_frames, skip_bad_samples=args.skip_bad_samples)
    train_dataset = SFTDataset(train_rows, **dataset_options)

    # Model and optimizer: one learning rate per part
    model = build_model(args, task, training_args)
    optimizer = build_optimizer(model, training_args, vision_lr=task.vision_lr, projector_lr=task.projector_lr)
    for group in optimizer.param_groups:
        logger.info("optimizer group %-20s lr %.3g, weight decay %g, %s parameters", group["name"], group["lr"],
                    group["weight_decay"], f"{sum(p.numel() for p in group['params']):,}")

    eval_dataset = SFTDataset(eval_rows, **dataset_options) if eval_rows is not None else None
    eval_before = None
    if eval_dataset is not None and not args.skip_eval_before and not resume:
        eval_before = evaluate(model, processor, eval_dataset, score, args, training_args, "eval_before")

    # Train
    trainer = make_trainer(model, training_args, train_dataset, processor, optimizers=(optimizer, None),
                           skip_nonfinite=args.skip_nonfinite_steps, packing=args.packing,
                           exempt_norms_from_decay=True)  # the Trainer's rule = build_optimizer's
    add_learning_rate_logging(trainer)
    if not run_training(trainer, resume):  # stopped by SIGTERM after saving a checkpoint
        return
    save_outputs(trainer, processor, args)

    eval_after = None
    if eval_dataset is not None:
        eval_after = evaluate(trainer.model, processor, eval_dataset, score, args, training_args, "eval_after")
    write_run_summary(trainer, args, task, eval_before, eval_after, classify=False)


def main(argv=None):
    exit_on_input_error(run)(argv)  # a bad flag or input file: one line, no traceback


if __name__ == "__main__":
    main()

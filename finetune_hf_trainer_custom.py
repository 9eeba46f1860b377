"""Fine-tune Phi-3.5-vision on your own data: LLaVA-style JSON (or the project's jsonl), images, several images or a
video per conversation; optionally evaluating before and after on a second file.

Data: --data_path, a LLaVA-style JSON list (or one record per line) or the project's jsonl (phi3v.data), media
paths relative to --image_folder. A LLaVA record:

    {"id": "1", "image": "cats/1.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."},
                       {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Grey."}]}

"image" may be a list (one <image> tag per image, in order) or be replaced by "video" (frames are sampled evenly,
--max_num_frames of them). Training learns every assistant turn.
Metric (--eval_data_path): the last assistant turn is generated; exact match (after strip / lower-case) and ANLS.

    torchrun --nproc_per_node=8 finetune_hf_trainer_custom.py --data_path train.json --image_folder images --bf16
    torchrun --nproc_per_node=1 finetune_hf_trainer_custom.py --data_path train.json --image_folder images \\
        --bf16 --lora_enable --vision_lora --num_crops 4

LoRA (--lora_enable) wraps the language model's linear layers (qkv_proj, o_proj, gate_up_proj, down_proj), the
projector's two linear layers unless --tune_img_projector false, and with --vision_lora the CLIP layers; lm_head and
embed_tokens too when --lora_namespan_exclude does not name them (it does by default). Without LoRA every part is
fully trained unless frozen (--freeze_vision_tower, --tune_img_projector false, --freeze_llm). Each part has its own
learning rate (--vision_lr, --projector_lr, --learning_rate), logged as learning_rate_<part>.
The launchers in scripts/ run the common set-ups.
"""

import argparse
import ast
import logging
import re
import sys
from dataclasses import dataclass, field

from phi3v import Phi3VProcessor
from phi3v.arguments import RecipeArguments, model_dtype, parse_args
from phi3v.checkpoints import prepare_resume
from phi3v.data import BadSampleError, load_records
from phi3v.dataset import SFTDataset
from phi3v.evaluation import evaluate
from phi3v.metrics import mean_anls
from phi3v.model_setup import (
    apply_lora,
    freeze_vision_tower,
    load_model,
    lora_target_modules,
    prepare_for_kbit_training,
)
from phi3v.optim import add_learning_rate_logging, build_optimizer, parameter_group
from phi3v.sources import take
from phi3v.training import (
    make_trainer,
    place_and_report,
    run_training,
    save_outputs,
    setup_logging,
    start_deepspeed_comm_for_zero3,
    write_run_summary,
)

logger = logging.getLogger(__name__)

EMBED_TOKENS, LM_HEAD = "model.embed_tokens", "lm_head"  # module names in the official layout
# Defaults of this script where they differ from the other recipes' (the community recipe's values).
SCRIPT_DEFAULTS = dict(lora_rank=128, lora_dropout=0.05, num_crops=16)


# ------------------------------------------------------------------------------------------------ the task
@dataclass
class CustomArguments:
    data_path: str = field(metadata={"help": "training data: LLaVA-style JSON / jsonl, or the project's jsonl"})
    image_folder: str | None = field(default=None, metadata={"help": "root of the relative image / video paths"})
    eval_data_path: str | None = field(
        default=None, metadata={"help": "evaluate before and after training on this file (same formats)"}
    )
    model_id: str | None = field(default=None, metadata={"help": "alias of --model_name_or_path"})
    freeze_vision_tower: bool = field(default=False, metadata={"help": "do not train the CLIP tower"})
    tune_img_projector: bool = field(
        default=True, metadata={"help": "train the image projector (--tune_img_projector false freezes it)"}
    )
    freeze_llm: bool = field(
        default=False, metadata={"help": "do not train the language model (with its embeddings and lm_head)"}
    )
    vision_lr: float | None = field(default=None, metadata={"help": "CLIP tower lr (default: --learning_rate)"})
    projector_lr: float | None = field(default=None, metadata={"help": "projector lr (default: --learning_rate)"})
    lora_enable: bool = field(
        default=False,
        metadata={"help": "LoRA: wraps the language model's linear layers, + the projector unless "
                          "--tune_img_projector false, + the CLIP layers with --vision_lora; the rest is frozen"},
    )
    vision_lora: bool = field(default=False, metadata={"help": "LoRA on the CLIP layers too"})
    lora_alpha: float = field(default=256, metadata={"help": "LoRA alpha (here instead of --lora_alpha_ratio)"})
    num_lora_modules: int = field(
        default=-1, metadata={"help": "-1: LoRA on every layer; N: only the last N decoder (and CLIP) layers"}
    )
    lora_namespan_exclude: str = field(
        default="['lm_head', 'embed_tokens']",
        metadata={"help": "Python list of module names or dotted name parts LoRA skips, e.g. "
                          "\"['o_proj','layers.0']\"; the default leaves out lm_head and embed_tokens "
                          "(adapting embed_tokens requires lm_head)"},
    )
    bits: int = field(default=16, metadata={"help": "16, or 8 / 4: quantized base model (with --lora_enable)"})
    disable_flash_attn2: bool = field(default=False, metadata={"help": "SDPA attention (the default anyway)"})
    max_num_frames: int = field(default=10, metadata={"help": "frames sampled from each video"})


def fail(message):
    sys.exit(f"error: {message}")


def parse(argv=None):
    """(recipe args, task args, training args) with the aliases resolved and the option combinations checked."""
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = dict(SCRIPT_DEFAULTS)
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--bits", type=int, default=16)
    if peek.parse_known_args(argv)[0].bits < 16:
        defaults["deepspeed"] = None  # quantized weights are not ZeRO-partitioned: DDP (an explicit flag still wins)
    args, task, training_args = parse_args(CustomArguments, argv, recipe_class=RecipeArguments, **defaults)

    if task.model_id is not None:
        given = any(a == "--model_name_or_path" or a.startswith("--model_name_or_path=") for a in argv)
        if given and args.model_name_or_path != task.model_id:
            fail(f"--model_id {task.model_id} and --model_name_or_path {args.model_name_or_path} differ; give one")
        args.model_name_or_path = task.model_id
    # The other recipes' spellings of the same options.
    if args.use_qlora and task.bits == 16:
        task.bits = 4
    args.use_lora = args.use_lora or task.lora_enable
    args.use_qlora = task.bits < 16  # save_outputs: a quantized base is not merged in place
    task.freeze_vision_tower = task.freeze_vision_tower or args.freeze_vision_model
    args.use_flash_attention = args.use_flash_attention and not task.disable_flash_attn2

    if task.bits not in (16, 8, 4):
        fail(f"--bits must be 16, 8 or 4, got {task.bits}")
    if task.bits < 16 and not args.use_lora:
        fail(f"--bits {task.bits} trains a quantized model, which needs --lora_enable")
    if task.vision_lora and not args.use_lora:
        fail("--vision_lora needs --lora_enable")
    if task.vision_lora and task.freeze_vision_tower:
        fail("--vision_lora adapts the vision tower, which --freeze_vision_tower freezes; choose one")
    if not args.use_lora and task.freeze_llm and task.freeze_vision_tower and not task.tune_img_projector:
        fail("--freeze_llm, --freeze_vision_tower and --tune_img_projector false leave nothing to train")
    task.lora_namespan_exclude = parse_name_list(task.lora_namespan_exclude)
    if args.use_lora and not task.freeze_llm:
        adapted = [name for name in (EMBED_TOKENS, LM_HEAD) if not excluded(name, task.lora_namespan_exclude)]
        if adapted == [EMBED_TOKENS]:
            fail("tuning embed_tokens with LoRA requires lm_head too")
    return args, task, training_args


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


def excluded(name, fragments) -> bool:
    """Whether a fragment is one or more whole dot-separated parts of `name`: "o_proj" and "layers.3" match
    "model.layers.3.self_attn.o_proj", and "embed_tokens" matches "model.embed_tokens" but not
    "model.vision_embed_tokens.img_projection.0" (a plain substring test would drop the whole vision side)."""
    return any(re.search(rf"(?:^|\.){re.escape(fragment)}(?:$|\.)", name) for fragment in fragments)


def lora_targets(model, task) -> list[str]:
    """Full names of the modules LoRA wraps (see the module docstring)."""
    names = lora_target_modules(model, vision=task.vision_lora, projector=task.tune_img_projector,
                                num_layers=task.num_lora_modules, lm_head=True)
    names = [name for name in names + [EMBED_TOKENS] if not excluded(name, task.lora_namespan_exclude)]
    if task.freeze_llm:
        names = [name for name in names if parameter_group(name + ".weight") != "language"]
    return names


def build_model(args, task, training_args):
    """The model with exactly the parts to train left trainable (LoRA: its adapters, the rest frozen)."""
    start_deepspeed_comm_for_zero3(training_args)
    model = load_model(args.model_name_or_path, dtype=model_dtype(training_args),
                       use_flash_attention=args.use_flash_attention, bits=task.bits)
    if task.bits < 16:
        model = prepare_for_kbit_training(model)
    if args.use_lora:
        model = apply_lora(model, rank=args.lora_rank, alpha=task.lora_alpha, dropout=args.lora_dropout,
                           target_modules=lora_targets(model, task), seed=training_args.seed)
    else:
        if task.freeze_vision_tower:
            freeze_vision_tower(model)
        frozen = {"projector"} if not task.tune_img_projector else set()
        frozen |= {"language"} if task.freeze_llm else set()
        for name, parameter in model.named_parameters():
            if parameter_group(name) in frozen:
                parameter.requires_grad_(False)
    return place_and_report(model, training_args, quantized=task.bits < 16)


def score(predictions):
    """Exact match after strip / lower-case, and ANLS, against every gold answer of a prediction."""
    golds = [p.get("answers") or [p["answer"]] for p in predictions]
    exact = [any(p["prediction"].strip().lower() == g.strip().lower() for g in gold)
             for p, gold in zip(predictions, golds)]
    return "exact_match", sum(exact) / len(exact), {"anls": mean_anls([p["prediction"] for p in predictions], golds)}


def one_line(error) -> str:
    """The message of a data error; one raised in a DataLoader worker arrives wrapped in the worker's traceback."""
    text = str(error).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


# ------------------------------------------------------------------------------------------------ the recipe
def run(argv=None):
    args, task, training_args = parse(argv)
    setup_logging(training_args)
    resume = prepare_resume(training_args, args.overwrite_output_dir)  # 'auto': newest complete checkpoint

    # Data
    train_rows = take(load_records(task.data_path, task.image_folder, args.skip_bad_samples), 0, args.max_train_samples)
    eval_rows = None
    if task.eval_data_path:
        eval_rows = take(load_records(task.eval_data_path, task.image_folder, args.skip_bad_samples),
                         0, args.max_eval_samples)
    processor = Phi3VProcessor.from_pretrained(args.model_name_or_path, num_crops=args.num_crops)
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
                           skip_nonfinite=args.skip_nonfinite_steps, packing=args.packing)
    add_learning_rate_logging(trainer)
    if not run_training(trainer, resume):  # stopped by SIGTERM after saving a checkpoint
        return
    save_outputs(trainer, processor, args)

    eval_after = None
    if eval_dataset is not None:
        eval_after = evaluate(trainer.model, processor, eval_dataset, score, args, training_args, "eval_after")
    write_run_summary(trainer, args, task, eval_before, eval_after, classify=False)


def main(argv=None):
    try:
        run(argv)
    except BadSampleError as error:  # a data problem: the file and record are in the message; no traceback
        fail(one_line(error))


if __name__ == "__main__":
    main()

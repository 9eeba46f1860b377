"""Command-line arguments shared by the recipes: the original recipe's flags plus every TrainingArguments flag.

`--batch_size` is the global batch: per-GPU batch (`--batch_size_per_gpu`) x GPUs x gradient accumulation, so
the same command line trains the same way on 1 or 8 GPUs. The optimizer and schedule are the original recipe's:
AdamW betas (0.9, 0.95), eps 1e-7, weight decay `--wd`, 50 warm-up steps, linear decay.
"""

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments

logger = logging.getLogger(__name__)

DS_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")
DEFAULT_DEEPSPEED = os.path.join(DS_CONFIGS, "zero2.json")


@dataclass
class RecipeArguments:
    model_name_or_path: str = field(
        default="microsoft/Phi-3.5-vision-instruct", metadata={"help": "hub id or local model folder"}
    )
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "local copy of the data: a datasets save_to_disk folder, or a jsonl file (project format)"},
    )
    use_flash_attention: bool = field(default=False, metadata={"help": "flash-attn 2 if installed, else SDPA"})
    use_lora: bool = field(default=False, metadata={"help": "LoRA on the language model (and vision unless frozen)"})
    use_qlora: bool = field(default=False, metadata={"help": "4-bit nf4 base model + LoRA"})
    freeze_vision_model: bool = field(default=False, metadata={"help": "freeze the CLIP tower (not the projector)"})
    batch_size: int = field(default=16, metadata={"help": "global batch size (all GPUs, all accumulation steps)"})
    batch_size_per_gpu: int = field(default=1, metadata={"help": "micro-batch size per GPU"})
    num_crops: int = field(
        default=16, metadata={"help": "max 336px crops per image; 4 is recommended for multi-image and video"}
    )
    wd: float = field(default=0.01, metadata={"help": "weight decay"})
    no_tqdm: bool = field(default=False, metadata={"help": "no progress bars"})
    lora_rank: int = field(default=64)
    lora_alpha_ratio: float = field(default=2.0, metadata={"help": "LoRA alpha = rank x this"})
    lora_dropout: float = field(default=0.0)
    merge_lora: bool = field(default=False, metadata={"help": "also save a merged full model (LoRA runs)"})
    max_seq_length: int | None = field(default=None, metadata={"help": "refuse (or skip) longer samples"})
    skip_bad_samples: bool = field(default=False, metadata={"help": "skip bad samples instead of stopping"})
    packing: bool = field(
        default=False,
        metadata={"help": "padding-free micro-batches: samples concatenated in one row, attention kept within each "
                          "sample (same loss); fastest with --use_flash_attention, see the README"},
    )
    eval_batch_size: int = field(default=8, metadata={"help": "generation batch size per GPU for evaluation"})
    max_new_tokens: int = field(default=64, metadata={"help": "answer length limit for evaluation"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training samples"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate only the first N samples"})
    skip_eval_before: bool = field(default=False, metadata={"help": "do not evaluate the model before training"})
    skip_nonfinite_steps: bool = field(
        default=False,
        metadata={"help": "skip optimizer steps with NaN/inf gradients (counted as nonfinite_steps) instead of stopping"},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "allow a new run into a non-empty --output_dir (else: refuse or resume)"}
    )


# Defaults of the original recipe where they differ from TrainingArguments'.
TRAINING_DEFAULTS = dict(
    output_dir="./output",
    learning_rate=4e-5,
    num_train_epochs=1,
    adam_beta1=0.9,
    adam_beta2=0.95,
    adam_epsilon=1e-7,
    warmup_steps=50,
    lr_scheduler_type="linear",
    logging_steps=10,
    save_strategy="steps",
    save_steps=500,
    save_total_limit=2,
    report_to="tensorboard",
    remove_unused_columns=False,  # the collator needs every field of our examples
    ddp_find_unused_parameters=False,
)


def default_dataloader_workers() -> int:
    """4 DataLoader workers per process, fewer where the node has fewer cores per process.

    A DocVQA page (num_crops 16) costs a worker ~0.1-0.15 s of a core and an H100 consumes ~5-6.5 pages/s: 4
    workers deliver ~27-38/s, 3x that and more (benchmarks/bench_data.py); 2 would deliver only 2-3x.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def parse_args(task_class=None, argv=None, **script_defaults):
    """(recipe_args, task_args or None, training_args) from the command line.

    script_defaults override RecipeArguments / TrainingArguments defaults for one recipe (e.g. num_crops=4).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    classes = [RecipeArguments] + ([task_class] if task_class else []) + [TrainingArguments]
    parser = HfArgumentParser(classes)
    gpu = torch.cuda.is_available()
    parser.set_defaults(
        **TRAINING_DEFAULTS,
        deepspeed=DEFAULT_DEEPSPEED if gpu else None,
        optim="adamw_torch_fused" if gpu else "adamw_torch",
        dataloader_num_workers=default_dataloader_workers(),
        **_checkpointing_defaults(),
        use_cpu=not gpu,
    )
    parser.set_defaults(**script_defaults)

    # First pass without building TrainingArguments: its __post_init__ reads the batch size into the DeepSpeed
    # config, so the derived values must be defaults before the real parse.
    if "--deepspeed" in argv:
        position = argv.index("--deepspeed")
        if position + 1 < len(argv) and argv[position + 1].lower() in ("none", ""):
            del argv[position : position + 2]
            parser.set_defaults(deepspeed=None)
    known, _ = parser.parse_known_args(argv)
    if known.use_qlora and (known.deepspeed and "--deepspeed" not in argv):
        logger.warning("QLoRA runs without DeepSpeed (4-bit weights are not ZeRO-partitioned); using DDP")
        parser.set_defaults(deepspeed=None)
    derived = dict(weight_decay=known.wd, disable_tqdm=known.no_tqdm)
    if gpu and not known.bf16 and "--fp16" not in argv:
        derived["fp16"] = True  # the original recipe: fp16 mixed precision unless --bf16
    if "--gradient_accumulation_steps" not in argv:
        per_gpu = known.per_device_train_batch_size if "--per_device_train_batch_size" in argv else known.batch_size_per_gpu
        derived.update(split_global_batch(known.batch_size, per_gpu, int(os.environ.get("WORLD_SIZE", 1))))
    parser.set_defaults(**derived)

    parsed = parser.parse_args_into_dataclasses(args=argv)
    recipe_args, training_args = parsed[0], parsed[-1]
    task_args = parsed[1] if task_class else None
    if recipe_args.use_qlora:
        recipe_args.use_lora = True
    return recipe_args, task_args, training_args


def split_global_batch(batch_size: int, per_gpu: int, world_size: int) -> dict:
    """Per-GPU batch and gradient accumulation for a global batch (rounded down, with a warning)."""
    accumulation = max(1, batch_size // (per_gpu * world_size))
    if per_gpu * world_size * accumulation != batch_size:
        logger.warning(
            "--batch_size %d is not a multiple of %d per GPU x %d GPUs: training with a global batch of %d",
            batch_size, per_gpu, world_size, per_gpu * world_size * accumulation,
        )
    return {"per_device_train_batch_size": per_gpu, "gradient_accumulation_steps": accumulation}


def _checkpointing_defaults() -> dict:
    """Non-reentrant activation checkpointing, under the name this transformers version uses (renamed in 5.2x)."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: True, f"{prefix}_kwargs": {"use_reentrant": False}}


def model_dtype(training_args) -> torch.dtype:
    """bf16 weights with --bf16 (as the original recipe); fp32 master weights for --fp16 (autocast) or fp32."""
    return torch.bfloat16 if training_args.bf16 else torch.float32

"""Command-line arguments shared by the recipes: the original recipe's flags plus every TrainingArguments flag.

`--batch_size` is the global batch: per-GPU batch (`--batch_size_per_gpu`) x GPUs x gradient accumulation, so
the same command line trains the same way on 1 or 8 GPUs. The optimizer and schedule are the original recipe's:
AdamW betas (0.9, 0.95), eps 1e-7, weight decay `--wd`, 50 warm-up steps, linear decay.
"""

import argparse
import dataclasses
import difflib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments

from phi3v.errors import InputError

logger = logging.getLogger(__name__)

DS_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_configs")  # shipped with the package
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
    lora_alpha_ratio: float = field(
        default=2.0, metadata={"help": "LoRA alpha = rank x this, rounded to a whole number (as the original recipe)"}
    )
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
        metadata={
            "help": "skip optimizer steps with NaN/inf gradients (counted as nonfinite_steps) instead of stopping"
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "allow a new run into a non-empty --output_dir (else: refuse or resume)"}
    )
    # Flags that older transformers or PEFT users pass (the community recipe's scripts among them).
    use_dora: bool = field(default=False, metadata={"help": "DoRA (weight-decomposed LoRA) instead of plain LoRA"})
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "warm-up as a fraction of the training steps, in [0, 1) (transformers 5 dropped this flag: "
                          "it becomes --warmup_steps RATIO, which transformers 5 reads as a fraction)"},
    )
    logging_dir: str | None = field(
        default=None,
        metadata={"help": "TensorBoard log folder (transformers 5 dropped this flag; default <output_dir>/runs/...)"},
    )


@dataclass
class TaskRecipeArguments(RecipeArguments):
    """The four task recipes' flags. Their strategies are the original recipe's (its published results were trained
    so); three flags opt into what transformers 5 / current practice does instead (README, "Strategies")."""

    use_lora: bool = field(
        default=False,
        metadata={"help": "LoRA on the language model's linear layers and lm_head, and on CLIP and the projector "
                          "unless --freeze_vision_model (the original recipe's targets)"},
    )
    freeze_vision_model: bool = field(
        default=False,
        metadata={"help": "freeze the image embedding (CLIP, projector, separators) and the token embeddings, as the "
                          "original recipe; --freeze_clip_only freezes CLIP alone"},
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

    def __post_init__(self):
        if self.lora_exclude_lm_head and not (self.use_lora or self.use_qlora):
            raise ValueError("--lora_exclude_lm_head applies to LoRA runs only: add --use_lora (or --use_qlora), "
                             "or drop it")


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
    """4 DataLoader workers per process, fewer where the node has fewer cores per process: enough to keep one GPU
    fed with DocVQA-sized pages (measured by benchmarks/bench_data.py; the figures are in benchmarks/README.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def parse_args(task_class=None, argv=None, recipe_class=TaskRecipeArguments, **script_defaults):
    """(recipe_args, task_args or None, training_args) from the command line.

    recipe_class: TaskRecipeArguments (the four task recipes) or RecipeArguments (the custom recipe, whose own
    flags choose what trains). script_defaults override RecipeArguments / TrainingArguments defaults for one recipe
    (e.g. num_crops=4).
    The command line is parsed once (flags must be spelled in full: no abbreviations; `--flag value` and
    `--flag=value` alike); the derived values (global batch -> per-GPU batch and accumulation, fp16 on GPU,
    `--deepspeed none`, `--warmup_ratio`, ...) then fill in what was not given, and the dataclasses are built last
    (TrainingArguments reads the batch size into the DeepSpeed config when it is built). A bad flag raises an
    InputError naming it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    classes = [recipe_class] + ([task_class] if task_class else []) + [TrainingArguments]
    parser = HfArgumentParser(classes, allow_abbrev=False)
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
    namespace, given = parse_once(parser, argv)
    derive(namespace, given, gpu)

    parsed = []
    for dtype in classes:
        names = {f.name for f in dataclasses.fields(dtype) if f.init}
        values = {name: value for name, value in vars(namespace).items() if name in names}
        try:
            parsed.append(dtype(**values))
        except ValueError as error:  # TrainingArguments' own checks of flag combinations
            raise InputError(f"invalid arguments: {' '.join(str(error).split())}") from None
    recipe_args, training_args = parsed[0], parsed[-1]
    task_args = parsed[1] if task_class else None
    if getattr(recipe_args, "use_qlora", False):
        recipe_args.use_lora = True
    return recipe_args, task_args, training_args


def parse_once(parser, argv) -> tuple[argparse.Namespace, set[str]]:
    """(namespace with every option, names of the options the command line gave), from one parse of argv.

    Which options were given is argparse's own knowledge: the parse runs with a marker as every default, so
    `--x=1`, `--x 1` and `--no_x` all count, whatever the spelling."""
    unset = object()
    defaults = {action.dest: parser.get_default(action.dest) for action in parser._actions if action.dest != "help"}
    saved = [(action, action.default) for action in parser._actions]
    saved_parser_defaults = dict(parser._defaults)
    parser.set_defaults(**{dest: unset for dest in defaults})
    try:
        namespace, unknown = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults.clear()
        parser._defaults.update(saved_parser_defaults)
    if unknown:
        raise InputError(unknown_flag_message(parser, unknown))
    given = {dest for dest, value in vars(namespace).items() if value is not unset}
    actions = {action.dest: action for action in parser._actions}
    for dest, default in defaults.items():
        if dest not in given:
            action = actions[dest]
            if isinstance(default, str) and action.type is not None:  # as argparse converts a string default
                default = parser._get_value(action, default)
            setattr(namespace, dest, default)
    return namespace, given


# Flags of other recipes (or older libraries) that mean something else here: what to use instead.
FLAG_HINTS = {
    "--lr": "did you mean --learning_rate?",
    "--lora_alpha": "this recipe sets LoRA alpha as --lora_alpha_ratio x --lora_rank (alpha 16 at rank 64 is "
                    "--lora_alpha_ratio 0.25)",
}


def unknown_flag_message(parser, unknown: list[str]) -> str:
    """'unknown flag --lr: did you mean --learning_rate?' for the first unknown option (or stray value)."""
    flags = sorted({option for action in parser._actions for option in action.option_strings
                    if option.startswith("--") and "-" not in option[2:]})  # the --snake_case spellings
    options = [token for token in unknown if token.startswith("-")]
    if not options:
        return f"unexpected value {unknown[0]!r} on the command line (values follow their flag: --flag value)"
    name = options[0].split("=", 1)[0]
    if name in FLAG_HINTS:
        return f"unknown flag {name}: {FLAG_HINTS[name]}"
    name = "--" + name.lstrip("-").replace("-", "_")
    if name in flags:  # a spelling argparse does not know, of a known flag (-learning_rate)
        return f"unknown flag {options[0].split('=', 1)[0]}: did you mean {name}?"
    starting = [flag for flag in flags if flag.startswith(name)]  # what an abbreviation used to expand to
    close = starting if len(starting) == 1 else difflib.get_close_matches(name, flags, n=1, cutoff=0.6) or starting[:1]
    hint = f": did you mean {close[0]}?" if close else " (--help lists every flag)"
    return f"unknown flag {name}{hint}"


def packaged_deepspeed_config(path: str) -> str:
    """`zero3.json` or `ds_configs/zero3.json` (the README's spelling, from any folder) -> this package's file of that
    name; any other path is returned as it is."""
    folder, name = os.path.split(os.path.normpath(path))
    packaged = os.path.join(DS_CONFIGS, name)
    if folder in ("", "ds_configs", os.path.join("phi3v", "ds_configs")) and os.path.isfile(packaged):
        return packaged
    return path


def derive(ns, given: set[str], gpu: bool) -> None:
    """Fill in the values that follow from others, for the options the command line did not give."""
    if isinstance(ns.deepspeed, str) and ns.deepspeed.strip().lower() in ("none", ""):
        ns.deepspeed = None
    if isinstance(ns.deepspeed, str) and not ns.deepspeed.lstrip().startswith("{") and not os.path.isfile(ns.deepspeed):
        ns.deepspeed = packaged_deepspeed_config(ns.deepspeed)
        if not os.path.isfile(ns.deepspeed):
            configs = ", ".join(sorted(name for name in os.listdir(DS_CONFIGS) if name.endswith(".json")))
            raise InputError(f"--deepspeed {ns.deepspeed}: no such file; this project's configs are in {DS_CONFIGS} "
                             f"({configs}), or --deepspeed none")
    if getattr(ns, "use_qlora", False) and ns.deepspeed and "deepspeed" not in given:
        logger.warning("QLoRA runs without DeepSpeed (4-bit weights are not ZeRO-partitioned); using DDP")
        ns.deepspeed = None

    _one_of(ns, given, "wd", "weight_decay")
    if "weight_decay" not in given:
        ns.weight_decay = ns.wd
    if "disable_tqdm" not in given:
        ns.disable_tqdm = ns.no_tqdm
    if gpu and not ns.bf16 and "fp16" not in given:
        ns.fp16 = True  # the original recipe: fp16 mixed precision unless --bf16

    _one_of(ns, given, "batch_size_per_gpu", "per_device_train_batch_size")
    per_gpu = ns.per_device_train_batch_size if "per_device_train_batch_size" in given else ns.batch_size_per_gpu
    if "gradient_accumulation_steps" in given:
        if "batch_size" in given:
            raise InputError("--batch_size (the global batch) and --gradient_accumulation_steps both set the "
                             "accumulation; give one")
        ns.per_device_train_batch_size = per_gpu
    else:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        for name, value in split_global_batch(ns.batch_size, per_gpu, world_size).items():
            setattr(ns, name, value)

    # transformers 5 renamed gradient_checkpointing to activation_checkpointing; the old name still works here.
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if hasattr(ns, new) and old in given:
            if new in given and getattr(ns, new) != getattr(ns, old):
                raise InputError(f"--{old} (the old name of --{new}) and --{new} differ; give one")
            setattr(ns, new, getattr(ns, old))
            setattr(ns, old, None)

    if ns.warmup_ratio is not None:  # transformers 4's --warmup_ratio: warmup_steps < 1 is a fraction in 5.x
        if "warmup_steps" in given:
            raise InputError("--warmup_ratio and --warmup_steps both set the warm-up; give one")
        if not 0 <= ns.warmup_ratio < 1:
            raise InputError(f"--warmup_ratio must be in [0, 1), got {ns.warmup_ratio}")
        ns.warmup_steps = ns.warmup_ratio
    if ns.logging_dir:  # transformers 5's TensorBoard callback reads its folder from the environment
        os.environ["TENSORBOARD_LOGGING_DIR"] = ns.logging_dir
    if ns.tf32 and not _tf32_available():
        logger.warning("--tf32: TF32 needs an NVIDIA GPU of the Ampere generation or newer, none here; TF32 stays off")
        ns.tf32 = None
    _check_reporters(ns.report_to)


def _one_of(ns, given, a: str, b: str) -> None:
    """Two spellings of one setting (this recipe's and TrainingArguments'): refuse different values."""
    if a in given and b in given and getattr(ns, a) != getattr(ns, b):
        raise InputError(f"--{a} {getattr(ns, a)} and --{b} {getattr(ns, b)} set the same thing; give one")


def _tf32_available() -> bool:
    from transformers.utils import is_torch_tf32_available

    return torch.cuda.is_available() and is_torch_tf32_available()


# --report_to names -> the package each needs (transformers fails only when the Trainer starts, with a traceback)
REPORTER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "comet_ml": "comet_ml",
                     "neptune": "neptune", "clearml": "clearml", "trackio": "trackio", "swanlab": "swanlab",
                     "dvclive": "dvclive", "codecarbon": "codecarbon", "azure_ml": "azureml"}


def _check_reporters(report_to) -> None:
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        package = REPORTER_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise InputError(f"--report_to {name}: {package} is not installed here (pip install {package}), or use "
                             "--report_to tensorboard / none")


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

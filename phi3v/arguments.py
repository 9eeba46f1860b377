"""Reading a recipe's command line: the flags every recipe takes (RecipeArguments), every TrainingArguments flag,
and a recipe family's own (phi3v.task_flags: the original recipe's; phi3v.community_flags: the community recipe's).

One parse tells the values and which flags were given; `derive` then fills in what follows from them:
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

from phi3v.errors import InputError, program_name

logger = logging.getLogger(__name__)

# The top-level ds_configs/ folder; phi3v/ds_configs links to it, so a built wheel ships the same files.
DS_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_configs")
DEFAULT_DEEPSPEED = os.path.join(DS_CONFIGS, "zero2.json")


@dataclass
class RecipeArguments:
    """The flags every recipe takes, whichever flag family it belongs to (phi3v.task_flags: the original recipe's,
    phi3v.community_flags: the community recipe's). `given` is filled in by parse_args: the names of the flags the
    command line gave (a flag given with its default value counts), for the families' rules that depend on it."""

    model_name_or_path: str = field(
        default="microsoft/Phi-3.5-vision-instruct", metadata={"help": "hub id or local model folder"}
    )
    use_flash_attention: bool = field(default=False, metadata={"help": "flash-attn 2 if installed, else SDPA"})
    batch_size: int = field(default=16, metadata={"help": "global batch size (all GPUs, all accumulation steps)"})
    batch_size_per_gpu: int = field(default=1, metadata={"help": "micro-batch size per GPU"})
    num_crops: int = field(
        default=16, metadata={"help": "max 336px crops per image; 4 is recommended for multi-image and video"}
    )
    wd: float = field(default=0.01, metadata={"help": "weight decay"})
    no_tqdm: bool = field(default=False, metadata={"help": "no progress bars"})
    lora_rank: int = field(default=64)
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
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "stop training after this many evaluations in a row without improvement of "
                          "--metric_for_best_model (by more than --early_stopping_threshold); needs --eval_strategy"},
    )
    early_stopping_threshold: float = field(
        default=0.0,
        metadata={"help": "how much --metric_for_best_model must improve on the best so far to count as an "
                          "improvement (with --early_stopping_patience)"},
    )
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
    given: tuple = field(default=(), init=False)  # not a flag (init=False): set by parse_args


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


def parse_args(task_class=None, argv=None, recipe_class=None, program=None, more_flags=None, **script_defaults):
    """(recipe_args, task_args or None, training_args) from the command line.

    recipe_class: the recipe's flag family, phi3v.task_flags.TaskRecipeArguments (the four task recipes, the default)
    or RecipeArguments (the flags every recipe shares; the community recipes put their family,
    phi3v.community_flags.CommunityArguments, in their task_class). task_class: the recipe's own flags.
    script_defaults override RecipeArguments / TrainingArguments defaults for one recipe (e.g. num_crops=4).
    program: the recipe's file name in messages (default: this process's script).
    more_flags(task_args) -> a dataclass or None: flags that depend on the recipe's own (GRPO's --task names a task
    recipe, whose data flags join): the flags the first parse did not know are read by it, into
    `task_args.more_flags`; what it does not know either is refused as any unknown flag.

    The command line is parsed once (flags must be spelled in full: no abbreviations; `--flag value` and
    `--flag=value` alike), which also tells which flags were given (`recipe_args.given`); the derived values (global
    batch -> per-GPU batch and accumulation, fp16 on GPU, `--deepspeed none`, `--warmup_ratio`, ...) then fill in
    what was not given, the dataclasses are built (TrainingArguments reads the batch size into the DeepSpeed config
    when it is built), and each family's `resolve(recipe_args)` gives its flags their meanings. A bad flag or
    combination raises an InputError naming it.
    """
    if recipe_class is None:  # imported here: phi3v.task_flags builds on this module
        from phi3v.task_flags import TaskRecipeArguments as recipe_class
    argv = list(sys.argv[1:] if argv is None else argv)
    classes = [recipe_class] + ([task_class] if task_class else []) + [TrainingArguments]
    parser = HfArgumentParser(classes, allow_abbrev=False)
    gpu = torch.cuda.is_available()
    parser.set_defaults(
        **TRAINING_DEFAULTS,
        deepspeed=DEFAULT_DEEPSPEED if gpu else None,
        optim="adamw_torch_fused" if gpu else "adamw_torch",
        dataloader_num_workers=default_dataloader_workers(),
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=not gpu,
    )
    parser.set_defaults(**script_defaults)
    hints = {flag: hint for cls in classes for flag, hint in getattr(cls, "flag_hints", {}).items()}
    hints, program = {**FLAG_HINTS, **hints}, program or program_name()
    names = flag_names(classes)
    namespace, given, unknown = parse_once(parser, argv, names)
    if unknown and more_flags is None:
        raise InputError(unknown_flag_message(names, unknown, hints, program))
    derive(namespace, given, gpu)

    parsed = []
    for dtype in classes:
        fields = {f.name for f in dataclasses.fields(dtype) if f.init}
        values = {name: value for name, value in vars(namespace).items() if name in fields}
        try:
            parsed.append(dtype(**values))
        except ValueError as error:  # TrainingArguments' own checks of flag combinations
            raise InputError(f"invalid arguments: {' '.join(str(error).split())}") from None
    recipe_args, training_args = parsed[0], parsed[-1]
    recipe_args.given = tuple(sorted(given))
    for args in parsed[:-1]:  # a flag family's meanings that need more than its own flags
        if hasattr(args, "resolve"):
            args.resolve(recipe_args)
    task_args = parsed[1] if task_class else None
    if more_flags is not None:
        extra_class = more_flags(task_args)
        task_args.more_flags = None
        if extra_class is not None:
            extra_names = flag_names([extra_class])
            extra, _, unknown = parse_once(HfArgumentParser(extra_class, allow_abbrev=False), unknown, extra_names)
            names |= extra_names
            task_args.more_flags = extra_class(**vars(extra))
        if unknown:
            raise InputError(unknown_flag_message(names, unknown, hints, program))
    return recipe_args, task_args, training_args


def flag_names(classes) -> set[str]:
    """The destinations of every flag the parser of `classes` has: HfArgumentParser makes one per init field."""
    return {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}


def parse_once(parser, argv, names: set[str]) -> tuple[argparse.Namespace, set[str], list[str]]:
    """(namespace with every option, names of the options the command line gave, the tokens it does not know), from
    one parse of argv.

    argparse sets a default only on a namespace attribute that is not there yet; the parse starts from a namespace
    holding a marker for every option, so what still holds it afterwards was not given (`--x=1`, `--x 1` and `--no_x`
    all count, whatever the value), and only then gets its default."""
    unset = object()
    namespace, unknown = parser.parse_known_args(argv, namespace=argparse.Namespace(**dict.fromkeys(names, unset)))
    given = {name for name in names if getattr(namespace, name) is not unset}
    for name in names - given:
        setattr(namespace, name, parser.get_default(name))
    return namespace, given, unknown


# Flags of other recipes (or older libraries) that mean something else here: the message to give instead. A flag
# family adds its own (its dataclass's `flag_hints`); {flag} and {program} are filled in.
FLAG_HINTS = {"--lr": "unknown flag {flag}: did you mean --learning_rate?"}


def unknown_flag_message(names: set[str], unknown: list[str], hints: dict, program: str) -> str:
    """'unknown flag --lr: did you mean --learning_rate?' for the first unknown option (or stray value)."""
    flags = sorted(f"--{name}" for name in names)
    options = [token for token in unknown if token.startswith("-")]
    if not options:
        return f"unexpected value {unknown[0]!r} on the command line (values follow their flag: --flag value)"
    name = options[0].split("=", 1)[0]
    if name in hints:
        return hints[name].format(flag=name, program=program)
    name = "--" + name.lstrip("-").replace("-", "_")
    if name in flags:  # a spelling argparse does not know, of a known flag (-learning_rate)
        return f"unknown flag {options[0].split('=', 1)[0]}: did you mean {name}?"
    starting = [flag for flag in flags if flag.startswith(name)]  # what an abbreviation used to expand to
    close = starting if len(starting) == 1 else difflib.get_close_matches(name, flags, n=1, cutoff=0.6) or starting[:1]
    hint = f": did you mean {close[0]}?" if close else " (--help lists every flag)"
    return f"unknown flag {name}{hint}"


def packaged_deepspeed_config(path: str) -> str:
    """`zero3.json` or `ds_configs/zero3.json` (the README's spelling, from any folder) -> this project's file of that
    name; any other path is returned as it is."""
    folder, name = os.path.split(os.path.normpath(path))
    packaged = os.path.join(DS_CONFIGS, name)
    if folder in ("", "ds_configs", os.path.join("phi3v", "ds_configs")) and os.path.isfile(packaged):
        return packaged
    return path


def derive(ns, given: set[str], gpu: bool) -> None:
    """Fill in the values that follow from others, for the options the command line did not give."""
    resolve_deepspeed(ns, given)
    _one_of(ns, given, "wd", "weight_decay")
    if "weight_decay" not in given:
        ns.weight_decay = ns.wd
    if "disable_tqdm" not in given:
        ns.disable_tqdm = ns.no_tqdm
    if gpu and not ns.bf16 and "fp16" not in given:
        ns.fp16 = True  # the original recipe: fp16 mixed precision unless --bf16
    split_batch(ns, given)
    derive_evaluation(ns, given)
    translate_renamed_flags(ns, given)
    check_environment(ns)


def resolve_deepspeed(ns, given: set[str]) -> None:
    """--deepspeed: none -> off; this project's configs found by name from any folder; a quantized base model runs
    without it unless asked for (4- and 8-bit weights are not ZeRO-partitioned)."""
    if isinstance(ns.deepspeed, str) and ns.deepspeed.strip().lower() in ("none", ""):
        ns.deepspeed = None
    if isinstance(ns.deepspeed, str) and not ns.deepspeed.lstrip().startswith("{") and not os.path.isfile(ns.deepspeed):
        ns.deepspeed = packaged_deepspeed_config(ns.deepspeed)
        if not os.path.isfile(ns.deepspeed):
            configs = ", ".join(sorted(name for name in os.listdir(DS_CONFIGS) if name.endswith(".json")))
            raise InputError(f"--deepspeed {ns.deepspeed}: no such file; this project's configs are in {DS_CONFIGS} "
                             f"({configs}), or --deepspeed none")
    quantized = getattr(ns, "use_qlora", False) or getattr(ns, "bits", 16) < 16
    if quantized and ns.deepspeed and "deepspeed" not in given:
        logger.warning("a quantized base model (QLoRA, --bits) runs without DeepSpeed (4- and 8-bit weights are not "
                       "ZeRO-partitioned); using DDP")
        ns.deepspeed = None


def split_batch(ns, given: set[str]) -> None:
    """--batch_size (global) -> per-GPU batch x accumulation, unless --gradient_accumulation_steps sets it.

    GRPO (a recipe with --num_generations G): the batch flags count answers, as in TRL, and a micro-batch holds
    whole groups (a group's G answers share their prompt's row), so the DataLoader's items are prompts: the
    per-GPU batch must be a multiple of G and becomes batch / G prompts."""
    _one_of(ns, given, "batch_size_per_gpu", "per_device_train_batch_size")
    per_gpu = ns.per_device_train_batch_size if "per_device_train_batch_size" in given else ns.batch_size_per_gpu
    groups = getattr(ns, "num_generations", None)
    if groups is not None:
        if groups < 1 or per_gpu % groups or ns.batch_size % groups:
            raise InputError(f"--batch_size_per_gpu {per_gpu} and --batch_size {ns.batch_size} count answers and "
                             f"must be multiples of --num_generations {groups} (a group's answers share their "
                             "prompt's row, on one GPU)")
        per_gpu //= groups
    global_batch = ns.batch_size // (groups or 1)
    if "gradient_accumulation_steps" in given:
        if "batch_size" in given:
            raise InputError("--batch_size (the global batch) and --gradient_accumulation_steps both set the "
                             "accumulation; give one")
        ns.per_device_train_batch_size = per_gpu
    else:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        for name, value in split_global_batch(global_batch, per_gpu, world_size).items():
            setattr(ns, name, value)


def derive_evaluation(ns, given: set[str]) -> None:
    """Evaluation during training (--eval_strategy steps|epoch): --eval_steps alone means steps, every --save_steps
    steps unless given; the loss pass runs in batches of --eval_batch_size; --load_best_model_at_end saves at the
    evaluations unless told otherwise; early stopping keeps its count across a resume. The flag combinations the
    Trainer cannot run are refused here in one line (the metric's name is checked against the recipe's score
    later, phi3v.training.recipe_evaluation)."""
    if "eval_steps" in given and "eval_strategy" not in given:
        ns.eval_strategy = "steps"
    strategy = str(getattr(ns.eval_strategy, "value", ns.eval_strategy))
    if strategy == "steps" and "eval_steps" not in given:
        ns.eval_steps = ns.save_steps
    if "per_device_eval_batch_size" not in given:
        ns.per_device_eval_batch_size = ns.eval_batch_size
    patience = ns.early_stopping_patience
    if patience is not None and patience < 1:
        raise InputError(f"--early_stopping_patience must be 1 or more (evaluations without improvement), got "
                         f"{patience}")
    if "early_stopping_threshold" in given and patience is None:
        raise InputError("--early_stopping_threshold applies to early stopping: add --early_stopping_patience N, or "
                         "drop it")
    wanting = [flag for flag, wanted in (("--load_best_model_at_end", ns.load_best_model_at_end),
                                         ("--early_stopping_patience", patience is not None),
                                         ("--metric_for_best_model", "metric_for_best_model" in given)) if wanted]
    if strategy == "no":
        if wanting:
            raise InputError(f"{wanting[0]} needs evaluations during training: add --eval_strategy steps "
                             "--eval_steps N (or --eval_strategy epoch)")
        return
    if patience is not None and "restore_callback_states_from_checkpoint" not in given:
        ns.restore_callback_states_from_checkpoint = True  # a resumed run keeps its count of evaluations so far
    if not ns.load_best_model_at_end:
        return
    # --load_best_model_at_end reloads the checkpoint of the best evaluation: checkpoints at evaluated steps
    if "save_strategy" not in given:
        ns.save_strategy = strategy
    save_strategy = str(getattr(ns.save_strategy, "value", ns.save_strategy))
    if save_strategy not in (strategy, "best"):
        raise InputError(f"--load_best_model_at_end reloads a checkpoint of an evaluated step, but --save_strategy "
                         f"{save_strategy} differs from --eval_strategy {strategy}: give them the same value (or "
                         "--save_strategy best)")
    if strategy == "steps" and save_strategy == "steps":
        if "save_steps" not in given:
            ns.save_steps = ns.eval_steps
        elif ns.save_steps % ns.eval_steps:
            raise InputError(f"--load_best_model_at_end reloads a checkpoint of an evaluated step, but --save_steps "
                             f"{ns.save_steps:g} is not a multiple of --eval_steps {ns.eval_steps:g}: save at "
                             "evaluations (drop --save_steps to save at each one)")


def translate_renamed_flags(ns, given: set[str]) -> None:
    """Flags of older transformers keep their meaning: --gradient_checkpointing (now activation_checkpointing),
    --warmup_ratio (now a fraction given as --warmup_steps), --logging_dir (now an environment variable)."""
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in given:
            if new in given and getattr(ns, new) != getattr(ns, old):
                raise InputError(f"--{old} (the old name of --{new}) and --{new} differ; give one")
            setattr(ns, new, getattr(ns, old))
            setattr(ns, old, None)
    if ns.warmup_ratio is not None:
        if "warmup_steps" in given:
            raise InputError("--warmup_ratio and --warmup_steps both set the warm-up; give one")
        if not 0 <= ns.warmup_ratio < 1:
            raise InputError(f"--warmup_ratio must be in [0, 1), got {ns.warmup_ratio}")
        ns.warmup_steps = ns.warmup_ratio
    if ns.logging_dir:  # transformers 5's TensorBoard callback reads its folder from the environment
        os.environ["TENSORBOARD_LOGGING_DIR"] = ns.logging_dir


def check_environment(ns) -> None:
    """What this machine cannot do, said before the run starts: TF32 without an Ampere GPU (off, with a warning),
    a --report_to whose package is missing (refused)."""
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


def model_dtype(training_args) -> torch.dtype:
    """bf16 weights with --bf16 (as the original recipe); fp32 master weights for --fp16 (autocast) or fp32."""
    return torch.bfloat16 if training_args.bf16 else torch.float32

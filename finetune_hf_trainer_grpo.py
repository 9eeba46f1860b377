"""Reinforcement fine-tuning (GRPO) of Phi-3.5-vision with verifiable rewards: for each prompt, sample a group of
answers, score them, and move the policy towards the better ones of the group. Evaluates before and after (greedy
answers, the task's metric).

Data and rewards, one of:
  --task RECIPE.py   a task recipe's data and metric: its training split (its own data flags work as there:
                     --dataset_path, --data_dir, --full_train, --max_train_samples, --max_eval_samples), and
                     accuracy_reward = the recipe's `score` of each answer alone (accuracy: 1 or 0; DocVQA: ANLS)
  --data_path FILE   LLaVA-style JSON or the project's jsonl (as the custom recipe), media under --image_folder;
                     the last assistant turn is the reference answer the rewards see; accuracy_reward: exact match

    torchrun --nproc_per_node=8 finetune_hf_trainer_grpo.py --task finetune_hf_trainer_hateful_memes.py --bf16
    torchrun --nproc_per_node=1 finetune_hf_trainer_grpo.py --data_path train.json --image_folder images \\
        --bf16 --lora_enable --num_generations 8 --reward_funcs accuracy_reward my_rewards.py

--reward_funcs: built-in accuracy_reward and format_reward (the answer must match --answer_format, a regular
expression such as '<think>.*?</think>\\s*<answer>(?P<answer>.*?)</answer>', whose answer part is what accuracy
scores), and .py files whose functions named *_reward are rewards (phi3v/rewards.py); --reward_weights combines them.
Sampling and the objective take TRL's GRPO names and meanings: --num_generations, --max_completion_length,
--temperature, --top_p, --top_k, --beta (KL to the reference; 0: no reference model), --epsilon, --epsilon_high,
--loss_type (grpo, bnpo, dr_grpo, dapo), --scale_rewards (group, batch, none), --use_bias_correction_kl. As in TRL,
--batch_size and --batch_size_per_gpu count answers (a multiple of --num_generations: a group shares its prompt's row
on one GPU).
Strategies and their flags are the community recipe's (phi3v/community_flags.py). Each group costs one prompt: the
prompt and its images run once in sampling (the KV cache copied for the G answers) and in the loss (one
shared-prefix row), docs/DESIGN.md §12, §14, §15; --shared_prefix False runs the usual layout instead (TRL's: the
prompt repeated G times in sampling, one row per answer in the loss; the same completions and loss, for comparison:
benchmarks/bench_grpo.py).
"""

import dataclasses
import functools
import logging
import os
import re
from dataclasses import dataclass, field
from types import SimpleNamespace

from phi3v import Phi3VProcessor
from phi3v.arguments import RecipeArguments, parse_args
from phi3v.callbacks import add_learning_rate_logging
from phi3v.checkpoints import prepare_resume
from phi3v.community_flags import CommunityArguments
from phi3v.dpo import frozen_reference
from phi3v.errors import InputError, exit_on_input_error
from phi3v.grpo import GRPOSettings, GRPOTrainer, PromptDataset, collate_prompts
from phi3v.grpo_loss import LOSS_TYPES, REWARD_SCALINGS
from phi3v.metrics import free_text_score
from phi3v.optim import build_optimizer
from phi3v.records import BadSampleError
from phi3v.rewards import Rewards, import_python_file
from phi3v.splits import records_split
from phi3v.training import (
    make_trainer,
    model_for_training,
    recipe_evaluation,
    run_training,
    save_outputs,
    setup_logging,
    write_run_summary,
)

logger = logging.getLogger(__name__)
HERE = os.path.dirname(os.path.abspath(__file__))
CLASS_SAMPLE = 256  # training records whose answers join the evaluation split's as a classification task's classes


# ------------------------------------------------------------------------------------------------ the task
# Defaults of this script where they differ from the other recipes' (the community recipe's values; one group of
# TRL's default 8 answers per GPU and micro-batch, 8 groups a step; TRL's GRPO learning rate).
SCRIPT_DEFAULTS = dict(lora_rank=128, lora_dropout=0.05, num_crops=16, batch_size=64, batch_size_per_gpu=8,
                       learning_rate=1e-6, warmup_steps=0)


@dataclass(kw_only=True)
class GRPOArguments(CommunityArguments):
    """The community recipe's flags (phi3v.community_flags), the data, the rewards and TRL's GRPO settings."""

    task: str | None = field(default=None, metadata={"help": "a task recipe (e.g. finetune_hf_trainer_docvqa.py): its "
                                                               "data, its own data flags and its metric as reward"})
    dataset_path: str | None = field(default=None, metadata={"help": "--task: a local copy of its data (as there)"})
    data_path: str | None = field(default=None, metadata={"help": "training data (without --task): LLaVA JSON / "
                                                                   "jsonl or the project's jsonl"})
    image_folder: str | None = field(default=None, metadata={"help": "root of --data_path's relative media paths"})
    eval_data_path: str | None = field(default=None, metadata={"help": "evaluate before and after on this file"})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy_reward"],
        metadata={"help": "rewards: accuracy_reward, format_reward (needs --answer_format) and .py files of "
                          "functions named *_reward(completions, answers, records)"})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "one weight per reward function"})
    answer_format: str | None = field(
        default=None, metadata={"help": "regular expression an answer must match (format_reward); its group "
                                        "'answer' (else its last group) is what accuracy_reward scores"})
    system_prompt: str | None = field(default=None, metadata={"help": "a system message opening every prompt (e.g. "
                                                                       "the answer format asked for)"})
    num_generations: int = field(default=8, metadata={"help": "answers sampled per prompt (a group)"})
    max_completion_length: int = field(default=256, metadata={"help": "longest sampled answer, in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (also in the loss, as TRL)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling, in (0, 1]"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0: off)"})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient to the reference (0: no reference model)"})
    epsilon: float = field(default=0.2, metadata={"help": "clipping of the probability ratio (lower bound)"})
    epsilon_high: float | None = field(default=None, metadata={"help": "upper clipping bound (default: --epsilon)"})
    loss_type: str = field(default="dapo", metadata={"help": f"one of {', '.join(LOSS_TYPES)} (TRL's)"})
    scale_rewards: str = field(default="group", metadata={"help": f"one of {', '.join(REWARD_SCALINGS)} (TRL's)"})
    use_bias_correction_kl: bool = field(
        default=True, metadata={"help": "weigh the KL term by the probability ratio: the unbiased reverse-KL gradient "
                                        "(TRL's, its default); False: beta x KL alone"})
    shared_prefix: bool = field(
        default=True, metadata={"help": "a group's prompt run once in sampling and in the loss (False: the prompt "
                                        "repeated G times in both, as TRL does; for comparison)"})

    def resolve(self, recipe_args) -> None:
        super().resolve(recipe_args)
        if (self.task is None) == (self.data_path is None):
            raise InputError("give the data as --task RECIPE.py (a task recipe's data and metric) or --data_path "
                             "FILE (records), one of them")
        if self.task is None and self.dataset_path:
            raise InputError("--dataset_path is a --task recipe's data flag; without --task use --data_path")
        if self.loss_type not in LOSS_TYPES:
            raise InputError(f"--loss_type {self.loss_type}: one of {', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in REWARD_SCALINGS:
            raise InputError(f"--scale_rewards {self.scale_rewards}: one of {', '.join(REWARD_SCALINGS)}")
        if self.num_generations < 2:
            raise InputError(f"--num_generations must be at least 2 (advantages compare a group's answers), got "
                             f"{self.num_generations}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_completion_length < 1:
            raise InputError("sampling needs --temperature > 0, --top_p in (0, 1], --top_k >= 0 and "
                             "--max_completion_length >= 1")
        if self.beta < 0 or self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise InputError("--beta, --epsilon and --epsilon_high must not be negative")
        if self.answer_format is not None:
            try:
                re.compile(self.answer_format)
            except re.error as error:
                raise InputError(f"--answer_format {self.answer_format!r}: not a regex ({error})") from None
        if self.shared_prefix and recipe_args.use_flash_attention:  # the rows need a mask flash-attn cannot take
            logger.warning("shared-prefix rows need an attention mask: SDPA attention instead of flash-attn")
            recipe_args.use_flash_attention = False

    def settings(self) -> GRPOSettings:
        names = {f.name for f in dataclasses.fields(GRPOSettings)}
        return GRPOSettings(**{name: getattr(self, name) for name in names})


@functools.cache
def task_recipe(path: str):
    """The task recipe --task names (a path, or a file name of this project's recipes), imported as a module."""
    found = path if os.path.isfile(path) else os.path.join(HERE, path)
    if not os.path.isfile(found):
        raise InputError(f"--task {path}: no such recipe file")
    if not found.endswith(".py"):  # importlib has no loader for it (a traceback otherwise)
        raise InputError(f"--task {path}: not a task recipe (a recipe is a .py file, e.g. "
                         "finetune_hf_trainer_docvqa.py)")
    module = import_python_file(found, "--task", f"phi3v_task_{os.path.basename(found)[:-3]}")
    missing = [name for name in ("load_data", "to_record", "score") if not hasattr(module, name)]
    if missing:
        raise InputError(f"--task {path}: not a task recipe (it has no {', '.join(missing)}; copy "
                         "finetune_hf_trainer_hateful_memes.py's task section)")
    return module


def parse(argv=None):
    """(recipe args, this recipe's flags, training args); --task's recipe's own flags in task.more_flags. A bad
    flag or combination ends the program in one line."""
    def task_flags(task):
        return getattr(task_recipe(task.task), "TaskArguments", None) if task.task else None

    return exit_on_input_error(parse_args)(GRPOArguments, argv, recipe_class=RecipeArguments, more_flags=task_flags,
                                           program=os.path.basename(__file__), **SCRIPT_DEFAULTS)


score = free_text_score  # --data_path: exact match and ANLS of the greedy answer against the reference (phi3v.metrics)


def task_classes(train_dataset, eval_dataset, train_records=CLASS_SAMPLE) -> list[str]:
    """A classification recipe's classes, which accuracy_reward parses each answer onto (as evaluation does onto the
    distinct gold answers): the answers of the evaluation split and of the first `train_records` training records."""
    datasets = [(train_dataset, min(train_records, len(train_dataset)))]
    if eval_dataset is not None:
        datasets.append((eval_dataset, len(eval_dataset)))
    answers = set()
    for dataset, count in datasets:
        for index in range(count):
            try:
                answers.add(dataset.record(index)["messages"][-1]["content"])
            except BadSampleError:
                if not dataset.skip_bad_samples:
                    raise
    return sorted(answers)


# ------------------------------------------------------------------------------------------------ the recipe
def run(argv=None):
    args, task, training_args = parse(argv)
    setup_logging(training_args)
    resume = prepare_resume(training_args, args.overwrite_output_dir)  # 'auto': newest complete checkpoint

    # Data and rewards: a task recipe's splits and metric, or records files; checked before the model loads
    recipe = task_recipe(task.task) if task.task else None
    if recipe is not None:
        if "num_crops" not in args.given:
            args.num_crops = getattr(recipe, "SCRIPT_DEFAULTS", {}).get("num_crops", args.num_crops)
        train_rows, eval_rows = recipe.load_data(SimpleNamespace(**vars(args), dataset_path=task.dataset_path),
                                                 task.more_flags)
        to_record, task_score = recipe.to_record, recipe.score
    else:
        train_rows = records_split(task.data_path, task.image_folder, args.skip_bad_samples, args.max_train_samples)
        eval_rows = task.eval_data_path and records_split(task.eval_data_path, task.image_folder,
                                                          args.skip_bad_samples, args.max_eval_samples)
        to_record, task_score = None, score
    processor = Phi3VProcessor.from_pretrained(args.model_name_or_path, num_crops=args.num_crops,
                                               **({"cache_dir": task.cache_dir} if task.cache_dir else {}))
    dataset_options = dict(processor=processor, to_record=to_record, num_crops=args.num_crops,
                           max_length=args.max_seq_length, max_num_frames=task.max_num_frames,
                           skip_bad_samples=args.skip_bad_samples, system_prompt=task.system_prompt,
                           max_completion_length=task.max_completion_length)
    train_dataset = PromptDataset(train_rows, **dataset_options)
    eval_dataset = PromptDataset(eval_rows, **dataset_options) if eval_rows else None
    evaluation = recipe_evaluation(eval_dataset, task_score, args, training_args)
    classes = task_classes(train_dataset, eval_dataset) if getattr(recipe, "CLASSIFY", False) else None
    rewards = Rewards(task.reward_funcs, task.reward_weights, task_score, task.answer_format, classes)
    first = train_dataset[0]  # every reward answers a sample (its reference answer) before the model loads
    rewards([first["answer"]], [first["answer"]], [first["record"]])

    # Model, optimizer (one learning rate per part) and, with --beta, the reference
    model = model_for_training(args, training_args, task.model_plan(args))
    optimizer = build_optimizer(model, training_args, vision_lr=task.vision_lr, projector_lr=task.projector_lr)
    reference = frozen_reference(model, args, task, training_args) if task.beta else None

    trainer = make_trainer(model, training_args, train_dataset, processor, optimizers=(optimizer, None),
                           skip_nonfinite=args.skip_nonfinite_steps, exempt_norms_from_decay=True,
                           evaluation=evaluation, early_stopping_patience=args.early_stopping_patience,
                           early_stopping_threshold=args.early_stopping_threshold, trainer_class=GRPOTrainer,
                           data_collator=collate_prompts, grpo=task.settings(), rewards=rewards,
                           ref_model=reference.ref_model if reference else None)
    if reference is not None:
        reference.attach(trainer)
    add_learning_rate_logging(trainer)
    eval_before = None
    if evaluation is not None and not args.skip_eval_before and not resume:
        eval_before = evaluation.run(model, processor, "eval_before")
    if not run_training(trainer, resume):  # stopped by SIGTERM after saving a checkpoint
        return
    save_outputs(trainer, processor, args)

    eval_after = None
    if evaluation is not None:  # with --load_best_model_at_end: the best checkpoint's weights
        eval_after = evaluation.run(trainer.model, processor, "eval_after")
    write_run_summary(trainer, args, task, eval_before, eval_after, classify=getattr(recipe, "CLASSIFY", False))


def main(argv=None):
    exit_on_input_error(run)(argv)  # a bad flag or input file: one line, no traceback


if __name__ == "__main__":
    main()

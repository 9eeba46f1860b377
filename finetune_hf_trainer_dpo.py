"""Preference tuning (DPO) of Phi-3.5-vision on preference pairs: for a prompt (images, a video, or text, optionally
after earlier turns), a chosen and a rejected answer. Evaluates before and after on a second file.

Data: --data_path, the community's DPO format (2U1/Qwen-VL-Series-Finetune): a JSON list (or one record per line)

    {"id": "1", "image": "cats/1.jpg", "prompt": "<image>\\nWhat is this?", "chosen": "A cat.", "rejected": "A dog."}

"image" may be a list (one <image> tag each) or be replaced by "video" (one <video> tag, --max_num_frames frames);
"conversations" (LLaVA turns) may hold earlier turns before the prompt. Paths are relative to --image_folder.
Every pair is checked before the model loads (phi3v.preference); --skip_bad_samples leaves bad ones out.

    torchrun --nproc_per_node=8 finetune_hf_trainer_dpo.py --data_path pairs.json --image_folder images --bf16
    torchrun --nproc_per_node=1 finetune_hf_trainer_dpo.py --data_path pairs.json --image_folder images \\
        --bf16 --lora_enable --beta 0.1 --loss_type sigmoid

Strategies and their flags are the community recipe's (finetune_hf_trainer_custom.py, phi3v/community_flags.py):
full, --freeze_vision_tower, --lora_enable (--vision_lora), --bits 4 / 8, --use_dora. The reference model: LoRA
runs use the base model with the adapters disabled; full runs keep a frozen copy, or with
--precompute_ref_log_probs compute the reference log-probabilities once before training (checkpoints keep them).
Loss: --beta, --loss_type (TRL's names: sigmoid, hinge, ipo, robust, ...; several with --loss_weights),
--label_smoothing, --rpo_alpha (adds the chosen answers' NLL, as TRL's RPO). Each pair runs as one shared-prefix
row: its prompt and images once, both answers continuing from it (docs/DESIGN.md §12, §13).
Evaluation (--eval_data_path): preference accuracy (the implicit reward prefers the chosen answer; a tie counts
half), the mean reward margin, and the greedy answer's exact match / ANLS against the chosen answer.
"""

import logging
import os
from dataclasses import dataclass, field

from phi3v import Phi3VProcessor
from phi3v.arguments import RecipeArguments, parse_args
from phi3v.callbacks import add_learning_rate_logging
from phi3v.checkpoints import prepare_resume
from phi3v.community_flags import CommunityArguments
from phi3v.dpo import DPOSettings, DPOTrainer, PreferenceCollator, reference_for_training
from phi3v.dpo_loss import LOSS_TYPES
from phi3v.errors import InputError, exit_on_input_error
from phi3v.metrics import free_text_score
from phi3v.optim import build_optimizer
from phi3v.preference import PreferenceDataset, check_pair_lengths, parse_preference
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


# ------------------------------------------------------------------------------------------------ the task
# Defaults of this script where they differ from the other recipes' (the community recipe's values; TRL's DPO lr).
SCRIPT_DEFAULTS = dict(lora_rank=128, lora_dropout=0.05, num_crops=16, learning_rate=1e-6, warmup_steps=0.1)


@dataclass(kw_only=True)
class DPOArguments(CommunityArguments):
    """The community recipe's flags (phi3v.community_flags), this recipe's data and the DPO loss (TRL's names)."""

    data_path: str = field(metadata={"help": "preference pairs: JSON list or jsonl of {prompt, chosen, rejected}"})
    image_folder: str | None = field(default=None, metadata={"help": "root of the relative image / video paths"})
    eval_data_path: str | None = field(
        default=None, metadata={"help": "evaluate before and after training on these pairs (same format)"})
    beta: float = field(default=0.1, metadata={"help": "DPO's beta: how far the policy may move from the reference"})
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": f"one or several of {', '.join(LOSS_TYPES)} (TRL's names); several add up, weighted by "
                          "--loss_weights"})
    loss_weights: list[float] | None = field(default=None, metadata={"help": "one weight per --loss_type (default 1)"})
    dpo_loss: str | None = field(default=None, metadata={"help": "the community recipe's name of --loss_type"})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "robust: the probability a preference is flipped, in [0, 0.5); exo_pair: eps"})
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "add rpo_alpha x the chosen answers' mean token NLL (TRL's RPO)"})
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "full / frozen-vision runs: the reference log-probabilities computed once "
                                         "before training instead of a frozen copy of the model (LoRA: not needed)"})
    shared_prefix: bool = field(
        default=True, metadata={"help": "each pair as one row, its prompt run once (False: prompt + chosen and "
                                        "prompt + rejected as two rows, as TRL does; for comparison)"})

    def resolve(self, recipe_args) -> None:
        super().resolve(recipe_args)
        given = set(recipe_args.given)
        if self.dpo_loss is not None:
            if "loss_type" in given and [self.dpo_loss] != self.loss_type:
                raise InputError(f"--dpo_loss {self.dpo_loss} and --loss_type {' '.join(self.loss_type)} differ; "
                                 "give one")
            self.loss_type = [self.dpo_loss]
        unknown = [name for name in self.loss_type if name not in LOSS_TYPES]
        if unknown:
            raise InputError(f"--loss_type {unknown[0]}: not a DPO loss; one of {', '.join(LOSS_TYPES)}")
        weights = self.loss_weights or [1.0] * len(self.loss_type)
        if len(weights) != len(self.loss_type):
            raise InputError(f"--loss_weights has {len(weights)} weights for {len(self.loss_type)} --loss_type")
        if self.rpo_alpha is not None:
            if "sft" in self.loss_type:
                raise InputError("--rpo_alpha adds the sft term; --loss_type already has it: give one")
            self.loss_type, weights = [*self.loss_type, "sft"], [*weights, self.rpo_alpha]
        self.loss_weights = weights
        if self.beta <= 0:
            raise InputError(f"--beta must be positive, got {self.beta}")
        if "robust" in self.loss_type and not 0 <= self.label_smoothing < 0.5:
            raise InputError(f"--label_smoothing must be in [0, 0.5) for the robust loss, got {self.label_smoothing}")
        if "exo_pair" in self.loss_type and not 0 < self.label_smoothing < 1:  # its loss takes log(eps), log(1 - eps)
            raise InputError(f"--label_smoothing is the exo_pair loss's epsilon and must be in (0, 1) (the EXO paper "
                             f"recommends 1e-3), got {self.label_smoothing}")
        if self.precompute_ref_log_probs and self.lora_enable:
            logger.warning("--precompute_ref_log_probs with --lora_enable: the reference is the base model with the "
                           "adapters disabled, computed once before training all the same")
        if self.shared_prefix and recipe_args.use_flash_attention:  # flash-attn cannot keep the answers apart
            logger.warning("shared-prefix rows need an attention mask: SDPA attention instead of flash-attn")
            recipe_args.use_flash_attention = False

    def settings(self) -> DPOSettings:
        return DPOSettings(beta=self.beta, loss_types=tuple(self.loss_type), loss_weights=tuple(self.loss_weights),
                           label_smoothing=self.label_smoothing)


def parse(argv=None):
    """(recipe args, this recipe's flags, training args); a bad flag or combination ends the program in one line."""
    return exit_on_input_error(parse_args)(DPOArguments, argv, recipe_class=RecipeArguments,
                                           program=os.path.basename(__file__), **SCRIPT_DEFAULTS)


score = free_text_score  # exact match and ANLS of the greedy answer against the chosen answer (phi3v.metrics)


# ------------------------------------------------------------------------------------------------ the recipe
def run(argv=None):
    args, task, training_args = parse(argv)
    setup_logging(training_args)
    resume = prepare_resume(training_args, args.overwrite_output_dir)  # 'auto': newest complete checkpoint

    # Data: every pair, its media and its length checked before the model loads
    processor = Phi3VProcessor.from_pretrained(args.model_name_or_path, num_crops=args.num_crops,
                                               **({"cache_dir": task.cache_dir} if task.cache_dir else {}))

    def pairs(path, max_samples):
        records = records_split(path, task.image_folder, args.skip_bad_samples, max_samples, parse=parse_preference)
        return check_pair_lengths(records, processor, args.num_crops, args.max_seq_length, task.max_num_frames,
                                  args.skip_bad_samples)

    dataset_options = dict(processor=processor, num_crops=args.num_crops, max_length=args.max_seq_length,
                           max_num_frames=task.max_num_frames, skip_bad_samples=args.skip_bad_samples)
    train_dataset = PreferenceDataset(pairs(task.data_path, args.max_train_samples), **dataset_options)
    eval_dataset = None
    if task.eval_data_path:
        eval_dataset = PreferenceDataset(pairs(task.eval_data_path, args.max_eval_samples), **dataset_options)
    evaluation = recipe_evaluation(eval_dataset, score, args, training_args)

    # Model, optimizer (one learning rate per part) and the reference model
    model = model_for_training(args, training_args, task.model_plan(args))
    optimizer = build_optimizer(model, training_args, vision_lr=task.vision_lr, projector_lr=task.projector_lr)
    collator = PreferenceCollator(processor.pad_token_id, shared_prefix=task.shared_prefix)
    reference = reference_for_training(model, args, task, training_args, collator, train_dataset, eval_dataset,
                                       resume)

    # Train
    trainer = make_trainer(model, training_args, train_dataset, processor, optimizers=(optimizer, None),
                           skip_nonfinite=args.skip_nonfinite_steps, exempt_norms_from_decay=True,
                           evaluation=evaluation, early_stopping_patience=args.early_stopping_patience,
                           early_stopping_threshold=args.early_stopping_threshold, trainer_class=DPOTrainer,
                           data_collator=collator, dpo=task.settings(), **reference.trainer_kwargs())
    reference.attach(trainer)
    add_learning_rate_logging(trainer)
    eval_before = None
    if evaluation is not None and not args.skip_eval_before and not resume:
        eval_before = evaluation.run(model, processor, "eval_before", extra=trainer.preference_report(eval_dataset))
    if not run_training(trainer, resume):  # stopped by SIGTERM after saving a checkpoint
        return
    save_outputs(trainer, processor, args)

    eval_after = None
    if evaluation is not None:  # with --load_best_model_at_end: the best checkpoint's weights
        eval_after = evaluation.run(trainer.model, processor, "eval_after",
                                    extra=trainer.preference_report(eval_dataset))
    write_run_summary(trainer, args, task, eval_before, eval_after, classify=False)


def main(argv=None):
    exit_on_input_error(run)(argv)  # a bad flag or input file: one line, no traceback


if __name__ == "__main__":
    main()

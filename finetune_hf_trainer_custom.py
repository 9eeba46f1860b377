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

The flags are the community recipe's (2U1/Phi3-Vision-Finetune) and mean what they mean there; phi3v/community_flags.py
defines them and the model plan they make (what trains, LoRA targets, quantisation). Each part has its own learning
rate (--vision_lr, --projector_lr, --learning_rate), logged as learning_rate_<part>. The launchers in scripts/ run
the common set-ups.
"""

import logging
import os
from dataclasses import dataclass, field

from phi3v import Phi3VProcessor
from phi3v.arguments import RecipeArguments, parse_args
from phi3v.callbacks import add_learning_rate_logging
from phi3v.checkpoints import prepare_resume
from phi3v.community_flags import CommunityArguments
from phi3v.dataset import SFTDataset
from phi3v.errors import exit_on_input_error
from phi3v.media import check_media
from phi3v.metrics import free_text_score
from phi3v.optim import build_optimizer
from phi3v.records import load_records
from phi3v.splits import take
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
# Defaults of this script where they differ from the other recipes' (the community recipe's values).
SCRIPT_DEFAULTS = dict(lora_rank=128, lora_dropout=0.05, num_crops=16)


@dataclass(kw_only=True)
class CustomArguments(CommunityArguments):
    """The community recipe's flags (phi3v.community_flags) and this recipe's data."""

    data_path: str = field(metadata={"help": "training data: LLaVA-style JSON / jsonl, or the project's jsonl"})
    image_folder: str | None = field(default=None, metadata={"help": "root of the relative image / video paths"})
    eval_data_path: str | None = field(
        default=None, metadata={"help": "evaluate before and after training on this file (same formats)"}
    )


def parse(argv=None):
    """(recipe args, this recipe's flags, training args); a bad flag or combination ends the program in one line."""
    return exit_on_input_error(parse_args)(CustomArguments, argv, recipe_class=RecipeArguments,
                                           program=os.path.basename(__file__), **SCRIPT_DEFAULTS)


def build_model(args, task, training_args):
    """The model with exactly the parts to train left trainable: the shared set-up with the community flags' plan."""
    return exit_on_input_error(model_for_training)(args, training_args, task.model_plan(args))


score = free_text_score  # exact match and ANLS against every gold answer of a prediction (phi3v.metrics)


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
    # Evaluation before, during (--eval_strategy) and after training, on --eval_data_path; the evaluation flags
    # (--metric_for_best_model ...) are checked against score's metrics here, before the model loads
    eval_dataset = SFTDataset(eval_rows, **dataset_options) if eval_rows is not None else None
    evaluation = recipe_evaluation(eval_dataset, score, args, training_args)

    # Model and optimizer: one learning rate per part
    model = build_model(args, task, training_args)
    optimizer = build_optimizer(model, training_args, vision_lr=task.vision_lr, projector_lr=task.projector_lr)

    eval_before = None
    if evaluation is not None and not args.skip_eval_before and not resume:
        eval_before = evaluation.run(model, processor, "eval_before")

    # Train (with --eval_strategy: evaluations on --eval_data_path, the best checkpoint, early stopping)
    trainer = make_trainer(model, training_args, train_dataset, processor, optimizers=(optimizer, None),
                           skip_nonfinite=args.skip_nonfinite_steps, packing=args.packing,
                           exempt_norms_from_decay=True,  # the Trainer's rule = build_optimizer's
                           evaluation=evaluation, early_stopping_patience=args.early_stopping_patience,
                           early_stopping_threshold=args.early_stopping_threshold)
    add_learning_rate_logging(trainer)
    if not run_training(trainer, resume):  # stopped by SIGTERM after saving a checkpoint
        return
    save_outputs(trainer, processor, args)

    eval_after = None
    if evaluation is not None:  # with --load_best_model_at_end: the best checkpoint's weights
        eval_after = evaluation.run(trainer.model, processor, "eval_after")
    write_run_summary(trainer, args, task, eval_before, eval_after, classify=False)


def main(argv=None):
    exit_on_input_error(run)(argv)  # a bad flag or input file: one line, no traceback


if __name__ == "__main__":
    main()

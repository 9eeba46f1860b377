"""Fine-tune Phi-3.5-vision on UCF101 action recognition, each video seen as 8 frames, evaluating before and after.

Data: --data_dir, the output folder of convert_ucf101.py: ucf101_train.jsonl to train, ucf101_test.jsonl to
evaluate (ucf101_val.jsonl when there is no test file), frames under data_dir/images/.
Metric: accuracy; a generated answer is mapped by phi3v.metrics.parse_choice onto the set of gold class names of
the evaluated samples (so a prediction naming any other class, or none, counts as wrong).

    python convert_ucf101.py --out_dir data/ucf101
    torchrun --nproc_per_node=8 finetune_hf_trainer_ucf101.py --data_dir data/ucf101 --bf16 --use_flash_attention
    torchrun --nproc_per_node=1 finetune_hf_trainer_ucf101.py --data_dir data/ucf101 --bf16 --use_lora

Custom data: this is the project's entry point for your own data. --data_dir takes any folder with
ucf101_train.jsonl and ucf101_test.jsonl (or ucf101_val.jsonl) in the project's jsonl format (phi3v.records), media
paths relative to data_dir/images/: any number of images per turn, several turns per conversation, e.g.

    {"id": "a1", "conversations": [{"images": ["a.jpg", "b.jpg"], "user": "What changed?", "assistant": "The sign."},
                                   {"user": "What colour is it now?", "assistant": "Red."}]}

Training learns every assistant turn; evaluation generates the last one. With free-text answers the metric reads
as (normalised) exact match against the gold answers.
"""

import os
from dataclasses import dataclass, field

from phi3v import Phi3VProcessor
from phi3v.arguments import parse_args
from phi3v.checkpoints import prepare_resume
from phi3v.dataset import SFTDataset
from phi3v.errors import InputError, exit_on_input_error
from phi3v.media import check_media
from phi3v.metrics import gold_choice_accuracy
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

# ------------------------------------------------------------------------------------------------ the task
TRAIN_FILE, EVAL_FILES = "ucf101_train.jsonl", ("ucf101_test.jsonl", "ucf101_val.jsonl")
SCRIPT_DEFAULTS = dict(num_crops=4, batch_size=16, batch_size_per_gpu=1)  # 8 frames a sample: fewer crops
CLASSIFY = True


@dataclass
class TaskArguments:
    data_dir: str = field(
        metadata={"help": "output folder of convert_ucf101.py (or any folder in its format): "
                          f"{TRAIN_FILE}, {' or '.join(EVAL_FILES)}, images/"},
    )


def data_files(data_dir):
    """(train file, eval file) of data_dir; a missing file is a user mistake, reported in one line."""
    train_file = os.path.join(data_dir, TRAIN_FILE)
    if not os.path.isfile(train_file):
        raise InputError(f"no {TRAIN_FILE} in --data_dir {data_dir} (expected the output folder of convert_ucf101.py)")
    for name in EVAL_FILES:
        if os.path.isfile(os.path.join(data_dir, name)):
            return train_file, os.path.join(data_dir, name)
    raise InputError(f"no {' or '.join(EVAL_FILES)} in --data_dir {data_dir} to evaluate on")


def load_data(args, task_args):
    """(train rows, eval rows): the records of --data_dir's files, every frame file looked at now, before the model
    loads (a bad one: its record and file, in one line)."""
    train_file, eval_file = data_files(task_args.data_dir)
    images = os.path.join(task_args.data_dir, "images")
    train_rows = take(load_records(train_file, images, args.skip_bad_samples), 0, args.max_train_samples)
    eval_rows = take(load_records(eval_file, images, args.skip_bad_samples), 0, args.max_eval_samples)
    return check_media(train_rows, args.skip_bad_samples), check_media(eval_rows, args.skip_bad_samples)


def to_record(row, index):
    """The rows are records already (phi3v.records.load_records)."""
    return row


def score(predictions):
    """Accuracy: each prediction is parsed onto the set of gold answers (phi3v.metrics.parse_choice)."""
    return "accuracy", gold_choice_accuracy(predictions)


# ------------------------------------------------------------------------------------------------ the recipe
def main():
    args, task_args, training_args = parse_args(TaskArguments, **SCRIPT_DEFAULTS)
    setup_logging(training_args)
    resume = prepare_resume(training_args, args.overwrite_output_dir)  # 'auto': newest complete checkpoint

    # Data: the task's rows, each made a record by to_record when it is read
    train_rows, eval_rows = load_data(args, task_args)
    processor = Phi3VProcessor.from_pretrained(args.model_name_or_path, num_crops=args.num_crops)
    dataset_options = dict(processor=processor, to_record=to_record, num_crops=args.num_crops,
                           max_length=args.max_seq_length, skip_bad_samples=args.skip_bad_samples)
    train_dataset = SFTDataset(train_rows, **dataset_options)
    # Evaluation before, during (--eval_strategy) and after training: score's metric of greedy answers. The
    # evaluation flags (--metric_for_best_model ...) are checked against score's metrics here, before the model loads
    evaluation = recipe_evaluation(SFTDataset(eval_rows, **dataset_options), score, args, training_args)

    # Model
    model = model_for_training(args, training_args)

    eval_before = None if args.skip_eval_before or resume else evaluation.run(model, processor, "eval_before")

    # Train (with --eval_strategy: evaluations, the best checkpoint, early stopping)
    trainer = make_trainer(model, training_args, train_dataset, processor, evaluation=evaluation,
                           skip_nonfinite=args.skip_nonfinite_steps, packing=args.packing,
                           exempt_norms_from_decay=args.exempt_norms_from_decay,
                           early_stopping_patience=args.early_stopping_patience,
                           early_stopping_threshold=args.early_stopping_threshold)
    if not run_training(trainer, resume):  # stopped by SIGTERM after saving a checkpoint
        return
    save_outputs(trainer, processor, args)

    # Evaluate the model as trained (with --load_best_model_at_end: the best checkpoint's weights; for QLoRA: the
    # quantized model with its adapter); plots and run config
    eval_after = evaluation.run(trainer.model, processor, "eval_after")
    write_run_summary(trainer, args, task_args, eval_before, eval_after, classify=CLASSIFY)


if __name__ == "__main__":
    exit_on_input_error(main)()  # a bad flag or input file: one line, no traceback

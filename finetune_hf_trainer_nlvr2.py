"""Fine-tune Phi-3.5-vision on NLVR2 (is a sentence true of a pair of images? True / False), evaluating before and
after.

Two images per sample, so each image gets at most 4 crops by default (--num_crops 4) to keep sequences short.
Data: HuggingFaceM4/the_cauldron, config nlvr2: train[500:] to train, train[:500] to evaluate
(or --dataset_path: a save_to_disk copy of that split, or a jsonl file in the project's format).
Metric: accuracy; a generated answer is mapped onto the gold answers ("True" / "False") by phi3v.metrics.parse_choice.

    torchrun --nproc_per_node=8 finetune_hf_trainer_nlvr2.py --bf16 --use_flash_attention
    torchrun --nproc_per_node=1 finetune_hf_trainer_nlvr2.py --bf16 --use_lora
"""

import os

from phi3v import Phi3VProcessor
from phi3v.arguments import parse_args
from phi3v.checkpoints import prepare_resume
from phi3v.dataset import SFTDataset
from phi3v.errors import exit_on_input_error
from phi3v.evaluation import evaluate
from phi3v.metrics import gold_choice_accuracy
from phi3v.sources import cauldron_record, load_split, take
from phi3v.training import (
    make_trainer,
    model_for_training,
    run_training,
    save_outputs,
    setup_logging,
    write_run_summary,
)

# ------------------------------------------------------------------------------------------------ the task
DATASET, CONFIG, EVAL_SIZE = "HuggingFaceM4/the_cauldron", "nlvr2", 500


def to_record(row, index):
    """A the_cauldron row -> a record (phi3v.data); "<|image_1|>
..." tags open the first user turn."""
    return cauldron_record(row, index, DATASET, CONFIG)


def score(predictions):
    """Accuracy: each prediction is parsed onto the set of gold answers (phi3v.metrics.parse_choice)."""
    return "accuracy", gold_choice_accuracy(predictions)


# ------------------------------------------------------------------------------------------------ the recipe
def main():
    args, task_args, training_args = parse_args(num_crops=4, batch_size=16, batch_size_per_gpu=1)
    setup_logging(training_args)
    resume = prepare_resume(training_args, args.overwrite_output_dir)  # 'auto': newest complete checkpoint

    # Data
    rows = load_split(DATASET, CONFIG, "train", args.dataset_path, args.skip_bad_samples)
    train_rows = take(rows, EVAL_SIZE, None if args.max_train_samples is None else EVAL_SIZE + args.max_train_samples,
                      note=f"the first {EVAL_SIZE} rows are the evaluation split and training takes the rest: give "
                           f"more than {EVAL_SIZE} rows, or change EVAL_SIZE at the top of "
                           f"{os.path.basename(__file__)}")
    eval_rows = take(rows, 0, min(EVAL_SIZE, args.max_eval_samples or EVAL_SIZE))
    processor = Phi3VProcessor.from_pretrained(args.model_name_or_path, num_crops=args.num_crops)
    dataset_options = dict(processor=processor, to_record=to_record, num_crops=args.num_crops,
                           max_length=args.max_seq_length, skip_bad_samples=args.skip_bad_samples)
    train_dataset = SFTDataset(train_rows, **dataset_options)
    eval_dataset = SFTDataset(eval_rows, **dataset_options)

    # Model
    model = model_for_training(args, training_args)

    eval_before = None if args.skip_eval_before or resume else evaluate(
        model, processor, eval_dataset, score, args, training_args, "eval_before"
    )

    # Train
    trainer = make_trainer(model, training_args, train_dataset, processor,
                           skip_nonfinite=args.skip_nonfinite_steps, packing=args.packing,
                           exempt_norms_from_decay=args.exempt_norms_from_decay)
    if not run_training(trainer, resume):  # stopped by SIGTERM after saving a checkpoint
        return
    save_outputs(trainer, processor, args)

    # Evaluate the model as trained (for QLoRA: the quantized model with its adapter); plots and run config
    eval_after = evaluate(trainer.model, processor, eval_dataset, score, args, training_args, "eval_after")
    write_run_summary(trainer, args, task_args, eval_before, eval_after, classify=True)


if __name__ == "__main__":
    exit_on_input_error(main)()  # a bad flag or input file: one line, no traceback

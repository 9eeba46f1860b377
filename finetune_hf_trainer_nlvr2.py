"""Fine-tune Phi-3.5-vision on NLVR2 (is a sentence true of a pair of images? True / False), evaluating before and
after.

Two images per sample, so each image gets at most 4 crops by default (--num_crops 4) to keep sequences short.
Data: HuggingFaceM4/the_cauldron, config nlvr2: train[500:] to train, train[:500] to evaluate
(or --dataset_path: a save_to_disk copy of that split, or a jsonl file in the project's format).
Metric: accuracy; a generated answer is mapped onto the gold answers ("True" / "False") by phi3v.metrics.parse_choice.

    torchrun --nproc_per_node=8 finetune_hf_trainer_nlvr2.py --bf16 --use_flash_attention
    torchrun --nproc_per_node=1 finetune_hf_trainer_nlvr2.py --bf16 --use_lora
"""

from phi3v import Phi3VProcessor
from phi3v.arguments import parse_args
from phi3v.checkpoints import prepare_resume
from phi3v.dataset import SFTDataset
from phi3v.errors import exit_on_input_error
from phi3v.metrics import gold_choice_accuracy
from phi3v.splits import cauldron_record, load_split, split_off_eval
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
DATASET, CONFIG, EVAL_SIZE = "HuggingFaceM4/the_cauldron", "nlvr2", 500
SCRIPT_DEFAULTS = dict(num_crops=4, batch_size=16, batch_size_per_gpu=1)  # two images a sample: fewer crops
TaskArguments = None
CLASSIFY = True


def load_data(args, task_args):
    """(train rows, eval rows): the first EVAL_SIZE rows of the train split evaluate, the rest train."""
    rows = load_split(DATASET, CONFIG, "train", args.dataset_path, args.skip_bad_samples)
    return split_off_eval(rows, EVAL_SIZE, args.max_train_samples, args.max_eval_samples, __file__)


def to_record(row, index):
    """A the_cauldron row -> a record (phi3v.records): "<|image_1|>\\n<|image_2|>\\n" opens the first user turn."""
    return cauldron_record(row, index, DATASET, CONFIG)


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

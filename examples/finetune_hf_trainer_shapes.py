"""A fifth task made from a copy of finetune_hf_trainer_hateful_memes.py: name the colour of the shape in a picture.

The worked example of the README's "start a new task": only the task section changed (the constants, load_data,
to_record, score); the recipe below it is the template's, line for line (tests/test_template_example.py checks it).
Data: a local `save_to_disk` folder (--dataset_path) with "train" and "test" splits of rows
{"image": PIL image, "colour": "red" | "blue" | ...}; phi3v.synthetic makes one:

    python -c "from phi3v.synthetic import shapes_dataset; shapes_dataset('data/shapes')"
    python examples/finetune_hf_trainer_shapes.py --dataset_path data/shapes --model_name_or_path <model>
"""

from phi3v import Phi3VProcessor
from phi3v.arguments import parse_args
from phi3v.checkpoints import prepare_resume
from phi3v.dataset import SFTDataset
from phi3v.errors import InputError, exit_on_input_error
from phi3v.metrics import gold_choice_accuracy
from phi3v.splits import load_split, take
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
DATASET = "local shapes"  # no hub copy: --dataset_path is required
SCRIPT_DEFAULTS = dict(num_crops=4, batch_size=16)
TaskArguments = None
CLASSIFY = True


def load_data(args, task_args):
    """(train rows, eval rows): the "train" and "test" splits of --dataset_path."""
    if not args.dataset_path:
        raise InputError("this example trains on local data: pass --dataset_path (a save_to_disk folder)")
    train_rows = take(load_split(DATASET, None, "train", args.dataset_path), 0, args.max_train_samples)
    eval_rows = take(load_split(DATASET, None, "test", args.dataset_path), 0, args.max_eval_samples)
    return train_rows, eval_rows


def to_record(row, index):
    """{"image", "colour"} -> a record (phi3v.records): one image, one question, the colour's name as the answer."""
    return {"id": f"shapes-{index}", "source": f"shapes[{index}]", "images": [row["image"]], "video": None,
            "messages": [{"role": "user", "content": "<|image_1|>\nWhat colour is the shape?"},
                         {"role": "assistant", "content": row["colour"]}]}


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

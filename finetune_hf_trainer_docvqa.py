"""Fine-tune Phi-3.5-vision on DocVQA (questions about scanned documents), evaluating before and after.

Data: nielsr/docvqa_1200_examples, split "train" (1000 examples) to train and "test" (200) to evaluate; with
--full_train, as the original recipe, the whole DocVQA training set from HuggingFaceM4/the_cauldron (config docvqa,
~10k pages, every question of a page as one multi-turn conversation) to train, still evaluating on the 200
(or --dataset_path: a save_to_disk DatasetDict folder holding "train" and "test", or a jsonl file in the project's
format, used for both).
Metric: ANLS (phi3v.metrics.mean_anls) of each generated answer against every gold answer of its question.

    torchrun --nproc_per_node=8 finetune_hf_trainer_docvqa.py --bf16 --use_flash_attention
    torchrun --nproc_per_node=8 finetune_hf_trainer_docvqa.py --bf16 --use_flash_attention --full_train
    torchrun --nproc_per_node=1 finetune_hf_trainer_docvqa.py --bf16 --use_lora
"""

from dataclasses import dataclass, field

from phi3v import Phi3VProcessor
from phi3v.arguments import parse_args
from phi3v.checkpoints import prepare_resume
from phi3v.dataset import SFTDataset
from phi3v.errors import InputError, exit_on_input_error
from phi3v.metrics import mean_anls
from phi3v.splits import cauldron_record, is_record, load_split, take
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
DATASET = "nielsr/docvqa_1200_examples"
FULL_DATASET, FULL_CONFIG = "HuggingFaceM4/the_cauldron", "docvqa"
SCRIPT_DEFAULTS = dict(num_crops=16, batch_size=16)
CLASSIFY = False  # free-text answers


@dataclass
class TaskArguments:
    full_train: bool = field(
        default=False,
        metadata={"help": f"train on all of DocVQA ({FULL_DATASET}, config {FULL_CONFIG}) instead of the 1000 "
                          f"training examples of {DATASET} (evaluation stays on its 200 test examples)"},
    )


def load_data(args, task_args):
    """(train rows, eval rows): DATASET's "train" (FULL_DATASET's with --full_train) and "test" splits."""
    if task_args.full_train and args.dataset_path:
        raise InputError(f"--full_train trains on the hub's {FULL_DATASET} {FULL_CONFIG}, but --dataset_path replaces "
                         "the hub data with your copy: give one (for a local copy of the full set, save it with "
                         "save_to_disk and pass only --dataset_path)")
    train_source = (FULL_DATASET, FULL_CONFIG) if task_args.full_train else (DATASET, None)
    train_rows = take(load_split(*train_source, "train", args.dataset_path, args.skip_bad_samples),
                      0, args.max_train_samples)
    eval_rows = take(load_split(DATASET, None, "test", args.dataset_path, args.skip_bad_samples),
                     0, args.max_eval_samples)
    return train_rows, eval_rows


def to_record(row, index):
    """A DocVQA row -> a record (phi3v.records) that also carries every gold answer for ANLS.

    Row shapes: the 1200-example subset ({"id", "image", "query": {"en": ...}, "answers"}), HuggingFaceM4/DocumentVQA
    ({"questionId", "image", "question", "answers"}) and the_cauldron ({"images", "texts"}: --full_train).
    """
    if is_record(row):  # already a record (jsonl --dataset_path)
        return row
    if "texts" in row:  # the_cauldron: its questions already ask for a short answer
        return cauldron_record(row, index, FULL_DATASET, FULL_CONFIG)
    question = row["question"] if "question" in row else row["query"]["en"]
    answers = list(row["answers"])
    row_id = str(row.get("id", row.get("questionId", index)))  # questionId: the official DocVQA id
    return {
        "id": row_id,
        "source": f"docvqa[{index}] (id {row_id})",
        "images": [row["image"]],
        "video": None,
        "messages": [
            {"role": "user", "content": f"<|image_1|>\n{question}\nAnswer briefly."},
            {"role": "assistant", "content": answers[0]},  # the first gold answer is the training target
        ],
        "answers": answers,
    }


def score(predictions):
    """ANLS against all gold answers of each question (only the target answer for jsonl records)."""
    golds = [p.get("answers") or [p["answer"]] for p in predictions]
    return "anls", mean_anls([p["prediction"] for p in predictions], golds)


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

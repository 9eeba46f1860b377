"""Fine-tune Phi-3.5-vision on Hateful Memes (is this meme hateful? yes / no), evaluating before and after.

Data: HuggingFaceM4/the_cauldron, config hateful_memes: train[500:] to train, train[:500] to evaluate
(or --dataset_path: a save_to_disk copy of that split, or a jsonl file in the project's format).
Metric: accuracy; a generated answer is mapped onto the gold answers ("yes" / "no") by phi3v.metrics.parse_choice.

    torchrun --nproc_per_node=8 finetune_hf_trainer_hateful_memes.py --bf16 --use_flash_attention
    torchrun --nproc_per_node=1 finetune_hf_trainer_hateful_memes.py --bf16 --use_lora

To start a new task, copy this file and change the task part: DATASET, to_record and score.
"""

import logging

from phi3v import Phi3VProcessor
from phi3v.arguments import parse_args
from phi3v.dataset import SFTDataset
from phi3v.evaluation import generate_answers, write_report
from phi3v.metrics import accuracy
from phi3v.sources import is_record, load_split, take
from phi3v.training import make_trainer, model_for_training, save_outputs, setup_logging

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ the task
DATASET, CONFIG, EVAL_SIZE = "HuggingFaceM4/the_cauldron", "hateful_memes", 500


def to_record(row, index):
    """A the_cauldron row ({"images": [...], "texts": [{"user", "assistant"}]}) -> a record (phi3v.data)."""
    if is_record(row):  # already a record (jsonl --dataset_path)
        return row
    tags = "".join(f"<|image_{k}|>\n" for k in range(1, len(row["images"]) + 1))
    messages = []
    for turn, text in enumerate(row["texts"]):
        messages.append({"role": "user", "content": (tags if turn == 0 else "") + text["user"]})
        messages.append({"role": "assistant", "content": text["assistant"]})
    return {"id": f"{CONFIG}-{index}", "source": f"{DATASET}/{CONFIG}[{index}]", "images": row["images"],
            "video": None, "messages": messages}


def score(predictions):
    """Accuracy: each prediction is parsed onto the set of gold answers (e.g. yes / no)."""
    choices = sorted({p["answer"].strip().strip(".").lower() for p in predictions})
    golds = [p["answer"].strip().strip(".").lower() for p in predictions]
    return "accuracy", accuracy([p["prediction"] for p in predictions], golds, choices)


# ------------------------------------------------------------------------------------------------ the recipe
def main():
    args, _, training_args = parse_args(num_crops=16, batch_size=16)
    setup_logging(training_args)

    # Data
    rows = load_split(DATASET, CONFIG, "train", args.dataset_path, args.skip_bad_samples)
    train_rows = take(rows, EVAL_SIZE, None if args.max_train_samples is None else EVAL_SIZE + args.max_train_samples)
    eval_rows = take(rows, 0, min(EVAL_SIZE, args.max_eval_samples or EVAL_SIZE))
    processor = Phi3VProcessor.from_pretrained(args.model_name_or_path, num_crops=args.num_crops)
    dataset_options = dict(processor=processor, to_record=to_record, num_crops=args.num_crops,
                           max_length=args.max_seq_length, skip_bad_samples=args.skip_bad_samples)
    train_dataset = SFTDataset(train_rows, **dataset_options)
    eval_dataset = SFTDataset(eval_rows, **dataset_options)

    # Model
    model = model_for_training(args, training_args)

    def evaluate(model, name):
        predictions = generate_answers(model, processor, eval_dataset, args.eval_batch_size, args.max_new_tokens,
                                       progress=not args.no_tqdm, description=name)
        metric_name, metric = score(predictions)
        write_report(f"{training_args.output_dir}/{name}.json", metric_name, metric, predictions)
        logger.warning("%s: %s = %.4f on %d samples", name, metric_name, metric, len(predictions))
        return metric

    if not args.skip_eval_before:
        evaluate(model, "eval_before")

    # Train
    trainer = make_trainer(model, training_args, train_dataset, processor)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_outputs(trainer, processor, args)

    # Evaluate the model as trained (for QLoRA: the quantized model with its adapter)
    evaluate(trainer.model, "eval_after")


if __name__ == "__main__":
    main()

"""Generation-based evaluation: batched greedy answers, sharded across ranks, scored, written to JSON."""

import contextlib
import json
import logging
import os

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from phi3v.collator import generation_prompt
from phi3v.data import BadSampleError, load_record_images
from phi3v.processing import STOP_TOKEN_IDS

logger = logging.getLogger(__name__)



def full_weights(model):
    """Under ZeRO-3 each rank holds a slice of every weight: gather them for the duration (a no-op otherwise).

    Before training nothing gathers them on the fly (DeepSpeed's hooks come with the Trainer's engine)."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


@torch.no_grad()
def generate_answers(
    model,
    processor,
    dataset,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    num_crops=None,
    progress: bool = True,
    description: str = "eval",
) -> list[dict]:
    """Greedy answers for every record of an SFTDataset: [{"id", "prediction", "answer"}] in dataset order.

    Each rank answers every world_size-th record (left-padded batches); the results are gathered on all ranks.
    With the dataset's skip_bad_samples, a record that cannot be read is logged and left out of the answers.
    """
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(rank, len(dataset), world_size))
    # Every rank runs the same number of batches (a rank short of one repeats a record and drops its answer):
    # under ZeRO-3 the ranks gather weights together at every forward, and one rank stopping early would hang.
    per_rank = -(-len(dataset) // world_size)
    padded = indices + [indices[-1] if indices else 0] * (per_rank - len(indices))
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    was_training = model.training
    model.eval()
    results = []
    batches = range(0, len(padded), batch_size)
    for start in tqdm(batches, desc=description, disable=not progress or rank != 0):
        prompts, image_lists, records = [], [], []
        for position in range(start, min(start + batch_size, len(padded))):
            index = padded[position] if position < len(indices) else None  # None: a repeat, answer dropped
            try:
                record = dataset.record(padded[position])
                images, messages = load_record_images(record, dataset.max_num_frames)
                prompt, answer = generation_prompt(processor, messages)
            except BadSampleError as error:
                if not dataset.skip_bad_samples:
                    raise
                if index is not None:
                    logger.warning("%s: skipping bad sample: %s", description, error)
                # The batch keeps its size (ranks stay in step): a text-only stand-in whose answer is dropped.
                index, record, images, answer = None, {"id": None}, [], None
                prompt = processor.apply_chat_template([{"role": "user", "content": "-"}], add_generation_prompt=True)
            prompts.append(prompt)
            image_lists.append(images)
            records.append((index, record["id"], answer, record.get("answers")))
        inputs = processor(prompts, image_lists, num_crops=num_crops or dataset.num_crops, padding_side="left")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with full_weights(model):
            generated = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=STOP_TOKEN_IDS,
                pad_token_id=processor.pad_token_id,
            )
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        for (index, record_id, answer, answers), ids in zip(records, new_tokens):
            if index is None:
                continue
            item = {"index": index, "id": record_id, "prediction": processor.decode(ids).strip(), "answer": answer}
            if answers is not None:  # several gold answers (DocVQA)
                item["answers"] = list(answers)
            results.append(item)
    if was_training:
        model.train()
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, results)
        results = [item for part in gathered for item in part]
    results.sort(key=lambda item: item["index"])
    return [{k: v for k, v in item.items() if k != "index"} for item in results]


def write_report(path: str, metric_name: str, metric: float, predictions: list[dict], extra: dict | None = None) -> dict:
    """eval_before.json / eval_after.json: the metric, how many samples, and every prediction."""
    report = {metric_name: metric, "num_samples": len(predictions), **(extra or {}), "predictions": predictions}
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
    return report


def evaluate(model, processor, dataset, score, args, training_args, name: str) -> dict:
    """Generate answers for `dataset`, score them and write `<output_dir>/<name>.json`; returns the report.

    score(predictions) -> (metric name, value) or (metric name, value, {other metric: value})."""
    predictions = generate_answers(model, processor, dataset, args.eval_batch_size, args.max_new_tokens,
                                   progress=not args.no_tqdm, description=name)
    skipped = len(dataset) - len(predictions)  # bad samples left out (--skip_bad_samples), each logged by name
    if len(dataset) and not predictions:
        raise BadSampleError(f"{name}: every one of the {len(dataset)} evaluation samples is bad")
    metric_name, metric, *other = score(predictions)
    other = other[0] if other else {}
    if skipped:
        other = {**other, "skipped_bad_samples": skipped}
    report = write_report(os.path.join(training_args.output_dir, f"{name}.json"), metric_name, metric, predictions,
                          other)
    extra = "".join(f", {key} = {value:.4f}" if isinstance(value, float) else f", {key} = {value}"
                    for key, value in other.items())
    logger.warning("%s: %s = %.4f%s on %d samples", name, metric_name, metric, extra, len(predictions))
    return report

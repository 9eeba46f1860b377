"""Generation-based evaluation: batched greedy answers, sharded across ranks, scored, written to JSON.

    generate_answers  greedy answers to every record of a dataset, sharded across ranks, gathered on every rank
    Evaluation        a recipe's evaluation (its data set and score): `run` generates, scores and writes
                      <output_dir>/<name>.json: eval_before, eval_after, and eval_step_<N> during training
                      (phi3v.training.Phi3VTrainer.evaluation_loop); `metric_names` says what the score gives
    write_report      the JSON report: the metric, the number of samples, every prediction
"""

import contextlib
import json
import logging
import os

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from phi3v.processing import STOP_TOKEN_IDS, inputs_on
from phi3v.records import BadSampleError

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
    """Greedy answers for every record of `dataset`: [{"id", "prediction", "answer"}] in dataset order.

    dataset: an SFTDataset, or anything with its generation API: len(), generation_example(index) (a dict with
    "id", "prompt", "images", "answer", maybe "answers"; BadSampleError for a record that cannot be read),
    skip_bad_samples and num_crops (predict.py's inference.RecordPrompts).
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
    with full_weights(model):  # under ZeRO-3: gathered once for the whole evaluation
        for start in tqdm(range(0, len(padded), batch_size), desc=description, disable=not progress or rank != 0):
            positions = range(start, min(start + batch_size, len(padded)))
            batch = [_prompt_for(dataset, processor, padded[p], p < len(indices), description) for p in positions]
            inputs = processor([b["prompt"] for b in batch], [b["images"] for b in batch],
                               num_crops=num_crops or dataset.num_crops, padding_side="left")
            inputs = inputs_on(inputs, device, dtype)
            generated = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=STOP_TOKEN_IDS,
                pad_token_id=processor.pad_token_id,
            )
            for b, ids in zip(batch, generated[:, inputs["input_ids"].shape[1] :]):
                if b["item"] is not None:
                    b["item"]["prediction"] = processor.decode(ids).strip()
                    results.append(b["item"])
    if was_training:
        model.train()
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, results)
        results = [item for part in gathered for item in part]
    results.sort(key=lambda item: item["index"])
    return [{k: v for k, v in item.items() if k != "index"} for item in results]


def _prompt_for(dataset, processor, index, real: bool, description: str) -> dict:
    """One record's generation prompt and images, and the result item its answer goes into (None: the answer is
    dropped). A repeated record (real False) keeps a rank's batch count equal to the others'; with the dataset's
    skip_bad_samples a bad record is logged and replaced by a text-only stand-in, so the batch keeps its size."""
    try:
        example = dataset.generation_example(index)
    except BadSampleError as error:
        if not dataset.skip_bad_samples:
            raise
        if real:
            logger.warning("%s: skipping bad sample: %s", description, error)
        prompt = processor.apply_chat_template([{"role": "user", "content": "-"}], add_generation_prompt=True)
        return {"prompt": prompt, "images": [], "item": None}
    item = {"index": index, "id": example["id"], "prediction": None, "answer": example["answer"]}
    if "answers" in example:  # several gold answers (DocVQA)
        item["answers"] = example["answers"]
    return {"prompt": example["prompt"], "images": example["images"], "item": item if real else None}


def write_report(
    path: str, metric_name: str, metric: float, predictions: list[dict], extra: dict | None = None
) -> dict:
    """eval_before.json / eval_after.json: the metric, how many samples, and every prediction."""
    report = {metric_name: metric, "num_samples": len(predictions), **(extra or {}), "predictions": predictions}
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
    return report


class Evaluation:
    """A recipe's evaluation: greedy answers to every record of `dataset` (generate_answers: batched, sharded across
    ranks, gathered on every rank), scored by `score`, written to `<output_dir>/<name>.json` (write_report).

    The one code path of every evaluation: before and after training (the recipe calls `run`) and during training
    (phi3v.training.Phi3VTrainer calls `run` at each of the Trainer's evaluations, as eval_step_<N>).

    dataset: an SFTDataset or anything with its generation API (see generate_answers).
    score(predictions) -> (metric name, value) or (metric name, value, {other metric: value}).
    """

    def __init__(self, dataset, score, output_dir, batch_size: int = 8, max_new_tokens: int = 64,
                 progress: bool = True):
        self.dataset = dataset
        self.score = score
        self.output_dir = output_dir
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.progress = progress

    @classmethod
    def from_args(cls, dataset, score, args, training_args) -> "Evaluation":
        """With the recipe's flags: --eval_batch_size, --max_new_tokens, --no_tqdm, and --output_dir."""
        return cls(dataset, score, training_args.output_dir, args.eval_batch_size, args.max_new_tokens,
                   progress=not args.no_tqdm)

    def metric_names(self) -> list[str]:
        """The names `score` gives its metrics (the first is the task's metric), found by scoring one perfect
        prediction: the first record's gold answer, read from the record (nothing is image-processed nor
        generated); a stand-in answer when the set has no record API or its first record cannot be read."""
        item = {"id": "-", "prediction": "yes", "answer": "yes"}  # a stand-in when no record can be read
        record_of = getattr(self.dataset, "record", None)
        try:
            if record_of is not None and len(self.dataset):
                record = record_of(0)
                item["prediction"] = item["answer"] = record["messages"][-1]["content"]
                if record.get("answers") is not None:
                    item["answers"] = list(record["answers"])
        except (BadSampleError, KeyError, IndexError, TypeError):
            pass
        name, _, *other = self.score([item])
        return [name, *(other[0] if other else {})]

    def run(self, model, processor, name: str, extra: dict | None = None) -> dict:
        """Generate, score and write `<output_dir>/<name>.json`; returns the report (`extra`: more keys for it)."""
        dataset = self.dataset
        predictions = generate_answers(model, processor, dataset, self.batch_size, self.max_new_tokens,
                                       progress=self.progress, description=name)
        skipped = len(dataset) - len(predictions)  # bad samples left out (--skip_bad_samples), each logged by name
        if len(dataset) and not predictions:
            raise BadSampleError(f"{name}: every one of the {len(dataset)} evaluation samples is bad")
        metric_name, metric, *other = self.score(predictions)
        other = other[0] if other else {}
        if skipped:
            other = {**other, "skipped_bad_samples": skipped}
        report = write_report(os.path.join(self.output_dir, f"{name}.json"), metric_name, metric, predictions,
                              {**other, **(extra or {})})
        text = "".join(f", {key} = {value:.4f}" if isinstance(value, float) else f", {key} = {value}"
                       for key, value in other.items())
        if not dist.is_initialized() or dist.get_rank() == 0:  # once per run, not once per process
            logger.info("%s: %s = %.4f%s on %d samples", name, metric_name, metric, text, len(predictions))
        return report


def report_metrics(report: dict) -> dict:
    """The numbers of an evaluation report: its metrics (and a count of skipped bad samples), not the predictions
    nor the report's bookkeeping (num_samples, step, loss)."""
    return {key: value for key, value in report.items()
            if key not in ("num_samples", "predictions", "step", "loss") and isinstance(value, (int, float))}


def evaluate(model, processor, dataset, score, args, training_args, name: str) -> dict:
    """Evaluation.from_args(...).run(...): answers for `dataset`, scored, written to `<output_dir>/<name>.json`."""
    return Evaluation.from_args(dataset, score, args, training_args).run(model, processor, name)

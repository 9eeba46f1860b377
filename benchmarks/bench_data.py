"""Data-pipeline throughput: how many DocVQA-shaped samples a second the recipes' data path delivers, on the CPU alone.

The data are bench_train.py's synthetic document pages (five 1700x2200 letter scans for one 1000x1400 page, a
question and a short answer each), written once as a real data set on disk the way users have it: a jsonl file in
the project's format plus one PNG (or JPEG) file a page. They are read back with `phi3v.records.load_records` and go
through the recipes' data path: `phi3v.dataset.SFTDataset` (decode, HD transform, tokenize) and
`phi3v.collator.Phi3VDataCollator`, in a torch DataLoader built as the Trainer builds it (random sampler, the
recipe's per-GPU batch, pin_memory and prefetch settings, on a GPU machine the batch moved to the GPU), once for
each worker count: 0, 1, 2, 4, ... up to the CPU count, and the recipe's default (`--dataloader_num_workers`).

Measured:
  samples/s, images/s   over one pass of the whole data set, from creating the iterator (worker start-up
                        included, as at every epoch) to the last batch
  steady samples/s      after the first round (one batch per worker) has arrived: the workers' production rate
  stage ms / sample     after the loaders, in this process on one thread with a worker's memory settings:
                        decode (`load_record_images`), HD transform (the image processor), tokenize
                        (`tokenize_conversation` with the image features already computed), collate
                        (`Phi3VDataCollator`), and the whole `dataset[i]`; mean and median wall time, mean CPU time

The GPU consumes ~5-6.5 samples/s (bench_train.py's targets for one H100, num_crops 16); the data path must deliver
`--factor` (3) times `--gpu_rate` (6.5) with the default workers so that it is never the bottleneck.

    python benchmarks/bench_data.py                      # 48 samples, workers 0,1,2,4,...
    python benchmarks/bench_data.py --image_format jpeg  # JPEG pages instead of PNG
    python benchmarks/bench_data.py --small              # 6 samples, workers 0 and the default (the test)
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one text at a time: the Rust thread pool is not used

import torch
from docvqa_pages import PAGE_SIZES, docvqa_records
from report_file import write_report

EXTENSIONS = {"png": "PNG", "jpeg": "JPEG"}


# ------------------------------------------------------------------------------------------------ the data set
def write_dataset(directory: str, samples: int, image_format: str, seed: int) -> str:
    """`samples` records as `train.jsonl` (project format) + `images/*.png|jpg` in `directory`; returns the jsonl.

    Written again only when the settings differ from the folder's `settings.json`. Pages are made a size cycle
    (len(PAGE_SIZES)) at a time, so that only a few full-size pages are in memory at once.
    """
    settings = {"samples": samples, "image_format": image_format, "seed": seed, "page_sizes": PAGE_SIZES}
    jsonl = os.path.join(directory, "train.jsonl")
    settings_path = os.path.join(directory, "settings.json")
    if os.path.isfile(jsonl) and os.path.isfile(settings_path):
        with open(settings_path) as f:
            if json.load(f) == json.loads(json.dumps(settings)):
                return jsonl
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    extension = "jpg" if image_format == "jpeg" else "png"
    save_options = {"quality": 90} if image_format == "jpeg" else {}
    lines = []
    for start in range(0, samples, len(PAGE_SIZES)):
        for offset, record in enumerate(docvqa_records(min(len(PAGE_SIZES), samples - start), seed=seed + start)):
            index = start + offset
            name = f"page-{index:05d}.{extension}"
            record["images"][0].save(os.path.join(directory, "images", name), EXTENSIONS[image_format], **save_options)
            user, answer = (message["content"] for message in record["messages"])
            lines.append(json.dumps({"id": f"bench-data-{index}",
                                     "conversations": [{"images": [name], "user": user, "assistant": answer}]}))
    with open(jsonl, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(settings_path, "w") as f:
        json.dump(settings, f)
    return jsonl


def recipe_settings(argv: list[str]):
    """(recipe args, TrainingArguments) of the recipes' parser with `argv`: the defaults users get."""
    from phi3v.arguments import parse_args

    args, _, training_args = parse_args(argv=["--deepspeed", "none", "--report_to", "none", *argv])
    return args, training_args


# ------------------------------------------------------------------------------------------------ DataLoader
def seed_worker(worker_id: int) -> None:  # the Trainer seeds its workers too; a module-level function pickles
    torch.manual_seed(torch.initial_seed() % 2**32)


def make_loader(dataset, collator, training_args, batch_size: int, workers: int, seed: int):
    """A DataLoader as Trainer.get_train_dataloader builds it, with `workers` worker processes.

    pin_memory only where a GPU is (elsewhere the DataLoader would ignore it, with a warning).
    """
    generator = torch.Generator().manual_seed(seed)
    options = dict(
        batch_size=batch_size,
        sampler=torch.utils.data.RandomSampler(dataset, generator=generator),
        collate_fn=collator,
        num_workers=workers,
        pin_memory=bool(training_args.dataloader_pin_memory and torch.cuda.is_available()),
        drop_last=training_args.dataloader_drop_last,
    )
    if workers > 0:
        options.update(persistent_workers=training_args.dataloader_persistent_workers,
                       prefetch_factor=training_args.dataloader_prefetch_factor,
                       worker_init_fn=seed_worker)
    return torch.utils.data.DataLoader(dataset, **options)


def measure_loader(loader, workers: int) -> dict:
    """One pass over the loader: throughput from the iterator's creation to the last batch, and after the first
    round of batches (one per worker). On a GPU machine each batch is also moved to the GPU, as the Trainer does."""
    device = torch.device("cuda") if torch.cuda.is_available() else None
    samples, images, arrivals, counts = 0, 0, [], []
    start = time.perf_counter()
    for batch in loader:
        if device is not None:
            batch = {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
                     for key, value in batch.items()}
            torch.cuda.synchronize()
        samples += len(batch["sample_ids"]) if "sample_ids" in batch else batch["input_ids"].shape[0]
        images += batch["image_sizes"].shape[0] if "image_sizes" in batch else 0
        arrivals.append(time.perf_counter())
        counts.append(samples)
    seconds = arrivals[-1] - start
    first_round = min(max(workers, 1), len(arrivals)) - 1  # index of the batch that ends the first round
    after = counts[-1] - counts[first_round]
    steady_seconds = arrivals[-1] - arrivals[first_round]
    return {
        "workers": workers,
        "samples": samples,
        "images": images,
        "batches": len(arrivals),
        "seconds": seconds,
        "samples_per_second": samples / seconds,
        "images_per_second": images / seconds,
        "steady_samples_per_second": after / steady_seconds if after > 0 and steady_seconds > 0 else None,
        "first_batch_seconds": arrivals[0] - start,
    }


# ------------------------------------------------------------------------------------------------ stages
class _PrecomputedImages:
    """The processor, but its image processor returns features computed beforehand: `tokenize_conversation`
    then times only its text part (chat template, encoding, labels)."""

    def __init__(self, processor, features):
        self._processor = processor
        self.image_processor = lambda images, num_crops=None: features

    def __getattr__(self, name):
        return getattr(self._processor, name)


STAGES = ("decode", "hd_transform", "tokenize", "collate")


def measure_stages(dataset, collator, batch_size: int) -> dict:
    """Per-sample milliseconds of each stage of `dataset[i]` and of the collator, in this process on one thread (as
    in a DataLoader worker; call phi3v.image_processing.reuse_freed_memory first for a worker's memory settings),
    over every sample of the data set: mean and median wall time, and mean CPU time of
    this thread (what the stage costs on a core of its own, whatever else the machine runs). Nothing is kept from
    one batch to the next (as in a worker, which sends each batch away), so that memory is reused as it is there."""
    from phi3v.conversation import tokenize_conversation
    from phi3v.media import load_record_images

    wall = {stage: [] for stage in (*STAGES, "dataset_item")}
    cpu = {stage: [] for stage in wall}

    def now():
        return time.perf_counter(), time.thread_time()

    def record(stage, start, samples=1):  # a batch's time is shared out among its samples
        end = now()
        wall[stage] += [(end[0] - start[0]) / samples] * samples
        cpu[stage] += [(end[1] - start[1]) / samples] * samples
        return end

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    images_total, tokens_total, pending = 0, 0, []
    processor = dataset.processor
    try:
        for index in range(len(dataset)):
            record_ = dataset.record(index)
            clock = now()
            images, messages = load_record_images(record_, dataset.max_num_frames)
            clock = record("decode", clock)
            features = processor.image_processor(images, num_crops=dataset.num_crops)
            clock = record("hd_transform", clock)
            tokenize_conversation(_PrecomputedImages(processor, features), messages, images, dataset.num_crops,
                                  dataset.max_length)
            record("tokenize", clock)
            images_total += len(images)
            del images, features

            clock = now()
            example = dataset[index]  # the whole item, for comparison with the sum of the stages
            record("dataset_item", clock)
            tokens_total += len(example["input_ids"])
            pending.append(example)
            del example
            if len(pending) == batch_size or index == len(dataset) - 1:
                clock = now()
                collator(pending)
                record("collate", clock, len(pending))
                pending = []
    finally:
        torch.set_num_threads(threads)
    per_sample = {}
    for stage in wall:
        per_sample[f"{stage}_ms"] = 1000 * statistics.fmean(wall[stage])
        per_sample[f"{stage}_median_ms"] = 1000 * statistics.median(wall[stage])  # robust to other jobs' bursts
        per_sample[f"{stage}_cpu_ms"] = 1000 * statistics.fmean(cpu[stage])
    for kind in ("", "_median", "_cpu"):
        per_sample[f"sum_of_stages{kind}_ms"] = sum(per_sample[f"{stage}{kind}_ms"] for stage in STAGES)
    per_sample.update(samples=len(dataset), images=images_total, batch_size=batch_size, threads=1,
                      mean_tokens_per_sample=tokens_total / len(dataset))
    return per_sample


# ------------------------------------------------------------------------------------------------ report
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    import numpy
    import PIL
    import tokenizers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "pillow": PIL.__version__, "numpy": numpy.__version__, "tokenizers": tokenizers.__version__}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def worker_counts(spec: str | None, default: int, small: bool) -> list[int]:
    """0, 1, 2, 4, ... up to the CPU count, and the default count (--small: 0 and the default)."""
    if spec:
        counts = {int(value) for value in spec.split(",")}
    elif small:
        counts = {0, default}
    else:
        counts, n = {0}, 1
        while n <= (os.cpu_count() or 1):
            counts.add(n)
            n *= 2
        counts.add(default)
    return sorted(counts)


def format_table(report: dict) -> str:
    lines = []
    header = f"{'workers':>7} {'samples/s':>10} {'images/s':>9} {'steady/s':>9} {'first s':>8} {'vs GPU':>7}"
    lines += [header, "-" * len(header)]
    gpu_rate, default = report["settings"]["gpu_rate"], report["default_workers"]
    for row in report["loader"]:
        steady = "-" if row["steady_samples_per_second"] is None else f"{row['steady_samples_per_second']:.2f}"
        mark = "  <- default" if row["workers"] == default else ""
        lines.append(f"{row['workers']:>7} {row['samples_per_second']:>10.2f} {row['images_per_second']:>9.2f} "
                     f"{steady:>9} {row['first_batch_seconds']:>8.2f} {row['samples_per_second'] / gpu_rate:>6.2f}x"
                     f"{mark}")
    stages = report["stages"]
    lines.append("")
    lines.append(f"{'ms a sample, 1 thread':<22}" + "".join(f"{name:>14}" for name in (*STAGES, "sum")))
    for kind, label in (("", "wall, mean"), ("_median", "wall, median"), ("_cpu", "CPU time, mean")):
        values = [stages[f"{name}{kind}_ms"] for name in STAGES] + [stages[f"sum_of_stages{kind}_ms"]]
        lines.append(f"{label:<22}" + "".join(f"{value:>14.1f}" for value in values))
    lines.append(f"dataset[i] {stages['dataset_item_ms']:.1f} ms (wall, mean); one worker on a core of its own: "
                 f"~{1000 / stages['sum_of_stages_cpu_ms']:.1f} samples/s (from the CPU time)")
    return "\n".join(lines)


def parse_cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--small", action="store_true", help="6 samples, workers 0 and the default: a quick check")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples in the data set (default 48; 6 with --small)")
    parser.add_argument("--workers", default=None,
                        help="comma-separated worker counts (default 0,1,2,4,... up to the CPU count, and the default)")
    parser.add_argument("--image_format", choices=sorted(EXTENSIONS), default="png", help="page files (default png)")
    parser.add_argument("--num_crops", type=int, default=None, help="default: the recipes' (16)")
    parser.add_argument("--batch_size_per_gpu", type=int, default=None, help="default: the recipes' (1)")
    parser.add_argument("--gpu_rate", type=float, default=6.5,
                        help="samples/s one GPU consumes (6.5: the frozen-vision target on an H100, the fastest)")
    parser.add_argument("--factor", type=float, default=3.0, help="the data path must deliver this x gpu_rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=None,
                        help="where the data set is written (default /tmp/phi3v-bench-data-<format>-<samples>)")
    parser.add_argument("--output", default=None,
                        help="JSON results (default benchmarks/results/data-<cpu>[-small]-<date>.json)")
    args = parser.parse_args(argv)
    args.samples = args.samples or (len(PAGE_SIZES) if args.small else 48)
    args.data_dir = args.data_dir or f"/tmp/phi3v-bench-data-{args.image_format}-{args.samples}"
    return args


def main(argv=None):
    args = parse_cli(argv)
    from phi3v.collator import Phi3VDataCollator
    from phi3v.dataset import SFTDataset
    from phi3v.image_processing import reuse_freed_memory
    from phi3v.processing import packaged_processor
    from phi3v.records import load_records

    recipe_argv = ["--output_dir", os.path.join(args.data_dir, "run")]
    if args.num_crops is not None:
        recipe_argv += ["--num_crops", str(args.num_crops)]
    if args.batch_size_per_gpu is not None:
        recipe_argv += ["--batch_size_per_gpu", str(args.batch_size_per_gpu)]
    recipe, training_args = recipe_settings(recipe_argv)
    default_workers = training_args.dataloader_num_workers
    batch_size = training_args.per_device_train_batch_size

    start = time.perf_counter()
    jsonl = write_dataset(args.data_dir, args.samples, args.image_format, args.seed)
    print(f"data set: {jsonl} ({args.samples} samples, {args.image_format}; ready in "
          f"{time.perf_counter() - start:.1f} s)", flush=True)
    processor = packaged_processor(recipe.num_crops)
    dataset = SFTDataset(load_records(jsonl), processor, num_crops=recipe.num_crops,
                         max_length=recipe.max_seq_length)
    collator = Phi3VDataCollator(processor.pad_token_id)

    rows = []
    for workers in worker_counts(args.workers, default_workers, args.small):
        loader = make_loader(dataset, collator, training_args, batch_size, workers, args.seed)
        print(f"{workers} worker(s) ...", flush=True)
        rows.append(measure_loader(loader, workers))
        del loader
    # After the loaders: the stages are timed as in a worker, whose memory settings the image processor changes
    # (phi3v.image_processing.reuse_freed_memory); the 0-worker run above had this process's own.
    reuse_freed_memory()
    stages = measure_stages(dataset, collator, batch_size)
    mean_tokens = stages["mean_tokens_per_sample"]

    default_row = next((row for row in rows if row["workers"] == default_workers), None)
    required = args.factor * args.gpu_rate
    report = {
        "device": cpu_name(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "command": shlex.join([sys.executable] + sys.argv if argv is None else ["bench_data.py"] + list(argv)),
        "settings": {**{key: value for key, value in vars(args).items()}, "num_crops": recipe.num_crops,
                     "batch_size_per_gpu": batch_size,
                     "pin_memory": bool(training_args.dataloader_pin_memory and torch.cuda.is_available()),
                     "prefetch_factor": training_args.dataloader_prefetch_factor,
                     "persistent_workers": training_args.dataloader_persistent_workers,
                     "torch_threads": torch.get_num_threads()},
        "data_set": {"jsonl": jsonl, "samples": len(dataset), "mean_tokens_per_sample": mean_tokens,
                     "page_sizes": PAGE_SIZES},
        "default_workers": default_workers,
        "required_samples_per_second": required,
        "meets_target": None if default_row is None else default_row["samples_per_second"] >= required,
        "stages": stages,
        "loader": rows,
    }
    report["table"] = format_table(report)
    print(f"{len(dataset)} samples, {mean_tokens:.0f} tokens a sample, num_crops "
          f"{recipe.num_crops}, batch {batch_size}; {report['device']}, {report['usable_cores']} usable cores")
    print(report["table"])
    if default_row is not None:
        verdict = "meets" if report["meets_target"] else "does NOT meet"
        print(f"default workers ({default_workers}): {default_row['samples_per_second']:.2f} samples/s {verdict} "
              f"{args.factor:g} x {args.gpu_rate:g} = {required:.1f} samples/s")
    write_report(report, args.output, prefix="data-", small=args.small)
    return report


if __name__ == "__main__":
    main()

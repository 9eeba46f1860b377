"""What the layout benchmarks (bench_dpo.py, bench_grpo.py) share: the model sizes, one process per layout taking
turns step by step with the others (a change in the machine's load falls on all alike), the timing callback, the
profile's shares, the summary, the printed table and the report.

A benchmark gives each layout the recipe's command line (`recipe_argv`) and a `run_layout(spec)` that builds the
recipe's trainer in the worker process with `Turns` among its callbacks; `run_in_turns` starts the workers (the
benchmark's own script with `--_worker SPEC`) and hands the turns over.
"""

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from bench_train import device_name, versions  # beside this file
from report_file import write_report
from transformers import TrainerCallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the recipes run from the checkout
# The CPU config: wide enough that matrix products, not Python, take the time of a step (the profile says how much),
# small enough for a few steps a minute on two cores. The full size: language model 3072 x 32 layers (MLP 8192), CLIP
# 1024 x 24 (23 used), LoRA rank 128 (the recipes' default); here the rank shrinks with the width.
CPU_CONFIG = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, clip_width=256, clip_layers=4)
CPU_FLAGS = ["--lora_rank", "16", "--lora_alpha", "32"]
# Kernels that do a matrix product's work (linear layers, attention, the patch embedding), forward and backward.
MATRIX_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product",
              "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_flash_attention", "aten::_efficient")
# What trains (the recipes' strategy flags); a benchmark adds the flags of its reference model.
STRATEGIES = {
    "lora": ["--lora_enable"],
    "vision_lora": ["--lora_enable", "--vision_lora"],
    "full": [],
    "frozen": ["--freeze_vision_tower"],
}
MODELS = {"full": "official Phi-3.5-vision config, random weights", "tiny": "tiny test config (phi3v.tiny)",
          "cpu": f"CPU config {CPU_CONFIG}"}


# ------------------------------------------------------------------------------------------------ the model
def write_checkpoint(size: str, folder: str, num_crops: int) -> None:
    """The model folder of a size: the official config with random bf16 weights, or the CPU / tiny config."""
    from phi3v.processing import packaged_processor
    from phi3v.tiny import write_tiny_checkpoint

    if size == "full":
        from bench_load import write_random_checkpoint

        write_random_checkpoint(folder)
        packaged_processor(num_crops).save_pretrained(folder)
        return
    overrides = {}
    if size == "cpu":
        overrides = {k: v for k, v in CPU_CONFIG.items() if not k.startswith("clip_")}
        width = CPU_CONFIG["clip_width"]
        vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=CPU_CONFIG["clip_layers"],
                      num_attention_heads=width // 64, image_size=336, patch_size=14, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5, num_channels=3)
        overrides["img_processor"] = {"image_dim_out": width, "model_name": "openai/clip-vit-large-patch14-336",
                                      "name": "clip_vision_model", "num_img_tokens": 144, "vision_config": vision}
    write_tiny_checkpoint(folder, num_crops=num_crops, **overrides)


def checkpoint_folder(args) -> str:
    """--checkpoint, or the size's folder under --work_dir, written the first time."""
    name = f"checkpoint-{args.size}" + ("".join(f"-{v}" for v in CPU_CONFIG.values()) if args.size == "cpu" else "")
    checkpoint = args.checkpoint or os.path.join(args.work_dir, name)  # a changed CPU_CONFIG: another folder
    if not os.path.isfile(os.path.join(checkpoint, "preprocessor_config.json")):
        start = time.time()
        write_checkpoint(args.size, checkpoint, args.num_crops)
        print(f"wrote the checkpoint {checkpoint} in {time.time() - start:.0f} s", flush=True)
    return checkpoint


# ------------------------------------------------------------------------------------------------ one layout
class Turns(TrainerCallback):
    """Takes turns with the other layout's process: waits for its turn before building its next batch (or at the
    step's start), hands it back at the step's end with the time it held it. The parent process writes one byte to
    `go_fd` per turn and reads one from `done_fd`; when it has given its last turn (end of file), the process runs
    on without waiting."""

    def __init__(self, go_fd: int, done_fd: int, profile_step: int | None):
        self.go_fd, self.done_fd, self.profile_step = go_fd, done_fd, profile_step
        self.cuda = torch.cuda.is_available()
        self.held, self.free = False, False
        self.turns, self.profile, self.profiler = [], None, None

    def take(self) -> None:
        if self.held or self.free:
            return
        if not os.read(self.go_fd, 1):
            self.free = True
            return
        self.held, self.start, self.start_cpu = True, time.perf_counter(), time.process_time()

    def collator(self, collate):
        def collate_in_turn(examples):
            self.take()
            return collate(examples)

        return collate_in_turn

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.cuda and os.path.exists("/proc/self/clear_refs"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the resident-set high-water mark from here: training's, not loading's

    def on_step_begin(self, args, state, control, **kwargs):
        self.take()
        self.step_start = time.perf_counter()
        if state.global_step == self.profile_step:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        if self.profiler is not None:
            self.profiler.stop()
            self.profile = time_shares(self.profiler, end - self.step_start)
            self.profiler = None
        else:
            held = self.held  # the turn: wall time, and the CPU time of this process (all its threads)
            self.turns.append({"turn": end - self.start if held else None, "step": end - self.step_start,
                               "turn_cpu": time.process_time() - self.start_cpu if held else None})
        if self.held:
            self.held = False
            os.write(self.done_fd, b".")


def time_shares(profiler, seconds: float) -> dict:
    """Where a profiled step's time went: matrix products and attention kernels, other ATen ops, the rest (Python,
    the autograd engine, the Trainer). Self times of the ops on the step's thread (CPU: backward runs there too)."""
    matrix = other = 0.0
    events = [event for event in profiler.key_averages() if event.key.startswith("aten::")]
    for event in events:
        if event.key.startswith(MATRIX_OPS):
            matrix += event.self_cpu_time_total / 1e6
        else:
            other += event.self_cpu_time_total / 1e6
    return {"seconds": seconds, "matrix_products": matrix / seconds, "other_aten_ops": other / seconds,
            "outside_aten": max(0.0, 1 - (matrix + other) / seconds),
            "top_ops_seconds": {event.key: round(event.self_cpu_time_total / 1e6, 4) for event in sorted(
                events, key=lambda event: -event.self_cpu_time_total)[:10]}}


def recipe_setup(recipe, spec: dict) -> SimpleNamespace:
    """A recipe's set-up in a worker, as its run() does it: its flags (spec["argv"]), the processor, the tokenized
    samples, the model and the optimizer; with the Turns callback of the worker (as `clock`)."""
    from phi3v.optim import build_optimizer
    from phi3v.processing import Phi3VProcessor
    from phi3v.training import model_for_training

    args, task, training_args = recipe.parse(spec["argv"])
    processor = Phi3VProcessor.from_pretrained(args.model_name_or_path, num_crops=args.num_crops)
    samples = torch.load(spec["samples"], weights_only=True)  # tensors, lists, str, int only: no pickled code
    model = model_for_training(args, training_args, task.model_plan(args))
    optimizer = build_optimizer(model, training_args, vision_lr=task.vision_lr, projector_lr=task.projector_lr)
    return SimpleNamespace(args=args, task=task, training_args=training_args, processor=processor, samples=samples,
                           model=model, optimizer=optimizer,
                           clock=Turns(spec["go_fd"], spec["done_fd"], spec["profile_step"]))


def layout_row(spec: dict, turns: Turns, model, first: dict) -> dict:
    """A worker's result after trainer.train(): its turns, profile, first batch's numbers, peak memory, model."""
    from phi3v.callbacks import peak_memory_gb
    from phi3v.model_setup import count_parameters

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    trainable, total = count_parameters(model)
    return {"layout": spec["layout"], "device": device_name(), "turns": turns.turns, "profile": turns.profile,
            "first_batch": first,
            "peak_memory_gb": peak_memory_gb(), "attention": base.config._attn_implementation,
            "trainable_parameters": trainable, "parameters": total}


def worker_main(spec_path: str, run_layout) -> None:
    """A worker process: `run_layout(spec)` of the spec written by run_in_turns, its row written as JSON."""
    with open(spec_path) as f:
        spec = json.load(f)
    result = run_layout(spec)
    with open(spec["result"], "w") as f:
        json.dump(result, f, indent=2)


# ------------------------------------------------------------------------------------------------ all, in turns
def recipe_argv(args, checkpoint: str, samples: str, layout: str, shared_prefix: str, batch_size: int,
                strategy_flags=()) -> list[str]:
    """A recipe's command line of one layout (`--shared_prefix True` / `False`): the same data in the same order,
    no logging, saving or evaluation inside the measured steps, SDPA attention for every layout."""
    steps = args.warmup + args.steps + (1 if args.profile else 0)
    argv = [
        "--model_name_or_path", checkpoint, "--data_path", samples,  # the samples come tokenized: data_path is unread
        "--output_dir", os.path.join(args.work_dir, "runs", layout), "--overwrite_output_dir",
        "--shared_prefix", shared_prefix, "--num_crops", str(args.num_crops),
        "--batch_size", str(batch_size), "--batch_size_per_gpu", str(batch_size),
        "--max_steps", str(steps), "--logging_steps", str(steps + 1),  # no logging inside the measured steps
        "--deepspeed", "none", "--report_to", "none", "--save_strategy", "no", "--no_tqdm", "--seed", str(args.seed),
        "--train_sampling_strategy", "sequential", "--dataloader_num_workers", "0",  # the same samples in turn
        "--disable_flash_attn2",  # the same attention for all: the shared rows cannot use flash-attn
    ]
    if torch.cuda.is_available():
        argv.append("--bf16")
    return argv + list(strategy_flags) + (CPU_FLAGS if args.size == "cpu" else []) + shlex.split(args.extra_args)


def run_in_turns(args, script: str, argvs: dict, samples: str) -> list[dict]:
    """Start a process per layout (`script --_worker SPEC`; on a GPU each where there are several) and give them
    turns, alternating which goes first: AB BA AB ... `argvs`: each layout's recipe command line."""
    workers = {}
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(torch.cuda.device_count())))).split(",")
    for index, (layout, argv) in enumerate(argvs.items()):
        env = dict(os.environ)
        if len(gpus) > 1:  # a GPU each: both layouts' memory need not fit on one
            env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        go_read, go_write = os.pipe()
        done_read, done_write = os.pipe()
        profile_step = args.warmup + args.steps if args.profile else None
        spec = dict(layout=layout, argv=argv, samples=samples, go_fd=go_read, done_fd=done_write,
                    profile_step=profile_step, result=os.path.join(args.work_dir, f"{layout}.result.json"))
        spec_path = os.path.join(args.work_dir, f"{layout}.spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        if os.path.exists(spec["result"]):
            os.remove(spec["result"])
        log_path = os.path.join(args.work_dir, f"{layout}.log")
        log = open(log_path, "w")
        process = subprocess.Popen([sys.executable, os.path.abspath(script), "--_worker", spec_path],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                   pass_fds=(go_read, done_write))
        os.close(go_read)
        os.close(done_write)
        workers[layout] = dict(process=process, go=go_write, done=done_read, log=log, log_path=log_path, spec=spec)
    turns = args.warmup + args.steps + (1 if args.profile else 0)
    order = list(argvs)
    failed = None
    for turn in range(turns):
        for layout in order if turn % 2 == 0 else order[::-1]:
            worker = workers[layout]
            os.write(worker["go"], b".")
            if not os.read(worker["done"], 1):  # it ended without finishing its step
                failed = layout
                break
        if failed:
            break
        print(f"turn {turn + 1}/{turns} done", flush=True)
    rows = []
    for layout, worker in workers.items():
        os.close(worker["go"])  # no more turns: a worker still waiting runs on, or sees the end
        status = worker["process"].wait()
        worker["log"].close()
        os.close(worker["done"])
        if status != 0:
            with open(worker["log_path"]) as f:
                print(f.read()[-3000:], file=sys.stderr)
            rows.append({"layout": layout, "error": f"exit status {status}, see {worker['log_path']}"})
            continue
        with open(worker["spec"]["result"]) as f:
            rows.append(json.load(f))
    return rows


def summarize(rows: list[dict], args, rate_key: str, per_step: int, compare) -> dict:
    """Medians over the measured turns, `rate_key` (per_step samples / median turn seconds), and the ratio of the
    first layout (shared) to the second: of the medians, and the median of the turn-by-turn ratios. `compare(shared,
    other)`: the benchmark's check that both did the same work (entries of the summary)."""
    for row in rows:
        if "error" in row:
            continue
        measured = row["turns"][args.warmup:args.warmup + args.steps]
        row["measured_turns"] = len(measured)
        row["median_turn_seconds"] = statistics.median(t["turn"] for t in measured)
        row["median_step_seconds"] = statistics.median(t["step"] for t in measured)
        row[rate_key] = per_step / row["median_turn_seconds"]
        if not torch.cuda.is_available():  # on a shared CPU less disturbed by other jobs than the wall time
            row["median_turn_cpu_seconds"] = statistics.median(t["turn_cpu"] for t in measured)
    if any("error" in row for row in rows):
        return {}
    shared, other = rows
    turns = list(zip(shared["turns"], other["turns"]))[args.warmup:args.warmup + args.steps]
    summary = {
        "speedup": shared[rate_key] / other[rate_key],
        "median_turn_ratio": statistics.median(b["turn"] / a["turn"] for a, b in turns),
        "memory_ratio": other["peak_memory_gb"] / shared["peak_memory_gb"],
        **compare(shared, other),
    }
    if "median_turn_cpu_seconds" in shared:
        summary["cpu_time_ratio"] = other["median_turn_cpu_seconds"] / shared["median_turn_cpu_seconds"]
        summary["median_turn_cpu_ratio"] = statistics.median(b["turn_cpu"] / a["turn_cpu"] for a, b in turns)
    return summary


def format_table(rows: list[dict], summary: dict, rate_key: str, rate: str, other: str, unit: str) -> str:
    """The printed table: a row per layout (`rate` the column name of `rate_key`), then the ratios of the first
    layout to the `other` (its name in words) and the CPU time `unit` ("a pair") takes."""
    header = f"{'layout':<13} {rate:>8} {'turn s':>8} {'step s':>8} {'CPU s':>7} {'peak GB':>8}  {'matmul':>7} " \
             f"{'other':>6} {'python':>7}"
    lines = [header, "-" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['layout']:<13} failed: {row['error']}")
            continue
        profile = row.get("profile")
        shares = (f"{100 * profile['matrix_products']:>6.1f}% {100 * profile['other_aten_ops']:>5.1f}% "
                  f"{100 * profile['outside_aten']:>6.1f}%") if profile else f"{'-':>7} {'-':>6} {'-':>7}"
        cpu = row.get("median_turn_cpu_seconds")
        lines.append(f"{row['layout']:<13} {row[rate_key]:>8.4f} {row['median_turn_seconds']:>8.3f} "
                     f"{row['median_step_seconds']:>8.3f} {'-' if cpu is None else format(cpu, '.2f'):>7} "
                     f"{row['peak_memory_gb']:>8.2f}  {shares}")
    if summary:
        lines.append(f"shared / {other}: {summary['speedup']:.2f}x {rate} (median of the turn-by-turn ratios "
                     f"{summary['median_turn_ratio']:.2f}x), {summary['memory_ratio']:.2f}x less peak memory")
        if "cpu_time_ratio" in summary:
            lines.append(f"CPU time {unit}, {other} / shared: {summary['cpu_time_ratio']:.2f}x (median of the "
                         f"turn-by-turn ratios {summary['median_turn_cpu_ratio']:.2f}x)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ command line
def make_parser(description: str, name: str, steps: tuple[int, int], warmup: tuple[int, int], samples: str,
                strategies: dict, strategy_help: str):
    """The parser of a layout benchmark with the options every one takes; steps and warmup: the defaults (on a GPU,
    on a CPU); name: "dpo", its work folder's and report's name; samples: what a step trains on ("pairs": the
    options --pairs_per_step and --pairs); strategies: the --strategy choices."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--size", choices=("full", "cpu", "tiny"), default=None,
                        help="full: the official config (default on a GPU); cpu: the CPU config (default without "
                             "one); tiny: the test config (phi3v.tiny)")
    parser.add_argument("--strategy", choices=tuple(strategies), default="lora", help=strategy_help)
    parser.add_argument("--steps", type=int, default=None,
                        help=f"measured turns of each layout (default {steps[0]}; {steps[1]} on a CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"turns of each layout before measuring (default {warmup[0]}; {warmup[1]} on a CPU)")
    parser.add_argument(f"--{samples}_per_step", type=int, default=1,
                        help=f"{samples} a micro-batch and an optimizer step")
    parser.add_argument(f"--{samples}", type=int, default=None, help=f"distinct {samples} (default: one per step)")
    parser.add_argument("--num_crops", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="one more step of each layout under torch.profiler (default: on a CPU)")
    parser.add_argument("--extra_args", default="",
                        help="more recipe flags for both layouts, after '=': --extra_args='--lora_rank 64'")
    parser.add_argument("--checkpoint", default=None, help="an existing model folder (default: written once)")
    parser.add_argument("--work_dir", default=None,
                        help=f"checkpoint, samples, logs (default /tmp/phi3v-bench-{name})")
    parser.add_argument("--output", default=None,
                        help=f"JSON results (default benchmarks/results/{name}-[<size>-config-]<device>-<date>.json)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(_defaults=(steps, warmup, f"/tmp/phi3v-bench-{name}", samples))
    return parser


def parse(parser: argparse.ArgumentParser, argv=None):
    """The options of a make_parser parser, with their device-dependent defaults and the number of distinct
    samples resolved."""
    args = parser.parse_args(argv)
    (steps, warmup, work_dir, samples), gpu = args._defaults, torch.cuda.is_available()
    del args._defaults
    args.size = args.size or ("full" if gpu else "cpu")
    args.steps = args.steps or (steps[0] if gpu else steps[1])
    args.warmup = (warmup[0] if gpu else warmup[1]) if args.warmup is None else args.warmup
    args.profile = not gpu if args.profile is None else args.profile
    args.work_dir = args.work_dir or work_dir
    per_step = getattr(args, f"{samples}_per_step")
    setattr(args, samples, getattr(args, samples) or (args.warmup + args.steps + 1) * per_step)
    return args


@dataclass
class Benchmark:
    """What `main` needs of a layout benchmark."""

    name: str  # "dpo": the report's name prefix
    script: str  # its file: the workers run it with --_worker SPEC
    layouts: dict  # layout name -> the recipe's --shared_prefix (the shared layout first)
    run_layout: Callable  # spec -> its row (in a worker, after trainer.train())
    prepare: Callable  # args -> (checkpoint, tokenized samples' path, their sizes)
    describe: Callable  # (args, sizes) -> a line on the data
    recipe_flags: Callable  # args -> (the recipe's --batch_size, its other flags)
    per_step: Callable  # args -> samples (pairs, groups) a step
    compare: Callable  # (shared row, other row) -> summary entries: the check that both did the same work
    rate_key: str  # "pairs_per_second"
    rate: str  # "pairs/s"
    other: str  # the other layout in words: "two-sequence"
    unit: str  # "a pair"
    samples_key: str  # the report's key of the sizes: "pairs"


def main(bench: Benchmark, args, argv) -> None:
    """Run a benchmark's layouts in turns (or, with --_worker, one layout), print the table, write the report."""
    if args._worker:
        return worker_main(args._worker, bench.run_layout)
    os.makedirs(args.work_dir, exist_ok=True)
    checkpoint, samples, sizes = bench.prepare(args)
    print(bench.describe(args, sizes), flush=True)
    batch_size, flags = bench.recipe_flags(args)
    argvs = {layout: recipe_argv(args, checkpoint, samples, layout, flag, batch_size, flags)
             for layout, flag in bench.layouts.items()}
    rows = run_in_turns(args, bench.script, argvs, samples)
    summary = summarize(rows, args, bench.rate_key, bench.per_step(args), bench.compare)
    table = format_table(rows, summary, bench.rate_key, bench.rate, bench.other, bench.unit)
    print(table)
    report = build_report(args, argv, os.path.basename(bench.script), {bench.samples_key: sizes}, rows, summary,
                          table)
    write_report(report, args.output, prefix=f"{bench.name}-" if args.size == "full" else
                 f"{bench.name}-{args.size}-config-")
    if not summary:
        raise SystemExit(1)


def build_report(args, argv, script: str, samples: dict, rows: list[dict], summary: dict, table: str) -> dict:
    """The JSON report: device, date, library versions, command, model, settings, `samples` (a key or more: the
    data's sizes), the rows, the summary and the table."""
    return {
        "device": device_name(),
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "command": shlex.join([sys.executable] + sys.argv if argv is None else [script] + list(argv)),
        "model": MODELS[args.size],
        "settings": {key: value for key, value in vars(args).items() if not key.startswith("_")},
        **samples,
        "results": rows,
        "summary": summary,
        "table": table,
    }

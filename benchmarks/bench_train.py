"""Training throughput of each strategy (full, frozen vision, LoRA, QLoRA) and of a stock \
baseline, on DocVQA-shaped data.

Every run goes through the code path of the recipes: `phi3v.arguments.parse_args(argv=[...])`, `model_for_training`,
`make_trainer`, `trainer.train()` (no DeepSpeed, no reporting, no saving, no evaluation), each in a fresh process
so that its peak memory is its own. The model is the official Phi-3.5-vision config with random weights (`--small`:
the tiny test config, so that it runs on a CPU), written once as a checkpoint folder with its processor.

The data: synthetic document pages of real DocVQA sizes (five 1700x2200 letter scans for one 1000x1400 page), a
question and a short answer; with num_crops 16 that is ~2440 tokens a sample, 13-17 of them CLIP crops.

Measured over the `--steps` optimizer steps after `--warmup` steps:
  img/s, tok/s   images and real (unpadded) tokens that entered the model, over the wall time
  MFU            model FLOPs/s over `--peak_tflops` (see `ModelFlops` for the formula)
  peak GB        torch.cuda.max_memory_allocated on a GPU, the process's max RSS on a CPU
  vision/lang/optim ms   per optimizer step: CLIP + projector (forward and backward), the rest of forward and
                 backward (language model, loss, gradient clipping), optimizer.step. On a GPU only with
                 `--breakdown`, which synchronizes in the timing hooks (and so slows the step a little).

The baseline ("stock") is the full strategy run the way stock implementations do it: eager attention, logits for
every position then cross-entropy (instead of `lm_head` at the supervised positions only), and CLIP over all
num_crops + 1 crop slots of every image, zero padding included (instead of the used crops only). Same data, seed
and TrainingArguments, so its first loss equals the full strategy's and both do the same useful work.

    python benchmarks/bench_train.py --small                         # CPU, tiny model
    python benchmarks/bench_train.py --strategies full --breakdown   # one GPU, full size
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import torch
from docvqa_pages import PAGE_SIZES, docvqa_records  # beside this file (shared with bench_data.py)
from report_file import write_report
from transformers import TrainerCallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the recipes run from the checkout

STRATEGIES = {"full": [], "frozen": ["--freeze_vision_model"], "lora": ["--use_lora"], "qlora": ["--use_qlora"]}
BASELINE = "stock"  # the name of the baseline run (the full strategy, done the stock way)

# (forward + backward) FLOPs over forward FLOPs, per part of the model and strategy. A matmul's backward costs one
# forward for the gradient of its input (needed when anything before it trains) and one for the gradient of its
# weight (when the weight trains); attention's QK^T and AV have two input gradients each. Frozen vision: CLIP
# runs forward only. LoRA: base weights get no gradient; the adapters' own FLOPs (~3% at r64) are not counted.
FLOP_FACTORS = {
    "full": dict(lm=3, lm_attn=3, head=3, clip=3, clip_attn=3, patch=2, projector=3),
    "frozen": dict(lm=3, lm_attn=3, head=3, clip=1, clip_attn=1, patch=1, projector=2),
    "lora": dict(lm=2, lm_attn=3, head=2, clip=2, clip_attn=3, patch=1, projector=2),
}
FLOP_FACTORS["qlora"] = FLOP_FACTORS["lora"]
FLOP_FACTORS[BASELINE] = FLOP_FACTORS["full"]

# ------------------------------------------------------------------------------------------------ data
def prepare(args) -> tuple[str, str, float]:
    """Write the checkpoint (once) and the tokenized samples; return their paths and the mean tokens a sample."""
    from phi3v.dataset import SFTDataset
    from phi3v.processing import packaged_processor

    checkpoint = os.path.join(args.work_dir, "checkpoint")
    if not os.path.isfile(os.path.join(checkpoint, "preprocessor_config.json")):
        start = time.time()
        if args.small:
            from phi3v.tiny import write_tiny_checkpoint

            write_tiny_checkpoint(checkpoint, num_crops=args.num_crops)
        else:
            from bench_load import write_random_checkpoint  # official layout, bf16 shards, one in memory at a time

            write_random_checkpoint(checkpoint)
            packaged_processor(args.num_crops).save_pretrained(checkpoint)
        print(f"wrote the checkpoint {checkpoint} in {time.time() - start:.0f} s", flush=True)
    # Tokenized and image-processed once, by the dataset class the recipes use: the benchmark measures the
    # model's step, not the DataLoader's image processing.
    dataset = SFTDataset(docvqa_records(args.samples), packaged_processor(args.num_crops), num_crops=args.num_crops)
    examples = [dataset[i] for i in range(len(dataset))]
    samples = os.path.join(args.work_dir, "samples.pt")
    torch.save(examples, samples)
    return checkpoint, samples, sum(len(e["input_ids"]) for e in examples) / len(examples)


# ------------------------------------------------------------------------------------------------ FLOPs
class ModelFlops:
    """Model FLOPs of the batches that enter the model (no sync: the counts stay device tensors until `total`).

    Forward FLOPs, 2 per multiply-add, over real tokens (padding excluded) and the crops actually used:
      language  2 x (decoder matmul params) x T  +  2 x layers x hidden x T^2 (causal attention: half of T x T)
      lm_head   2 x hidden x vocab x (supervised tokens): the loss needs no other logits
      CLIP      per used crop (global view + grid): 2 x (used layers' matmul params) x 577 + 4 x layers x width
                x 577^2 (attention), + 2 x 588 x width x 576 (patch embedding)
      projector 2 x (4 x clip_width x hidden + hidden^2) per image token
    each times FLOP_FACTORS[strategy] for the backward. Activation-checkpointing recomputation is not counted
    (MFU, not hardware FLOPs utilisation), nor the stock baseline's extra work (padding crops, all logits).
    """

    def __init__(self, config, layers_used: int, strategy: str):
        d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        head_dim = d // heads
        vision = config.vision_config
        width, patches = vision.hidden_size, (vision.image_size // vision.patch_size) ** 2
        self.factors = FLOP_FACTORS[strategy]
        self.lm_params = config.num_hidden_layers * (
            d * (heads + 2 * kv) * head_dim + heads * head_dim * d + 3 * d * config.intermediate_size
        )
        self.lm_attn = 2 * config.num_hidden_layers * d  # x T^2
        self.head_params = d * config.vocab_size
        clip_tokens = patches + 1
        self.crop = dict(
            clip=2 * layers_used * (4 * width**2 + 2 * width * vision.intermediate_size) * clip_tokens,
            clip_attn=4 * layers_used * width * clip_tokens**2,
            patch=2 * 3 * vision.patch_size**2 * width * patches,
        )
        self.projector_params = 4 * width * d + d * d
        self.crop_size = vision.image_size
        self.counts = {}

    def add(self, attention_mask=None, image_sizes=None, labels=None, lengths=None) -> None:
        """lengths: the samples' real token counts (a packed row's, from its boundaries); else from attention_mask."""
        counts = {}
        if lengths is None and attention_mask is not None:
            lengths = attention_mask.sum(dim=1)
        if lengths is not None:
            lengths = lengths.long()
            counts.update(tokens=lengths.sum(), tokens_squared=(lengths**2).sum())
        if image_sizes is not None:
            rows, cols = image_sizes[:, 0] // self.crop_size, image_sizes[:, 1] // self.crop_size
            crops = rows * cols + 1
            counts.update(crops=crops.sum(), image_tokens=(crops * 144 + 1 + (rows + 1) * 12).sum())
        if labels is not None:
            counts["supervised"] = (labels[:, 1:] != -100).sum()
        for key, value in counts.items():
            self.counts[key] = self.counts.get(key, 0) + value

    def reset(self) -> None:
        self.counts = {}

    def total(self) -> float:
        c = {key: float(value) for key, value in self.counts.items()}
        f = self.factors
        flops = (
            f["lm"] * 2 * self.lm_params * c.get("tokens", 0)
            + f["lm_attn"] * self.lm_attn * c.get("tokens_squared", 0)
        )
        flops += f["head"] * 2 * self.head_params * c.get("supervised", 0)
        flops += sum(f[part] * per_crop for part, per_crop in self.crop.items()) * c.get("crops", 0)
        flops += f["projector"] * 2 * self.projector_params * c.get("image_tokens", 0)
        return flops


# ------------------------------------------------------------------------------------------------ timing
class StepTimer(TrainerCallback):
    """Throughput over the steps after warm-up, model FLOPs, and the step-time breakdown.

    Vision time: forward between hooks around `vision_embed_tokens`; backward from the moment the gradient reaches
    the image features to the moment all of the vision parameters' gradients are computed (a multi-grad hook).
    Optimizer: on_pre_optimizer_step -> on_optimizer_step. Language (and the rest): the step's forward and backward
    minus vision. On a GPU these need a synchronize at every mark: only with `breakdown`.
    """

    def __init__(self, warmup: int, flops: ModelFlops, breakdown: bool):
        self.warmup, self.flops = warmup, flops
        self.cuda = torch.cuda.is_available()
        self.breakdown = breakdown or not self.cuda  # on a CPU the marks cost nothing
        self.measuring, self.first_loss, self.first_batch = False, None, None
        self.images, self.tokens = 0, 0
        self.times = dict(vision_forward=0.0, vision_backward=0.0, step=0.0, optimizer=0.0)
        self._marks = {}

    def now(self, sync: bool | None = None) -> float:
        """The time; on a GPU after the queued work is done when `sync` (default: when breaking the step down)."""
        if self.cuda and (self.breakdown if sync is None else sync):
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        vision = base.model.vision_embed_tokens
        model.register_forward_pre_hook(self._count, with_kwargs=True)
        model.register_forward_hook(self._first_loss)
        model.register_forward_pre_hook(self._first_batch, with_kwargs=True)
        vision.register_forward_pre_hook(lambda module, inputs: self._mark("vision_forward"))
        vision.register_forward_hook(self._vision_output)
        trainable = [p for p in vision.parameters() if p.requires_grad]
        if trainable:
            torch.autograd.graph.register_multi_grad_hook(trainable, self._vision_backward_done)

    def _mark(self, name):
        self._marks[name] = self.now()

    def _count(self, module, args, kwargs):
        if not (module.training and self.measuring):
            return
        image_sizes, mask, bounds = kwargs.get("image_sizes"), kwargs.get("attention_mask"), kwargs.get("cu_seq_lens_q")
        self.images += 0 if image_sizes is None else image_sizes.shape[0]
        # Padded batches: the attention mask's tokens; packed rows (--packing) have no padding: their boundaries.
        lengths = bounds.diff() if bounds is not None else mask.sum(dim=1)
        self.tokens += lengths.sum()  # a device tensor: read once at the end
        self.flops.add(image_sizes=image_sizes, labels=kwargs.get("labels"), lengths=lengths)

    def _first_loss(self, module, args, output):
        if module.training and self.first_loss is None and getattr(output, "loss", None) is not None:
            self.first_loss = output.loss.item()

    def _first_batch(self, module, args, kwargs):
        if module.training and self.first_batch is None:
            sizes, pixel_values = kwargs.get("image_sizes"), kwargs.get("pixel_values")
            crop = self.flops.crop_size
            used = [(h // crop) * (w // crop) + 1 for h, w in sizes.tolist()] if sizes is not None else []
            self.first_batch = {"image_sizes": sizes.tolist() if sizes is not None else [],
                                "padding_crops": sum(pixel_values.shape[1] - n for n in used)}

    def _vision_output(self, module, args, output):
        if self.measuring:
            self.times["vision_forward"] += self.now() - self._marks["vision_forward"]
        if output.requires_grad:
            output.register_hook(lambda grad: self._mark("vision_backward"))

    def _vision_backward_done(self, grads):
        if self.measuring and "vision_backward" in self._marks:
            self.times["vision_backward"] += self.now() - self._marks.pop("vision_backward")

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:  # the measured steps start here
            self.measuring = True
            self.start = self.now(sync=True)  # the warm-up steps' queued work is done
        self._mark("step")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._mark("pre_optimizer")

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.measuring:
            now = self.now()
            self.times["optimizer"] += now - self._marks["pre_optimizer"]
            self.times["step"] += self._marks["pre_optimizer"] - self._marks["step"]

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = self.now(sync=True) - self.start
        self.steps = state.global_step - self.warmup

    def result(self) -> dict:
        per_step = {key: 1000 * value / max(self.steps, 1) for key, value in self.times.items()}
        per_step["vision"] = per_step["vision_forward"] + per_step["vision_backward"]
        measured = self.breakdown
        return {
            "images_per_second": self.images / self.seconds,
            "tokens_per_second": float(self.tokens) / self.seconds,
            "model_tflops_per_second": self.flops.total() / self.seconds / 1e12,
            "measured_steps": self.steps,
            "seconds": self.seconds,
            "vision_ms": per_step["vision"] if measured else None,
            "vision_forward_ms": per_step["vision_forward"] if measured else None,
            "language_ms": per_step["step"] - per_step["vision"] if measured else None,
            "optimizer_ms": per_step["optimizer"] if measured else None,
            "first_loss": self.first_loss,
            "first_batch": self.first_batch,
        }


# ------------------------------------------------------------------------------------------------ the stock baseline
def full_logits_loss(timer: StepTimer):
    """Trainer's `compute_loss_func`: the model runs without labels (so it returns logits for every position) and
    the loss is the shifted cross-entropy over all of them, as stock causal LMs compute it."""
    import torch.nn.functional as F

    def loss_func(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits.float()
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
        if timer.measuring:
            timer.flops.add(labels=labels)  # the labels never reach the model's counting hook here
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != -100).sum())
        if timer.first_loss is None:
            timer.first_loss = loss.item()
        return loss

    return loss_func


def run_clip_on_every_slot(embedding) -> None:
    """Make `embedding` run CLIP over every crop slot of every image, zero padding included (as the reference
    implementation does), then keep the used crops' features: the same result for more work."""
    clip_used_crops = embedding.clip_features
    batch = {}

    def remember_images(module, args):
        batch["pixel_values"], batch["image_sizes"] = args  # Phi3VModel.embed passes both positionally

    def clip_features(crops):
        pixel_values = batch["pixel_values"]
        features = clip_used_crops(pixel_values.flatten(0, 1).to(crops.dtype)).unflatten(0, pixel_values.shape[:2])
        used = [(h // embedding.crop_size) * (w // embedding.crop_size) + 1 for h, w in batch["image_sizes"].tolist()]
        return torch.cat([image[:n] for image, n in zip(features, used)])

    embedding.register_forward_pre_hook(remember_images)
    embedding.clip_features = clip_features


# ------------------------------------------------------------------------------------------------ one run
def run(spec: dict) -> dict:
    """One strategy (or the baseline), in this process: the recipe's code path, timed."""
    from phi3v.arguments import parse_args
    from phi3v.callbacks import peak_memory_gb
    from phi3v.model_setup import count_parameters
    from phi3v.processing import Phi3VProcessor
    from phi3v.training import make_trainer, model_for_training

    name = spec["name"]
    strategy = "full" if name == BASELINE else name
    args, _, training_args = parse_args(argv=spec["argv"] + STRATEGIES[strategy])
    model = model_for_training(args, training_args)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.model.vision_embed_tokens
    timer = StepTimer(spec["warmup"], ModelFlops(base.config, embedding.layers_used, name), spec["breakdown"])
    if name == BASELINE:
        model.set_attn_implementation("eager")  # the language model and CLIP
        run_clip_on_every_slot(embedding)
    processor = Phi3VProcessor.from_pretrained(args.model_name_or_path, num_crops=args.num_crops)
    train_dataset = torch.load(spec["samples"], weights_only=True)  # tensors, lists, dicts, str only: no pickled code
    trainer = make_trainer(model, training_args, train_dataset, processor, callbacks=[timer], packing=args.packing)
    if name == BASELINE:
        trainer.compute_loss_func = full_logits_loss(timer)  # read by Trainer.compute_loss at every step
    trainer.train()
    trainable, total = count_parameters(model)
    result = timer.result()
    result.update(
        name=name,
        peak_memory_gb=peak_memory_gb(),
        mfu=result["model_tflops_per_second"] / spec["peak_tflops"],
        trainable_parameters=trainable,
        parameters=total,
        attention=base.config._attn_implementation,
    )
    return result


def run_in_new_process(spec: dict, work_dir: str) -> dict:
    """`run` in a fresh Python process (its own peak memory, nothing left over from the previous run)."""
    spec_path = os.path.join(work_dir, f"{spec['name']}.spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    if os.path.exists(spec["result"]):
        os.remove(spec["result"])
    log_path = os.path.join(work_dir, f"{spec['name']}.log")
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--_worker", spec_path],
                              stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        with open(log_path) as f:
            print(f.read()[-3000:], file=sys.stderr)
        return {"name": spec["name"], "error": f"exit status {done.returncode}, see {log_path}"}
    with open(spec["result"]) as f:
        return json.load(f)


def run_in_this_process(spec: dict) -> dict:
    """`run` here, with the peak-memory marks reset first (the GPU's by ThroughputCallback at train begin)."""
    import gc

    gc.collect()
    if os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the resident-set high-water mark that max RSS reports
    try:
        return run(spec)
    except Exception as error:
        import traceback

        traceback.print_exc()
        return {"name": spec["name"], "error": f"{type(error).__name__}: {error}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def worker_main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    result = run(spec)
    with open(spec["result"], "w") as f:
        json.dump(result, f, indent=2)


# ------------------------------------------------------------------------------------------------ the benchmark
def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict:
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
             "cuda": torch.version.cuda}
    for package in ("peft", "bitsandbytes", "flash_attn"):
        try:
            found[package] = __import__(package).__version__
        except ImportError:
            found[package] = None
    return found


def training_argv(args, checkpoint: str, name: str, gpu: bool) -> list[str]:
    """The recipe command line of one run."""
    argv = [
        "--model_name_or_path", checkpoint,
        "--output_dir", os.path.join(args.work_dir, "runs", name),
        "--deepspeed", "none", "--report_to", "none", "--save_strategy", "no", "--skip_eval_before",
        "--max_steps", str(args.warmup + args.steps),
        "--batch_size", str(args.batch_size), "--batch_size_per_gpu", str(args.batch_size_per_gpu),
        "--num_crops", str(args.num_crops), "--lora_rank", str(args.lora_rank),
        "--seed", str(args.seed), "--no_tqdm", "--overwrite_output_dir",
        # The same batches in the same order for every run: equal work, and the same first batch (whose loss the
        # baseline must reproduce); it starts with padding crop slots.
        "--train_sampling_strategy", "sequential",
    ]
    if args.in_process:
        argv += ["--dataloader_num_workers", "0"]  # tiny steps: worker processes would cost more than they save
    if gpu:
        argv.append("--bf16")
    return argv + shlex.split(args.extra_args)


def format_table(rows: list[dict]) -> str:
    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    header = (
        f"{'run':<8} {'img/s':>8} {'tokens/s':>10} {'MFU':>7} {'peak GB':>8} "
        f"{'vision ms':>10} {'lang ms':>9} {'optim ms':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['name']:<8} failed: {row['error']}")
            continue
        lines.append(
            f"{row['name']:<8} {row['images_per_second']:>8.3f} {row['tokens_per_second']:>10.1f} "
            f"{100 * row['mfu']:>6.2f}% {row['peak_memory_gb']:>8.2f} {number(row['vision_ms'], '10.1f'):>10} "
            f"{number(row['language_ms'], '9.1f'):>9} {number(row['optimizer_ms'], '9.1f'):>9}"
        )
    return "\n".join(lines)


def parse_cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--small", action="store_true", help="the tiny test model (CPU-sized), not the full size")
    parser.add_argument("--strategies", default=None,
                        help="comma-separated, of full,frozen,lora,qlora (default: all)")
    parser.add_argument("--no_baseline", action="store_true", help="skip the stock baseline run")
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps before measuring")
    parser.add_argument("--batch_size", type=int, default=None, help="global batch (default 16; 1 with --small)")
    parser.add_argument("--batch_size_per_gpu", type=int, default=1)
    parser.add_argument("--num_crops", type=int, default=16)
    parser.add_argument("--lora_rank", type=int, default=64)
    parser.add_argument("--samples", type=int, default=None, help="distinct samples (default 24; 6 with --small)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--peak_tflops", type=float, default=760.0,
                        help="peak matmul TFLOP/s for MFU (760: dense bf16 measured on an H100 SXM)")
    parser.add_argument("--breakdown", action="store_true",
                        help="vision / language / optimizer times on a GPU (synchronizes: slightly slower steps)")
    parser.add_argument("--in_process", action=argparse.BooleanOptionalAction, default=None,
                        help="run the strategies in this process instead of one fresh process each "
                             "(default: only with --small, where process start-up would dominate)")
    parser.add_argument("--extra_args", default="",
                        help="more recipe flags for every run, after '=': "
                             "--extra_args='--packing --use_flash_attention'")
    parser.add_argument("--work_dir", default=None,
                        help="checkpoint and samples (default /tmp/phi3v-bench-train[-small])")
    parser.add_argument("--output", default=None, help="JSON results (default benchmarks/results/<device>-<date>.json)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (1 if args.small else 16)
    args.in_process = args.small if args.in_process is None else args.in_process
    args.samples = args.samples or (len(PAGE_SIZES) if args.small else 24)
    args.work_dir = args.work_dir or ("/tmp/phi3v-bench-train" + ("-small" if args.small else ""))
    return args


def main(argv=None):
    args = parse_cli(argv)
    if args._worker:
        return worker_main(args._worker)
    gpu = torch.cuda.is_available()
    names = (args.strategies or ",".join(STRATEGIES)).split(",")
    unknown = set(names) - set(STRATEGIES)
    if unknown:
        raise SystemExit(f"unknown strategies {sorted(unknown)}: choose from {', '.join(STRATEGIES)}")
    if not args.no_baseline:
        names.append(BASELINE)
    os.makedirs(args.work_dir, exist_ok=True)
    checkpoint, samples, mean_tokens = prepare(args)
    print(f"{args.samples} samples, {mean_tokens:.0f} tokens a sample on average (num_crops {args.num_crops})",
          flush=True)

    rows = []
    for name in names:
        spec = dict(name=name, argv=training_argv(args, checkpoint, name, gpu), samples=samples, warmup=args.warmup,
                    breakdown=args.breakdown, peak_tflops=args.peak_tflops,
                    result=os.path.join(args.work_dir, f"{name}.result.json"))
        print(f"running {name} ({args.warmup} + {args.steps} steps) ...", flush=True)
        rows.append(run_in_this_process(spec) if args.in_process else run_in_new_process(spec, args.work_dir))
    table = format_table(rows)
    print(table)
    device = device_name()
    report = {
        "device": device,
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "command": shlex.join([sys.executable] + sys.argv if argv is None else ["bench_train.py"] + list(argv)),
        "model": "tiny test config (phi3v.tiny)" if args.small else "official Phi-3.5-vision config, random weights",
        "settings": {key: value for key, value in vars(args).items() if not key.startswith("_")},
        "mean_tokens_per_sample": mean_tokens,
        "results": rows,
        "table": table,
    }
    write_report(report, args.output, small=args.small)
    if any("error" in row for row in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""DPO training speed: pairs as shared-prefix rows (the recipe's way) against the two-sequence layout (TRL's), in \
one run, on DocVQA-sized pairs.

Both layouts train through the code path of finetune_hf_trainer_dpo.py: its flag parser (`--shared_prefix True` /
`False`), `model_for_training`, `build_optimizer`, `PreferenceCollator`, `reference_for_training` and `make_trainer`
with `trainer_class=DPOTrainer`, then `trainer.train()`: forward, backward and optimizer step. Each layout runs in a
process of its own (its peak memory is its own), and the two take turns step by step (a pair each, by default): this
script hands the turn over, so only one of them computes at any moment and a change in the machine's load falls on
both alike. The reference model is the same for both: with LoRA the base with the adapters disabled (a no-grad
forward a step), for full and frozen-vision runs the log-probabilities precomputed before training.

The pairs: synthetic document pages of real DocVQA sizes (benchmarks/docvqa_pages.py: five 1700x2200 letter scans for
one 1000x1400 page), a question, the right answer chosen and another page's answer rejected; at num_crops 16 the
prompt is ~2,440 tokens, an answer 4-9. Tokenized and image-processed once, by PreferenceDataset, before timing.

Measured per turn (the process holding the turn: building the next batch, forward, backward, optimizer step; on a
GPU synchronized before the clock stops), after `--warmup` turns: medians, pairs/s = pairs a step / median seconds,
the ratio shared / two-sequence. Peak memory: torch.cuda.max_memory_allocated on a GPU, max resident set size on a
CPU, each since its process's train begin. On a CPU one more step of each layout runs under torch.profiler: the
share of its time in matrix products and attention kernels, in other ATen ops, and outside ATen (Python, autograd).

    python benchmarks/bench_dpo.py                           # GPU: full-size config, bf16; CPU: the CPU config
    python benchmarks/bench_dpo.py --size tiny --num_crops 1 --steps 1 --warmup 1   # the test (seconds)
"""

import os
import statistics
import sys

import torch
import turns  # the turn-taking driver and the table, shared by the layout benchmarks (beside this file)
from docvqa_pages import QUESTIONS, docvqa_records  # beside this file

LAYOUTS = {"shared": "True", "two_sequence": "False"}  # the recipe's --shared_prefix
# The recipe's strategies, with the reference each takes: LoRA the base (adapters disabled), the others
# precomputed log-probabilities (a frozen copy would cost a second model's memory and a forward, alike for both).
STRATEGIES = {name: flags + ([] if "--lora_enable" in flags else ["--precompute_ref_log_probs"])
              for name, flags in turns.STRATEGIES.items()}


# ------------------------------------------------------------------------------------------------ pairs
def preference_records(n: int) -> list[dict]:
    """DocVQA-shaped pairs: each page's question, its answer chosen, the next question's answer rejected."""
    answers = [answer for _, answer in QUESTIONS]
    records = docvqa_records(n)
    for index, record in enumerate(records):
        record["rejected"] = answers[(index + 1) % len(answers)]
    return records


def prepare(args) -> tuple[str, str, dict]:
    """Write the checkpoint (once) and the tokenized pairs; return their paths and the pairs' sizes."""
    from phi3v.preference import PreferenceDataset
    from phi3v.processing import packaged_processor

    checkpoint = turns.checkpoint_folder(args)
    processor = packaged_processor(args.num_crops)
    dataset = PreferenceDataset(preference_records(args.pairs), processor, num_crops=args.num_crops)
    items = [dataset[i] for i in range(len(dataset))]
    samples = os.path.join(args.work_dir, "pairs.pt")
    torch.save(items, samples)
    # The sizes of the pairs the measured turns train on (the sampler is sequential: turn t takes the t-th batch).
    measured = items[args.warmup * args.pairs_per_step:(args.warmup + args.steps) * args.pairs_per_step]
    crop = processor.image_processor.crop_size
    lengths = [(len(item["prompt_ids"]), [len(c) for c in item["completions"]]) for item in measured]
    sizes = {
        "pairs": len(items),
        "measured_pairs": len(measured),
        "prompt_tokens": statistics.mean(prompt for prompt, _ in lengths),
        "answer_tokens": statistics.mean(n for _, answers in lengths for n in answers),
        "crops_per_pair": statistics.mean(int((h // crop) * (w // crop) + 1) for item in measured
                                          for h, w in item["image_sizes"].tolist()),
        # what the language model runs a pair: one row, or two rows padded to the longer answer (a pair a batch)
        "tokens_per_pair": {"shared": statistics.mean(prompt + sum(answers) for prompt, answers in lengths),
                            "two_sequence": statistics.mean(2 * (prompt + max(answers)) for prompt, answers in
                                                            lengths)},
    }
    return checkpoint, samples, sizes


# ------------------------------------------------------------------------------------------------ one layout
def run_layout(spec: dict) -> dict:
    """One layout, in this process: the DPO recipe's model, optimizer, reference and DPOTrainer, taking turns."""
    sys.path.insert(0, turns.ROOT)
    import finetune_hf_trainer_dpo as recipe
    from phi3v.dpo import DPOTrainer, PreferenceCollator, reference_for_training
    from phi3v.training import make_trainer

    run = turns.recipe_setup(recipe, spec)
    args, task, training_args, model, pairs, clock = (run.args, run.task, run.training_args, run.model, run.samples,
                                                      run.clock)
    collator = PreferenceCollator(run.processor.pad_token_id, shared_prefix=task.shared_prefix)
    reference = reference_for_training(model, args, task, training_args, collator, pairs, None, None)
    trainer = make_trainer(model, training_args, pairs, run.processor, callbacks=[clock],
                           optimizers=(run.optimizer, None), exempt_norms_from_decay=True, trainer_class=DPOTrainer,
                           data_collator=clock.collator(collator), dpo=task.settings(), **reference.trainer_kwargs())
    reference.attach(trainer)
    first = {}
    add_metrics = trainer.add_metrics

    def keep_first(mode, values):  # the first batch's log-probabilities: the same pairs give the same numbers
        if not first:
            first.update({key: values[key].tolist() for key in ("logps/chosen", "logps/rejected")})
        add_metrics(mode, values)

    trainer.add_metrics = keep_first
    trainer.train()
    return turns.layout_row(spec, clock, model, first)


# ------------------------------------------------------------------------------------------------ both, in turns
def first_batch_difference(shared: dict, two: dict) -> dict:
    """The largest difference of the two layouts' first-batch log-probabilities (the same pairs: ~0)."""
    return {"first_batch_max_difference": max(
        abs(x - y) for key in shared["first_batch"] for x, y in zip(shared["first_batch"][key],
                                                                    two["first_batch"][key]))}


def parse_cli(argv=None):
    parser = turns.make_parser(__doc__, "dpo", steps=(10, 8), warmup=(2, 1), samples="pairs", strategies=STRATEGIES,
                               strategy_help="lora: reference = the base, adapters disabled; full / frozen: reference "
                                             "precomputed")
    return turns.parse(parser, argv)


def describe(args, sizes) -> str:
    return (f"the measured pairs: {sizes['prompt_tokens']:.0f} prompt tokens and {sizes['crops_per_pair']:.1f} CLIP "
            f"crops a pair on average, answers {sizes['answer_tokens']:.1f} tokens (num_crops {args.num_crops}); "
            f"{args.size} config, {args.strategy}")


BENCHMARK = turns.Benchmark(
    name="dpo", script=__file__, layouts=LAYOUTS, run_layout=run_layout, prepare=prepare, describe=describe,
    recipe_flags=lambda args: (args.pairs_per_step, STRATEGIES[args.strategy]),
    per_step=lambda args: args.pairs_per_step, compare=first_batch_difference, rate_key="pairs_per_second",
    rate="pairs/s", other="two-sequence", unit="a pair", samples_key="pairs")


def main(argv=None):
    turns.main(BENCHMARK, parse_cli(argv), argv)


if __name__ == "__main__":
    main()

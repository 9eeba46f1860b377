"""GRPO training speed: a group's prompt run once (the recipe's way: sampling from one prefill whose KV cache is copied
for the G answers, the loss on one shared-prefix row) against G full sequences (TRL's: the prompt repeated G times
in sampling and one row per answer in the loss), in one run, on DocVQA-sized prompts.

Both layouts train through the code path of finetune_hf_trainer_grpo.py: its flag parser (`--shared_prefix True` /
`False`), `model_for_training`, `build_optimizer`, its `Rewards`, `frozen_reference` (with --beta) and `make_trainer`
with `trainer_class=GRPOTrainer`, then `trainer.train()`: sampling, rewards, forward, backward and optimizer step.
Each layout runs in a process of its own (its peak memory is its own), and the two take turns step by step (a group
each, by default; benchmarks/turns.py): only one of them computes at any moment and a change in the machine's load
falls on both alike.

The prompts: synthetic document pages of real DocVQA sizes (benchmarks/docvqa_pages.py: five 1700x2200 letter scans
for one 1000x1400 page) and a question; at num_crops 16 a prompt is ~2,440 tokens. Tokenized and image-processed
once, by the recipe's PromptDataset, before timing. G = 8 answers a prompt (--num_generations), at most 16 tokens
(--max_completion_length), temperature 1.0. Rewards: the recipe's accuracy_reward (exact match with the page's
answer) and a reward file of the answer's length; the random model's answers are never right, the length spreads
them, so the advantages and the loss are not zero (the backward runs in full either way: a zero loss is still
back-propagated). LoRA without a reference (beta 0) by default.

Measured per turn (the process holding the turn: sampling, rewards, forward, backward, optimizer step; on a GPU
synchronized before the clock stops), after `--warmup` turns: medians, groups/s = groups a step / median seconds,
the ratio shared / repeated. Peak memory: torch.cuda.max_memory_allocated on a GPU, max resident set size on a CPU,
each since its process's train begin. On a CPU one more step of each layout runs under torch.profiler: the share of
its time in matrix products and attention kernels, in other ATen ops, and outside ATen (Python, autograd, generate's
loop). With the same seed the first step samples the same completions in both layouts and gets the same loss and
token log-probabilities: recorded as a check.

    python benchmarks/bench_grpo.py                          # GPU: full-size config, bf16; CPU: the CPU config
    python benchmarks/bench_grpo.py --size tiny --num_crops 1 --steps 1 --warmup 1   # a smoke run (seconds)

Measured results and their command lines: benchmarks/README.md.
"""

import os
import sys
from statistics import mean

import torch
import turns  # the turn-taking driver and the table, shared by the layout benchmarks (beside this file)
from docvqa_pages import docvqa_records  # beside this file

LAYOUTS = {"shared": "True", "repeated": "False"}  # the recipe's --shared_prefix
LENGTH_REWARD = '''
def length_reward(completions, answers, records):
    """A tenth of the answer's length in characters: spread within a group of the random model's answers."""
    return [len(text) / 10 for text in completions]
'''


# ------------------------------------------------------------------------------------------------ prompts
def prepare(args) -> tuple[str, str, dict]:
    """Write the checkpoint (once), the tokenized prompts and the reward file; return the checkpoint's and the
    prompts' paths and the prompts' sizes."""
    from phi3v.grpo import PromptDataset
    from phi3v.processing import packaged_processor

    checkpoint = turns.checkpoint_folder(args)
    processor = packaged_processor(args.num_crops)
    dataset = PromptDataset(docvqa_records(args.prompts), processor, num_crops=args.num_crops,
                            max_completion_length=args.max_completion_length)
    items = [dataset[i] for i in range(len(dataset))]
    samples = os.path.join(args.work_dir, "prompts.pt")
    torch.save(items, samples)
    with open(os.path.join(args.work_dir, "length_reward.py"), "w") as f:
        f.write(LENGTH_REWARD)
    # The prompts the measured turns train on (the sampler is sequential: turn t takes the t-th batch).
    measured = items[args.warmup * args.prompts_per_step:(args.warmup + args.steps) * args.prompts_per_step]
    crop = processor.image_processor.crop_size
    prompts = [len(item["prompt_ids"]) for item in measured]
    g, most = args.num_generations, args.max_completion_length
    sizes = {
        "prompts": len(items),
        "measured_prompts": len(measured),
        "prompt_tokens": mean(prompts),
        "crops_per_prompt": mean(int((h // crop) * (w // crop) + 1) for item in measured
                                            for h, w in item["image_sizes"].tolist()),
        # what the language model runs a group in the loss at the longest answers: one row of the prompt and the
        # G answers, or G rows of prompt + answer (and sampling: one prefill, or G)
        "loss_tokens_per_group": {"shared": mean(p + g * most for p in prompts),
                                  "repeated": mean(g * (p + most) for p in prompts)},
    }
    return checkpoint, samples, sizes


# ------------------------------------------------------------------------------------------------ one layout
def run_layout(spec: dict) -> dict:
    """One layout, in this process: the GRPO recipe's model, optimizer, rewards and GRPOTrainer, taking turns."""
    sys.path.insert(0, turns.ROOT)
    import finetune_hf_trainer_grpo as recipe
    from phi3v.dpo import frozen_reference
    from phi3v.grpo import GRPOTrainer, collate_prompts
    from phi3v.rewards import Rewards
    from phi3v.training import make_trainer

    run = turns.recipe_setup(recipe, spec)
    task = run.task
    rewards = Rewards(task.reward_funcs, task.reward_weights, recipe.score, task.answer_format)
    reference = frozen_reference(run.model, run.args, task, run.training_args) if task.beta else None
    trainer = make_trainer(run.model, run.training_args, run.samples, run.processor, callbacks=[run.clock],
                           optimizers=(run.optimizer, None), exempt_norms_from_decay=True, trainer_class=GRPOTrainer,
                           data_collator=run.clock.collator(collate_prompts), grpo=task.settings(), rewards=rewards,
                           ref_model=reference.ref_model if reference else None)
    if reference is not None:
        reference.attach(trainer)
    first = {}
    sample, compute_loss = trainer.sample, trainer.compute_loss

    def keep_completions(group_prompts):  # the first step's completions: the same seed samples the same answers
        sampled = sample(group_prompts)
        first.setdefault("completions", sampled.completions)
        return sampled

    def keep_loss(model, inputs, return_outputs=False, **kwargs):  # and its loss and token log-probabilities
        loss, outputs = compute_loss(model, inputs, return_outputs=True, **kwargs)
        if "loss" not in first:
            first.update(loss=loss.item(), token_log_probs=outputs["log_probs"].float().tolist())
        return (loss, outputs) if return_outputs else loss

    trainer.sample, trainer.compute_loss = keep_completions, keep_loss
    trainer.train()
    return turns.layout_row(spec, run.clock, run.model, first)


# ------------------------------------------------------------------------------------------------ both, in turns
def first_step_difference(shared: dict, repeated: dict) -> dict:
    """Whether the first step sampled the same completions in both layouts, and how far apart its loss and token
    log-probabilities are (the same computation: ~0)."""
    a, b = shared["first_batch"], repeated["first_batch"]
    same = a["completions"] == b["completions"]
    return {"first_step_same_completions": same,
            "first_step_loss_difference": abs(a["loss"] - b["loss"]),
            "first_step_max_log_prob_difference": max(
                abs(x - y) for x, y in zip(a["token_log_probs"], b["token_log_probs"])) if same else None}


def describe(args, sizes) -> str:
    return (f"the measured prompts: {sizes['prompt_tokens']:.0f} tokens and {sizes['crops_per_prompt']:.1f} CLIP "
            f"crops on average (num_crops {args.num_crops}), G = {args.num_generations} answers of at most "
            f"{args.max_completion_length} tokens; {args.size} config, {args.strategy}")


def parse_cli(argv=None):
    parser = turns.make_parser(
        __doc__, "grpo", steps=(10, 3), warmup=(2, 1), samples="prompts", strategies=turns.STRATEGIES,
        strategy_help="what trains (LoRA by default; the reference, with --extra_args='--beta 0.04', is the recipe's: "
                      "the base with the adapters disabled, else a frozen copy)")
    parser.add_argument("--num_generations", type=int, default=8, help="G: answers sampled a prompt")
    parser.add_argument("--max_completion_length", type=int, default=16, help="longest answer, in tokens")
    parser.add_argument("--temperature", type=float, default=1.0)
    return turns.parse(parser, argv)


def recipe_flags(args) -> tuple[int, list[str]]:
    """The recipe's batch size (it counts answers) and its GRPO flags: G, the answers' length, the rewards."""
    return args.prompts_per_step * args.num_generations, [
        "--num_generations", str(args.num_generations), "--max_completion_length", str(args.max_completion_length),
        "--temperature", str(args.temperature),
        "--reward_funcs", "accuracy_reward", os.path.join(args.work_dir, "length_reward.py"),
        *turns.STRATEGIES[args.strategy]]


BENCHMARK = turns.Benchmark(
    name="grpo", script=__file__, layouts=LAYOUTS, run_layout=run_layout, prepare=prepare, describe=describe,
    recipe_flags=recipe_flags, per_step=lambda args: args.prompts_per_step, compare=first_step_difference,
    rate_key="groups_per_second", rate="groups/s", other="repeated", unit="a group", samples_key="prompts")


def main(argv=None):
    turns.main(BENCHMARK, parse_cli(argv), argv)


if __name__ == "__main__":
    main()

"""GRPO (finetune_hf_trainer_grpo.py): the advantages, token losses and loss types equal their formulas written out by
hand and TRL's GRPOTrainer on the same batch; the shared-prefix rows give the loss and gradients of the usual
layout; the rewards are the task recipe's own metric; a bad reward file or flag ends the recipe in one line; a run
resumed after SIGKILL continues exactly (the sampling RNG restored); 2-process DDP and ZeRO-2 train alike.

The tiny random model never answers yes or no (accuracy 0 everywhere), so the runs add a reward of the answer's
length (LENGTH_REWARD), which spreads within a group: non-zero advantages, a loss with gradients.
"""

import copy
import glob
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the recipes are imported as modules

import finetune_hf_trainer_docvqa as docvqa_recipe  # noqa: E402
import finetune_hf_trainer_grpo as recipe  # noqa: E402
import finetune_hf_trainer_hateful_memes as memes_recipe  # noqa: E402
import phi3v.grpo  # noqa: E402
import phi3v.training  # noqa: E402
from phi3v.errors import InputError  # noqa: E402
from phi3v.group_sampling import SampledGroups  # noqa: E402
from phi3v.grpo import GRPOSettings, GRPOTrainer, collate_prompts  # noqa: E402
from phi3v.grpo_loss import aggregate, group_advantages, token_losses  # noqa: E402
from phi3v.rewards import Rewards  # noqa: E402
from phi3v.shared_prefix import model_inputs, shared_prefix_batch, two_sequence_batch  # noqa: E402

SCRIPT = os.path.join(ROOT, "finetune_hf_trainer_grpo.py")
PROGRAM = os.path.basename(SCRIPT)
PAD, END = 32000, 32007  # the pad id (also <|endoftext|>) and <|end|>, the stop tokens
TIMEOUT_S = 600
STD_EPS = 1e-4  # TRL's advantages / (std + 1e-4)

LENGTH_REWARD = '''
import os


def length_reward(completions, answers, records):
    """A tenth of the answer's length in characters: the tiny model's answers differ in it."""
    return [len(text) / 10 for text in completions]


def helper(text):  # not a reward: its name does not end in _reward
    return 0.0
'''


def length_reward(texts):  # LENGTH_REWARD's, written out for the checks
    return [len(text) / 10 for text in texts]


# ------------------------------------------------------------------------------------------------ 1. advantages
# Three groups of G = 4: spread, no spread at all, spread with negative rewards.
REWARD_TABLE = [[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, -1.0, 0.5, 3.0]]


def hand_advantages(table, scale):
    """(r - its group's mean) / (std + 1e-4): the group's Bessel std ("group"), the whole batch's ("batch"), or no
    division ("none"), with the statistics module."""
    everything = [r for group in table for r in group]
    out = []
    for group in table:
        mean = statistics.mean(group)
        std = {"group": statistics.stdev(group), "batch": statistics.stdev(everything), "none": None}[scale]
        out += [(r - mean) if std is None else (r - mean) / (std + STD_EPS) for r in group]
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_the_formulas(scale):
    rewards = torch.tensor(REWARD_TABLE).flatten()
    advantages, std = group_advantages(rewards, 4, scale)
    assert advantages.tolist() == pytest.approx(hand_advantages(REWARD_TABLE, scale), abs=1e-6)
    # written out for group 0 (mean 0.5, Bessel std sqrt(1/3)) and group 2 (mean 1.125, std 1.7500)
    if scale == "group":
        assert advantages[0].item() == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-4), abs=1e-6)  # 0.865875
        assert advantages[8].item() == pytest.approx(0.875 / (1.75 + 1e-4), abs=1e-6)  # squares sum 9.1875
    if scale == "none":
        assert advantages.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 0.875, -2.125, -0.625, 1.875])
    # the group without spread: advantage exactly 0 whatever the scaling, and its std 0 (a zero-std group)
    assert advantages[4:8].tolist() == [0.0] * 4
    zero_std = torch.isclose(std, torch.zeros_like(std)).view(-1, 4)[:, 0].tolist()
    assert zero_std == ([False, True, False] if scale != "batch" else [False] * 3)
    if scale == "batch":  # one std for all: that of the 12 rewards
        assert std.tolist() == pytest.approx([statistics.stdev(sum(REWARD_TABLE, []))] * 12)


def test_unscorable_answers_leave_the_baseline_and_get_no_advantage():
    """NaN (every reward function returned None): out of the group's mean and std, advantage 0 (TRL's)."""
    rewards = torch.tensor([1.0, float("nan"), 3.0, 2.0])
    advantages, _ = group_advantages(rewards, 4, "group")
    std = statistics.stdev([1.0, 3.0, 2.0])  # mean 2
    assert advantages.tolist() == pytest.approx([-1 / (std + STD_EPS), 0.0, 1 / (std + STD_EPS), 0.0])


# ------------------------------------------------------------------------------------------------ 2. token losses
# Six tokens: log-ratios putting the ratio above 1 + eps_high, below 1 - eps_low and inside, with positive and
# negative advantages.
LOG_PROBS = [-1.0, -2.0, -0.5, -3.0, -1.5, -0.25]
OLD_LOG_PROBS = [-1.5, -1.5, -0.6, -2.5, -1.0, -0.35]  # ratios e^0.5, e^-0.5, e^0.1, e^-0.5, e^-0.5, e^0.1
ADVANTAGES = [1.0, -2.0, 0.5, 1.5, -0.75, -1.0]
REF_LOG_PROBS = [-1.2, -1.0, -0.5, -4.0, -1.0, -2.0]
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def hand_token_loss(lp, old, a, ref, beta, bias_correction):
    """-min(ratio A, clip(ratio) A) + beta KL (x ratio with TRL's use_bias_correction_kl), KL the k3 estimator."""
    ratio = math.exp(lp - old)
    clipped = min(max(ratio, 1 - EPS_LOW), 1 + EPS_HIGH)
    policy = -min(ratio * a, clipped * a)
    kl = math.exp(ref - lp) - (ref - lp) - 1
    loss = policy + beta * kl * (ratio if bias_correction else 1.0)
    return loss, kl, ratio < 1 - EPS_LOW and a < 0, ratio > 1 + EPS_HIGH and a > 0


@pytest.mark.parametrize("beta, bias_correction", [(0.0, True), (BETA, True), (BETA, False)])
def test_token_losses_equal_the_formulas(beta, bias_correction):
    args = [torch.tensor(v, dtype=torch.float64) for v in (LOG_PROBS, OLD_LOG_PROBS, ADVANTAGES)]
    loss, kl, low, high = token_losses(*args, EPS_LOW, EPS_HIGH, beta,
                                       torch.tensor(REF_LOG_PROBS, dtype=torch.float64) if beta else None,
                                       bias_correction_kl=bias_correction)
    expected = [hand_token_loss(*values, beta, bias_correction)
                for values in zip(LOG_PROBS, OLD_LOG_PROBS, ADVANTAGES, REF_LOG_PROBS)]
    assert loss.tolist() == pytest.approx([e[0] for e in expected], abs=1e-12)
    assert low.tolist() == [e[2] for e in expected] == [False, True, False, False, True, False]
    assert high.tolist() == [e[3] for e in expected] == [True, False, False, False, False, False]
    if beta:
        assert kl.tolist() == pytest.approx([e[1] for e in expected], abs=1e-12)
        # token 3: ref - logp = -1: e^-1 + 1 - 1 = 0.367879; ratio e^-0.5, A = 1.5 (not clipped)
        assert kl[3].item() == pytest.approx(math.exp(-1), abs=1e-12)
        weight = math.exp(-0.5) if bias_correction else 1.0
        assert loss[3].item() == pytest.approx(-math.exp(-0.5) * 1.5 + BETA * math.exp(-1) * weight, abs=1e-12)
    else:
        assert kl is None
        # token 0: ratio e^0.5 = 1.6487 > 1.28 with A = 1: clipped, -1.28; token 1: ratio 0.6065 < 0.8 with A = -2:
        # clipped, 0.8 x 2 = 1.6; token 2: inside, -e^0.1 x 0.5
        assert loss[:3].tolist() == pytest.approx([-1.28, 1.6, -math.exp(0.1) * 0.5], abs=1e-12)


# three completions of lengths 2, 3, 1 (flat, completion-major)
PER_TOKEN = torch.tensor([0.5, -1.0, 2.0, 0.25, -0.75, 3.0], dtype=torch.float64)
INDEX = torch.tensor([0, 0, 1, 1, 1, 2])
LENGTHS = torch.tensor([2, 3, 1])


@pytest.mark.parametrize("loss_type, total_tokens, expected", [
    ("grpo", None, ((0.5 - 1.0) / 2 + (2.0 + 0.25 - 0.75) / 3 + 3.0 / 1) / 3),
    ("bnpo", None, 4.0 / 6),
    ("dr_grpo", None, 4.0 / (3 * 5)),  # completions x max_completion_length 5
    ("dapo", None, 4.0 / 6),  # the micro-batch's tokens when not given
    ("dapo", 10.0, 4.0 / 10),  # the whole batch's tokens per process
])
def test_aggregate_equals_the_hand_computation(loss_type, total_tokens, expected):
    assert aggregate(PER_TOKEN, INDEX, LENGTHS, loss_type, 5, total_tokens).item() == pytest.approx(expected,
                                                                                                   abs=1e-12)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="unknown GRPO loss type 'ppo'"):
        aggregate(PER_TOKEN, INDEX, LENGTHS, "ppo", 5)


# ------------------------------------------------------------------------------------------------ 3. against TRL
G = 3
TEMPERATURE = 0.7
TEXT_PROMPTS = ["Is the sky blue?", "Name a colour that a ripe banana has, in one word.", "What is 2 + 2, in digits?"]
ANSWERS = [["Yes.", "No, it is green.", "Blue"], ["Yellow", "Yellow.", "It is yellow, mostly"], ["4", "Five", "22"]]
# group 0 and 2 spread, group 1 none (a zero-std group: no advantage)
TABLE = [[1.0, 0.0, 0.5], [0.25, 0.25, 0.25], [2.0, -1.0, 0.0]]


class TableRewards:
    """A reward function of fixed values (one per sampled answer, prompt-major), remembering what it was given."""

    names = ["table_reward"]

    def __init__(self, table):
        self.values = torch.tensor(table).flatten()
        self.calls = []

    def __call__(self, completions, answers, records):
        self.calls.append((completions, answers, records))
        return self.values[: len(completions), None].clone()

    def combine(self, per_function):
        return per_function[:, 0]


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    """(policy, its copy for TRL, reference): a policy that differs from its reference, so every term counts."""
    from phi3v import Phi3VForCausalLM

    policy, reference = (Phi3VForCausalLM.from_pretrained(tiny_checkpoint).eval() for _ in range(2))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    reference.requires_grad_(False)
    return policy, copy.deepcopy(policy), reference


@pytest.fixture(scope="module")
def text_prompts(processor):
    """The three text prompts (different lengths: TRL's rows are left-padded) and each one's G completions as the
    sampler returns them: up to and including <|end|>, the last one of prompt 2 cut without it (truncated)."""
    from phi3v.conversation import tokenize_prompt

    prompts, completions, truncated = [], [], []
    for index, (question, answers) in enumerate(zip(TEXT_PROMPTS, ANSWERS)):
        prompt = tokenize_prompt(processor, [{"role": "user", "content": question}], [])
        prompts.append({**prompt, "answer": answers[0], "record": {"id": f"q{index}"}, "sample_id": f"q{index}"})
        ids = [processor.encode_text(text) + [END] for text in answers]
        cut = [False] * G
        if index == 2:
            ids[-1], cut[-1] = ids[-1][:-1], True
        completions.append(ids)
        truncated.append(cut)
    assert len({len(p["prompt_ids"]) for p in prompts}) == 3
    return prompts, SampledGroups(completions, truncated)


def max_completion_length(sampled):
    return max(len(c) for group in sampled.completions for c in group) + 2  # dr_grpo divides by it


@pytest.fixture(scope="module")
def trl_trainer(models, processor, text_prompts, tmp_path_factory):
    from datasets import Dataset
    from trl import GRPOConfig
    from trl import GRPOTrainer as TRLGRPOTrainer

    # bf16=False: TRL's configs default to bf16 mixed precision (autocast). beta 0 here (TRL would load a reference
    # model by the policy's name); the tests set trainer.beta and hand it the reference log-probabilities.
    config = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl_grpo")), report_to="none", use_cpu=True,
                        bf16=False, per_device_train_batch_size=G, num_generations=G, temperature=TEMPERATURE,
                        max_completion_length=max_completion_length(text_prompts[1]), epsilon=EPS_LOW,
                        epsilon_high=EPS_HIGH, beta=0.0)
    return TRLGRPOTrainer(model=models[1], reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
                          args=config, train_dataset=Dataset.from_dict({"prompt": ["a"]}),
                          processing_class=processor.tokenizer)


@pytest.fixture(scope="module")
def our_trainer(models, processor, text_prompts, tmp_path_factory):
    """Our GRPOTrainer on the policy, its sampling replaced by the fixed completions."""
    from transformers import TrainingArguments

    policy, _, reference = models
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("ours")), report_to="none", use_cpu=True,
                             per_device_train_batch_size=1)
    trainer = GRPOTrainer(model=policy, args=args, train_dataset=[{}], processing_class=processor,
                          data_collator=collate_prompts, grpo=GRPOSettings(), rewards=TableRewards(TABLE),
                          ref_model=reference)
    trainer.sample = lambda prompts: text_prompts[1]
    return trainer


def trl_inputs(text_prompts, advantages):
    """TRL's layout of the same groups: each prompt repeated G times, left-padded; completions right-padded."""
    prompts, sampled = text_prompts
    rows = [(p["prompt_ids"], c) for p, group in zip(prompts, sampled.completions) for c in group]
    prompt_width, completion_width = max(len(p) for p, _ in rows), max(len(c) for _, c in rows)
    prompt_ids = torch.full((len(rows), prompt_width), PAD)
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_ids = torch.full((len(rows), completion_width), PAD)
    completion_mask = torch.zeros_like(completion_ids)
    for row, (prompt, completion) in enumerate(rows):
        prompt_ids[row, prompt_width - len(prompt):] = torch.tensor(prompt)
        prompt_mask[row, prompt_width - len(prompt):] = 1
        completion_ids[row, : len(completion)] = torch.tensor(completion)
        completion_mask[row, : len(completion)] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.tensor(advantages),
            "old_per_token_logps": None, "num_items_in_batch": completion_mask.sum()}


def padded_log_probs(model, inputs):
    """[rows, completion tokens] log softmax(logits / T) of each completion token: a plain forward of the padded
    rows (the reference's, as TRL computes ref_per_token_logps)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -width - 1: -1].float() / TEMPERATURE
    return logits.log_softmax(-1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)


def gradients(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("loss_type, beta, bias_correction", [
    *[(loss_type, beta, True) for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo") for beta in (0.0, 0.2)],
    ("dapo", 0.2, False),
])
def test_loss_equals_trl_grpo_trainer_on_the_same_batch(models, text_prompts, trl_trainer, our_trainer, loss_type,
                                                        beta, bias_correction):
    """TRL scores prompt + completion as G padded rows per prompt; ours runs one shared-prefix row of the three
    groups (GRPOTrainer.compute_loss, its sampling replaced by the same completions and its rewards by a table).
    Same model, same advantages: the same loss, the same gradients (the KL term's too: TRL weighs it by the ratio
    unless use_bias_correction_kl=False, which changes its gradient only) and the same KL."""
    policy, trl_policy, reference = models
    advantages = hand_advantages(TABLE, "group")
    our_trainer.grpo = GRPOSettings(num_generations=G, max_completion_length=max_completion_length(text_prompts[1]),
                                    temperature=TEMPERATURE, beta=beta, epsilon=EPS_LOW, epsilon_high=EPS_HIGH,
                                    loss_type=loss_type, scale_rewards="group", use_bias_correction_kl=bias_correction)
    our_trainer._metric_sums.clear()
    loss = our_trainer.compute_loss(policy, {"prompts": text_prompts[0]})
    loss.backward()
    ours = gradients(policy)

    trl_trainer.loss_type, trl_trainer.beta = loss_type, beta
    trl_trainer.args.use_bias_correction_kl = bias_correction
    trl_trainer._metrics["eval"].clear()
    inputs = trl_inputs(text_prompts, advantages)
    if beta:
        inputs["ref_per_token_logps"] = padded_log_probs(reference, inputs)
    expected = trl_trainer.compute_loss(trl_policy, inputs)
    expected.backward()
    theirs = gradients(trl_policy)

    print(f"\n{loss_type} beta {beta}: TRL {expected.item():.8f}, ours {loss.item():.8f}")
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5, rel=1e-5)
    if beta or loss_type != "grpo":  # grpo at beta 0: the mean of -A over completions, 0 (the value; not its gradient)
        assert abs(loss.item()) > 1e-3  # the others weigh each completion's -A by its length
    assert ours.keys() == theirs.keys() and len(ours) > 10
    worst = max(ours, key=lambda n: (ours[n] - theirs[n]).abs().max())
    print(f"max |gradient difference| {(ours[worst] - theirs[worst]).abs().max():.3g} ({worst})")
    assert max(g.abs().max().item() for g in ours.values()) > 1e-3  # real gradients
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5, msg=name)
    sums = our_trainer._metric_sums["eval"]
    if beta:
        assert float(sums["kl"][0] / sums["kl"][1]) == pytest.approx(trl_trainer._metrics["eval"]["kl"][0], abs=1e-6)
        assert trl_trainer._metrics["eval"]["kl"][0] > 1e-4
    else:
        assert "kl" not in sums
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert float(sums[key][0]) == trl_trainer._metrics["eval"][key][0] == 0.0  # one pass: ratio 1


def test_logs_of_a_step(models, text_prompts, our_trainer, processor):
    """TRL's names, per answer or group, averaged at the next log: reward, rewards/<function>/mean, reward_std (the
    groups' std), frac_reward_zero_std (group 1 of 3), completions/mean_length, completions/clipped_ratio; the
    reward functions see the answers decoded without their stop token."""
    prompts, sampled = text_prompts
    our_trainer.grpo = GRPOSettings(num_generations=G, max_completion_length=max_completion_length(sampled),
                                    beta=0.0)
    our_trainer._metric_sums.clear()
    our_trainer.rewards.calls.clear()
    with torch.no_grad():
        our_trainer.compute_loss(models[0], {"prompts": prompts})
    [(texts, answers, records)] = our_trainer.rewards.calls
    expected_texts = [a for group in ANSWERS for a in group]
    expected_texts[-1] = processor.decode(sampled.completions[2][2])  # the truncated one, its end token cut
    assert texts == expected_texts and answers == [a[0] for a in ANSWERS for _ in range(G)]
    assert [r["id"] for r in records] == [f"q{i}" for i in range(3) for _ in range(G)]

    logs = {key: float(total / count) for key, (total, count) in our_trainer._metric_sums["eval"].items()}
    lengths = [len(c) for group in sampled.completions for c in group]
    assert logs["reward"] == pytest.approx(statistics.mean(sum(TABLE, [])), abs=1e-6)
    assert logs["rewards/table_reward/mean"] == logs["reward"]
    assert logs["reward_std"] == pytest.approx(statistics.mean(statistics.stdev(g) for g in TABLE), abs=1e-6)
    assert logs["frac_reward_zero_std"] == pytest.approx(1 / 3)
    assert logs["completions/mean_length"] == pytest.approx(statistics.mean(lengths))
    assert logs["completions/clipped_ratio"] == pytest.approx(1 / 9)



# ------------------------------------------------------------------------------------------------ 4. shared prefix
@pytest.fixture(scope="module")
def image_groups(processor):
    """Two image prompts (different images and lengths, one with a history turn), G = 3 completions each of
    different lengths, one truncated (no end token); rewards with spread."""
    from test_packing import random_image

    from phi3v.conversation import tokenize_prompt

    first = tokenize_prompt(processor, [{"role": "user", "content": "<|image_1|>\nWhat colour is it?"}],
                            [random_image(400, 300, 1)], num_crops=1)
    second = tokenize_prompt(processor, [{"role": "user", "content": "Describe the next picture."},
                                         {"role": "assistant", "content": "Sure."},
                                         {"role": "user", "content": "<|image_1|>\nWhat is in it?"}],
                             [random_image(200, 500, 2)], num_crops=1)
    first["completions"] = [processor.encode_text(t) + [END] for t in ("Red.", "A dark, reddish brown.", "Red")]
    second["completions"] = [processor.encode_text(t) + [END] for t in ("Noise.", "Pixels", "Coloured noise")]
    second["completions"][2] = second["completions"][2][:-1]
    return [first, second], [[1.0, 0.0, 0.25], [-0.5, 2.0, 0.5]]


def layout_losses(policy, reference, batch, rewards, bias_correction):
    """Each loss type's value on one batch (either layout), beta 0.1 with the reference, old log-probs off the
    current ones by a fixed amount per token (so the clip bounds some tokens), and the gradients of their sum."""
    inputs = model_inputs(batch)
    log_probs = policy(**inputs, logp_temperature=TEMPERATURE).token_log_probs
    with torch.no_grad():
        ref = reference(**inputs, logp_temperature=TEMPERATURE).token_log_probs
    old = log_probs.detach() + torch.linspace(-0.4, 0.4, log_probs.numel())
    advantages, _ = group_advantages(torch.tensor(rewards).flatten(), G)
    index, lengths = batch["completion_index"], batch["completion_lengths"]
    per_token, kl, low, high = token_losses(log_probs, old, advantages[index], EPS_LOW, EPS_HIGH, 0.1, ref,
                                            bias_correction)
    losses = {t: aggregate(per_token, index, lengths, t, 12) for t in ("grpo", "bnpo", "dr_grpo", "dapo")}
    sum(losses.values()).backward()
    values = {t: v.item() for t, v in losses.items()}
    return values, gradients(policy), (kl.detach(), low, high, log_probs.detach())


@pytest.mark.parametrize("bias_correction", [True, False])
def test_shared_prefix_rows_give_the_loss_and_gradients_of_the_usual_layout(models, image_groups, bias_correction):
    """The GRPO loss of two image groups as one shared-prefix row (the prompt and its image run once) equals that
    of prompt + completion rows (CLIP run per row), per loss type, with every gradient (CLIP and projector too)."""
    policy, _, reference = models
    groups, rewards = image_groups
    shared = shared_prefix_batch(groups, PAD)
    usual = two_sequence_batch(groups, PAD)
    assert shared["input_ids"].shape[0] == 1 and usual["input_ids"].shape[0] == 6
    values, grads, (kl, low, high, log_probs) = layout_losses(policy, reference, shared, rewards, bias_correction)
    expected, expected_grads, (ref_kl, ref_low, ref_high, ref_log_probs) = layout_losses(
        policy, reference, usual, rewards, bias_correction)
    print(f"\nshared {values}\nusual  {expected}")
    torch.testing.assert_close(log_probs, ref_log_probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(kl, ref_kl, rtol=0, atol=1e-5)
    assert torch.equal(low, ref_low) and torch.equal(high, ref_high) and low.any() and high.any()
    assert values == pytest.approx(expected, abs=1e-5, rel=1e-5)
    assert values["dapo"] == values["bnpo"]  # one micro-batch on one process: dapo's normalizer is its tokens
    assert len(set(values.values())) == 3 and all(abs(v) > 1e-3 for v in values.values())
    assert grads.keys() == expected_grads.keys()
    assert any("vision_model.encoder.layers.0" in n for n in grads) and any("img_projection" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------ data and files
EVAL_SIZE, NUM_TRAIN, DISTINCT = 500, 16, 12  # the memes recipe evaluates on rows [:500] and trains on the rest
RUN_FLAGS = ["--num_crops", "1", "--num_generations", "2", "--max_completion_length", "3", "--max_new_tokens", "2",
             "--report_to", "none", "--deepspeed", "none", "--dataloader_num_workers", "0", "--no_tqdm",
             "--logging_steps", "1", "--seed", "0", "--warmup_steps", "0"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny checkpoint (1 crop); 500 + 16 memes (12 distinct images repeated); a 3 + 2 row DocVQA copy; a records
    file of 4 + 2 samples with images; the length reward file."""
    import datasets
    from PIL import Image

    from phi3v.synthetic import docvqa_rows, memes_rows, save_hf_dataset
    from phi3v.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("grpo")
    distinct = memes_rows(DISTINCT)
    memes = save_hf_dataset([distinct[i % DISTINCT] for i in range(EVAL_SIZE + NUM_TRAIN)], str(root / "memes"))
    docvqa = str(root / "docvqa")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(docvqa_rows(3, seed=0)),
                          "test": datasets.Dataset.from_list(docvqa_rows(2, seed=1))}).save_to_disk(docvqa)
    (root / "media").mkdir()
    for name, colour in (("red.png", (220, 30, 30)), ("blue.png", (30, 30, 220))):
        Image.new("RGB", (48, 40), colour).save(root / "media" / name)

    def records(n, offset=0):
        return [{"id": f"r{offset + i}", "image": f"{colour}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": colour.title()}]}
            for i, colour in zip(range(n), ["red", "blue"] * n)]

    (root / "train.json").write_text(json.dumps(records(4)))
    (root / "eval.json").write_text(json.dumps(records(2, offset=4)))
    (root / "length_rewards.py").write_text(LENGTH_REWARD)
    return {"root": root, "model": write_tiny_checkpoint(root / "model", num_crops=1), "memes": memes,
            "docvqa": docvqa, "train": str(root / "train.json"), "eval": str(root / "eval.json"),
            "media": str(root / "media"), "rewards": str(root / "length_rewards.py")}


def task_argv(work, *flags, task="finetune_hf_trainer_hateful_memes.py", out="out"):
    """The recipe's command line with --task (out None: no --output_dir, the launcher adds it)."""
    dataset = work["docvqa"] if "docvqa" in task else work["memes"]
    return ["--task", task, "--dataset_path", dataset, "--model_id", work["model"],
            *(["--output_dir", str(work["root"] / out)] if out else []), "--batch_size", "4", "--batch_size_per_gpu",
            "4", "--max_train_samples", "16", "--max_eval_samples", "2", *RUN_FLAGS, *flags]


def records_argv(work, *flags, out="out"):
    return ["--data_path", work["train"], "--image_folder", work["media"], "--model_id", work["model"],
            "--output_dir", str(work["root"] / out), "--batch_size", "4", "--batch_size_per_gpu", "4", *RUN_FLAGS,
            *flags]


class Stop(Exception):
    """Raised where the model would load."""


def built_before_the_model(monkeypatch, argv):
    """(the Rewards, the training PromptDataset) the recipe builds from argv, stopped where the model would load."""
    built = {}

    class RecordingRewards(Rewards):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built["rewards"] = self

    class RecordingDataset(recipe.PromptDataset):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.setdefault("train", self)

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(recipe, "Rewards", RecordingRewards)
    monkeypatch.setattr(recipe, "PromptDataset", RecordingDataset)
    monkeypatch.setattr(recipe, "model_for_training", stop)
    with pytest.raises(Stop):
        recipe.main(argv)
    return built["rewards"], built["train"]


# ------------------------------------------------------------------------------------------------ 5. rewards
MEMES_ANSWERS = ["yes", "no", "Yes.", " NO ", "maybe", "no, it is not hateful"]


def test_task_accuracy_reward_is_the_recipes_score_of_each_answer(work, monkeypatch):
    rewards, train = built_before_the_model(monkeypatch, task_argv(work))
    assert rewards.names == ["accuracy_reward"]
    examples = {}
    for index in range(len(train)):
        example = train[index]
        examples.setdefault(example["answer"], example)
    assert sorted(examples) == ["no", "yes"]
    for gold, hand in (("yes", [1, 0, 1, 0, 0, 0]), ("no", [0, 1, 0, 1, 0, 1])):
        example = examples[gold]
        n = len(MEMES_ANSWERS)
        got = rewards(MEMES_ANSWERS, [example["answer"]] * n, [example["record"]] * n)[:, 0].tolist()
        alone = [memes_recipe.score([{"id": example["sample_id"], "prediction": text.strip(), "answer": gold}])[1]
                 for text in MEMES_ANSWERS]
        assert got == alone == hand, gold


def test_task_docvqa_reward_is_anls(work, monkeypatch):
    rewards, train = built_before_the_model(monkeypatch, task_argv(work, task="finetune_hf_trainer_docvqa.py"))
    example = train[0]
    record, colour = example["record"], example["answer"]
    assert record["answers"] == [colour, f"{colour} box"]
    answers = [colour, f"{colour} bx", f"{colour.upper()} BOX.", "zzzzzzzzzz"]
    got = rewards(answers, [colour] * 4, [record] * 4)[:, 0].tolist()
    # a partial match: 1 - Levenshtein / length against the closer gold answer ("<colour> box", one letter off)
    hand = [1.0, 1 - 1 / (len(colour) + 4), 1.0, 0.0]
    alone = [docvqa_recipe.score([{"id": record["id"], "prediction": a, "answer": colour,
                                   "answers": record["answers"]}])[1] for a in answers]
    assert got == pytest.approx(hand, abs=1e-6) and got == pytest.approx(alone, abs=1e-6)  # float32
    assert 0 < got[1] < 1


def test_records_accuracy_reward_is_exact_match(work, monkeypatch):
    rewards, train = built_before_the_model(monkeypatch, records_argv(work))
    example = train[0]
    assert example["answer"] == "Red"
    answers = ["Red", " red.", "Red!", "Rde", "It is red"]
    got = rewards(answers, ["Red"] * 5, [example["record"]] * 5)[:, 0].tolist()
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_an_answer_naming_every_class_is_parsed_as_evaluation_parses_it(work, monkeypatch):
    """Scored alone, "yes or no" would be parsed onto its own gold class only and be right whatever the gold (a
    reward to hack); the recipe gives accuracy_reward the task's classes, so it is parsed onto both, as in
    evaluation: the first class named."""
    rewards, train = built_before_the_model(monkeypatch, task_argv(work))
    records = [{"id": "a"}, {"id": "b"}]
    assert rewards(["yes or no", "yes or no"], ["yes", "no"], records)[:, 0].tolist() == [1.0, 0.0]
    assert rewards(["no, not yes", "no, not yes"], ["yes", "no"], records)[:, 0].tolist() == [0.0, 1.0]
    evaluated = memes_recipe.score([{"id": "a", "prediction": "yes or no", "answer": "yes"},
                                    {"id": "b", "prediction": "yes or no", "answer": "no"}])
    assert evaluated == ("accuracy", 0.5)
    alone = Rewards(["accuracy_reward"], None, memes_recipe.score, None)  # no classes: the hole this closes
    assert alone(["yes or no", "yes or no"], ["yes", "no"], records)[:, 0].tolist() == [1.0, 1.0]


def test_answer_format_and_weights():
    pattern = r"<think>.*?</think>\s*<answer>(?P<answer>.*?)</answer>"
    rewards = Rewards(["accuracy_reward", "format_reward"], [1.0, 0.5], memes_recipe.score, pattern)
    answers = ["<think>red disc</think> <answer>yes</answer>", "yes", "<think></think><answer>no</answer>",
               "<answer>yes</answer>"]
    per_function = rewards(answers, ["yes"] * 4, [{"id": str(i)} for i in range(4)])
    assert per_function.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    assert rewards.combine(per_function).tolist() == [1.5, 0.0, 0.5, 0.0]


def test_reward_file_functions_none_and_numpy_values(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("import numpy as np\nfrom os.path import join as imported_reward\n\n\n"
                    "def first_reward(completions, answers, records):\n"
                    "    return [np.float32(0.5) if c else None for c in completions]\n\n\n"
                    "def second_reward(completions, answers, records):\n"
                    "    return [None, 2, 1.5][: len(completions)]\n")
    rewards = Rewards([str(path), "accuracy_reward"], [2.0, 1.0, 1.0], memes_recipe.score, None)
    assert rewards.names == ["first_reward", "second_reward", "accuracy_reward"]  # the file's order; not imports
    per_function = rewards(["", "yes", "no"], ["no", "yes", "yes"], [{"id": str(i)} for i in range(3)])
    expected = [[math.nan, math.nan, 0.0], [0.5, 2.0, 1.0], [0.5, 1.5, 0.0]]
    assert torch.allclose(per_function, torch.tensor(expected), equal_nan=True)
    assert rewards.combine(per_function).tolist() == [0.0, 4.0, 2.5]  # nansum: None counts 0 (a number is there)
    only_none = Rewards([str(path)], None, memes_recipe.score, None)
    assert math.isnan(only_none.combine(only_none([""], ["x"], [{}]))[0])  # every function None: unscorable
    flag = tmp_path / "flag.py"
    flag.write_text("def flag_reward(completions, answers, records):\n    return [True for _ in completions]\n")
    with pytest.raises(InputError, match=r"flag_reward returned True: a reward is a float \(or None\)$"):
        Rewards([str(flag)], None, memes_recipe.score, None)(["a"], ["a"], [{}])


# ------------------------------------------------------------------------------------------------ 8. errors
def error_line(call) -> str:
    """The message the recipe exits with, after "error: ": checked to be the one line
    `finetune_hf_trainer_grpo.py: error: ...` with exit status 2 (argparse's way, phi3v.errors)."""
    with pytest.raises(SystemExit) as error:
        call()
    text = str(error.value)
    print(text)
    assert error.value.code == 2
    assert "\n" not in text and text.startswith(f"{PROGRAM}: error: ")
    return text.removeprefix(f"{PROGRAM}: error: ")


REWARD_FILES = {
    "syntax": "import os\ndef broken_reward(completions, answers, records)\n    return [0.0]\n",
    "none": "def score(completions, answers, records):\n    return [0.0 for _ in completions]\n",
    "raises": "def crash_reward(completions, answers, records):\n    raise KeyError('solution')\n",
    "short": "def short_reward(completions, answers, records):\n    return []\n",
    "text": "def text_reward(completions, answers, records):\n    return ['high' for _ in completions]\n",
    "scalar": "def mean_reward(completions, answers, records):\n    return 0.5\n",
    "import": "import not_a_module_here\n\ndef some_reward(completions, answers, records):\n    return [0.0]\n",
}


@pytest.fixture
def no_model(monkeypatch):
    """The recipe as `finetune_hf_trainer_grpo.py` (its name in messages); the test fails if the model loads."""
    monkeypatch.setattr(sys, "argv", [PROGRAM])
    monkeypatch.setattr(phi3v.training, "load_model",
                        lambda *args, **kwargs: pytest.fail("the model loaded before the error"))


@pytest.mark.parametrize("case", sorted(REWARD_FILES))
def test_bad_reward_files_end_in_one_line_before_the_model_loads(work, tmp_path, no_model, case):
    path = tmp_path / f"{case}.py"
    path.write_text(REWARD_FILES[case])
    expected = {
        "syntax": f"--reward_funcs {path}:2: cannot load it: SyntaxError: expected ':'",
        "none": f"--reward_funcs {path}: no function whose name ends in _reward (a reward is f(completions, answers, "
                "records) -> one float per completion)",
        "raises": f"reward {path}:crash_reward raised KeyError: 'solution'",
        "short": f"reward {path}:short_reward returned 0 values for 1 completions: it must return one float per "
                 "completion",
        "text": f"reward {path}:text_reward returned 'high': a reward is a float (or None)",
        "scalar": f"reward {path}:mean_reward returned float for 1 completions: it must return one float per "
                  "completion",
        "import": f"--reward_funcs {path}: cannot load it: ModuleNotFoundError: No module named 'not_a_module_here'",
    }[case]
    assert error_line(lambda: recipe.main(records_argv(work, "--reward_funcs", "accuracy_reward", str(path),
                                                       out=f"bad_{case}"))) == expected


def bad_flags(work, tmp_path):
    """{case: (argv, the error after "error: ")}"""
    (tmp_path / "broken_recipe.py").write_text("def load_data(args, task_args)\n    pass\n")
    (tmp_path / "notes.txt").write_text("not a recipe")
    broken, notes = str(tmp_path / "broken_recipe.py"), str(tmp_path / "notes.txt")
    neither = records_argv(work)[4:]  # without --data_path and --image_folder
    assert "--data_path" not in neither and "--model_id" in neither
    data = "give the data as --task RECIPE.py (a task recipe's data and metric) or --data_path FILE (records), one " \
           "of them"
    return {
        "format_reward without --answer_format": (
            records_argv(work, "--reward_funcs", "format_reward"),
            "--reward_funcs format_reward needs --answer_format (the regular expression an answer must match)"),
        "bad --answer_format": (
            records_argv(work, "--answer_format", "(<answer>"),
            "--answer_format '(<answer>': not a regex (missing ), unterminated subpattern at position 0)"),
        "--reward_weights count": (
            records_argv(work, "--reward_funcs", "accuracy_reward", work["rewards"], "--reward_weights", "1"),
            "--reward_weights has 1 weights for 2 reward functions (accuracy_reward, length_reward)"),
        "unknown reward": (
            records_argv(work, "--reward_funcs", "accuracy"),
            "--reward_funcs accuracy: neither a built-in reward (accuracy_reward, format_reward) nor a .py file of "
            "reward functions"),
        "missing reward file": (
            records_argv(work, "--reward_funcs", str(tmp_path / "nope.py")),
            f"--reward_funcs {tmp_path / 'nope.py'}: no such file"),
        "--task and --data_path": (records_argv(work, "--task", "finetune_hf_trainer_hateful_memes.py"), data),
        "neither --task nor --data_path": (neither, data),
        "--dataset_path without --task": (
            records_argv(work, "--dataset_path", work["memes"]),
            "--dataset_path is a --task recipe's data flag; without --task use --data_path"),
        "--task not a recipe": (
            task_argv(work, task="phi3v/grpo.py"),
            "--task phi3v/grpo.py: not a task recipe (it has no load_data, to_record, score; copy "
            "finetune_hf_trainer_hateful_memes.py's task section)"),
        "--task not python": (
            task_argv(work, task=notes),
            f"--task {notes}: not a task recipe (a recipe is a .py file, e.g. finetune_hf_trainer_docvqa.py)"),
        "--task syntax error": (task_argv(work, task=broken),
                                f"--task {broken}:1: cannot load it: SyntaxError: expected ':'"),
        "--task missing": (task_argv(work, task="finetune_hf_trainer_nope.py"),
                           "--task finetune_hf_trainer_nope.py: no such recipe file"),
        "batch not a multiple of G": (
            records_argv(work, "--batch_size_per_gpu", "3"),
            "--batch_size_per_gpu 3 and --batch_size 4 count answers and must be multiples of --num_generations 2 "
            "(a group's answers share their prompt's row, on one GPU)"),
        "--num_generations 1": (
            records_argv(work, "--num_generations", "1"),
            "--num_generations must be at least 2 (advantages compare a group's answers), got 1"),
        "--loss_type": (records_argv(work, "--loss_type", "ppo"), "--loss_type ppo: one of grpo, bnpo, dr_grpo, dapo"),
        "--scale_rewards": (records_argv(work, "--scale_rewards", "std"),
                            "--scale_rewards std: one of group, batch, none"),
        "--temperature 0": (
            records_argv(work, "--temperature", "0"),
            "sampling needs --temperature > 0, --top_p in (0, 1], --top_k >= 0 and --max_completion_length >= 1"),

        "docvqa's own check": (
            task_argv(work, "--full_train", task="finetune_hf_trainer_docvqa.py"),
            "--full_train trains on the hub's HuggingFaceM4/the_cauldron docvqa, but --dataset_path replaces the hub "
            "data with your copy: give one (for a local copy of the full set, save it with save_to_disk and pass only "
            "--dataset_path)"),
    }


BAD_FLAG_CASES = ["format_reward without --answer_format", "bad --answer_format", "--reward_weights count",
                  "unknown reward", "missing reward file", "--task and --data_path", "neither --task nor --data_path",
                  "--dataset_path without --task", "--task not a recipe", "--task not python", "--task syntax error",
                  "--task missing", "batch not a multiple of G", "--num_generations 1", "--loss_type",
                  "--scale_rewards", "--temperature 0", "docvqa's own check"]


@pytest.mark.parametrize("case", BAD_FLAG_CASES)
def test_bad_flags_end_in_one_line_before_the_model_loads(work, tmp_path, no_model, case):
    argv, expected = bad_flags(work, tmp_path)[case]
    assert error_line(lambda: recipe.main(argv)) == expected


@pytest.mark.parametrize("flags, task", [
    (["--full_train"], "finetune_hf_trainer_hateful_memes.py"),  # docvqa's flag: the memes recipe has none
    (["--full_train"], None),  # nor GRPO without --task
    (["--use_lora"], "finetune_hf_trainer_hateful_memes.py"),  # a task recipe flag GRPO's family calls otherwise
    (["--num_generation", "4"], "finetune_hf_trainer_hateful_memes.py"),
])
def test_unknown_flags_are_named(work, no_model, flags, task):
    argv = task_argv(work, *flags, task=task) if task else records_argv(work, *flags)
    text = error_line(lambda: recipe.main(argv))
    if flags[0] == "--use_lora":
        assert text == f"--use_lora is a flag of the four task recipes, not of {PROGRAM}; use --lora_enable"
    else:
        assert text.startswith(f"unknown flag {flags[0]}")


def test_a_misspelt_grpo_flag_gets_its_hint(work, no_model):
    argv = task_argv(work, "--num_generation", "4")
    assert error_line(lambda: recipe.main(argv)) == "unknown flag --num_generation: did you mean --num_generations?"


def test_a_task_recipes_own_flags_join_the_parser(work):
    """--full_train is docvqa's: known with --task finetune_hf_trainer_docvqa.py (above: unknown with memes)."""
    _, task, _ = recipe.parse(task_argv(work, "--full_train", task="finetune_hf_trainer_docvqa.py"))
    assert task.more_flags.full_train is True
    _, task, _ = recipe.parse(task_argv(work))
    assert task.more_flags is None


def test_a_reward_failing_in_training_ends_in_one_line(work, tmp_path, monkeypatch):
    """A reward that answers the check on one sample but fails on a training batch: the same one line, from inside
    the Trainer's step."""
    monkeypatch.setattr(sys, "argv", [PROGRAM])
    path = tmp_path / "picky.py"
    path.write_text("def picky_reward(completions, answers, records):\n"
                    "    if len(completions) > 1:\n"
                    "        raise ValueError(f'{len(completions)} answers at once')\n"
                    "    return [0.0]\n")
    loaded = []
    load_model = phi3v.training.load_model
    monkeypatch.setattr(phi3v.training, "load_model", lambda *a, **k: loaded.append(1) or load_model(*a, **k))
    argv = records_argv(work, "--reward_funcs", str(path), "--max_steps", "1", "--save_strategy", "no",
                        "--skip_eval_before", out="picky")
    assert error_line(lambda: recipe.main(argv)) == f"reward {path}:picky_reward raised ValueError: 4 answers at once"
    assert loaded == [1]


# ------------------------------------------------------------------------------------------------ 9. runs in-process
def log_entries(log_history):
    """{step: the training log of that step} (the step logs, not the summary at the end)."""
    return {entry["step"]: entry for entry in log_history if "loss" in entry}


@pytest.fixture(scope="module")
def records_run(work):
    """--data_path records with --eval_data_path, accuracy_reward + the length reward, LoRA with --beta (the
    reference: the adapters disabled), 2 steps of 2 prompts x 2 answers; every sampled group recorded."""
    samples, trainers = [], []
    sample = GRPOTrainer.sample

    def recording_sample(self, prompts):
        sampled = sample(self, prompts)
        samples.append({"step": self.state.global_step, "answers": [p["answer"] for p in prompts],
                        "texts": [self.processing_class.decode(c) for group in sampled.completions for c in group],
                        "lengths": [len(c) for group in sampled.completions for c in group]})
        return sampled

    make_trainer = recipe.make_trainer
    argv = records_argv(work, "--eval_data_path", work["eval"], "--reward_funcs", "accuracy_reward", work["rewards"],
                        "--lora_enable", "--lora_rank", "4", "--lora_alpha", "8", "--beta", "0.1", "--max_steps", "2",
                        "--learning_rate", "1e-2", "--save_strategy", "no", "--eval_batch_size", "2",
                        "--eval_steps", "1", out="records_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [PROGRAM])
        patch.setattr(GRPOTrainer, "sample", recording_sample)
        patch.setattr(recipe, "make_trainer", lambda *a, **k: trainers.append(make_trainer(*a, **k)) or trainers[-1])
        recipe.main(argv)
    return {"dir": work["root"] / "records_run", "samples": samples, "trainer": trainers[0]}


def test_records_run_logs_each_reward_function(records_run):
    """rewards/<name>/mean of the user's file and of accuracy_reward (exact match), reward their sum, for the
    answers each step sampled; KL 0 at the first step (the LoRA policy is its base) and more after it."""
    from phi3v.metrics import mean_exact_match

    logs = log_entries(records_run["trainer"].state.log_history)
    assert sorted(logs) == [1, 2]
    assert [s["step"] for s in records_run["samples"]] == [0, 1]
    for sampled in records_run["samples"]:
        step = sampled["step"] + 1
        texts, answers = sampled["texts"], [a for a in sampled["answers"] for _ in range(2)]
        assert sorted(set(answers)) == ["Blue", "Red"]
        length = statistics.mean(length_reward(texts))
        accuracy = mean_exact_match(texts, [[a] for a in answers])
        assert logs[step]["rewards/length_reward/mean"] == pytest.approx(length, abs=1e-6)
        assert logs[step]["rewards/accuracy_reward/mean"] == pytest.approx(accuracy, abs=1e-6)
        assert logs[step]["reward"] == pytest.approx(length + accuracy, abs=1e-6)
        assert logs[step]["completions/mean_length"] == pytest.approx(statistics.mean(sampled["lengths"]), abs=1e-6)
        assert logs[step]["frac_reward_zero_std"] < 1  # the length reward spreads: advantages, a gradient
    assert logs[1]["kl"] == 0.0 and logs[2]["kl"] > 0
    assert logs[2]["loss"] != 0.0  # beta x KL


def test_records_run_evaluates_by_exact_match(records_run):
    """Before, during (--eval_steps 1: after each of the 2 steps, logged as eval_exact_match / eval_anls) and after
    training: the greedy answers' exact match and ANLS, recomputed here from the predictions each report holds."""
    from phi3v.metrics import mean_anls, mean_exact_match

    logged = {e["step"]: e for e in records_run["trainer"].state.log_history if "eval_exact_match" in e}
    assert sorted(logged) == [1, 2]
    for name in ("eval_before", "eval_step_1", "eval_step_2", "eval_after"):
        with open(records_run["dir"] / f"{name}.json") as f:
            report = json.load(f)
        predictions = report["predictions"]
        assert [p["id"] for p in predictions] == ["r4", "r5"] and [p["answer"] for p in predictions] == ["Red", "Blue"]
        texts, golds = [p["prediction"] for p in predictions], [[p["answer"]] for p in predictions]
        assert report["exact_match"] == mean_exact_match(texts, golds)
        assert report["anls"] == pytest.approx(mean_anls(texts, golds))
        if name.startswith("eval_step_"):
            step = int(name.rsplit("_", 1)[1])
            assert logged[step]["eval_exact_match"] == pytest.approx(report["exact_match"])
            assert logged[step]["eval_anls"] == pytest.approx(report["anls"])
    assert os.path.isfile(records_run["dir"] / "adapter_model.safetensors")


# ------------------------------------------------------------------------------------------------ 6, 7. runs
# The recipe, recording every sampled group (to $SAMPLES.<rank>, one JSON line each) and SIGKILLed once the
# checkpoint of step $KILL_AFTER_SAVE is complete.
WRAPPER = """
import json
import os
import signal
import sys

from transformers import TrainerCallback

sys.path.insert(0, {root!r})
import finetune_hf_trainer_grpo as recipe
from phi3v.grpo import GRPOTrainer


class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):  # after the Trainer wrote trainer_state.json and rotated
        if str(state.global_step) == os.environ.get("KILL_AFTER_SAVE"):
            os.kill(os.getpid(), signal.SIGKILL)


sample = GRPOTrainer.sample


def recording_sample(self, prompts):
    sampled = sample(self, prompts)
    line = {{"step": self.state.global_step, "ids": [p["sample_id"] for p in prompts],
             "answers": [p["answer"] for p in prompts], "completions": sampled.completions,
             "texts": [self.processing_class.decode(c) for group in sampled.completions for c in group]}}
    with open(f"{{os.environ['SAMPLES']}}.{{self.args.process_index}}", "a") as f:
        f.write(json.dumps(line) + "\\n")
    return sampled


GRPOTrainer.sample = recording_sample
make_trainer = recipe.make_trainer
recipe.make_trainer = lambda *positional, **options: make_trainer(*positional, callbacks=[KillAfterSave()], **options)
recipe.main()
"""


def subprocess_env(**extra):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1", **extra)
    os.makedirs(env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/phi3v-torch-extensions")),
                exist_ok=True)
    return env


def launch(command, output_dir, expect=0, **extra_env):
    """Run the wrapped recipe (command: the interpreter or torchrun, then the wrapper); returns its output."""
    result = subprocess.run([*command, "--output_dir", str(output_dir)], cwd=ROOT, capture_output=True, text=True,
                            timeout=TIMEOUT_S, env=subprocess_env(SAMPLES=f"{output_dir}.samples", **extra_env))
    with open(f"{output_dir}.log", "w") as f:  # beside the run, for a look after a failure
        f.write(result.stdout + result.stderr)
    assert result.returncode == expect, f"exit {result.returncode}:\n{(result.stdout + result.stderr)[-6000:]}"
    return result.stdout + result.stderr


def samples(output_dir, rank=0):
    with open(f"{output_dir}.samples.{rank}") as f:
        return [json.loads(line) for line in f]


def trainer_state(run_dir, step):
    with open(os.path.join(run_dir, f"checkpoint-{step}", "trainer_state.json")) as f:
        return json.load(f)


def weights(path):
    from safetensors.torch import load_file

    return load_file(path)


def max_difference(a, b):
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# The values a step logs that do not depend on the machine's speed
STEP_KEYS = ("loss", "grad_norm", "learning_rate", "reward", "reward_std", "frac_reward_zero_std", "kl",
             "rewards/accuracy_reward/mean", "rewards/length_reward/mean", "completions/mean_length",
             "completions/clipped_ratio", "clip_ratio/region_mean")


def step_logs(run_dir, last_step):
    return {step: {k: entry[k] for k in STEP_KEYS}
            for step, entry in log_entries(trainer_state(run_dir, last_step)["log_history"]).items()}


@pytest.fixture(scope="module")
def run_flags(work):
    """The memes task, accuracy_reward + the length reward, beta 0.1 (a reference model), 4 steps of 2
    micro-batches (1 prompt x 2 answers each: gradient accumulation), a checkpoint every 2 steps."""
    (work["root"] / "wrapper.py").write_text(WRAPPER.format(root=ROOT))
    return [str(work["root"] / "wrapper.py"),
            *task_argv(work, "--reward_funcs", "accuracy_reward", work["rewards"], "--beta", "0.1", "--learning_rate",
                       "1e-3", "--batch_size_per_gpu", "2", "--max_steps", "4", "--save_strategy", "steps",
                       "--save_steps", "2", "--skip_eval_before", "--eval_batch_size", "2", out=None)]


@pytest.fixture(scope="module")
def resumed_runs(work, run_flags):
    """S goes straight through; K, the same command, is SIGKILLed right after its checkpoint of step 2; R resumes K
    with --resume_from_checkpoint auto."""
    flags, root = run_flags, work["root"]
    straight, killed = root / "straight", root / "killed"
    launch([sys.executable, *flags], straight)
    launch([sys.executable, *flags], killed, expect=-signal.SIGKILL, KILL_AFTER_SAVE="2")
    left = sorted(os.listdir(killed / "checkpoint-2"))
    killed_samples = samples(killed)
    os.replace(f"{killed}.samples.0", f"{killed}.killed-samples.0")
    log = launch([sys.executable, *flags, "--resume_from_checkpoint", "auto"], killed)
    assert f"resuming from {killed / 'checkpoint-2'}" in log
    return {"straight": straight, "resumed": killed, "left_by_kill": left, "killed_samples": killed_samples}


def test_resumed_after_sigkill_continues_exactly(resumed_runs):
    straight, resumed = resumed_runs["straight"], resumed_runs["resumed"]
    # the checkpoint holds the Trainer's RNG state, which the resumed run's sampling continues from
    assert "rng_state.pth" in resumed_runs["left_by_kill"] and "optimizer.pt" in resumed_runs["left_by_kill"]
    everything = samples(straight)
    assert [s["step"] for s in everything] == [0, 0, 1, 1, 2, 2, 3, 3]  # 2 micro-batches of 1 prompt a step
    assert [s["step"] for s in resumed_runs["killed_samples"]] == [0, 0, 1, 1]
    assert resumed_runs["killed_samples"] == everything[:4]
    after = samples(resumed)
    assert [s["step"] for s in after] == [2, 2, 3, 3]
    # the same prompts and the same sampled answers, token for token, after the resume
    assert after == everything[4:]
    assert len({json.dumps(s["completions"]) for s in everything}) == 8  # sampling varies from group to group

    logs, expected = step_logs(resumed, 4), step_logs(straight, 4)
    print(f"\nstraight run: {expected}")
    assert sorted(logs) == sorted(expected) == [1, 2, 3, 4]
    for step in (3, 4):
        assert logs[step] == pytest.approx(expected[step], abs=1e-6), step
    assert expected[1]["kl"] == 0.0 and expected[4]["kl"] > 0 and expected[4]["loss"] != 0
    for step in expected:  # all answers 3 tokens long: dapo's policy term is 0 in value, the loss is beta x KL
        assert expected[step]["loss"] == pytest.approx(0.1 * expected[step]["kl"], abs=1e-6)
    assert min(expected[s]["frac_reward_zero_std"] for s in expected) < 1  # the length reward spreads
    assert max_difference(weights(resumed / "model.safetensors"), weights(straight / "model.safetensors")) <= 1e-6
    initial = weights(os.path.join(resumed_runs["straight"].parent, "model", "model.safetensors"))
    assert max_difference(weights(straight / "model.safetensors"), initial) > 1e-4  # it trained


@pytest.fixture(scope="module")
def distributed_runs(work, run_flags):
    """torchrun x 2 on CPU (gloo): DDP and DeepSpeed ZeRO-2 (DDP twice, with a warning, where DeepSpeed cannot
    run), 2 steps of a global batch of 8 answers = 2 processes x 2 prompts x 2 answers; --scale_rewards batch (the
    rewards of both processes gathered for the std)."""
    from test_distributed import deepspeed_unavailable

    from phi3v.arguments import DS_CONFIGS

    reason = deepspeed_unavailable()
    if reason:
        warnings.warn(f"DeepSpeed cannot run here ({reason}): the ZeRO-2 run is DDP", stacklevel=2)
    flags = [*run_flags, "--ddp_backend", "gloo", "--batch_size", "8", "--batch_size_per_gpu", "4", "--max_steps",
             "2", "--scale_rewards", "batch"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    runs = {}
    for name, deepspeed in (("ddp", "none"), ("zero2", "none" if reason else os.path.join(DS_CONFIGS, "zero2.json"))):
        runs[name] = work["root"] / name
        launch([*torchrun, *flags, "--deepspeed", deepspeed], runs[name])
    return {**runs, "deepspeed": reason is None}


def test_two_processes_ddp_and_zero2(distributed_runs):
    ddp, zero2 = distributed_runs["ddp"], distributed_runs["zero2"]
    if distributed_runs["deepspeed"]:  # DeepSpeed's checkpoint: one optimizer shard per rank
        assert len(glob.glob(str(zero2 / "checkpoint-2" / "global_step2" / "*optim_states.pt"))) == 2
    logs = {name: step_logs(run, 2) for name, run in (("ddp", ddp), ("zero2", zero2))}
    print(f"\nDDP {logs['ddp']}\nZeRO-2 {logs['zero2']}")
    assert sorted(logs["ddp"]) == sorted(logs["zero2"]) == [1, 2]
    for run in (ddp, zero2):
        per_rank = [samples(run, rank) for rank in (0, 1)]
        assert [[s["step"] for s in rank] for rank in per_rank] == [[0, 1], [0, 1]]  # one micro-batch a step
        for step in (0, 1):
            lines = [rank[step] for rank in per_rank]
            assert not set(lines[0]["ids"]) & set(lines[1]["ids"])  # each process its own 2 prompts
            texts = lines[0]["texts"] + lines[1]["texts"]
            assert len(texts) == 8
            # the logged mean is over both processes' answers
            logged = logs["ddp" if run == ddp else "zero2"][step + 1]["rewards/length_reward/mean"]
            assert logged == pytest.approx(statistics.mean(length_reward(texts)), abs=1e-6)
    assert samples(ddp, 0) == samples(zero2, 0) and samples(ddp, 1) == samples(zero2, 1)  # same answers sampled
    # Same data, seeds and optimizer: only the gradient reduction differs (ZeRO-2's buckets, DDP's), so the losses
    # agree to float rounding
    for step in (1, 2):
        assert logs["zero2"][step] == pytest.approx(logs["ddp"][step], rel=1e-5, abs=1e-6), step
    assert logs["ddp"][2]["kl"] > 0
    assert max_difference(weights(zero2 / "model.safetensors"), weights(ddp / "model.safetensors")) < 1e-5


# ------------------------------------------------------------------------------------------------ --shared_prefix
def test_shared_prefix_flag_off_is_the_usual_computation(models, image_groups, processor, tmp_path):
    """One GRPO compute_loss with the real sampler, shared_prefix True (the prompt run once in sampling and in the
    loss) and False (--shared_prefix False: the prompt repeated G times in both, TRL's layout), the same seed: the
    same completions, the same loss (beta 0.1, spread rewards) and the same gradients."""
    from transformers import TrainingArguments

    policy, _, reference = models
    groups, rewards = image_groups
    prompts = [{**{k: v for k, v in group.items() if k != "completions"}, "answer": "Red.", "record": {"id": f"p{i}"},
                "sample_id": f"p{i}"} for i, group in enumerate(groups)]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=1)
    results = {}
    for shared in (True, False):
        settings = GRPOSettings(num_generations=G, max_completion_length=6, temperature=TEMPERATURE, beta=0.1,
                                shared_prefix=shared)
        trainer = GRPOTrainer(model=policy, args=args, train_dataset=[{}], processing_class=processor,
                              data_collator=collate_prompts, grpo=settings, rewards=TableRewards(rewards),
                              ref_model=reference)
        sampled = []  # what the real sampler returned
        trainer.sample = lambda prompts, sample=trainer.sample, into=sampled: into.append(sample(prompts)) or into[-1]
        torch.manual_seed(0)
        loss = trainer.compute_loss(policy, {"prompts": prompts})
        loss.backward()
        results[shared] = sampled[0].completions, loss.item(), gradients(policy)
    (completions, loss, grads), (usual_completions, usual_loss, usual_grads) = results[True], results[False]
    print(f"\nshared {loss:.8f}, usual {usual_loss:.8f}; completions {completions}")
    assert completions == usual_completions and len({tuple(c) for group in completions for c in group}) == 2 * G
    assert loss == pytest.approx(usual_loss, abs=1e-5, rel=1e-5) and abs(loss) > 1e-3
    assert grads.keys() == usual_grads.keys() and any("img_projection" in name for name in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], usual_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_grpo_launcher_trains_lora_with_its_flags(work, tmp_path):
    """scripts/finetune_grpo.sh: the GRPO recipe under torchrun on records with the launcher's flags (LoRA, frozen
    CLIP, beta 0); extra flags pass through and win (a tiny rank, 2 answers of 3 tokens, one step, a reward file)."""
    output_dir = tmp_path / "launcher"
    env = subprocess_env(MODEL=work["model"], DATA_PATH=work["train"], IMAGE_FOLDER=work["media"],
                         OUTPUT_DIR=str(output_dir))
    flags = [*RUN_FLAGS, "--batch_size", "4", "--batch_size_per_gpu", "4", "--max_steps", "1", "--lora_rank", "4",
             "--lora_alpha", "8", "--save_strategy", "no", "--reward_funcs", "accuracy_reward", work["rewards"]]
    result = subprocess.run(["bash", "scripts/finetune_grpo.sh", *flags], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    config = json.loads((output_dir / "run_config.json").read_text())
    assert os.path.isfile(output_dir / "adapter_model.safetensors")
    assert "--freeze_vision_tower" in config["command"] and "--num_generations 2" in config["command"]
    assert "rewards/length_reward/mean" in result.stdout + result.stderr

"""The GRPO algorithm as TRL's GRPOTrainer (1.16) computes it: group-normalised advantages, the clipped policy term,
the KL term to the reference, and the loss types' normalisations; here on the flat per-token log-probabilities of
shared-prefix rows (docs/DESIGN.md §12, §15), where TRL works on padded [completions x tokens] tensors.
tests/test_grpo.py checks the formulas on hand-built tables and the loss against TRL's GRPOTrainer on the same batch.
"""

import torch
from trl.trainer.utils import nanstd

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # TRL's names (its default: dapo)
REWARD_SCALINGS = ("group", "batch", "none")  # TRL's scale_rewards
STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group", batch_rewards=None):
    """(advantages, std) of rewards [prompts x G] laid out prompt-major: reward - its group's mean, divided by
    (std + 1e-4) with the group's std ("group"), the whole batch's ("batch": of `batch_rewards`, every process's,
    default these), or not at all ("none"). std is the one used (per completion; "none": the group's, for the
    zero-spread count), Bessel-corrected as TRL's nanstd."""
    grouped = rewards.view(-1, num_generations)
    mean = grouped.nanmean(dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        batch_rewards = rewards if batch_rewards is None else batch_rewards
        std = nanstd(batch_rewards).expand_as(rewards) if batch_rewards.numel() > 1 else torch.zeros_like(rewards)
    elif num_generations > 1:
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    else:
        std = torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0), std


def token_losses(log_probs, old_log_probs, advantages, epsilon_low=0.2, epsilon_high=0.2, beta=0.0,
                 ref_log_probs=None, bias_correction_kl=True):
    """Per-token loss (and its parts) of GRPO's clipped objective, all tensors of the same shape (one value per
    completion token; `advantages` repeated over its completion's tokens):

        ratio = exp(log_probs - old_log_probs)
        loss  = -min(ratio x A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) x A) + beta x KL x ratio
        KL    = exp(ref - logp) - (ref - logp) - 1      (the k3 estimator)

    The KL term is weighted by the ratio (TRL's use_bias_correction_kl, its default since 1.x: the unbiased
    reverse-KL gradient of DeepSeek-V3.2); with the old policy the current one the ratio is 1 in value, but its
    gradient adds KL x grad(logp). bias_correction_kl=False: beta x KL alone.

    Returns (loss, kl or None, low_clipped, high_clipped): kl is the k3 value; the clipped flags say which tokens
    the clip bound (ratio below 1 - eps with A < 0, above 1 + eps with A > 0)."""
    ratio = torch.exp(log_probs - old_log_probs)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if beta != 0.0:
        delta = ref_log_probs - log_probs
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * (kl * ratio if bias_correction_kl else kl)
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return loss, kl, low, high


def aggregate(per_token: torch.Tensor, completion_index: torch.Tensor, completion_lengths: torch.Tensor,
              loss_type: str, max_completion_length: int, total_tokens=None) -> torch.Tensor:
    """The micro-batch's loss from its per-token losses (flat, with each token's completion):

        grpo     mean over completions of (sum over its tokens / its length)
        bnpo     sum / the micro-batch's completion tokens
        dr_grpo  sum / (completions x max_completion_length)
        dapo     sum / total_tokens (the completion tokens per process of the whole batch; TRL's num_items_in_batch
                 / num_processes), the micro-batch's own count when not given

    The Trainer then divides by the gradient accumulation steps, as TRL does itself."""
    total = per_token.sum()
    if loss_type == "grpo":
        sums = per_token.new_zeros(completion_lengths.shape[0]).index_add(0, completion_index, per_token)
        return (sums / completion_lengths.clamp(min=1)).mean()
    if loss_type == "bnpo":
        return total / completion_lengths.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return total / (completion_lengths.shape[0] * max_completion_length)
    if loss_type == "dapo":
        normalizer = completion_lengths.sum() if total_tokens is None else total_tokens
        return total / torch.as_tensor(normalizer, device=total.device).clamp(min=1)
    raise ValueError(f"unknown GRPO loss type {loss_type!r}; one of {', '.join(LOSS_TYPES)}")

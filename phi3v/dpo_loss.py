"""The DPO losses, as TRL's DPOTrainer (1.16) computes them, from sequence log-probabilities.

TRL's trainer cannot take this project's model and batches (docs/DESIGN.md §13): its loss is written inside its
`_compute_loss`, after a forward of two padded sequences per pair. Here the same formulas take the log-probabilities
that the shared-prefix rows give (one prompt, chosen and rejected continuing from it); tests/test_dpo.py checks
them against TRL's DPOTrainer on the same batch.

Notation: for pair i, `chosen_logps[i]` = log pi(chosen | prompt) summed over the answer's tokens, `ref_*` the same
under the reference model; log-ratios r_c = chosen_logps - ref_chosen_logps, r_r likewise; delta = r_c - r_r.
"""

import torch
import torch.nn.functional as F

# loss type -> what it needs beyond the four log-probabilities; the names are TRL's (DPOConfig.loss_type).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
              "apo_down", "sigmoid_norm", "sft")


def pair_losses(loss_type, beta, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths=None, rejected_lengths=None, label_smoothing=0.0):
    """Per-pair losses [pairs] of one loss type (TRL's formulas, reverse-KL DPO).

    chosen_lengths / rejected_lengths: answer token counts (ipo and sigmoid_norm average the log-ratios per token;
    sft takes the mean log-probability of all chosen tokens, the same for every pair)."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type in ("ipo", "sigmoid_norm"):  # log-ratios per answer token
        per_token = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        if loss_type == "ipo":  # beta is IPO's tau
            return (per_token - 1 / (2 * beta)) ** 2
        return -F.logsigmoid(beta * per_token)
    if loss_type == "robust":  # label_smoothing: the probability that a preference label is flipped
        eps = label_smoothing
        return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        eps = torch.tensor(label_smoothing, device=delta.device)
        return (torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta) - torch.log1p(-eps))
                + torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta) - torch.log(eps)))
    if loss_type == "nca_pair":
        return (-F.logsigmoid(beta * chosen_ratio) - 0.5 * F.logsigmoid(-beta * chosen_ratio)
                - 0.5 * F.logsigmoid(-beta * rejected_ratio))
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
    if loss_type == "sppo_hard":
        return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(beta * delta)
    if loss_type == "sft":  # the chosen answers' mean token negative log-likelihood (TRL: RPO's term)
        return (-chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)).expand(chosen_logps.shape[0])
    raise ValueError(f"unknown DPO loss type {loss_type!r}; one of {', '.join(LOSS_TYPES)}")


def preference_loss(loss_types, loss_weights, beta, chosen_logps, rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, **kwargs) -> torch.Tensor:
    """sum over loss types of weight x the mean per-pair loss (TRL's multi-loss combination; RPO is
    ["sigmoid", "sft"] weighted [1, rpo_alpha])."""
    loss = 0.0
    for loss_type, weight in zip(loss_types, loss_weights, strict=True):
        losses = pair_losses(loss_type, beta, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                             **kwargs)
        loss = loss + weight * losses.mean()
    return loss


def reward_metrics(beta, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps) -> dict:
    """The implicit rewards (beta x log-ratio) and what TRL logs of them, per pair (detached tensors):
    rewards/chosen, rewards/rejected, rewards/accuracies (chosen > rejected), rewards/margins, logps/chosen,
    logps/rejected."""
    chosen = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected = beta * (rejected_logps - ref_rejected_logps).detach()
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "rewards/margins": chosen - rejected,
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }

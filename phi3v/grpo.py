"""GRPO with verifiable rewards on the project's foundations: each prompt's G answers sampled with the prompt run
once (phi3v.group_sampling), scored by reward functions (phi3v.rewards), and trained on as one shared-prefix row per
group (phi3v.shared_prefix) with TRL's GRPO objective (phi3v.grpo_loss); docs/DESIGN.md §12, §14, §15.

    PromptDataset   a record's prompt (the conversation up to its last answer, which is the reference answer)
    GRPOTrainer     Phi3VTrainer whose step samples, scores and trains on groups, with TRL's GRPO logs
"""

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from phi3v.conversation import check_length, tokenize_prompt
from phi3v.dataset import SFTDataset
from phi3v.dpo import adapters_disabled
from phi3v.evaluation import full_weights
from phi3v.group_sampling import group_examples, sample_groups
from phi3v.grpo_loss import aggregate, group_advantages, token_losses
from phi3v.media import load_record_images
from phi3v.records import BadSampleError
from phi3v.shared_prefix import model_inputs, shared_prefix_batch, two_sequence_batch
from phi3v.training import Phi3VTrainer

logger = logging.getLogger(__name__)


@dataclass
class GRPOSettings:
    """Sampling and the objective, with TRL's names and meanings (GRPOConfig)."""

    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    use_bias_correction_kl: bool = True  # the KL term weighted by the ratio (TRL's default)
    shared_prefix: bool = True  # False: the usual layout (prompt repeated G times in sampling and loss), to compare


class PromptDataset(SFTDataset):
    """A record -> the prompt GRPO samples answers to: {"prompt_ids", "pixel_values", "image_sizes" (with images),
    "answer" (the record's last answer: the reference the rewards see), "record" (the record without its decoded
    images, for reward functions), "sample_id", "index"}. `system_prompt` (optional) opens every conversation, in
    training and in evaluation. A prompt with no room for max_completion_length under max_length is a bad sample
    (never truncated)."""

    def __init__(self, rows, processor, system_prompt=None, max_completion_length=256, **options):
        super().__init__(rows, processor, **options)
        self.system_prompt = system_prompt
        self.max_completion_length = max_completion_length

    def record(self, index) -> dict:
        record = super().record(index)
        if self.system_prompt and record["messages"][0]["role"] != "system":
            record = {**record, "messages": [{"role": "system", "content": self.system_prompt}, *record["messages"]]}
        return record

    def example(self, index) -> dict:
        record = self.record(index)
        images, messages = load_record_images(record, self.max_num_frames)
        try:
            prompt = tokenize_prompt(self.processor, messages[:-1], images, self.num_crops)
            check_length(len(prompt["prompt_ids"]) + self.max_completion_length, self.max_length)
        except ValueError as error:
            raise BadSampleError(f"{record['source']}: {error} (prompt and --max_completion_length)") from None
        light = {k: v for k, v in record.items() if k not in ("images", "video")}
        light["media"] = [str(i) for i in record.get("images") or [] if isinstance(i, str)] + (
            [record["video"]] if record.get("video") else [])
        return {**prompt, "answer": messages[-1]["content"], "record": light, "sample_id": record["id"],
                "index": index}


def collate_prompts(examples: list[dict]) -> dict:
    """A micro-batch of prompts, kept as they are: the trainer samples their answers before it builds the rows."""
    return {"prompts": examples}


class GRPOTrainer(Phi3VTrainer):
    """Phi3VTrainer whose step is GRPO's: sample G answers to each prompt of the micro-batch (the prompt run once),
    score them, group-normalise the rewards into advantages, and take the clipped policy-gradient loss (plus beta x
    KL to the reference) on one shared-prefix row per micro-batch. With settings shared_prefix=False, the usual
    layout instead (TRL's): each prompt repeated G times in sampling and one row per answer in the loss.

    One pass per sampled batch (TRL's num_iterations 1): the old policy is the current one, so the ratio is 1 and
    the clip bounds nothing, as in TRL by default. The reference (beta > 0): `ref_model`, or the policy with its LoRA
    adapters disabled. Logs (TRL's names): reward, rewards/<function>/mean, reward_std (within groups),
    frac_reward_zero_std, kl, clip_ratio/low_mean, high_mean, region_mean, completions/mean_length,
    completions/clipped_ratio (answers cut at --max_completion_length)."""

    loss_is_scaled_for_ga = False  # the loss is the micro-batch's: the Trainer divides by the accumulation steps

    def __init__(self, *args, grpo: GRPOSettings, rewards, ref_model=None, reference=None, **kwargs):
        self.grpo = grpo
        self.rewards = rewards
        self.ref_model = ref_model  # `reference` (precomputed log-probabilities) does not apply to sampled answers
        super().__init__(*args, **kwargs)

    def sample(self, prompts):
        """G answers to each prompt (phi3v.group_sampling), by the policy without its training wrapper; under
        ZeRO-3 its weights gathered for the duration, as for evaluation."""
        model = self.model
        g = self.grpo
        with full_weights(model):
            return sample_groups(model, prompts, g.num_generations, g.max_completion_length, temperature=g.temperature,
                                 top_p=g.top_p, top_k=g.top_k, pad_token_id=self.processing_class.pad_token_id,
                                 share_prompt=g.shared_prefix)

    def token_log_probs(self, model, batch):
        return model(**model_inputs(batch), logp_temperature=self.grpo.temperature).token_log_probs

    def reference_log_probs(self, model, batch):
        with torch.no_grad():
            if self.ref_model is not None:
                return self.token_log_probs(self.ref_model, batch)
            with adapters_disabled(model):
                return self.token_log_probs(model, batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        g, mode = self.grpo, "train" if model.training else "eval"
        prompts = inputs["prompts"]
        self.remember_batch_ids([p["sample_id"] for p in prompts])
        sampled = self.sample(prompts)
        texts = [self.processing_class.decode(c) for group in sampled.completions for c in group]
        answers = [p["answer"] for p in prompts for _ in range(g.num_generations)]
        records = [p["record"] for p in prompts for _ in range(g.num_generations)]
        per_function = self.rewards(texts, answers, records)
        rewards = self.rewards.combine(per_function)
        batch_rewards = gather_rewards(rewards) if g.scale_rewards == "batch" else None
        advantages, std = group_advantages(rewards, g.num_generations, g.scale_rewards, batch_rewards)

        layout = shared_prefix_batch if g.shared_prefix else two_sequence_batch  # one row, or a row per answer
        batch = self._prepare_inputs(layout(group_examples(prompts, sampled), self.processing_class.pad_token_id))
        log_probs = self.token_log_probs(model, batch)
        completion_index, lengths = batch["completion_index"], batch["completion_lengths"]
        token_advantages = advantages.to(log_probs.device)[completion_index]
        reference = self.reference_log_probs(model, batch) if g.beta != 0.0 else None
        epsilon_high = g.epsilon if g.epsilon_high is None else g.epsilon_high
        per_token, kl, low, high = token_losses(log_probs, log_probs.detach(), token_advantages, g.epsilon,
                                                epsilon_high, g.beta, reference, g.use_bias_correction_kl)
        total_tokens = None
        if g.loss_type == "dapo":  # completion tokens per process over the whole batch (TRL's normalizer)
            total_tokens = lengths.sum().float()
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(total_tokens)
                total_tokens = total_tokens / dist.get_world_size()
        loss = aggregate(per_token, completion_index, lengths, g.loss_type, g.max_completion_length, total_tokens)

        metrics = {
            "reward": rewards[~rewards.isnan()],
            "reward_std": std.view(-1, g.num_generations)[:, 0],
            "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).view(-1, g.num_generations)[:, 0],
            "completions/mean_length": lengths,
            "completions/clipped_ratio": torch.tensor(sum(sampled.truncated, [])),
            "clip_ratio/low_mean": low.detach(), "clip_ratio/high_mean": high.detach(),
            "clip_ratio/region_mean": (low | high).detach(),
        }
        for column, name in enumerate(self.rewards.names):
            values = per_function[:, column]
            metrics[f"rewards/{name}/mean"] = values[~values.isnan()]
        if kl is not None:
            metrics["kl"] = kl.detach()
        self.add_metrics(mode, metrics)
        return (loss, {"log_probs": log_probs.detach()}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation is by the task's metric of greedy answers (phi3v.evaluation); no loss pass."""
        return None, None, None


def gather_rewards(rewards: torch.Tensor) -> torch.Tensor:
    """Every process's rewards (for the batch-wide std of scale_rewards batch)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return rewards
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rewards.cpu())
    return torch.cat(gathered)

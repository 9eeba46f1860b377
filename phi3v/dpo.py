"""DPO on the project's foundations: preference pairs as shared-prefix rows (docs/DESIGN.md §12, §13), the losses of
phi3v.dpo_loss, and the reference model as each strategy allows it.

    PreferenceCollator   a micro-batch of pairs -> one shared-prefix row (or the two-sequence layout, to compare)
    DPOTrainer           Phi3VTrainer with the DPO loss, its reference log-probabilities and TRL's DPO logs
    precompute_reference the reference log-probabilities of every pair in one pass before training

The reference model, by strategy: LoRA / QLoRA use the base model with the adapters disabled (no second copy of the
weights); full and frozen-vision runs keep a frozen copy (`ref_model`), or with --precompute_ref_log_probs compute
the reference log-probabilities once before training (the policy before its first step is the reference), which
checkpoints carry so that a resumed run does not redo it.
"""

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from phi3v.dpo_loss import preference_loss, reward_metrics
from phi3v.evaluation import full_weights
from phi3v.shared_prefix import model_inputs, sequence_log_probs, shared_prefix_batch, two_sequence_batch
from phi3v.training import Phi3VTrainer

logger = logging.getLogger(__name__)

REFERENCE_FILE = "reference_log_probs.pt"  # tensors only: loaded with weights_only=True


@dataclass
class DPOSettings:
    """The loss: TRL's loss types combined with weights (RPO: ["sigmoid", "sft"], [1, rpo_alpha]), beta and the
    label smoothing of robust / exo_pair."""

    beta: float = 0.1
    loss_types: tuple = ("sigmoid",)
    loss_weights: tuple = (1.0,)
    label_smoothing: float = 0.0


@dataclass
class PreferenceCollator:
    """Pairs (phi3v.preference.PreferenceDataset items) -> one shared-prefix row: each prompt and its images once,
    the chosen and the rejected answer continuing from it. shared_prefix=False gives the usual layout instead
    (prompt + chosen and prompt + rejected as two padded rows), which the benchmark compares with. The batch keeps
    the pairs' dataset indices (`indices`, host ints) for the precomputed reference log-probabilities."""

    pad_token_id: int
    shared_prefix: bool = True

    def __call__(self, examples: list[dict]) -> dict:
        build = shared_prefix_batch if self.shared_prefix else two_sequence_batch
        batch = build(examples, self.pad_token_id)
        batch["indices"] = [e["index"] for e in examples]
        return batch


def pair_log_probs(model, batch) -> torch.Tensor:
    """[pairs, 2] log-probabilities of (chosen, rejected) under `model`, from one forward of the batch."""
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "indices"}
    sums = sequence_log_probs(model(**inputs).token_log_probs, batch["completion_index"], batch["num_completions"])
    return sums.view(-1, 2)


def adapters_disabled(model):
    """The base model of a LoRA model (PEFT's disable_adapter), for the reference forward; `model` may be wrapped
    (DDP, DeepSpeed): the PeftModel is found inside."""
    inner = getattr(model, "module", model)
    return inner.disable_adapter()


class DPOTrainer(Phi3VTrainer):
    """Phi3VTrainer whose loss is DPO's, on shared-prefix rows of preference pairs.

    Reference log-probabilities, in order of preference: `reference` (precomputed: {dataset name: [pairs, 2]
    tensor}, looked up by the batch's indices), `ref_model` (a frozen copy), or the policy with its LoRA adapters
    disabled. The logs get TRL's DPO metrics, averaged over the micro-batches since the previous log and over all
    processes: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected
    (eval_ prefixed in evaluations)."""

    # The loss is a mean over the micro-batch's pairs (TRL's): the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, dpo: DPOSettings, ref_model=None, reference: dict | None = None, **kwargs):
        self.dpo = dpo
        self.ref_model = ref_model
        self.reference = reference or {}
        super().__init__(*args, **kwargs)

    # ---------------------------------------------------------------- the loss
    def reference_log_probs(self, model, batch, split: str) -> torch.Tensor:
        if split in self.reference:
            return self.reference[split][batch["indices"]].to(batch["logp_targets"].device)
        with torch.no_grad():
            if self.ref_model is not None:
                return pair_log_probs(self.ref_model, batch)
            with adapters_disabled(model):
                return pair_log_probs(model, batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        self.remember_batch_ids(inputs.get("sample_ids"))
        policy = pair_log_probs(model, inputs)
        # the policy's dtype: precomputed values are kept in float64, and would make the loss float64
        reference = self.reference_log_probs(model, inputs, mode).to(policy.dtype)
        lengths = inputs["completion_lengths"].view(-1, 2)
        loss = preference_loss(
            self.dpo.loss_types, self.dpo.loss_weights, self.dpo.beta, policy[:, 0], policy[:, 1], reference[:, 0],
            reference[:, 1], chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1],
            label_smoothing=self.dpo.label_smoothing)
        self.add_metrics(mode, reward_metrics(self.dpo.beta, policy[:, 0], policy[:, 1], reference[:, 0],
                                              reference[:, 1]))
        return (loss, {"log_probs": policy.detach()}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the DPO loss (and its metrics) of the batch; pairs have no labels or logits to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The model, and the precomputed reference log-probabilities beside it. In a checkpoint this runs before
        trainer_state.json is written, which is what makes a checkpoint complete (phi3v.checkpoints): a run killed
        at any moment leaves no complete checkpoint without them (a callback's on_save came after that file, so a
        kill in between left a checkpoint whose resume had to compute them again)."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.reference and self.args.should_save:
            save_reference(self.reference, output_dir or self.args.output_dir)

    def preference_report(self, dataset) -> dict:
        """Preference accuracy, mean margin and log-prob accuracy (dpo.preference_metrics) of the policy on every
        pair of `dataset` (an evaluation's extra numbers; the reference as in training)."""
        batch_size = self.args.per_device_eval_batch_size
        policy = dataset_log_probs(self.model, dataset, self.data_collator, batch_size)
        if "eval" in self.reference:
            reference = self.reference["eval"]
        elif self.ref_model is not None:
            reference = dataset_log_probs(self.ref_model, dataset, self.data_collator, batch_size)
        else:
            reference = dataset_log_probs(self.model, dataset, self.data_collator, batch_size, adapters=False)
        return preference_metrics(policy, reference, self.dpo.beta)

# ------------------------------------------------------------------------------------------------ the reference
@dataclass
class Reference:
    """What a run uses as its reference model: a frozen copy (`ref_model`), precomputed log-probabilities
    (`log_probs`: {"train": [pairs, 2], "eval": [pairs, 2]}), or neither (LoRA: the base, adapters disabled)."""

    ref_model: object = None
    log_probs: dict | None = None

    def trainer_kwargs(self) -> dict:
        return {"ref_model": self.ref_model, "reference": self.log_probs}

    def attach(self, trainer) -> None:
        """Under ZeRO-3 the frozen copy is partitioned like the policy (TRL's prepare_deepspeed: an inference
        engine, no optimizer). (Checkpoints carry precomputed log-probabilities: DPOTrainer.save_model.)"""
        if self.ref_model is not None and trainer.is_deepspeed_enabled:
            from transformers.integrations import is_deepspeed_zero3_enabled
            from trl.models.utils import prepare_deepspeed

            if is_deepspeed_zero3_enabled():
                trainer.ref_model = prepare_deepspeed(self.ref_model, trainer.accelerator)


def reference_for_training(model, args, task, training_args, collator, train_dataset, eval_dataset, resume):
    """The run's Reference. --precompute_ref_log_probs: read from the checkpoint resumed from, else computed now
    (the policy before training, adapters disabled) and saved in the output folder; LoRA: none needed; full and
    frozen-vision runs: a frozen copy of the starting model, loaded as the policy was.

    On resume the model is still the starting one here (the Trainer loads the checkpoint's weights later), so a
    split the checkpoint has no values for, or values for another number of pairs (an evaluation set added or
    changed since), is computed now as it would have been at the start."""
    if task.precompute_ref_log_probs:
        datasets = {"train": train_dataset, **({"eval": eval_dataset} if eval_dataset is not None else {})}
        stored = (load_reference(resume) if resume else None) or {}
        log_probs = {name: stored[name] for name, dataset in datasets.items()
                     if name in stored and len(stored[name]) == len(dataset)}
        if log_probs:
            logger.info("reference log-probabilities read from %s (%s)", resume, pair_counts(log_probs))
        missing = {name: dataset for name, dataset in datasets.items() if name not in log_probs}
        if missing:
            batch_size = training_args.per_device_eval_batch_size
            computed = {name: dataset_log_probs(model, dataset, collator, batch_size, adapters=False)
                        for name, dataset in missing.items()}
            log_probs.update(computed)
            if training_args.should_save:
                save_reference(log_probs, training_args.output_dir)
            logger.info("reference log-probabilities computed for %s", pair_counts(computed))
        return Reference(log_probs=log_probs)
    return frozen_reference(model, args, task, training_args)


def pair_counts(log_probs: dict) -> str:
    return ", ".join(f"{len(values)} {name} pairs" for name, values in log_probs.items())


def frozen_reference(model, args, task, training_args) -> Reference:
    """LoRA: no second model (the base with the adapters disabled is the reference); otherwise a frozen copy of the
    starting model, loaded as the policy was (DPO, GRPO with --beta > 0)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from phi3v.arguments import model_dtype
    from phi3v.model_setup import load_model

    if hasattr(model, "disable_adapter"):
        return Reference()
    ref_model = load_model(args.model_name_or_path, dtype=model_dtype(training_args), cache_dir=task.cache_dir)
    ref_model.requires_grad_(False)
    ref_model.eval()
    if not is_deepspeed_zero3_enabled():  # ZeRO-3: partitioned as it loads, then an engine (Reference.attach)
        ref_model.to(training_args.device)  # ZeRO-2 too: no engine moves the copy to this process's GPU
    return Reference(ref_model=ref_model)


# ------------------------------------------------------------------------------------------------ precomputing
def dataset_log_probs(model, dataset, collator, batch_size: int, adapters: bool = True) -> torch.Tensor:
    """[len(dataset), 2] log-probabilities (chosen, rejected) of every pair under `model` (adapters=False: a LoRA
    model's base, i.e. the reference), in eval mode, sharded across processes and gathered on all. A pair the
    dataset skips as bad keeps NaN. Under ZeRO-3 the weights are gathered for the pass (as for generation)."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    mine = list(range(rank, len(dataset), world_size))
    per_rank = -(-len(dataset) // world_size)  # every rank runs the same number of forwards (ZeRO-3 gathers)
    indices = mine + [mine[-1] if mine else 0] * (per_rank - len(mine))
    values = torch.full((len(dataset), 2), float("nan"), dtype=torch.float64)
    disabled = adapters_disabled(model) if not adapters and hasattr(model, "disable_adapter") else None
    was_training = model.training
    model.eval()
    with torch.no_grad(), full_weights(model), disabled or contextlib.nullcontext():
        for start in range(0, len(indices), batch_size):
            batch = collator([dataset[i] for i in indices[start:start + batch_size]])
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            for index, pair in zip(batch["indices"], pair_log_probs(model, inputs).double().cpu()):
                values[index] = pair
    model.train(was_training)
    if world_size > 1:  # each pair comes from the one rank that computed it
        gathered = [None] * world_size
        dist.all_gather_object(gathered, values)
        values = torch.stack(gathered).nan_to_num(float("-inf")).amax(0)
        values[values == float("-inf")] = float("nan")
    return values


def preference_metrics(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict:
    """Of [pairs, 2] policy and reference log-probabilities: how often the policy's implicit reward (beta x
    log-ratio) prefers the chosen answer (a tie counts half: before training every pair is a tie, 0.5 = chance),
    the mean reward margin, and how often the policy alone gives the chosen answer the higher log-probability.
    Bad pairs (NaN) are left out."""
    keep = ~(policy.isnan().any(1) | reference.isnan().any(1))
    policy, reference = policy[keep], reference[keep]
    margins = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    wins = (margins > 0).double() + 0.5 * (margins == 0).double()
    return {"preference_accuracy": round(float(wins.mean()), 6), "mean_margin": round(float(margins.mean()), 6),
            "logp_accuracy": round(float((policy[:, 0] > policy[:, 1]).double().mean()), 6),
            "num_pairs": int(keep.sum())}


def save_reference(reference: dict, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, REFERENCE_FILE + ".tmp")
    torch.save({name: values.cpu() for name, values in reference.items()}, tmp)
    os.replace(tmp, os.path.join(folder, REFERENCE_FILE))


def load_reference(folder: str) -> dict | None:
    """The precomputed reference log-probabilities a checkpoint holds (None when it has none)."""
    path = os.path.join(folder, REFERENCE_FILE)
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)

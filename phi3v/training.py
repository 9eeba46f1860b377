"""What every recipe does around the Trainer: the model for a strategy, the Trainer, saving the result."""

import logging
import os

import torch
import torch.distributed as dist
from transformers import EarlyStoppingCallback, Trainer

from phi3v.arguments import model_dtype
from phi3v.callbacks import NonFiniteCallback, SigtermCallback, ThroughputCallback
from phi3v.collator import Phi3VDataCollator
from phi3v.errors import InputError
from phi3v.evaluation import Evaluation, report_metrics
from phi3v.metrics import normalise_answer
from phi3v.model_setup import ModelPlan, apply_lora, count_parameters, load_model, prepare_for_kbit_training
from phi3v.optim import decay_parameter_names, original_decay_parameter_names
from phi3v.reporting import save_run_config, write_end_of_run_plots

logger = logging.getLogger(__name__)


def setup_logging(training_args) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
    )


def model_for_training(args, training_args, plan: ModelPlan | None = None):
    """The model of every recipe, with what trains left trainable: loaded (quantized with the plan's bits), parts
    frozen, prepared for k-bit training, LoRA adapters, the plan's last word, then placed on this process's device.

    args: the recipe arguments (model_name_or_path, use_flash_attention); plan: what the recipe's flag family makes of
    the model (phi3v.community_flags), by default `args.model_plan()` (the four task recipes', phi3v.task_flags)."""
    plan = plan or args.model_plan()
    start_deepspeed_comm_for_zero3(training_args)
    model = load_model(args.model_name_or_path, dtype=model_dtype(training_args),
                       use_flash_attention=args.use_flash_attention, **plan.load)
    if plan.freeze is not None:
        plan.freeze(model)
    if plan.quantized:
        model = prepare_for_kbit_training(model)
    if plan.lora is not None:
        model = apply_lora(model, target_modules=plan.lora_targets(model), seed=training_args.seed, **plan.lora)
    if plan.finish is not None:
        plan.finish(model)
    return place_and_report(model, training_args, quantized=plan.quantized)


def start_deepspeed_comm_for_zero3(training_args) -> None:
    """ZeRO-3 partitions the weights across ranks while loading, which needs DeepSpeed's communication: the
    Trainer's arguments start it on GPUs, but on CPUs (gloo) only torch.distributed is started."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    import deepspeed

    training_args.device  # noqa: B018  (starts torch.distributed)
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=training_args.ddp_backend or "gloo", auto_mpi_discovery=False)


def place_and_report(model, training_args, quantized: bool):
    """Move the model to this process's device (bitsandbytes and DeepSpeed place it themselves) and log how
    much of it trains."""
    if not quantized and not training_args.deepspeed:
        model.to(training_args.device)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


class Phi3VTrainer(Trainer):
    """The Trainer, plus: the ids of each batch's samples reach the non-finite check (for its message), its
    optimizer decays the original recipe's set of weights (or, with exempt_norms_from_decay, not the norm weights),
    and each of its evaluations adds the recipe's own metric to the loss (`evaluation`, see evaluation_loop).
    """

    def __init__(self, *args, exempt_norms_from_decay: bool = False, evaluation: Evaluation | None = None,
                 **kwargs):
        self.exempt_norms_from_decay = exempt_norms_from_decay
        self.evaluation = evaluation
        self._metric_sums = {}  # add_metrics
        super().__init__(*args, **kwargs)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The Trainer's loss pass over its eval_dataset, then the recipe's metric by greedy generation on the
        evaluation's records (phi3v.evaluation.Evaluation.run: sharded across ranks and gathered on every rank, so
        every rank gets the same numbers and takes the same best-model and early-stopping decisions). The metrics
        come back as `<prefix>_<name>` (eval_accuracy, eval_anls, ...) beside eval_loss, so the Trainer logs them
        (log_history, TensorBoard), keeps the best checkpoint and stops early on them; the predictions go to
        `<prefix>_step_<global step>.json` in the output folder."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self.evaluation is None or description != "Evaluation":  # trainer.predict() is the loss pass alone
            return output
        step = self.state.global_step
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        report = self.evaluation.run(self.model, self.processing_class, f"{metric_key_prefix}_step_{step}",
                                     extra={"step": step, **({"loss": loss} if loss is not None else {})})
        output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in report_metrics(report).items()})
        return output

    def get_decay_parameter_names(self, model) -> list[str]:
        """The original recipe's Trainer rule (transformers 4.45: all but biases and torch.nn.LayerNorm weights, so
        the RMSNorm weights are decayed); transformers 5's rule (norm weights exempt too) with
        exempt_norms_from_decay. Every optimizer the Trainer builds (also under DeepSpeed) takes its groups here."""
        if self.exempt_norms_from_decay:
            return sorted(decay_parameter_names(model))
        return sorted(original_decay_parameter_names(model))

    def add_metrics(self, mode: str, values: dict) -> None:
        """Per-sample values of a training objective's own logs (DPO's rewards, GRPO's rewards and KL...): kept as
        sums and counts on the device (no sync per step); the next log() of `mode` ("train" / "eval") adds their
        averages over every sample since the previous log and over all processes."""
        sums = self._metric_sums.setdefault(mode, {})
        for key, value in values.items():
            total, count = sums.get(key, (0.0, 0))
            value = torch.as_tensor(value)
            sums[key] = (total + value.float().sum(), count + value.numel())

    def log(self, logs: dict, start_time=None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        sums = self._metric_sums.get(mode)
        if sums:  # log() runs on every process, so the reduction below is matched
            keys = sorted(sums)
            device = self.args.device
            totals = torch.stack([torch.as_tensor(sums[k][0], device=device, dtype=torch.float64) for k in keys])
            counts = torch.tensor([float(sums[k][1]) for k in keys], device=device, dtype=torch.float64)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(totals)
                dist.all_reduce(counts)
            prefix = "eval_" if mode == "eval" else ""
            logs.update({f"{prefix}{k}": round(float(t / max(c, 1.0)), 6) for k, t, c in zip(keys, totals, counts)})
            sums.clear()
        super().log(logs, start_time)

    def remember_batch_ids(self, sample_ids) -> None:
        """Hand a micro-batch's sample ids (None: none known) to the non-finite check, for its message."""
        if sample_ids is None:
            return
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, NonFiniteCallback):
                callback.remember_batch_ids(sample_ids)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.remember_batch_ids(inputs.pop("sample_ids", None))
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def recipe_evaluation(dataset, score, args, training_args) -> Evaluation | None:
    """The recipe's evaluation (phi3v.evaluation.Evaluation) of `dataset` (None: the recipe has no evaluation
    set), with the evaluation flags checked against what its `score` gives, before the model loads.

    --metric_for_best_model must be eval_loss or one of the score's metrics (with or without the eval_ prefix, as
    the Trainer takes it); not given, --load_best_model_at_end and --early_stopping_patience use the task's metric
    (the first the score gives), and --greater_is_better, unless given, follows the metric (lower is better only
    for a loss). phi3v.arguments.derive_evaluation has already checked what needs no score."""
    given = set(args.given)
    evaluating = training_args.eval_strategy != "no"  # an IntervalStrategy, a str
    if dataset is None:
        if evaluating:
            raise InputError(f"--eval_strategy {training_args.eval_strategy.value} evaluates during training, which "
                             "needs an evaluation set (--eval_data_path)")
        return None
    evaluation = Evaluation.from_args(dataset, score, args, training_args)
    if not evaluating:
        return evaluation
    names = evaluation.metric_names()
    valid = ["eval_loss"] + [f"eval_{name}" for name in names]
    metric = training_args.metric_for_best_model
    if "metric_for_best_model" in given:
        if (metric if metric.startswith("eval_") else f"eval_{metric}") not in valid:
            raise InputError(f"--metric_for_best_model {metric}: this recipe's evaluation gives {', '.join(valid)} "
                             "(with or without the eval_ prefix)")
    elif training_args.load_best_model_at_end or args.early_stopping_patience is not None:
        training_args.metric_for_best_model = metric = names[0]  # the task's metric, not the Trainer's "loss"
    if metric is not None and "greater_is_better" not in given:
        training_args.greater_is_better = not metric.endswith("loss")
    return evaluation


def make_trainer(
    model, training_args, train_dataset, processor, callbacks=None, optimizers=(None, None), skip_nonfinite=False,
    packing=False, exempt_norms_from_decay=False, evaluation: Evaluation | None = None,
    early_stopping_patience: int | None = None, early_stopping_threshold: float = 0.0,
    trainer_class=Phi3VTrainer, data_collator=None, **trainer_kwargs,
) -> Trainer:
    """The Trainer of every recipe: padding collator (padding-free rows with `packing`), SIGTERM -> checkpoint and
    clean stop, NaN/inf gradients stop the run (or skip the step), throughput and memory in the logs. Its own
    optimizer (when `optimizers` gives none) decays what the original recipe's does, see Phi3VTrainer.

    evaluation (recipe_evaluation's): with --eval_strategy, the Trainer's evaluations run the loss pass over its
    records (with the training collator) and then the recipe's metric (Phi3VTrainer.evaluation_loop);
    early_stopping_patience adds transformers' EarlyStoppingCallback on --metric_for_best_model.
    trainer_class (a Phi3VTrainer subclass, e.g. a preference trainer), data_collator (default: the padding or
    packing collator) and trainer_kwargs (the subclass's own arguments) let other training objectives reuse all of
    it."""
    if len(train_dataset) == 0:
        raise ValueError("the training split is empty")
    callbacks = [SigtermCallback(), NonFiniteCallback(skip=skip_nonfinite)] + list(callbacks or [])
    if early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience, early_stopping_threshold))
    evaluating = evaluation is not None and training_args.eval_strategy != "no"
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=evaluation.dataset if evaluating else None,
        data_collator=data_collator or Phi3VDataCollator(processor.pad_token_id, packing=packing),
        processing_class=processor,
        callbacks=callbacks,
        optimizers=optimizers,  # (optimizer, scheduler); None: the Trainer's own
        exempt_norms_from_decay=exempt_norms_from_decay,
        evaluation=evaluation if evaluating else None,
        **trainer_kwargs,
    )
    # images/s, tokens/s and peak memory in the logs; first, so the reporting callbacks see them.
    ThroughputCallback.install_first(trainer)
    return trainer


def run_training(trainer: Trainer, resume_from_checkpoint=None) -> bool:
    """trainer.train(); False when SIGTERM stopped it (a checkpoint was saved: resume from it later)."""
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    sigterm = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SigtermCallback))
    if sigterm.stopped:
        logger.warning(sigterm.message)
        return False
    return True


def save_outputs(trainer: Trainer, processor, args) -> None:
    """Save the model (full: official layout; LoRA: the adapter, plus a merged model with --merge_lora)."""
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)
    if trainer.args.process_index == 0:
        processor.save_pretrained(output_dir)
    lora = hasattr(trainer.model, "get_base_model")  # a PeftModel
    if lora and args.merge_lora:
        quantized = getattr(trainer.model.get_base_model(), "hf_quantizer", None) is not None
        merge_lora(trainer.model, os.path.join(output_dir, "merged"), processor, quantized=quantized,
                   main=trainer.args.process_index == 0)


def merge_lora(peft_model, merged_dir, processor, quantized=False, main=True) -> None:
    """Fold the LoRA weights into the base model and save it in the official layout."""
    if quantized:
        logger.warning(
            "--merge_lora with QLoRA: merge the adapter into the bf16 base model with scripts/merge_lora.py "
            "(merging into 4-bit weights would lose precision); skipped here"
        )
        return
    if not main:
        return
    import copy

    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.save_pretrained(merged_dir)
    processor.save_pretrained(merged_dir)
    logger.info("merged model saved to %s", merged_dir)
    del merged
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_run_summary(trainer, args, task_args, eval_before, eval_after, classify: bool) -> list[str]:
    """run_config.json, training_curves.png, the metric during training (eval_curve.png, best point marked), the
    before/after chart and, for classification, a confusion matrix."""
    if not trainer.is_world_process_zero():
        return []
    output_dir = trainer.args.output_dir
    save_run_config(output_dir, args, task_args, trainer.args)
    metric_name = next((key for key in eval_after or {} if key not in ("num_samples", "predictions")), None)
    classes = sorted({normalise_answer(p["answer"]) for p in eval_after["predictions"]}) if classify else None
    best_step = trainer.state.best_global_step if trainer.args.metric_for_best_model else None
    metric = (trainer.args.metric_for_best_model or "").removeprefix("eval_")
    greater_is_better = trainer.args.greater_is_better is not False if metric == metric_name else True
    written = write_end_of_run_plots(output_dir, trainer.state.log_history, eval_before, eval_after, metric_name,
                                     classes=classes, best_step=best_step, greater_is_better=greater_is_better,
                                     best_by=trainer.args.metric_for_best_model)
    logger.info("wrote %s", ", ".join(os.path.basename(path) for path in written))
    return written

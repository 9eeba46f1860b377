"""What every recipe does around the Trainer: the model for a strategy, the Trainer, saving the result."""

import logging
import os

import torch
from transformers import Trainer

from phi3v.arguments import model_dtype
from phi3v.callbacks import NonFiniteCallback, SigtermCallback, ThroughputCallback
from phi3v.collator import Phi3VDataCollator
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
    """The Trainer, plus: the ids of each batch's samples reach the non-finite check (for its message), and its
    optimizer decays the original recipe's set of weights (or, with exempt_norms_from_decay, not the norm weights).
    """

    def __init__(self, *args, exempt_norms_from_decay: bool = False, **kwargs):
        self.exempt_norms_from_decay = exempt_norms_from_decay
        super().__init__(*args, **kwargs)

    def get_decay_parameter_names(self, model) -> list[str]:
        """The original recipe's Trainer rule (transformers 4.45: all but biases and torch.nn.LayerNorm weights, so
        the RMSNorm weights are decayed); transformers 5's rule (norm weights exempt too) with
        exempt_norms_from_decay. Every optimizer the Trainer builds (also under DeepSpeed) takes its groups here."""
        if self.exempt_norms_from_decay:
            return sorted(decay_parameter_names(model))
        return sorted(original_decay_parameter_names(model))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sample_ids = inputs.pop("sample_ids", None)
        if sample_ids is not None:
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, NonFiniteCallback):
                    callback.remember_batch_ids(sample_ids)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def make_trainer(
    model, training_args, train_dataset, processor, callbacks=None, optimizers=(None, None), skip_nonfinite=False,
    packing=False, exempt_norms_from_decay=False,
) -> Trainer:
    """The Trainer of every recipe: padding collator (padding-free rows with `packing`), SIGTERM -> checkpoint and
    clean stop, NaN/inf gradients stop the run (or skip the step), throughput and memory in the logs. Its own
    optimizer (when `optimizers` gives none) decays what the original recipe's does, see Phi3VTrainer."""
    if len(train_dataset) == 0:
        raise ValueError("the training split is empty")
    callbacks = [SigtermCallback(), NonFiniteCallback(skip=skip_nonfinite)] + list(callbacks or [])
    trainer = Phi3VTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=Phi3VDataCollator(processor.pad_token_id, packing=packing),
        processing_class=processor,
        callbacks=callbacks,
        optimizers=optimizers,  # (optimizer, scheduler); None: the Trainer's own
        exempt_norms_from_decay=exempt_norms_from_decay,
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
    """run_config.json, training_curves.png, the before/after chart and, for classification, a confusion matrix."""
    if not trainer.is_world_process_zero():
        return []
    output_dir = trainer.args.output_dir
    save_run_config(output_dir, args, task_args, trainer.args)
    metric_name = next((key for key in eval_after or {} if key not in ("num_samples", "predictions")), None)
    classes = sorted({normalise_answer(p["answer"]) for p in eval_after["predictions"]}) if classify else None
    written = write_end_of_run_plots(output_dir, trainer.state.log_history, eval_before, eval_after, metric_name,
                                     classes=classes)
    logger.info("wrote %s", ", ".join(os.path.basename(path) for path in written))
    return written

"""Loading the model for a training strategy: full, frozen vision tower, LoRA, QLoRA (4-bit base + LoRA)."""

import importlib.util
import logging
import re

import torch

from phi3v.modeling import Phi3VForCausalLM

logger = logging.getLogger(__name__)

# Not lm_head (the original recipe adapted it too): PEFT then stores the whole embedding and lm_head, ~400 MB,
# in every adapter. Pass lm_head=True to lora_target_modules to adapt it anyway.
LANGUAGE_LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def attention_implementation(use_flash_attention: bool) -> str:
    """flash_attention_2 when asked for and installed; otherwise SDPA (with a warning if flash was asked for)."""
    if not use_flash_attention:
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
        logger.warning("--use_flash_attention: flash-attn is not installed (or no GPU); using SDPA attention instead")
        return "sdpa"
    return "flash_attention_2"


def load_model(
    model_name_or_path: str,
    dtype: torch.dtype = torch.float32,
    use_flash_attention: bool = False,
    use_qlora: bool = False,
    bits: int = 16,
) -> Phi3VForCausalLM:
    """The model in `dtype`; with use_qlora (or bits 4 / 8) its linear layers quantized by bitsandbytes."""
    kwargs = {"dtype": dtype, "attn_implementation": attention_implementation(use_flash_attention)}
    if use_qlora:
        bits = 4
    if bits in (4, 8):
        from transformers import BitsAndBytesConfig

        compute_dtype = dtype if dtype != torch.float32 else torch.bfloat16
        if bits == 4:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute_dtype,
                llm_int8_skip_modules=["lm_head"],
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
        kwargs["dtype"] = compute_dtype
        kwargs["device_map"] = {"": _local_device()}
    elif bits != 16:
        raise ValueError(f"bits must be 16, 8 or 4, got {bits}")
    return Phi3VForCausalLM.from_pretrained(model_name_or_path, **kwargs)


def _local_device():
    if torch.cuda.is_available():
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def freeze_vision_tower(model) -> None:
    """Freeze the CLIP tower only; the projector and the (shared) token embeddings stay trainable."""
    _base(model).model.vision_embed_tokens.vision_model.requires_grad_(False)


def lora_target_modules(
    model, vision: bool, projector: bool = None, num_layers: int = -1, exclude=(), lm_head: bool = False
) -> list[str]:
    """Full names of the linear layers LoRA wraps.

    vision: the CLIP layers that are used (the last one never is); projector: img_projection (defaults to
    `vision`); num_layers: -1 for every decoder/CLIP layer, else only the last N of each; exclude: name
    fragments to skip.
    """
    projector = vision if projector is None else projector
    base = _base(model)
    embedding = base.model.vision_embed_tokens
    language_layers = list(range(base.config.num_hidden_layers))
    vision_layers = list(range(embedding.layers_used))
    if num_layers > 0:
        language_layers, vision_layers = language_layers[-num_layers:], vision_layers[-num_layers:]
    patterns = [
        rf"model\.layers\.({'|'.join(map(str, language_layers))})\.(self_attn|mlp)\.({'|'.join(LANGUAGE_LORA_TARGETS)})$",
    ]
    if lm_head:
        patterns.append(r"^lm_head$")
    if vision and vision_layers:
        patterns.append(
            rf"vision_model\.encoder\.layers\.({'|'.join(map(str, vision_layers))})\.(self_attn|mlp)\."
            rf"({'|'.join(VISION_LORA_TARGETS)})$"
        )
    if projector:
        patterns.append(r"vision_embed_tokens\.img_projection\.(0|2)$")
    pattern = re.compile("|".join(f"(?:{p})" for p in patterns))
    names = [name for name, _ in base.named_modules() if pattern.search(name)]
    return [name for name in names if not any(fragment in name for fragment in exclude)]


def apply_lora(model, rank: int, alpha: float, dropout: float, target_modules: list[str], modules_to_save=None):
    """Wrap `target_modules` with LoRA adapters (gaussian init, as the official recipe); returns a PeftModel."""
    from peft import LoraConfig, get_peft_model

    if not target_modules:
        raise ValueError("LoRA has no module to wrap: check the LoRA options (layers, exclusions)")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        init_lora_weights="gaussian",
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def prepare_for_kbit_training(model):
    """PEFT's preparation of a quantized model (fp32 norms, input grads), with non-reentrant checkpointing."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    def numel(p):  # under ZeRO-3 a parameter is a 0-element shard; ds_numel is its full size
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(numel(p) for p in model.parameters())


def _base(model) -> Phi3VForCausalLM:
    """The Phi3VForCausalLM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model

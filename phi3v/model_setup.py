"""Loading the model for a training strategy (full, frozen parts, LoRA, QLoRA): the steps every flag family's
model plan is made of, and checking and loading saved LoRA adapters."""

import importlib.util
import json
import logging
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from phi3v.modeling import Phi3VForCausalLM

logger = logging.getLogger(__name__)

# The original recipe's LoRA targets (its create_lora_config): these four in every decoder layer and lm_head; with
# the vision side, CLIP's attention and MLP layers (the used ones) and the projector's two linear layers.
# lora_target_modules adds lm_head with lm_head=True (the four task recipes, unless --lora_exclude_lm_head).
LANGUAGE_LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class ModelPlan:
    """What a flag family makes of the model (phi3v.task_flags, phi3v.community_flags), for
    phi3v.training.model_for_training: the families' flags mean different things, the steps are the same."""

    load: dict = field(default_factory=dict)  # load_model's options: bits (quantisation), quant_type, skip_modules...
    freeze: Callable | None = None  # model -> None: freezes parts of the base model, before LoRA
    lora: dict | None = None  # apply_lora's options (rank, alpha, dropout, ...); None: no LoRA
    lora_targets: Callable | None = None  # model -> the names of the modules LoRA wraps
    finish: Callable | None = None  # model -> None: after LoRA, the last word on what trains

    @property
    def quantized(self) -> bool:
        return self.load.get("bits", 16) < 16


def flash_attention_available() -> bool:
    """flash-attn installed and a GPU to run it on."""
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def attention_implementation(use_flash_attention: bool) -> str:
    """flash_attention_2 when asked for and installed; otherwise SDPA (with a warning if flash was asked for)."""
    if not use_flash_attention:
        return "sdpa"
    if not flash_attention_available():
        logger.warning("--use_flash_attention: flash-attn is not installed (or no GPU); using SDPA attention instead")
        return "sdpa"
    return "flash_attention_2"


def load_model(
    model_name_or_path: str,
    dtype: torch.dtype = torch.float32,
    use_flash_attention: bool = False,
    bits: int = 16,
    quant_type: str = "nf4",
    double_quant: bool = True,
    skip_modules=("lm_head",),
    cache_dir: str | None = None,
) -> Phi3VForCausalLM:
    """The model in `dtype`; with bits 4 or 8 (QLoRA: 4) its linear layers quantized by bitsandbytes, except the
    modules named in skip_modules (4-bit: `quant_type` nf4 or fp4, double-quantized unless double_quant is False).
    cache_dir: where hub downloads go (the hub's default cache when None)."""
    kwargs = {"dtype": dtype, "attn_implementation": attention_implementation(use_flash_attention)}
    if cache_dir:
        kwargs["cache_dir"] = cache_dir
    if bits in (4, 8):
        from transformers import BitsAndBytesConfig

        compute_dtype = dtype if dtype != torch.float32 else torch.bfloat16
        if bits == 4:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant_type,
                bnb_4bit_use_double_quant=double_quant,
                bnb_4bit_compute_dtype=compute_dtype,
                llm_int8_skip_modules=list(skip_modules),
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True,
                                                               llm_int8_skip_modules=list(skip_modules))
        kwargs["dtype"] = compute_dtype
        kwargs["device_map"] = {"": _local_device()}
    elif bits != 16:
        raise ValueError(f"bits must be 16, 8 or 4, got {bits}")
    return Phi3VForCausalLM.from_pretrained(model_name_or_path, **kwargs)


def _local_device():
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def freeze_vision_tower(model) -> None:
    """Freeze the CLIP tower only; the projector and the (shared) token embeddings stay trainable.

    The custom recipe's --freeze_vision_tower, and the four task recipes' --freeze_clip_only."""
    _base(model).model.vision_embed_tokens.vision_model.requires_grad_(False)


def freeze_vision_embedding(model) -> None:
    """The original recipe's --freeze_vision_model, `model.model.vision_embed_tokens.requires_grad_(False)`: in the
    official model the image embedding holds CLIP, the projector, the glb_GN / sub_GN separators and the language
    model's token embedding table (the same module as model.embed_tokens), so all of them are frozen."""
    model = _base(model).model
    model.vision_embed_tokens.requires_grad_(False)
    model.embed_tokens.requires_grad_(False)


def lora_target_modules(
    model, vision: bool, projector: bool = None, num_layers: int = -1, exclude=(), lm_head: bool = False
) -> list[str]:
    """Full names of the linear layers LoRA wraps.

    vision: the CLIP layers that are used (the last one never is); projector: img_projection (defaults to
    `vision`); num_layers: -1 for every decoder/CLIP layer, else only the last N of each; exclude: name
    fragments to skip (the rule of `excluded`).
    """
    projector = vision if projector is None else projector
    base = _base(model)
    embedding = base.model.vision_embed_tokens
    language_layers = list(range(base.config.num_hidden_layers))
    vision_layers = list(range(embedding.layers_used))
    if num_layers > 0:
        language_layers, vision_layers = language_layers[-num_layers:], vision_layers[-num_layers:]
    language = "|".join(LANGUAGE_LORA_TARGETS)
    patterns = [rf"model\.layers\.({'|'.join(map(str, language_layers))})\.(self_attn|mlp)\.({language})$"]
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
    return [name for name in names if not excluded(name, exclude)]


def excluded(name, fragments) -> bool:
    """The one LoRA-exclusion rule (2U1's, the custom recipe's --lora_namespan_exclude): a module is left out when
    its name contains one of the fragments; "embed_tokens" stands for the language model's token embedding
    (model.embed_tokens) alone, not model.vision_embed_tokens.*."""
    fragments = ["model.embed_tokens" if fragment == "embed_tokens" else fragment for fragment in fragments]
    return any(fragment in name for fragment in fragments)


def apply_lora(
    model, rank: int, alpha: float, dropout: float, target_modules: list[str], modules_to_save=None, seed=None,
    use_dora: bool = False, bias: str = "none",
):
    """Wrap `target_modules` with LoRA adapters (gaussian init, as the official recipe); returns a PeftModel.

    seed: the adapters' random init then depends on it alone, not on how many random numbers loading the model
    drew (ZeRO-3 loading draws some, plain loading none)."""
    from peft import LoraConfig, get_peft_model

    if seed is not None:
        torch.manual_seed(seed)

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
        use_dora=use_dora,  # DoRA: weight-decomposed LoRA (--use_dora)
        bias=bias,  # "none", "all" or "lora_only": which biases train too (--lora_bias)
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


# ------------------------------------------------------------------------------------------------ LoRA adapters
_LORA_TENSOR = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?:\.weight)?$"
)


def adapter_tensor_shapes(adapter_dir) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a saved adapter, read without running any pickled code."""
    safetensors_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    bin_path = os.path.join(adapter_dir, "adapter_model.bin")
    if os.path.isfile(safetensors_path):
        from safetensors import safe_open

        try:
            with safe_open(safetensors_path, framework="pt") as f:  # reads the header only
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except Exception as error:  # safetensors raises its own SafetensorError for a damaged file
            raise ValueError(f"{safetensors_path}: not a readable safetensors file ({error})") from None
    if os.path.isfile(bin_path):
        # An adapter folder is untrusted input: weights_only loads tensors only and refuses any other pickled object.
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            # torch's message is a page of advice; the name of the refused global is what matters
            found = re.search(r"GLOBAL ([\w.]+)", str(error))
            reason = f"it references {found[1]}" if found else "not a plain tensor file"
            raise ValueError(f"{bin_path}: refused to load, it holds more than tensors ({reason})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{bin_path}: not an adapter state dict (name -> tensor)")
        return {key: tuple(value.shape) for key, value in state.items()}
    raise ValueError(f"{adapter_dir}: no adapter weights (adapter_model.safetensors or adapter_model.bin)")


def _expected_lora_shape(module, part: str, found: tuple) -> tuple | None:
    """The shape `part` of a LoRA adapter on `module` must have (the rank taken from `found`); None: unknown."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):  # nn.Linear, bitsandbytes layers
        fan_in, fan_out = module.in_features, module.out_features
    elif hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
        fan_in, fan_out = module.num_embeddings, module.embedding_dim
    else:
        return None
    if part == "lora_magnitude_vector":
        return (fan_out,)
    if part in ("lora_A", "lora_embedding_A"):
        return (found[0] if len(found) == 2 else "r", fan_in)
    return (fan_out, found[1] if len(found) == 2 else "r")


def check_adapter_fits(model, adapter_dir, settings: str = "the model's LoRA adapters") -> None:
    """Raise ValueError (naming the adapter, the model and the first tensor that does not fit) unless the adapter in
    `adapter_dir` fits `model`, the one check of a saved adapter:

    - onto a base model (loading an adapter: predict.py, merging): every tensor of the adapter has a module of the
      base to go on, with matching shapes (any rank);
    - onto a model that has adapters already (warm-starting a run's adapters from a saved folder): the adapter holds
      exactly the model's adapter tensors (and fully trained copies), with their shapes: same targets, same rank
      (`settings` names what decided them, in the message)."""
    shapes = adapter_tensor_shapes(adapter_dir)
    own = {saved_adapter_name(name): tuple(p.shape) for name, p in model.named_parameters()
           if ".lora_" in name or ".modules_to_save." in name}
    if own:
        differ = [(key, shapes.get(key), shape) for key, shape in own.items() if shapes.get(key) != shape]
        differ += [(key, shape, None) for key, shape in shapes.items() if key not in own]
        if differ:
            key, there, here = differ[0]
            raise ValueError(
                f"{adapter_dir}: its adapter does not match {settings}, first {key}: "
                f"{there if there is not None else 'absent'} there, {here if here is not None else 'absent'} here")
        return
    base = _base(model)
    base_name = getattr(base, "name_or_path", "") or type(base).__name__
    modules = dict(base.named_modules())
    parameters = {name: tuple(p.shape) for name, p in base.named_parameters()}
    missing, mismatched = [], []
    for key, found in shapes.items():
        name = key.removeprefix("base_model.model.")
        match = _LORA_TENSOR.match(name)
        if match is None:  # a fully saved layer (modules_to_save, an adapted lm_head): that base parameter
            name = name if name in parameters else name.replace(".base_layer.", ".")
            if name not in parameters:
                missing.append((key, found, name))
            elif parameters[name] != found:
                mismatched.append((key, found, parameters[name]))
            continue
        module_name = match["module"]
        if module_name not in modules:
            missing.append((key, found, module_name))
            continue
        expected = _expected_lora_shape(modules[module_name], match["part"], found)
        if expected is not None and expected != found:
            mismatched.append((key, found, expected))
    where = f"{adapter_dir}: this LoRA adapter does not fit the base model {base_name}"
    hint = "; was the adapter trained on another base model? (predict.py / merge_lora.py: --base_model)"
    if mismatched:
        key, found, expected = mismatched[0]
        raise ValueError(
            f"{where}: {len(mismatched)} of its {len(shapes)} tensors have the wrong shape, first {key}: "
            f"expected {expected}, found {found}{hint}"
        )
    if missing:
        key, found, module_name = missing[0]
        raise ValueError(
            f"{where}: {len(missing)} of its {len(shapes)} tensors adapt modules the base model does not have, "
            f"first {key} (shape {found}): the base model has no {module_name}{hint}"
        )


def saved_adapter_name(name: str) -> str:
    """The name PEFT saves a PeftModel parameter under: without the adapter name and the modules_to_save wrapper
    ("...q_proj.lora_A.default.weight" -> "...q_proj.lora_A.weight")."""
    return name.replace(".default", "").replace(".modules_to_save", "")


def load_adapter(base_model, adapter_dir, **kwargs):
    """PeftModel.from_pretrained(base_model, adapter_dir), after checking the adapter fits the base model.

    Every loader of a saved adapter goes through here: an adapter trained on another base model is refused with a
    ValueError naming the first tensor that does not fit (expected vs found shape), instead of a deep
    size-mismatch traceback or, when only the layer count differs, a silent partial load. If the base model
    recorded in adapter_config.json is not the one used but the shapes fit, it loads with a warning.
    """
    from peft import PeftModel

    adapter_dir = os.fspath(adapter_dir)
    recorded = recorded_base_model(adapter_dir)
    check_adapter_fits(base_model, adapter_dir)
    used = getattr(_base(base_model), "name_or_path", "")
    if recorded and used and not _same_model(recorded, used):
        logger.warning(
            "%s was trained on %s but is loaded onto %s: the shapes fit, but check that this is the base you mean",
            adapter_dir, recorded, used,
        )
    return PeftModel.from_pretrained(base_model, adapter_dir, **kwargs)


def recorded_base_model(adapter_dir) -> str | None:
    """The base model an adapter folder names in its adapter_config.json (None if it names none)."""
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (is it the output folder of a LoRA run?)")
    with open(config_path) as f:
        return json.load(f).get("base_model_name_or_path")


def _same_model(a: str, b: str) -> bool:
    """Whether two model names/paths point at the same model (folders compared by their real path)."""
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")

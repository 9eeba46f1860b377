"""Phi3VConfig: the official `config.json` of Phi-3(.5)-vision, read as it is, on top of transformers' Phi3Config.

What the official file needs beyond Phi3Config (PHI3V_SPEC sections 2 and 6):
- `rope_scaling: {"type": "su", short_factor, long_factor}` is LongRoPE. transformers 5 rejects that dict as it
  is (it wants `original_max_position_embeddings` inside), so it is translated to `rope_parameters`.
- `embd_layer` and `img_processor` describe the image embedding; `img_processor.vision_config` (our extension,
  spec section 7) shrinks the CLIP tower for tiny test checkpoints.
- `_attn_implementation: "flash_attention_2"` is baked into the file; it is a property of the machine, not of the
  checkpoint, so it is dropped here and chosen at load time (sdpa by default).
"""

from transformers import CLIPVisionConfig, Phi3Config

# The CLIP ViT-L/14-336 tower that the remote code hard-codes (spec 2.4). Never downloaded.
CLIP_VIT_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    num_channels=3,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    projection_dim=768,
    initializer_range=0.02,
    initializer_factor=1.0,
)

DEFAULT_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}

DEFAULT_IMG_PROCESSOR = {
    "image_dim_out": 1024,
    "model_name": "openai/clip-vit-large-patch14-336",
    "name": "clip_vision_model",
    "num_img_tokens": 144,
}


class Phi3VConfig(Phi3Config):
    model_type = "phi3_v"

    def __init__(self, embd_layer=None, img_processor=None, rope_scaling=None, **kwargs):
        kwargs.pop("auto_map", None)  # remote-code hooks (spec 9.14): never followed, never written back
        kwargs.pop("_attn_implementation", None)
        # LongRoPE's scale s = max_position_embeddings / original_max_position_embeddings (32 for the official
        # models) sets the attention factor sqrt(1 + ln s / ln original); written as transformers' `factor`.
        scale = kwargs.get("max_position_embeddings", 4096) / kwargs.get("original_max_position_embeddings", 4096)
        if rope_scaling is not None:
            kwargs["rope_parameters"] = _longrope_parameters(rope_scaling, kwargs.get("rope_theta", 10000.0), scale)
        rope_parameters = kwargs.get("rope_parameters")
        if isinstance(rope_parameters, dict) and rope_parameters.get("rope_type") == "su":
            kwargs["rope_parameters"] = _longrope_parameters(rope_parameters, rope_parameters.get("rope_theta", 1e4), scale)
        # The remote config defaults eos to 32000 (<|endoftext|>) and pad to 32000.
        kwargs.setdefault("eos_token_id", 32000)
        kwargs.setdefault("pad_token_id", 32000)
        self.embd_layer = dict(DEFAULT_EMBD_LAYER if embd_layer is None else embd_layer)
        self.img_processor = dict(DEFAULT_IMG_PROCESSOR if img_processor is None else img_processor)
        super().__init__(**kwargs)
        self._check_vision_options()

    @property
    def vision_config(self) -> CLIPVisionConfig:
        """The CLIP tower's config: ViT-L/14-336 unless `img_processor.vision_config` overrides fields."""
        fields = dict(CLIP_VIT_L_336)
        fields.update(self.img_processor.get("vision_config") or {})
        return CLIPVisionConfig(**fields)

    def _check_vision_options(self):
        embd = self.embd_layer
        if embd.get("embedding_cls", "image") != "image":
            raise ValueError(f"embd_layer.embedding_cls {embd.get('embedding_cls')!r} is not supported (only 'image')")
        if not (embd.get("use_hd_transform", True) and embd.get("with_learnable_separator", True)):
            raise ValueError("embd_layer: only use_hd_transform=True with with_learnable_separator=True is supported")
        if embd.get("hd_transform_order", "sub_glb") != "sub_glb":
            raise ValueError(f"embd_layer.hd_transform_order {embd.get('hd_transform_order')!r}: only 'sub_glb'")
        if embd.get("projection_cls", "mlp") != "mlp":
            raise ValueError(f"embd_layer.projection_cls {embd.get('projection_cls')!r}: only 'mlp' is supported")
        vision = self.vision_config
        if vision.image_size % vision.patch_size or (vision.image_size // vision.patch_size) % 2:
            raise ValueError(
                f"img_processor.vision_config: image_size/patch_size = {vision.image_size}/{vision.patch_size} must be "
                "an even whole number (the 2x2 merge of patch features)"
            )
        if self.img_processor.get("image_dim_out", vision.hidden_size) != vision.hidden_size:
            raise ValueError(
                f"img_processor.image_dim_out ({self.img_processor['image_dim_out']}) must equal the vision hidden "
                f"size ({vision.hidden_size})"
            )
        if self.img_processor.get("type_feature", "patch") != "patch":
            raise ValueError("img_processor.type_feature: only 'patch' is supported")


def _longrope_parameters(rope_scaling: dict, rope_theta: float, scale: float) -> dict:
    """Translate the official `{"type": "su", ...}` dict into transformers' LongRoPE `rope_parameters`."""
    rope_type = rope_scaling.get("type", rope_scaling.get("rope_type"))
    if rope_type not in ("su", "longrope"):
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported: Phi-3-V uses 'su' (LongRoPE)")
    missing = [k for k in ("short_factor", "long_factor") if k not in rope_scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} misses {missing}")
    # original_max_position_embeddings is copied from the top level of the config by transformers.
    return {
        "rope_type": "longrope",
        "short_factor": list(rope_scaling["short_factor"]),
        "long_factor": list(rope_scaling["long_factor"]),
        "rope_theta": rope_scaling.get("rope_theta", rope_theta),
        "factor": rope_scaling.get("factor", scale),
    }

"""Phi3VConfig: the official `config.json` of Phi-3(.5)-vision, read as it is, on top of transformers' Phi3Config.

What the official file needs beyond Phi3Config (docs/DESIGN.md §2 and §6):
- `rope_scaling: {"type": "su", short_factor, long_factor}` is LongRoPE. transformers 5 rejects that dict as it
  is (it wants `original_max_position_embeddings` inside), so it is translated to `rope_parameters`.
- `embd_layer` and `img_processor` describe the image embedding; `img_processor.vision_config` (our extension,
  docs/DESIGN.md §7) shrinks the CLIP tower for tiny test checkpoints.
- `_attn_implementation: "flash_attention_2"` is baked into the file; it is a property of the machine, not of the
  checkpoint, so it is dropped here and chosen at load time (sdpa by default).
- `auto_map` (the remote code) is never followed. Only which repository it names is kept, so that a saved
  config.json is written back in the official form of its base, pointing at that repository's code (phi3v.official).
"""

import logging

from transformers import CLIPVisionConfig, Phi3Config

from phi3v.official import code_repo_in_auto_map, is_hub_id, official_file, pointing_at, recognise_base, write_json

logger = logging.getLogger(__name__)


# The CLIP ViT-L/14-336 tower that the remote code hard-codes (docs/DESIGN.md §2.4). Never downloaded.
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
        # Remote-code hooks (docs/DESIGN.md §9.14) are never followed; the repository they name is kept for saving (see
        # to_official_dict): a repo named in "<repo>--module.Class" entries, "" for code beside the file, None for none.
        auto_map = kwargs.pop("auto_map", None)
        recorded = kwargs.pop("_code_repo", None)
        self._code_repo = code_repo_in_auto_map(auto_map) if auto_map is not None else recorded
        kwargs.pop("_attn_implementation", None)
        # LongRoPE's scale s = max_position_embeddings / original_max_position_embeddings (32 for the official
        # models) sets the attention factor sqrt(1 + ln s / ln original); written as transformers' `factor`.
        scale = kwargs.get("max_position_embeddings", 4096) / kwargs.get("original_max_position_embeddings", 4096)
        if rope_scaling is not None and kwargs.get("rope_parameters") is None:  # both: see to_official_dict
            kwargs["rope_parameters"] = _longrope_parameters(rope_scaling, kwargs.get("rope_theta", 10000.0), scale)
        rope_parameters = kwargs.get("rope_parameters")
        if isinstance(rope_parameters, dict) and rope_parameters.get("rope_type") == "su":
            kwargs["rope_parameters"] = _longrope_parameters(
                rope_parameters, rope_parameters.get("rope_theta", 1e4), scale
            )
        # The remote config defaults eos to 32000 (<|endoftext|>) and pad to 32000.
        kwargs.setdefault("eos_token_id", 32000)
        kwargs.setdefault("pad_token_id", 32000)
        self.embd_layer = dict(DEFAULT_EMBD_LAYER if embd_layer is None else embd_layer)
        self.img_processor = dict(DEFAULT_IMG_PROCESSOR if img_processor is None else img_processor)
        super().__init__(**kwargs)
        self._check_vision_options()

    # ------------------------------------------------------------------------------------------ config.json
    def official_base(self) -> tuple[str, str]:
        """(official base whose config.json form is written, repository the auto_map points at); phi3v.official."""
        repo = self._code_repo
        if repo == "":  # the files carried the code: that is the repository loaded from, when it was a hub id
            repo = self.name_or_path if is_hub_id(self.name_or_path) else None
        base = recognise_base(repo, getattr(self, "sliding_window", None))
        return base, repo or base

    def to_official_dict(self) -> dict:
        """config.json as the base model writes it: its keys in its order, LongRoPE as `rope_scaling` ("su") with
        `rope_theta`, `torch_dtype`, and `auto_map` pointing at the base repository's remote code. A setting the
        official form has no key for is added only where it is not the default (so that this package reads the
        same model back)."""
        base, repo = self.official_base()
        template = official_file(base, "config.json")
        native = self.to_dict()
        rope = dict(native.get("rope_parameters") or {})
        longrope = rope.get("rope_type") == "longrope"
        official = {
            "_name_or_path": repo,
            "auto_map": pointing_at(template["auto_map"], repo),
            "rope_scaling": (
                {"long_factor": rope["long_factor"], "short_factor": rope["short_factor"], "type": "su"}
                if longrope else None
            ),
            "rope_theta": rope.get("rope_theta", native.get("rope_theta", 10000.0)),
            "torch_dtype": native.get("dtype"),
            "_attn_implementation": template["_attn_implementation"],
        }
        out = {key: official[key] if key in official else native[key] for key in template}

        reread = type(self)(**out).to_dict()
        handled = set(out) | {"rope_parameters", "dtype", "transformers_version", "_name_or_path", "_code_repo"}
        for key, value in native.items():
            if key not in handled and reread.get(key) != value:
                out[key] = value
        if reread.get("rope_parameters") != native.get("rope_parameters"):
            logger.warning("config.json: rope_parameters %s have no official form; written beside rope_scaling "
                           "(the official code will not read them)", native.get("rope_parameters"))
            out["rope_parameters"] = native.get("rope_parameters")
        return out

    def to_json_file(self, json_file_path, use_diff: bool = True):
        """Write config.json in the official form of the base model (save_pretrained writes through here)."""
        write_json(json_file_path, self.to_official_dict())

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

"""Tiny random Phi-3-V checkpoints in the official layout, for the tests and the offline demo.

All token counts are the real model's: 336-pixel crops, a 24x24 patch grid, 144 tokens per crop, and the real
tokenizer (shipped in phi3v/assets) with its 32064-row vocabulary. Only widths and depths shrink (docs/DESIGN.md §7).
"""

import json
import os

import torch
from transformers import GenerationConfig

from phi3v.configuration import Phi3VConfig
from phi3v.modeling import Phi3VForCausalLM
from phi3v.processing import STOP_TOKEN_IDS, packaged_processor


def tiny_config(**overrides) -> Phi3VConfig:
    """The tiny config of docs/DESIGN.md §7: LM 64 wide x 2 layers, CLIP 32 wide x 2 layers; overrides win."""
    head_dim = overrides.get("hidden_size", 64) // overrides.get("num_attention_heads", 4)
    fields = dict(
        vocab_size=32064,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_theta=10000.0,
        rope_scaling={
            "type": "su",
            "short_factor": [1.0 + 0.1 * i for i in range(head_dim // 2)],
            "long_factor": [2.0 + 0.5 * i for i in range(head_dim // 2)],
        },
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=32000,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        embd_layer={
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        img_processor={
            "image_dim_out": 32,
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 336,
                "patch_size": 14,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "num_channels": 3,
            },
        },
        architectures=["Phi3VForCausalLM"],
    )
    fields.update(overrides)
    return Phi3VConfig(**fields)


def write_tiny_checkpoint(path, num_crops: int = 4, seed: int = 0, **config_overrides) -> str:
    """Write a random tiny model + processor + tokenizer folder at `path` and return the path."""
    torch.manual_seed(seed)
    model = Phi3VForCausalLM(tiny_config(**config_overrides))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=STOP_TOKEN_IDS, pad_token_id=32000)
    model.save_pretrained(path)
    packaged_processor(num_crops=num_crops).save_pretrained(path)
    return os.fspath(path)


def main():
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random Phi-3-V checkpoint (official layout).",
                                     allow_abbrev=False)
    parser.add_argument("out_dir")
    parser.add_argument("--num_crops", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_tiny_checkpoint(args.out_dir, num_crops=args.num_crops, seed=args.seed)
    with open(os.path.join(args.out_dir, "config.json")) as f:
        print(f"wrote {args.out_dir} ({json.load(f)['num_hidden_layers']} layers)")


if __name__ == "__main__":
    main()

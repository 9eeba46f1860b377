"""Phi3VImageEmbedding: CLIP features of the HD crops -> image tokens in the language model's width (docs/DESIGN.md §5).

Per image: CLIP runs on the global view and the used crops (the zero padding crops are skipped: their features
are discarded by the reference anyway), the 24x24 patch features of each crop are merged 2x2 into 12x12 tokens
of width 4D, the crops are stitched into one grid with a learned `sub_GN` "newline" after every row, then come
the learned separator `glb_GN` and the global view (also with newlines); an MLP projects everything to the
language model's hidden size.
"""

import contextlib

import torch
from torch import nn
from transformers import CLIPVisionModel


class Phi3VImageEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        vision_config = config.vision_config
        vision_config._attn_implementation = config._attn_implementation
        # `img_processor.vision_model.*` are the official checkpoint names; a ModuleDict keeps them exactly,
        # whatever renaming transformers applies to a bare nested CLIPVisionModel (docs/DESIGN.md §1.4).
        self.img_processor = nn.ModuleDict({"vision_model": CLIPVisionModel(vision_config)})
        dim = vision_config.hidden_size
        self.crop_size = vision_config.image_size
        self.patch_grid = vision_config.image_size // vision_config.patch_size  # 24
        layer_idx = config.img_processor.get("layer_idx", -2)
        num_layers = vision_config.num_hidden_layers
        # hidden_states[i] is the output after i encoder layers (0: embeddings + pre_layrnorm), so only
        # `layers_used` layers need to run; the last layer and post_layernorm stay in the checkpoint, unused.
        self.layers_used = layer_idx if layer_idx >= 0 else num_layers + 1 + layer_idx
        if not 0 <= self.layers_used <= num_layers:
            raise ValueError(f"img_processor.layer_idx {layer_idx} is outside the {num_layers} CLIP layers")
        self.freeze_unused_layers()
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, 4 * dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, 4 * dim))
        self.img_projection = nn.Sequential(
            nn.Linear(4 * dim, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )

    def freeze_unused_layers(self) -> None:
        """CLIP layers after the feature layer and post_layernorm never get a gradient: freeze them so that DDP
        and ZeRO do not wait for their gradients (they stay in the checkpoint all the same)."""
        clip = self.vision_model
        for layer in clip.encoder.layers[self.layers_used :]:
            layer.requires_grad_(False)
        clip.post_layernorm.requires_grad_(False)

    @property
    def vision_model(self) -> CLIPVisionModel:
        return self.img_processor["vision_model"]

    def clip_features(self, crops: torch.Tensor) -> torch.Tensor:
        """[N, 3, 336, 336] -> patch features [N, 576, D] of the chosen CLIP layer (CLS dropped).

        A frozen tower (no parameter that trains, inputs that need no gradient) runs under no_grad: the same
        features, without autograd's bookkeeping or activation checkpointing's wrapper around every layer."""
        clip = self.vision_model
        frozen = not crops.requires_grad and not any(p.requires_grad for p in clip.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            hidden = clip.pre_layrnorm(clip.embeddings(crops))
            for layer in clip.encoder.layers[: self.layers_used]:
                hidden = layer(hidden, None)
        return hidden[:, 1:]

    def merge_2x2(self, features: torch.Tensor) -> torch.Tensor:
        """[N, g*g, D] -> [N, (g/2)^2, 4D]: token (r, c) = patches (2r,2c), (2r,2c+1), (2r+1,2c), (2r+1,2c+1)."""
        n, _, dim = features.shape
        h = self.patch_grid // 2
        return features.reshape(n, h, 2, h, 2, dim).permute(0, 1, 3, 2, 4, 5).reshape(n, h * h, 4 * dim)

    def with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """[rows, cols, 4D] -> [rows * (cols + 1), 4D] with sub_GN appended to every row."""
        rows = grid.shape[0]
        newline = self.sub_GN[0].expand(rows, 1, -1).to(grid.dtype)
        return torch.cat([grid, newline], dim=1).reshape(-1, grid.shape[-1])

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, grids=None) -> torch.Tensor:
        """All images' tokens, concatenated in image order: [total image tokens, hidden_size].

        grids: each image's crops as (rows, cols) = image_sizes // crop size, as Python ints (the training
        collator passes them): reading them from image_sizes on a GPU would make the host wait for it."""
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be [images, crops, 3, H, W], got shape {tuple(pixel_values.shape)}")
        if image_sizes.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"image_sizes has {image_sizes.shape[0]} rows for {pixel_values.shape[0]} images in pixel_values"
            )
        if grids is None:
            grids = [(h // self.crop_size, w // self.crop_size) for h, w in image_sizes.tolist()]
        else:
            grids = [(int(rows), int(cols)) for rows, cols in grids]
            if len(grids) != pixel_values.shape[0]:
                raise ValueError(f"{len(grids)} image grids for {pixel_values.shape[0]} images in pixel_values")
        for index, (rows, cols) in enumerate(grids):
            if rows * cols + 1 > pixel_values.shape[1]:
                raise ValueError(
                    f"image {index}: image_sizes {image_sizes[index].tolist()} needs {rows * cols + 1} crops, "
                    f"pixel_values has {pixel_values.shape[1]}"
                )
        # Only the global view and the used crops go through CLIP.
        crops = torch.cat([pixel_values[i, : 1 + rows * cols] for i, (rows, cols) in enumerate(grids)])
        merged = self.merge_2x2(self.clip_features(crops.to(self.img_projection[0].weight.dtype)))
        side = self.patch_grid // 2
        tokens, start = [], 0
        glb_sep = self.glb_GN[0].to(merged.dtype)
        for rows, cols in grids:
            image = merged[start : start + 1 + rows * cols]
            start += 1 + rows * cols
            sub = (
                image[1:]
                .reshape(rows, cols, side, side, -1)
                .permute(0, 2, 1, 3, 4)
                .reshape(rows * side, cols * side, -1)
            )
            glb = image[0].reshape(side, side, -1)
            tokens += [self.with_newlines(sub), glb_sep, self.with_newlines(glb)]
        return self.img_projection(torch.cat(tokens))

"""Phi3VImageProcessor: the HD transform of Phi-3(.5)-vision (docs/DESIGN.md §3).

Each image becomes a global 336x336 view plus up to `num_crops` 336x336 crops of a resized, white-padded copy,
so that `pixel_values` is [num_images, num_crops + 1, 3, 336, 336] (unused crop slots are zeros) and
`image_sizes` holds the (height, width) of the padded HD image, from which the token count follows.
"""

import ctypes
import json
import math
import os
import platform
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BatchFeature

from phi3v.official import (
    PHI3_VISION_128K,
    base_of_model_folder,
    code_repo_in_auto_map,
    code_repo_of_source,
    official_file,
    pointing_at,
    recognise_base,
    write_json,
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# glibc mallopt parameters (malloc.h) and the values set in DataLoader workers: see reuse_freed_memory.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: buffers up to 32 MiB (a page's crops are 23 MiB) come from the heap
_TRIM_THRESHOLD = 256 * 2**20  # freed heap memory kept for the next sample, up to this much
_memory_reuse = None  # None: not tried yet in this process; then whether it applied


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of a PIL image in any mode; transparency is composited onto white (docs/DESIGN.md §3, step 1)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I"):
        # 16-bit grey: scale to 8 bits instead of letting convert() clip everything above 255
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    if image.mode == "La":  # premultiplied alpha: PIL converts it only to LA
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed buffers of up to 32 MiB for reuse (instead of giving them back to the system).

    Every page makes ~130 MiB of short-lived buffers (the decoded image, its transposed and resized copies, the
    float HD image, the crops, the collated batch). By default glibc returns most of them to the system when they
    are freed, so each new one is fresh memory that the kernel faults in page by page: ~20,000 page faults a
    DocVQA page and 20-40% of the CPU time a page costs (benchmarks/bench_data.py). With the heap kept, a worker
    reuses its memory (~1,500 page faults a page; its resident memory grows by a few tens of MB).
    Applied once per process, on Linux with glibc only (returns whether it applied); the preprocessor calls it in
    DataLoader workers only, so the training process itself is untouched. Pixel values do not change.
    """
    global _memory_reuse
    if _memory_reuse is None:
        _memory_reuse = False
        if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL(None).mallopt
                _memory_reuse = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
                    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
                )
            except (OSError, AttributeError):
                pass
    return _memory_reuse


class Phi3VImageProcessor:
    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(
        self,
        num_crops: int = 1,
        num_img_tokens: int = 144,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb: bool = True,
        crop_size: int = 336,
        auto_map: dict | None = None,  # the remote code's classes: never followed, kept to save the official form
        **kwargs,  # other keys of preprocessor_config.json (processor_class, ...) are not ours
    ):
        self.auto_map = dict(auto_map) if isinstance(auto_map, dict) else None
        # The repository whose remote code saved files point at (phi3v.official); from_pretrained records it.
        self.code_repo = code_repo_in_auto_map(self.auto_map) or None
        self.model_folder_base = None  # (base, repository) of a model folder read with this file, see official_base
        self.num_crops = _check_num_crops(num_crops)
        self.num_img_tokens = num_img_tokens
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.do_convert_rgb = do_convert_rgb
        self.crop_size = crop_size
        # Tokens per crop side after the 2x2 merge: 336 / 14 / 2 = 12 (so 144 tokens per crop).
        self.merged_side = math.isqrt(num_img_tokens)
        self._mean = torch.tensor(self.image_mean).view(3, 1, 1)
        self._std = torch.tensor(self.image_std).view(3, 1, 1)

    # ---------------------------------------------------------------- sizes and token counts (numbers only)
    def hd_size(self, width: int, height: int, num_crops: int | None = None) -> tuple[int, int]:
        """(height, width) of the padded HD image for an input of `width` x `height` (docs/DESIGN.md §3, steps 2-5)."""
        num_crops = self.num_crops if num_crops is None else _check_num_crops(num_crops)
        transposed = width < height  # portrait images are planned as landscape, then transposed back
        long_side, short_side = (height, width) if transposed else (width, height)
        new_w, _, padded_h = self._landscape_plan(long_side, short_side, num_crops)
        return (new_w, padded_h) if transposed else (padded_h, new_w)

    def _landscape_plan(self, width: int, height: int, num_crops: int) -> tuple[int, int, int]:
        """For width >= height: (resized width, resized height, padded height)."""
        ratio = width / height
        scale = 1  # crop columns; ceil(scale / ratio) rows must keep rows * cols <= num_crops
        while scale * math.ceil(scale / ratio) <= num_crops:
            scale += 1
        scale -= 1
        new_w = scale * self.crop_size
        new_h = max(1, int(new_w / ratio))  # truncation as the reference; >= 1 is our guard for extreme ratios
        return new_w, new_h, math.ceil(new_h / self.crop_size) * self.crop_size

    def num_tokens_for_hd_size(self, hd_height: int, hd_width: int) -> int:
        """Image tokens for a padded HD image: crops with a newline per row, glb_GN, global view with newlines."""
        rows, cols = hd_height // self.crop_size, hd_width // self.crop_size
        side = self.merged_side
        return (rows * cols + 1) * side * side + 1 + (rows + 1) * side

    def num_image_tokens(self, width: int, height: int, num_crops: int | None = None) -> int:
        return self.num_tokens_for_hd_size(*self.hd_size(width, height, num_crops))

    # ---------------------------------------------------------------- pixels
    def hd_transform(self, image: Image.Image, num_crops: int) -> torch.Tensor:
        """Resize and white-pad one RGB image to the HD grid; returns the normalised [3, H, W] float tensor."""
        transposed = image.width < image.height
        if transposed:  # process portrait images as landscape, then transpose back (docs/DESIGN.md §3, step 2)
            image = image.transpose(Image.Transpose.TRANSPOSE)
        new_w, new_h, padded_h = self._landscape_plan(image.width, image.height, num_crops)
        resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)  # = torchvision's resize on PIL
        canvas = Image.new("RGB", (new_w, padded_h), (255, 255, 255))
        canvas.paste(resized, (0, int((padded_h - new_h) / 2)))  # the odd pixel of padding goes to the bottom
        if transposed:
            canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
        pixels = torch.from_numpy(np.array(canvas)).permute(2, 0, 1)  # [3, H, W] view of the uint8 [H, W, 3]
        # One uint8 -> float32 pass into a contiguous [3, H, W] tensor, then the same float32 operations as
        # ((x / 255) - mean) / std, in place: bit-identical to the out-of-place form, without three temporaries.
        hd = torch.empty(pixels.shape, dtype=torch.float32)
        hd.copy_(pixels)
        return hd.div_(255.0).sub_(self._mean).div_(self._std)

    def preprocess(self, images, num_crops: int | None = None, return_tensors: str | None = "pt") -> BatchFeature:
        """Images (a PIL image or a list of them) -> pixel_values, image_sizes and num_img_tokens."""
        num_crops = self.num_crops if num_crops is None else _check_num_crops(num_crops)
        if _memory_reuse is None and torch.utils.data.get_worker_info() is not None:
            reuse_freed_memory()  # in a DataLoader worker: see there
        images = [images] if isinstance(images, Image.Image) else list(images)
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise ValueError(
                    f"image {index + 1} is a {type(image).__name__}, not a PIL.Image.Image "
                    "(open files with PIL.Image.open or phi3v.media.open_image first)"
                )
        size = self.crop_size
        # Every crop is written straight into the batch tensor (no per-image buffer, no stack); only the unused
        # crop slots are zeroed.
        pixel_values = torch.empty(len(images), num_crops + 1, 3, size, size)
        image_sizes, num_tokens = [], []
        for index, image in enumerate(images):
            if self.do_convert_rgb:
                image = to_rgb(image)
            hd = self.hd_transform(image, num_crops)
            _, hd_h, hd_w = hd.shape
            rows, cols = hd_h // size, hd_w // size
            crops = pixel_values[index]
            crops[0] = F.interpolate(hd[None], size=(size, size), mode="bicubic", align_corners=False)[0]
            # Row-major tiles: [3, rows*336, cols*336] -> [rows*cols, 3, 336, 336], in one copy.
            tiles = hd.view(3, rows, size, cols, size).permute(1, 3, 0, 2, 4)
            crops[1 : 1 + rows * cols].view(rows, cols, 3, size, size).copy_(tiles)
            crops[1 + rows * cols :].zero_()
            image_sizes.append([hd_h, hd_w])
            num_tokens.append(self.num_tokens_for_hd_size(hd_h, hd_w))
        data = {
            "pixel_values": pixel_values,
            "image_sizes": torch.tensor(image_sizes, dtype=torch.long).reshape(-1, 2),
            "num_img_tokens": num_tokens,
        }
        return BatchFeature(data=data)

    __call__ = preprocess

    # ---------------------------------------------------------------- files
    def official_base(self) -> tuple[str, str]:
        """(official base whose preprocessor_config.json form is written, repository its auto_map points at).

        The base: named by the recorded repository, else told by the file read (Phi-3-vision-128k's auto_map names
        image_processing_phi3_v, Phi-3.5-vision's processing_phi3_v), else Phi-3.5-vision (phi3v.official)."""
        if self.code_repo is None and self.auto_map is None and self.model_folder_base is not None:
            return self.model_folder_base  # the file names no remote code: as the model's config.json beside it
        base = recognise_base(self.code_repo)
        if base != self.code_repo:  # not named by the repository: told by the file read
            module = str((self.auto_map or {}).get("AutoImageProcessor", "")).split("--")[-1]
            if module.startswith("image_processing_phi3_v."):
                base = PHI3_VISION_128K
        return base, self.code_repo or base

    def to_dict(self) -> dict:
        """preprocessor_config.json in the official form of the base model: its keys in its order, auto_map pointing
        at the base repository's code; settings it has no key for only where they are not the default."""
        base, repo = self.official_base()
        template = official_file(base, "preprocessor_config.json")
        values = {
            "auto_map": pointing_at(template["auto_map"], repo),
            "do_convert_rgb": self.do_convert_rgb,
            "image_mean": self.image_mean,
            "image_processor_type": "Phi3VImageProcessor",
            "image_std": self.image_std,
            "num_crops": self.num_crops,
            "num_img_tokens": self.num_img_tokens,
            "processor_class": "Phi3VProcessor",
        }
        out = {key: values[key] for key in template}
        if not self.do_convert_rgb:
            out["do_convert_rgb"] = False
        if self.crop_size != 336:
            out["crop_size"] = self.crop_size
        return out

    def save_pretrained(self, save_directory):
        os.makedirs(save_directory, exist_ok=True)
        write_json(os.path.join(save_directory, "preprocessor_config.json"), self.to_dict())

    @classmethod
    def from_pretrained(cls, path_or_hub_id, num_crops: int | None = None, **kwargs):
        from phi3v.hub import resolve_file

        with open(resolve_file(path_or_hub_id, "preprocessor_config.json", **kwargs)) as f:
            config = json.load(f)
        if num_crops is not None:
            config["num_crops"] = num_crops
        processor = cls(**config)
        processor.code_repo = code_repo_of_source(config.get("auto_map"), path_or_hub_id)
        if os.path.isdir(path_or_hub_id):
            processor.model_folder_base = base_of_model_folder(path_or_hub_id)
        return processor


def _check_num_crops(num_crops) -> int:
    if not isinstance(num_crops, int) or isinstance(num_crops, bool) or num_crops < 1:
        raise ValueError(f"num_crops must be a whole number >= 1, got {num_crops!r}")
    return num_crops

"""The image processor's fast path (crops written straight into one preallocated batch tensor, in-place
normalisation) against the step-by-step torchvision reference of test_processor.py, on DocVQA page sizes."""

import platform
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_processor import reference_hd

from phi3v.image_processing import Phi3VImageProcessor


def page(size, seed=0):
    """A document-like page: white, with dark text-like blocks and a grey gradient (so every value occurs)."""
    rng = random.Random(seed)
    width, height = size
    ramp = torch.linspace(0, 255, width).to(torch.uint8).expand(height, width)
    pixels = torch.stack([ramp, ramp.flip(1), torch.full_like(ramp, 255)], dim=-1).clone()
    for _ in range(40):
        x, y = rng.randrange(width - 60), rng.randrange(height - 12)
        pixels[y : y + 12, x : x + 60] = rng.randrange(40)
    return Image.fromarray(pixels.numpy())


@pytest.mark.parametrize("size", [(1700, 2200), (1000, 1400), (2200, 1700), (1280, 720)])
def test_docvqa_pages_equal_the_reference(size):
    image = page(size)
    hd = reference_hd(image, 16)
    out = Phi3VImageProcessor(num_crops=16)(image)
    rows, cols = hd.shape[1] // 336, hd.shape[2] // 336
    pixel_values = out["pixel_values"][0]
    expected_global = F.interpolate(hd[None], size=(336, 336), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(pixel_values[0], expected_global, rtol=0, atol=1e-6)
    tiles = hd.reshape(3, rows, 336, cols, 336).permute(1, 3, 0, 2, 4).reshape(-1, 3, 336, 336)
    torch.testing.assert_close(pixel_values[1 : 1 + rows * cols], tiles, rtol=0, atol=1e-6)
    assert pixel_values.is_contiguous()


def test_several_images_in_one_call_equal_each_alone():
    """The batch tensor is allocated uninitialised: each image's crops and zeroed unused slots must fill it."""
    processor = Phi3VImageProcessor(num_crops=16)
    images = [page((1000, 1400), 1), page((640, 480), 2), page((1700, 2200), 3), page((500, 3000), 4)]
    together = processor(iter(images))  # any iterable of images
    assert together["pixel_values"].shape == (4, 17, 3, 336, 336)
    for index, image in enumerate(images):
        alone = processor(image)
        assert torch.equal(together["pixel_values"][index], alone["pixel_values"][0])
        assert together["image_sizes"][index].tolist() == alone["image_sizes"][0].tolist()
        rows, cols = (size // 336 for size in alone["image_sizes"][0].tolist())
        assert together["pixel_values"][index, 1 + rows * cols :].count_nonzero() == 0  # unused slots: zeros
    assert together["num_img_tokens"] == [processor(image)["num_img_tokens"][0] for image in images]


class _ProcessOnePage(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        import phi3v.image_processing as image_processing

        Phi3VImageProcessor(num_crops=4)(page((500, 400), index))
        return torch.tensor(image_processing._memory_reuse is True)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings only")
def test_dataloader_workers_keep_freed_memory_and_the_main_process_is_untouched():
    import phi3v.image_processing as image_processing

    before = image_processing._memory_reuse
    loader = torch.utils.data.DataLoader(_ProcessOnePage(), batch_size=1, num_workers=1)
    assert [bool(flag) for flag in loader] == [True, True]  # the worker applied it at its first image
    assert image_processing._memory_reuse is before  # this process: not applied by the workers' calls

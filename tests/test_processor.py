"""Phi3VImageProcessor / Phi3VProcessor against the worked examples of docs/DESIGN.md §3 and §4."""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from conftest import OFFICIAL
from PIL import Image

from phi3v import Phi3VImageProcessor, Phi3VProcessor
from phi3v.image_processing import CLIP_MEAN, CLIP_STD
from phi3v.processing import check_image_tags, packaged_processor

# (width, height, num_crops) -> (hd height, hd width, tokens): the table of docs/DESIGN.md §3.
WORKED_EXAMPLES = [
    (500, 500, 4, 672, 672, 757),
    (500, 500, 16, 1344, 1344, 2509),
    (1280, 720, 16, 1008, 1680, 2353),
    (1280, 720, 4, 672, 672, 757),
    (720, 1280, 16, 1680, 1008, 2377),
    (640, 480, 16, 1008, 1344, 1921),
    (50, 8000, 16, 5376, 336, 2653),
    (50, 8000, 4, 1344, 336, 781),
]
WHITE = [(1.0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]


@pytest.fixture(scope="module")
def image_processor():
    return Phi3VImageProcessor(num_crops=4)


@pytest.mark.parametrize("width,height,num_crops,hd_h,hd_w,tokens", WORKED_EXAMPLES)
def test_worked_examples_sizes_and_pixels(image_processor, width, height, num_crops, hd_h, hd_w, tokens):
    assert image_processor.hd_size(width, height, num_crops) == (hd_h, hd_w)
    assert image_processor.num_image_tokens(width, height, num_crops) == tokens
    out = image_processor(Image.new("RGB", (width, height), (200, 30, 60)), num_crops=num_crops)
    assert out["image_sizes"].tolist() == [[hd_h, hd_w]]
    assert out["num_img_tokens"] == [tokens]
    assert out["pixel_values"].shape == (1, num_crops + 1, 3, 336, 336)
    used = 1 + (hd_h // 336) * (hd_w // 336)
    assert out["pixel_values"][0, used:].abs().sum() == 0  # unused crop slots are zeros
    assert out["pixel_values"][0, :used].abs().sum(dim=(1, 2, 3)).min() > 0


def reference_hd(image: Image.Image, num_crops: int) -> torch.Tensor:
    """docs/DESIGN.md §3 step by step, with torchvision's resize and pad as the reference code uses them."""
    width, height = image.size
    transposed = width < height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * -(-scale // ratio) <= num_crops:  # ceil
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    image = TF.resize(image, [new_h, new_w])
    target = -(-new_h // 336) * 336
    top = int((target - new_h) / 2)
    image = TF.pad(image, [0, top, 0, target - new_h - top], fill=[255, 255, 255])
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    return TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)


@pytest.mark.parametrize("size", [(1280, 720), (720, 1280), (333, 517), (900, 301)])
def test_pixels_equal_reference_pipeline(image_processor, size):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    hd = reference_hd(image, 16)
    out = image_processor(image, num_crops=16)
    rows, cols = hd.shape[1] // 336, hd.shape[2] // 336
    assert out["image_sizes"].tolist() == [[hd.shape[1], hd.shape[2]]]
    expected_global = F.interpolate(hd[None], size=(336, 336), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(out["pixel_values"][0, 0], expected_global, rtol=0, atol=1e-5)
    for r in range(rows):  # crops in row-major order
        for c in range(cols):
            crop = hd[:, r * 336 : (r + 1) * 336, c * 336 : (c + 1) * 336]
            torch.testing.assert_close(out["pixel_values"][0, 1 + r * cols + c], crop, rtol=0, atol=1e-5)


def test_landscape_padding_is_white_top_and_bottom(image_processor):
    hd = image_processor.hd_transform(Image.new("RGB", (1280, 720), (0, 0, 0)), 16)  # 945 rows -> 1008
    assert hd.shape == (3, 1008, 1680)
    white = torch.tensor(WHITE).view(3, 1)
    torch.testing.assert_close(hd[:, :31, :].reshape(3, -1).mean(1, keepdim=True), white)  # top 31 rows
    torch.testing.assert_close(hd[:, 976:, :].reshape(3, -1).mean(1, keepdim=True), white)  # bottom 32 rows
    assert (hd[:, 31:976, :] < -1).all()  # the black picture itself


def test_portrait_is_transposed_and_padded_left_right(image_processor):
    hd = image_processor.hd_transform(Image.new("RGB", (720, 1280), (0, 0, 0)), 16)
    assert hd.shape == (3, 1680, 1008)
    white = torch.tensor(WHITE).view(3, 1)
    torch.testing.assert_close(hd[:, :, :31].reshape(3, -1).mean(1, keepdim=True), white)
    torch.testing.assert_close(hd[:, :, 976:].reshape(3, -1).mean(1, keepdim=True), white)
    assert (hd[:, :, 31:976] < -1).all()


def test_alpha_is_composited_on_white(image_processor):
    transparent = Image.new("RGBA", (336, 336), (0, 0, 0, 0))
    out = image_processor(transparent, num_crops=1)
    torch.testing.assert_close(out["pixel_values"][0, 1, :, 0, 0], torch.tensor(WHITE))


def test_token_ids_are_the_reference_ones(processor):
    tok = processor.tokenizer
    assert tok("<|user|>\n")["input_ids"] == [1, 32010, 29871, 13]
    assert tok("\nWhat is shown?<|end|>\n<|assistant|>\n")["input_ids"] == [
        1, 29871, 13, 5618, 338, 4318, 29973, 32007, 29871, 13, 32001,
    ]
    assert processor.encode_text("A cat.<|end|>\n<|endoftext|>") == [319, 6635, 29889, 32007, 29871, 13, 32000]
    assert len(tok) == 32045


def test_decode_skips_image_slots_and_special_tokens_as_the_model_card_uses_it(processor):
    # The official model card decodes with processor.batch_decode(generate_ids[:, prompt_length:], ...).
    answer = [319, 6635, 29889, 32007, 29871, 13, 32000]  # "A cat.<|end|>\n<|endoftext|>"
    with_slots = torch.tensor([[-1, -1, 5618, 338], [319, 6635, 29889, 32007]])
    assert processor.decode(answer) == "A cat. \n"  # 29871 is the lone "▁" (a space) before the newline
    assert processor.batch_decode(with_slots) == ["What is", "A cat."]
    assert processor.batch_decode([answer], skip_special_tokens=False) == ["A cat.<|end|> \n<|endoftext|>"]


def test_chat_template(processor):
    messages = [{"role": "user", "content": "<|image_1|>\nWhat is shown?"}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n"
    )
    assert processor.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "A cat."}]
    ) == "<|system|>\nBe brief.<|end|>\n<|assistant|>\nA cat.<|end|>\n"


def test_input_ids_layout_with_bos_after_each_image(processor):
    prompt = "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n"
    out = processor(prompt, [Image.new("RGB", (500, 500))], num_crops=4)
    expected = [1, 32010, 29871, 13] + [-1] * 757 + [1, 29871, 13, 5618, 338, 4318, 29973, 32007, 29871, 13, 32001]
    assert out["input_ids"].tolist() == [expected]
    assert out["attention_mask"].tolist() == [[1] * 772]


def test_two_images_and_batched_padding(processor):
    prompts = ["<|image_1|>\n<|image_2|>\nSame?", "No image here."]
    images = [[Image.new("RGB", (336, 336)), Image.new("RGB", (2000, 300))], []]
    right = processor(prompts, images, num_crops=4, padding_side="right")
    left = processor(prompts, images, num_crops=4, padding_side="left")
    # 336x336 -> 2x2 crops (757 tokens); 2000x300 -> 1x4 crops: (4 + 1) * 144 + 1 + 2 * 12 = 745 tokens
    tail = processor.tokenizer("\nSame?")["input_ids"]
    assert tail[:3] == [1, 29871, 13]
    first = [1] + [-1] * 757 + [1, 29871, 13] + [-2] * 745 + tail
    second = processor.tokenizer("No image here.")["input_ids"]
    assert right["input_ids"][0].tolist() == first
    pad = len(first) - len(second)
    assert right["input_ids"][1].tolist() == second + [32000] * pad
    assert left["input_ids"][1].tolist() == [32000] * pad + second
    assert left["attention_mask"][1].tolist() == [0] * pad + [1] * len(second)
    assert right["pixel_values"].shape == (2, 5, 3, 336, 336)
    assert right["image_sizes"].tolist() == [[672, 672], [336, 1344]]


@pytest.mark.parametrize(
    "prompt,n_images,message",
    [
        ("<|image_2|>\nhi", 1, "in order, each once; found <|image_2|>"),
        ("<|image_1|><|image_1|>", 2, "found <|image_1|>, <|image_1|>"),
        ("<|image_2|><|image_1|>", 2, "found <|image_2|>, <|image_1|>"),
        ("<|image_1|>\nhi", 2, "1 image tag(s) but 2 image(s)"),
        ("hi", 1, "0 image tag(s) but 1 image(s)"),
    ],
)
def test_bad_tags_are_refused(processor, prompt, n_images, message):
    with pytest.raises(ValueError, match=message.replace("|", r"\|").replace("(", r"\(").replace(")", r"\)")):
        processor(prompt, [Image.new("RGB", (40, 40))] * n_images)
    with pytest.raises(ValueError):
        check_image_tags(prompt, n_images)


def test_other_bad_inputs(processor):
    with pytest.raises(ValueError, match="image 1 is a str, not a PIL.Image.Image"):
        processor("<|image_1|>", ["cat.jpg"])
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="num_crops must be a whole number >= 1"):
            processor("<|image_1|>", [Image.new("RGB", (40, 40))], num_crops=bad)
    with pytest.raises(ValueError, match="prompt 0 is 316 tokens long, more than the limit of 100 tokens"):
        processor("<|image_1|>hi", [Image.new("RGB", (40, 40))], num_crops=1, max_length=100)


def test_official_files_load_with_num_crops_override(tmp_path):
    folder = tmp_path / "official"
    shutil.copytree(os.path.join(OFFICIAL, "phi-3.5-vision-instruct"), folder)
    shutil.copy(os.path.join(OFFICIAL, "tokenizer.json"), folder / "tokenizer.json")
    processor = Phi3VProcessor.from_pretrained(folder)
    assert processor.num_crops == 4  # the 3.5 default
    assert Phi3VProcessor.from_pretrained(folder, num_crops=16).num_crops == 16
    assert processor.tokenizer("<|end|>\n", add_special_tokens=False)["input_ids"] == [32007, 29871, 13]
    from transformers import AutoProcessor

    import phi3v  # noqa: F401  (registers the Auto classes)

    auto = AutoProcessor.from_pretrained(folder, num_crops=16)
    assert isinstance(auto, Phi3VProcessor) and auto.num_crops == 16


def test_save_and_reload_round_trip(tmp_path):
    processor = packaged_processor(num_crops=16)
    processor.save_pretrained(tmp_path)
    again = Phi3VProcessor.from_pretrained(tmp_path)
    assert again.num_crops == 16
    text = "<|user|>\nHello wörld<|end|>\n<|assistant|>\n"
    assert again.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    from transformers import AutoTokenizer

    # The saved tokenizer_config keeps AutoTokenizer on the same ids (LlamaTokenizer would change them).
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == processor.tokenizer(text)["input_ids"]


def test_every_image_mode_is_accepted_and_alpha_goes_onto_white(processor):
    """Premultiplied-alpha modes (La, RGBa), which PIL converts only to their plain-alpha twins, and 16-bit grey
    reach the same pixels as their plain equivalents."""
    from phi3v.image_processing import to_rgb

    same = [(Image.new("La", (40, 30), (100, 128)), Image.new("LA", (40, 30), (199, 128))),
            (Image.new("RGBa", (40, 30), (50, 50, 50, 128)), Image.new("RGBA", (40, 30), (100, 100, 100, 128))),
            (Image.new("I;16", (40, 30), 51400), Image.new("L", (40, 30), 200))]
    for image, twin in same:
        assert to_rgb(image).getpixel((0, 0)) == to_rgb(twin).getpixel((0, 0)), image.mode
        a = processor.image_processor([image], num_crops=1)["pixel_values"]
        b = processor.image_processor([twin], num_crops=1)["pixel_values"]
        assert torch.equal(a, b), image.mode
    assert to_rgb(Image.new("La", (4, 4), (100, 128))).getpixel((0, 0)) == (227, 227, 227)  # 199 half over white

"""Fuzz: hundreds of seeded random cases through Phi3VProcessor, tokenize_conversation and Phi3VDataCollator.

Random image sizes (2x2 up, ordinary, extreme aspect ratios up to 1:1500), image modes, 0-4 images, num_crops
1..16, random texts (unicode, whitespace, special tokens, text that looks like a tag but is not one). Every valid
case is checked against the specification computed here on its own (docs/DESIGN.md §3: HD size and token count; 4.1: the
raw tokenizer.json pipeline; 4.2: the chat template; 4.3: every text chunk with its BOS, tag k as -k once per image
token; 4.4: labels on the answers only) — layout, run lengths and signs, padding, masks, pixel_values and
image_sizes shapes. Every invalid case must raise ValueError (BadSampleError through the dataset) with its
documented message, and nothing else.
"""

import itertools
import math
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from phi3v.collator import Phi3VDataCollator
from phi3v.conversation import tokenize_conversation
from phi3v.dataset import SFTDataset
from phi3v.processing import PACKAGED_TOKENIZER
from phi3v.records import BadSampleError

SEED = 1234
CROP, TOKENS_PER_CROP, MERGED_SIDE = 336, 144, 12
BOS, PAD, IGNORE = 1, 32000, -100
TAG = re.compile(r"<\|image_(\d+)\|>")

# Text that looks like a tag but is not one, the special tokens as text, whitespace, escapes, template syntax.
PIECES = [
    "What is shown?", "Describe the picture.", "<image>", "<|image|>", "<|image_x|>", "<|image_ 1|>", "< |image_1|>",
    "<|IMAGE_1|>", "<|image_1 |>", "<|image_-1|>", "<|image_1.0|>", "<|image_1", "image_2|>", "<|user|>", "<|end|>",
    "<|assistant|>", "<|system|>", "<|endoftext|>", "<|placeholder3|>", "<s>", "</s>", "<unk>", "▁", "\\n", "{{ x }}",
    "{% if true %}", "0123456789", "a" * 40, "日本語のテキスト", "🐱\u200d👤🎉", "e\u0301", "مرحبا بالعالم", "\x00",
]
WHITESPACE = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "\u200b", "\ufeff"]
CODEPOINTS = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xE0FF),
              (0x1F300, 0x1FAFF), (0x10000, 0x100FF)]  # no surrogates: those are an invalid case of their own
MODES = ["RGB"] * 6 + ["L", "RGBA", "LA", "P", "PA", "CMYK", "I", "F", "1", "I;16", "YCbCr", "RGBX", "La", "RGBa"]


@pytest.fixture(scope="module")
def tokenizer():
    """The raw tokenizer.json pipeline (docs/DESIGN.md §4.1), independent of the processor's tokenizer object."""
    return Tokenizer.from_file(PACKAGED_TOKENIZER)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of small tensors: one thread is faster than two fighting over a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ the spec
def spec_hd_size(width, height, num_crops):
    """(h, w) of the padded HD image (docs/DESIGN.md §3, steps 2-5, numbers only; new_h >= 1, our deviation)."""
    transposed = width < height
    long_side, short_side = (height, width) if transposed else (width, height)
    ratio = long_side / short_side
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = scale * CROP
    padded_h = math.ceil(max(1, int(new_w / ratio)) / CROP) * CROP
    return (new_w, padded_h) if transposed else (padded_h, new_w)


def spec_tokens(width, height, num_crops):
    rows, cols = (side // CROP for side in spec_hd_size(width, height, num_crops))
    return (rows * cols + 1) * TOKENS_PER_CROP + 1 + (rows + 1) * MERGED_SIDE


def spec_layout(tokenizer, text, counts, first=1):
    """docs/DESIGN.md §4.3: every chunk between tags encoded with its BOS; tag k becomes -k, counts[k - first] times."""
    chunks = re.split(r"<\|image_\d+\|>", text)
    assert len(chunks) == len(counts) + 1
    ids = tokenizer.encode(chunks[0]).ids
    for k, (count, chunk) in enumerate(zip(counts, chunks[1:]), start=first):
        ids += [-k] * count + tokenizer.encode(chunk).ids
    return ids


def render(messages):
    """The chat template of docs/DESIGN.md §4.2, with add_generation_prompt."""
    return "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages) + "<|assistant|>\n"


def spec_example(tokenizer, messages, counts):
    """docs/DESIGN.md §4.4, several turns: each answer after the prompt of the messages before it (a later prompt
    without its BOS), labels -100 but on the answers, which end <|end|>\\n<|endoftext|>."""
    ids, labels, pending, next_image = [], [], [], 1
    for message in messages:
        if message["role"] != "assistant":
            pending.append(message)
            continue
        prompt = render(pending)
        num_tags = len(TAG.findall(prompt))
        prompt_ids = spec_layout(tokenizer, prompt, counts[next_image - 1 : next_image - 1 + num_tags], next_image)
        prompt_ids = prompt_ids[1:] if ids else prompt_ids
        answer_ids = tokenizer.encode(message["content"] + "<|end|>\n<|endoftext|>", add_special_tokens=False).ids
        ids += prompt_ids + answer_ids
        labels += [IGNORE] * len(prompt_ids) + answer_ids
        next_image, pending = next_image + num_tags, []
    return ids, labels


def check_image_runs(ids, counts):
    """The negative ids form one run per image, in order: -1 x counts[0], then -2 x counts[1], ...; BOS after each."""
    runs = [(value, len(list(group))) for value, group in itertools.groupby(ids) if value < 0]
    assert runs == [(-k, count) for k, count in enumerate(counts, start=1)]
    ends = [i for i in range(len(ids) - 1) if ids[i] < 0 <= ids[i + 1]]
    assert len(ends) == len(counts) and all(ids[i + 1] == BOS for i in ends)  # the text after a tag keeps its BOS


def check_pixels(pixel_values, image_sizes, images, num_crops):
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == (len(images), num_crops + 1, 3, CROP, CROP)
    assert image_sizes.dtype == torch.long and image_sizes.shape == (len(images), 2)
    assert image_sizes.tolist() == [list(spec_hd_size(*image.size, num_crops)) for image in images]
    for crops, (h, w) in zip(pixel_values, image_sizes.tolist()):
        used = (h // CROP) * (w // CROP)
        assert 1 <= used <= num_crops
        assert math.isfinite(crops[: 1 + used].sum().item()) and crops[0].abs().sum() > 0  # global view + crops
        assert not crops[1 + used :].any()  # unused crop slots are zeros


# ------------------------------------------------------------------------------------------------ random inputs
def random_text(rng, max_parts=4):
    parts = []
    for _ in range(rng.randint(0, max_parts)):
        r = rng.random()
        if r < 0.4:
            parts.append(rng.choice(PIECES))
        elif r < 0.75:
            low, high = rng.choice(CODEPOINTS)
            parts.append("".join(chr(rng.randint(low, high)) for _ in range(rng.randint(1, 12))))
        else:
            parts.append(rng.choice(WHITESPACE))
    return "".join(parts)


def text_with_numbers(rng, numbers):
    """Random text with the tags <|image_k|> for k in numbers, in that order; nothing else that reads as a tag."""
    while True:
        if numbers and rng.random() < 0.4:  # the usual form: one tag line per image, then the question
            text = "".join(f"<|image_{k}|>\n" for k in numbers) + random_text(rng)
        else:
            text = random_text(rng) + "".join(f"<|image_{k}|>" + random_text(rng, 2) for k in numbers)
        if [int(k) for k in TAG.findall(text)] == list(numbers):  # random pieces did not form a tag by chance
            return text


def text_with_tags(rng, numbers):
    return text_with_numbers(rng, list(numbers))


def random_image(rng):
    r = rng.random()
    if r < 0.2:  # tiny, above the 2x2 minimum
        size = (rng.randint(2, 12), rng.randint(2, 12))
    elif r < 0.45:  # extreme aspect ratio, either way round
        long_side, short_side = rng.randint(200, 3000), rng.randint(2, 24)
        size = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    else:
        size = (rng.randint(2, 700), rng.randint(2, 700))
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    mode = rng.choice(MODES)
    return image if mode == "RGB" else image.convert(mode)


def random_prompt(rng, num_images):
    text = text_with_tags(rng, range(1, num_images + 1))
    if rng.random() < 0.5:
        return text  # a raw prompt
    messages = [{"role": "system", "content": random_text(rng)}] if rng.random() < 0.3 else []
    return render(messages + [{"role": "user", "content": text}])


def random_conversation(rng):
    """(messages, images): optional system turn, 1-3 user/assistant turns (some with two user messages), 0-4
    images spread over the user turns, tags numbered across the whole conversation."""
    num_images, num_turns = rng.choice([0, 1, 1, 2, 2, 3, 4]), rng.randint(1, 3)
    cuts = sorted(rng.randint(0, num_images) for _ in range(num_turns - 1))
    per_turn = [b - a for a, b in zip([0] + cuts, cuts + [num_images])]
    messages = [{"role": "system", "content": random_text(rng)}] if rng.random() < 0.3 else []
    first = 1
    for count in per_turn:
        if rng.random() < 0.15:
            messages.append({"role": "user", "content": text_with_tags(rng, [])})
        messages.append({"role": "user", "content": text_with_tags(rng, range(first, first + count))})
        messages.append({"role": "assistant", "content": random_text(rng) or "x"})
        first += count
    return messages, [random_image(rng) for _ in range(num_images)]


# ------------------------------------------------------------------------------------------------ valid inputs
def test_image_sizes_and_token_counts_follow_the_spec(processor):
    rng = random.Random(SEED)
    image_processor = processor.image_processor
    for _ in range(3000):
        num_crops = rng.randint(1, 16)
        width, height = rng.choice([
            (rng.randint(2, 40), rng.randint(2, 40)),
            (rng.randint(2, 5000), rng.randint(2, 5000)),
            (rng.randint(2, 20000), rng.randint(1, 3)),
            (rng.randint(1, 3), rng.randint(2, 20000)),
        ])
        hd_h, hd_w = image_processor.hd_size(width, height, num_crops)
        assert (hd_h, hd_w) == spec_hd_size(width, height, num_crops)
        rows, cols = hd_h // CROP, hd_w // CROP
        assert hd_h % CROP == hd_w % CROP == 0 and 1 <= rows * cols <= num_crops
        assert cols >= rows if width > height else rows >= cols if height > width else True
        tokens = image_processor.num_image_tokens(width, height, num_crops)
        assert tokens == spec_tokens(width, height, num_crops)
        # at most the worked examples' maxima: 781 for 4 crops, 2653 for 16 (a 1 x n strip)
        assert tokens <= (num_crops + 1) * TOKENS_PER_CROP + 1 + (num_crops + 1) * MERGED_SIDE


def test_processor_on_random_batches(processor, tokenizer):
    rng = random.Random(SEED + 1)
    num_prompts = 0
    for _ in range(70):
        num_crops = rng.randint(1, 16)
        texts, image_lists = [], []
        for _ in range(rng.randint(1, 3)):
            images = [random_image(rng) for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4]))]
            texts.append(random_prompt(rng, len(images)))
            image_lists.append(images)
        side = rng.choice(["left", "right", None])
        if len(texts) == 1 and rng.random() < 0.5:  # the single-prompt form
            images = image_lists[0]
            out = processor(texts[0], images[0] if len(images) == 1 and rng.random() < 0.5 else images,
                            num_crops=num_crops, padding_side=side)
        else:
            out = processor(texts, image_lists, num_crops=num_crops, padding_side=side)
        num_prompts += len(texts)

        expected = []
        for text, images in zip(texts, image_lists):
            counts = [spec_tokens(*image.size, num_crops) for image in images]
            ids = spec_layout(tokenizer, text, counts)
            check_image_runs(ids, counts)
            expected.append(ids)
        longest = max(len(ids) for ids in expected)
        assert out["input_ids"].shape == out["attention_mask"].shape == (len(texts), longest)
        for row, ids in enumerate(expected):
            pad = longest - len(ids)
            left = side == "left"
            got = out["input_ids"][row].tolist()
            assert (got[pad:] if left else got[: len(ids)]) == ids
            assert (got[:pad] if left else got[len(ids):]) == [PAD] * pad
            mask = out["attention_mask"][row].tolist()
            assert mask == ([0] * pad + [1] * len(ids) if left else [1] * len(ids) + [0] * pad)
        all_images = [image for images in image_lists for image in images]
        if all_images:
            check_pixels(out["pixel_values"], out["image_sizes"], all_images, num_crops)
        else:
            assert "pixel_values" not in out and "image_sizes" not in out
    assert num_prompts >= 120


def test_collator_on_random_conversations(processor, tokenizer):
    rng = random.Random(SEED + 2)
    collator = Phi3VDataCollator(processor.pad_token_id)
    num_examples = 0
    for batch_number in range(45):
        num_crops = rng.randint(1, 16)  # one per batch: a run has one num_crops
        examples, expectations = [], []
        for i in range(rng.randint(1, 4)):
            messages, images = random_conversation(rng)
            example = tokenize_conversation(processor, messages, images, num_crops=num_crops)
            counts = [spec_tokens(*image.size, num_crops) for image in images]
            ids, labels = spec_example(tokenizer, messages, counts)
            assert example["input_ids"] == ids and example["labels"] == labels
            check_image_runs(ids, counts)
            # supervised positions: exactly the answers, each right after <|assistant|>, each ending the text
            supervised_at = [label != IGNORE for label in labels]
            spans = [list(g) for supervised, g in itertools.groupby(range(len(ids)), supervised_at.__getitem__)
                     if supervised]
            answers = [m for m in messages if m["role"] == "assistant"]
            assert len(spans) == len(answers)
            for span, answer in zip(spans, answers):
                assert ids[span[0] - 1] == 32001 and ids[span[-1]] == PAD
                assert [ids[t] for t in span] == [labels[t] for t in span] == tokenizer.encode(
                    answer["content"] + "<|end|>\n<|endoftext|>", add_special_tokens=False).ids
            if images:
                check_pixels(example["pixel_values"], example["image_sizes"], images, num_crops)
            example["sample_id"] = f"b{batch_number}-{i}"
            examples.append(example)
            expectations.append((ids, labels, images))
        num_examples += len(examples)

        batch = collator(examples)
        longest = max(len(ids) for ids, _, _ in expectations)
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        assert batch["input_ids"].shape == (len(examples), longest)
        for row, (ids, labels, _) in enumerate(expectations):
            pad = longest - len(ids)
            assert batch["input_ids"][row].tolist() == ids + [PAD] * pad
            assert batch["labels"][row].tolist() == labels + [IGNORE] * pad
            assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * pad
        assert batch["sample_ids"] == [e["sample_id"] for e in examples]
        all_images = [image for _, _, images in expectations for image in images]
        if all_images:  # every example's images, in order (compared on a sparse grid of pixels: it is quicker)
            assert batch["pixel_values"].shape == (len(all_images), num_crops + 1, 3, CROP, CROP)
            assert batch["image_sizes"].tolist() == [list(spec_hd_size(*im.size, num_crops)) for im in all_images]
            sample = torch.cat([e["pixel_values"][..., ::37, ::37] for e in examples if "pixel_values" in e])
            assert torch.equal(batch["pixel_values"][..., ::37, ::37], sample)
        else:
            assert "pixel_values" not in batch
        if "image_positions" in batch:  # what the model would otherwise read back from the GPU
            flat = batch["input_ids"].flatten()
            assert batch["image_positions"].tolist() == (flat < 0).nonzero().flatten().tolist()
    assert num_examples >= 100


# ------------------------------------------------------------------------------------------------ invalid inputs
SURROGATE = r"text is not valid Unicode: lone surrogate '\\ud[89a-f][0-9a-f]{2}'"
ORDER = r"image tags must be <\|image_(\d+)\|>, <\|image_\d+\|>, \.\.\. in order, each once; found .*"
NOT_PIL = (r"image (\d+) is a (\w+), not a PIL\.Image\.Image "
           r"\(open files with PIL\.Image\.open or phi3v\.media\.open_image first\)")


def tag_list(numbers):
    return ", ".join(f"<|image_{k}|>" for k in numbers)


def wrong_numbers(rng, num_images):
    """Tag numbers that are not 1..num_images in order: too many, too few, out of order, repeated, 0."""
    while True:
        numbers = [rng.randint(0, 5) for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.5 and num_images:  # near misses: one dropped, one added, two swapped
            numbers = list(range(1, num_images + 1))
            kind = rng.choice(["drop", "add", "swap", "repeat"])
            if kind == "drop":
                numbers.pop(rng.randrange(len(numbers)))
            elif kind == "add":
                numbers.insert(rng.randint(0, len(numbers)), rng.randint(0, num_images + 1))
            elif kind == "swap" and len(numbers) > 1:
                i, j = rng.sample(range(len(numbers)), 2)
                numbers[i], numbers[j] = numbers[j], numbers[i]
            else:
                numbers.insert(rng.randint(0, len(numbers)), rng.choice(numbers))
        if numbers != list(range(1, num_images + 1)):
            return numbers


def processor_error(numbers, num_images):
    """The processor's message for a prompt with these tag numbers (docs/DESIGN.md §4.3: 1..n in order, n == images)."""
    if numbers != list(range(1, len(numbers) + 1)):
        return f"image tags must be <|image_1|>, <|image_2|>, ... in order, each once; found {tag_list(numbers)}"
    return f"the prompt has {len(numbers)} image tag(s) but {num_images} image(s) were given"


def test_processor_refuses_invalid_inputs_with_documented_messages(processor, tokenizer):
    rng = random.Random(SEED + 3)
    kinds = ["tags", "surrogate", "image_type", "num_crops", "prompt_type", "too_long", "batch_shape"]
    seen = set()
    for case in range(160):
        kind = kinds[case % len(kinds)]
        num_prompts = rng.randint(1, 3)
        bad = rng.randrange(num_prompts)
        texts, image_lists = [], []
        for _ in range(num_prompts):
            images = [random_image(rng) for _ in range(rng.choice([0, 1, 1, 2]))]
            texts.append(random_prompt(rng, len(images)))
            image_lists.append(images)
        num_crops = rng.randint(1, 16)
        kwargs = {}
        text = texts[bad]
        if kind == "tags":
            numbers = wrong_numbers(rng, len(image_lists[bad]))
            texts[bad] = text_with_numbers(rng, numbers)
            expected = re.escape(f"prompt {bad}: {processor_error(numbers, len(image_lists[bad]))}")
        elif kind == "surrogate":
            at = rng.randint(0, len(text))
            texts[bad] = text[:at] + chr(rng.randint(0xD800, 0xDFFF)) + text[at:]
            expected = rf"prompt {bad}: {SURROGATE} at character {at}"
        elif kind == "image_type":
            if not image_lists[bad]:
                image_lists[bad].append(random_image(rng))
                texts[bad] = "<|image_1|>" + texts[bad].replace("<|image_", "<|img_")
            position = rng.randrange(len(image_lists[bad]))
            image_lists[bad][position] = rng.choice([np.zeros((4, 4, 3), np.uint8), "cat.jpg", None, b"\x89PNG",
                                                     torch.zeros(3, 4, 4)])
            flat_index = sum(len(images) for images in image_lists[:bad]) + position + 1
            expected = NOT_PIL.replace(r"image (\d+)", f"image {flat_index}", 1)
        elif kind == "num_crops":
            if not any(image_lists):
                image_lists[bad].append(random_image(rng))
                texts[bad] = "<|image_1|>" + texts[bad].replace("<|image_", "<|img_")
            num_crops = rng.choice([0, -1, 2.5, True, "4"])
            expected = re.escape(f"num_crops must be a whole number >= 1, got {num_crops!r}")
        elif kind == "prompt_type":
            texts[bad] = rng.choice([None, 7, b"bytes", ["a list"]])
            expected = re.escape(f"prompt {bad} is a {type(texts[bad]).__name__}, not a string")
        elif kind == "too_long":
            texts[bad] = text = text + " and a question"
            counts = [spec_tokens(*image.size, num_crops) for image in image_lists[bad]]
            length = len(spec_layout(tokenizer, text, counts))
            limit = rng.randint(1, length - 1)
            lengths = [len(spec_layout(tokenizer, t, [spec_tokens(*im.size, num_crops) for im in ims]))
                       for t, ims in zip(texts, image_lists)]
            first_too_long = next(i for i, n in enumerate(lengths) if n > limit)  # the first one is reported
            kwargs["max_length"] = limit
            expected = re.escape(f"prompt {first_too_long} is {lengths[first_too_long]} tokens long, "
                                 f"more than the limit of {limit} tokens")
        else:  # batch_shape: not one image list per prompt
            image_lists = rng.choice([image_lists + [[]], [image for images in image_lists for image in images]
                                      + [random_image(rng)]])
            expected = re.escape("for a batch of prompts, pass images as a list with one list of images per prompt")
        with pytest.raises(ValueError) as error:
            processor(texts, image_lists, num_crops=num_crops, **kwargs)
        assert type(error.value) is ValueError
        assert re.fullmatch(expected, str(error.value)), (kind, str(error.value), expected)
        seen.add(kind)
    assert seen == set(kinds)


COLLATOR_MESSAGES = {
    "tags": [r"the conversation has more image tags than its \d+ image\(s\)",
             r"the conversation has \d+ image tag\(s\) but \d+ image\(s\)", ORDER],
    "ends_with_user": [r"the conversation must end with an assistant answer"],
    "two_answers": [r"two assistant turns in a row: every answer needs a user turn before it"],
    "content": [r"(user|assistant|system) content must be a string, got \w+"],
    "role": [r"a message must be a dict with role 'system', 'user' or 'assistant', got .*"],
    "surrogate": [SURROGATE + r" at character \d+"],
    "too_long": [r"the example is (\d+) tokens long, more than max_seq_length (\d+)"],
}
# The same conversations as records through SFTDataset: the data checks speak first (phi3v.records.check_record_tags,
# whose numbering check is the processor's).
DATASET_MESSAGES = {
    **COLLATOR_MESSAGES,
    "tags": COLLATOR_MESSAGES["tags"] + [r"the prompt has \d+ image tag\(s\) but \d+ image\(s\) were given"],
}


def mutate_conversation(rng, kind, messages, images):
    messages = [dict(m) for m in messages]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if kind == "tags":
        numbers = wrong_numbers(rng, len(images))
        for i in users:
            messages[i]["content"] = TAG.sub("", messages[i]["content"])
        messages[users[0]]["content"] = "".join(f"<|image_{k}|>\n" for k in numbers) + messages[users[0]]["content"]
    elif kind == "ends_with_user":
        messages.append({"role": "user", "content": random_text(rng)})
    elif kind == "two_answers":
        at = rng.choice([i for i, m in enumerate(messages) if m["role"] == "assistant"])
        messages.insert(at + 1, {"role": "assistant", "content": random_text(rng) or "y"})
    elif kind == "content":
        messages[rng.randrange(len(messages))]["content"] = rng.choice([None, 3, ["x"], {"text": "x"}])
    elif kind == "role":
        at = rng.randrange(len(messages))
        messages[at] = rng.choice([{"role": "tool", "content": "x"}, {"content": "x"}, "just text", None])
    elif kind == "surrogate":
        message = messages[rng.randrange(len(messages))]
        at = rng.randint(0, len(message["content"]))
        message["content"] = message["content"][:at] + chr(rng.randint(0xD800, 0xDFFF)) + message["content"][at:]
    return messages


def test_collator_and_dataset_refuse_invalid_conversations_with_documented_messages(processor, tokenizer):
    rng = random.Random(SEED + 4)
    kinds = list(COLLATOR_MESSAGES)
    seen = set()
    for case in range(140):
        kind = kinds[case % len(kinds)]
        messages, images = random_conversation(rng)
        images = images[:2]  # fewer pixels: the checks are about the text
        messages = [dict(m, content=TAG.sub("", m["content"])) for m in messages]
        if images:
            messages[next(i for i, m in enumerate(messages) if m["role"] == "user")]["content"] = (
                "".join(f"<|image_{k}|>\n" for k in range(1, len(images) + 1)) + "question")
        num_crops = rng.randint(1, 4)
        max_length = None
        if kind == "too_long":
            length = len(spec_example(tokenizer, messages, [spec_tokens(*im.size, num_crops) for im in images])[0])
            max_length = rng.randint(1, length - 1)
        else:
            messages = mutate_conversation(rng, kind, messages, images)

        through_dataset = case % 2 == 1
        if through_dataset:  # a record with in-memory images, as the recipes' to_record functions make
            record = {"id": f"s{case}", "source": f"fuzz[{case}]", "images": images, "video": None,
                      "messages": messages}
            dataset = SFTDataset([record], processor, num_crops=num_crops, max_length=max_length)
            with pytest.raises(BadSampleError) as error:
                dataset[0]
            patterns, prefix = DATASET_MESSAGES[kind], re.escape(f"fuzz[{case}]: ")
        else:
            with pytest.raises(ValueError) as error:
                tokenize_conversation(processor, messages, images, num_crops=num_crops, max_length=max_length)
            assert type(error.value) is ValueError
            patterns, prefix = COLLATOR_MESSAGES[kind], ""
        message = str(error.value)
        assert any(re.fullmatch(prefix + pattern, message, flags=re.DOTALL) for pattern in patterns), (kind, message)
        if kind == "too_long":
            found = re.search(COLLATOR_MESSAGES["too_long"][0], message)
            assert (int(found[1]), int(found[2])) == (length, max_length)
        seen.add(kind)
    assert seen == set(kinds)

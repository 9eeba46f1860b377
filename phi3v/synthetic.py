"""Small synthetic data sets in the exact shape of each recipe's real data, generated offline.

The answer always depends on what is drawn, so a model that learns to look at the image can get it right:
- memes (the_cauldron "hateful_memes" shape): a meme with a red disc is "yes" (hateful), a blue square "no";
- nlvr2 (the_cauldron "nlvr2" shape, two images): "True" when both images show the same shape;
- docvqa (nielsr/docvqa_1200_examples shape): a page with a big coloured box; "What colour is the box?";
- ucf101 (convert_ucf101.py output: jsonl + 8 frames): a shape moving left or right -> class name.
"""

import json
import os
import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (230, 200, 20)}


def _canvas(rng, size=(336, 336)):
    background = tuple(rng.randint(200, 255) for _ in range(3))
    return Image.new("RGB", size, background)


def _shape(draw, kind, box, colour):
    if kind == "disc":
        draw.ellipse(box, fill=colour)
    else:
        draw.rectangle(box, fill=colour)


def meme_image(hateful: bool, rng) -> Image.Image:
    image = _canvas(rng, (rng.choice([336, 400, 480]), rng.choice([300, 336, 360])))
    draw = ImageDraw.Draw(image)
    for _ in range(3):  # clutter that does not decide the label
        x, y = rng.randint(0, image.width - 40), rng.randint(0, image.height - 40)
        draw.line((x, y, x + rng.randint(10, 40), y + rng.randint(10, 40)), fill=(90, 90, 90), width=2)
    w, h = image.size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    _shape(draw, "disc" if hateful else "square", box, COLOURS["red"] if hateful else COLOURS["blue"])
    draw.text((10, h - 20), rng.choice(["when monday comes", "me at 3am", "nobody:", "so true"]), fill=(0, 0, 0))
    return image


def memes_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        hateful = rng.random() < 0.5
        rows.append({
            "images": [meme_image(hateful, rng)],
            "texts": [{"user": "Is this meme hateful? Answer yes or no.", "assistant": "yes" if hateful else "no",
                       "source": "synthetic_memes"}],
        })
    return rows


def shape_image(kind: str, rng) -> Image.Image:
    image = _canvas(rng)
    draw = ImageDraw.Draw(image)
    x, y = rng.randint(20, 120), rng.randint(20, 120)
    _shape(draw, kind, (x, y, x + 180, y + 180), rng.choice(list(COLOURS.values())))
    return image


def nlvr2_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        left, right = rng.choice(["disc", "square"]), rng.choice(["disc", "square"])
        rows.append({
            "images": [shape_image(left, rng), shape_image(right, rng)],
            "texts": [{"user": "The two images show the same shape. True or False?",
                       "assistant": "True" if left == right else "False", "source": "synthetic_nlvr2"}],
        })
    return rows


def docvqa_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        colour = rng.choice(list(COLOURS))
        page = Image.new("RGB", (rng.choice([400, 500]), rng.choice([560, 640])), (250, 250, 250))
        draw = ImageDraw.Draw(page)
        for line in range(8):
            draw.line((20, 30 + 18 * line, page.width - 20, 30 + 18 * line), fill=(60, 60, 60), width=3)
        draw.rectangle((40, 220, page.width - 40, page.height - 60), fill=COLOURS[colour])
        rows.append({
            "id": f"synthetic-docvqa-{index}",
            "image": page,
            "query": {"en": "What colour is the box?"},
            "answers": [colour, f"{colour} box"],
        })
    return rows


def save_hf_dataset(rows: list[dict], folder: str, split: str = "train") -> str:
    """Save rows as a datasets DatasetDict folder (what `--dataset_path` reads, like a save_to_disk copy)."""
    import datasets

    datasets.DatasetDict({split: datasets.Dataset.from_list(rows)}).save_to_disk(folder)
    return folder


def write_ucf101_folder(folder: str, videos_per_class: dict, num_frames: int = 8, seed: int = 0) -> str:
    """A converted-UCF101-shaped folder: images/{split}/{Class}/{stem}.{k}.jpg and ucf101_{split}.jsonl."""
    rng = random.Random(seed)
    classes = ["MovingLeft", "MovingRight"]
    prompt = f"Classify the video into one of the following classes: {', '.join(classes)}."
    counter = 0
    for split, count in videos_per_class.items():
        lines = []
        for v in range(count):
            label = classes[v % 2]
            stem = f"v_{label}_{v:03d}"
            frame_dir = os.path.join(folder, "images", split, label)
            os.makedirs(frame_dir, exist_ok=True)
            colour = rng.choice(list(COLOURS.values()))
            paths = []
            for k in range(num_frames):
                progress = k / (num_frames - 1)
                x = int(20 + 240 * (1 - progress if label == "MovingLeft" else progress))
                frame = _canvas(rng)
                _shape(ImageDraw.Draw(frame), "disc", (x, 130, x + 70, 200), colour)
                frame.save(os.path.join(frame_dir, f"{stem}.{k}.jpg"))
                paths.append(f"{split}/{label}/{stem}.{k}.jpg")
            counter += 1
            lines.append({"id": f"{split}-{counter:010d}", "source": "ucf101",
                          "conversations": [{"images": paths, "user": prompt, "assistant": label}]})
        with open(os.path.join(folder, f"ucf101_{split}.jsonl"), "w") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
    return folder


def shapes_dataset(folder: str, train: int = 96, test: int = 16, seed: int = 0) -> str:
    """The data of examples/finetune_hf_trainer_shapes.py: {"image", "colour"} rows (a red or blue disc or
    square), "train" and "test" splits."""
    import datasets

    rng = random.Random(seed)

    def rows(n):
        out = []
        for _ in range(n):
            colour = rng.choice(["red", "blue"])
            image = _canvas(rng)
            x, y = rng.randint(20, 120), rng.randint(20, 120)
            _shape(ImageDraw.Draw(image), rng.choice(["disc", "square"]), (x, y, x + 180, y + 180), COLOURS[colour])
            out.append({"image": image, "colour": colour})
        return out

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(train)),
                          "test": datasets.Dataset.from_list(rows(test))}).save_to_disk(folder)
    return folder


def preference_pairs(folder: str, train: int = 64, test: int = 32, seed: int = 0) -> dict:
    """DPO data in the community format (phi3v.preference): memes (red disc: "yes", blue square: "no") with the
    right answer chosen and the wrong one rejected, images in <folder>/images. Returns the paths
    {"train", "test", "images"}."""
    rng = random.Random(seed)
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    paths = {"images": images}
    for split, n in (("train", train), ("test", test)):
        pairs = []
        for i in range(n):
            hateful = rng.random() < 0.5
            name = f"{split}-{i}.png"
            meme_image(hateful, rng).save(os.path.join(images, name))
            answer, wrong = ("yes", "no") if hateful else ("no", "yes")
            pairs.append({"id": f"{split}-{i}", "image": name, "prompt": "<image>\nIs this meme hateful? Answer yes "
                          "or no.", "chosen": answer, "rejected": wrong})
        paths[split] = os.path.join(folder, f"pairs_{split}.json")
        with open(paths[split], "w") as f:
            json.dump(pairs, f, indent=1)
    return paths

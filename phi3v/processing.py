"""Phi3VProcessor: prompts with `<|image_k|>` tags + images -> input_ids, attention_mask, pixel_values, image_sizes.

Token layout (docs/DESIGN.md §4.3): the prompt is split at its image tags, every text chunk is encoded with BOS (so a
second BOS follows each image block, as in the reference), and tag k becomes the id -k repeated once per image
token. The model later writes the image features over those negative ids.

The tokenizer is always built from `tokenizer.json` itself: loading the official folder through
LlamaTokenizer(Fast) under transformers 5 rebuilds Llama's pre-processing and changes the ids (docs/DESIGN.md §4.1).
"""

import json
import os
import re

import torch
from transformers import BatchFeature, PreTrainedTokenizerFast

from phi3v.hub import resolve_file
from phi3v.image_processing import Phi3VImageProcessor
from phi3v.official import processor_config, write_json

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
IMAGE_TAG_SPLIT = re.compile(r"<\|image_\d+\|>")

# The official `chat_template` (docs/DESIGN.md §4.2), used when a folder's tokenizer_config.json has none.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}"
    "{% endif %}"
)
END_OF_TEXT = "<|endoftext|>"  # 32000: eos and pad
# Stop at the chat model's end of turn: <|end|> (32007), sometimes followed by <|endoftext|> (docs/DESIGN.md §8).
STOP_TOKEN_IDS = [32007, 32000]

PACKAGED_TOKENIZER = os.path.join(os.path.dirname(__file__), "assets", "tokenizer.json")


def check_image_tags(text: str, num_images: int, first: int = 1) -> None:
    """Tags must be <|image_first|>, <|image_first+1|>, ... in textual order, each once, num_images of them."""
    numbers = [int(k) for k in IMAGE_TAG.findall(text)]
    if numbers != list(range(first, first + len(numbers))):
        found = ", ".join(f"<|image_{k}|>" for k in numbers)
        raise ValueError(
            f"image tags must be <|image_{first}|>, <|image_{first + 1}|>, ... in order, each once; found {found}"
        )
    if len(numbers) != num_images:
        raise ValueError(f"the prompt has {len(numbers)} image tag(s) but {num_images} image(s) were given")


def check_text(text) -> None:
    """Raise ValueError unless `text` is a str the tokenizer can take: JSON escapes can carry lone surrogates
    ("\\ud800"), which are not valid Unicode and which the tokenizer fails on with a TypeError."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"text is not valid Unicode: lone surrogate {text[error.start]!r} at character {error.start}"
        ) from None


def image_tag_block(numbers) -> str:
    """[1, 2] -> "<|image_1|>\n<|image_2|>\n": the tag lines put in front of a prompt for its images."""
    return "".join(f"<|image_{k}|>\n" for k in numbers)


def pad_sequences(sequences: list[list[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """Pad lists of ids to one [batch, longest] LongTensor, on the right (training) or left (generation)."""
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    longest = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), longest), pad_value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            if side == "right":
                out[row, : len(seq)] = torch.as_tensor(seq)
            else:
                out[row, longest - len(seq) :] = torch.as_tensor(seq)
    return out


def load_tokenizer(tokenizer_file: str, tokenizer_config: dict | None = None) -> PreTrainedTokenizerFast:
    """The Phi-3 tokenizer from a tokenizer.json, with the special tokens and chat template of the folder."""
    config = tokenizer_config or {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=tokenizer_file,
        bos_token=config.get("bos_token", "<s>"),
        eos_token=config.get("eos_token", END_OF_TEXT),
        unk_token=config.get("unk_token", "<unk>"),
        pad_token=config.get("pad_token", END_OF_TEXT),
        model_max_length=config.get("model_max_length", 131072),
        padding_side=config.get("padding_side", "right"),
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = config.get("chat_template") or CHAT_TEMPLATE
    return tokenizer


class Phi3VProcessor:
    def __init__(self, image_processor: Phi3VImageProcessor, tokenizer: PreTrainedTokenizerFast):
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @property
    def num_crops(self) -> int:
        return self.image_processor.num_crops

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    # ---------------------------------------------------------------- text
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render a conversation with the Phi-3 chat template (contents are strings with inline image tags; checked
        by phi3v.conversation.check_messages on the training and evaluation paths)."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode_prompt(self, text: str, image_token_counts: list[int], first_image: int = 1) -> list[int]:
        """Ids of one prompt: every text chunk with its BOS, tag k as -k repeated for each of image k's tokens.

        `first_image` is the number of the first tag in `text` (a later turn of a conversation continues the
        numbering); image_token_counts[i] is the token count of image first_image + i."""
        check_text(text)
        check_image_tags(text, len(image_token_counts), first_image)
        chunks = IMAGE_TAG_SPLIT.split(text)
        encoded = self.tokenizer(chunks, add_special_tokens=True)["input_ids"]
        ids = list(encoded[0])
        for k, (count, chunk_ids) in enumerate(zip(image_token_counts, encoded[1:]), start=first_image):
            ids.extend([-k] * count)
            ids.extend(chunk_ids)
        return ids

    def encode_text(self, text: str) -> list[int]:
        """Ids of text with no BOS (answers appended to a prompt)."""
        check_text(text)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids, **kwargs) -> str:
        kwargs.setdefault("skip_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        ids = [i for i in as_id_list(ids) if i >= 0]  # image slots are not tokens
        return self.tokenizer.decode(ids, **kwargs)

    def batch_decode(self, batch, **kwargs) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in batch]

    # ---------------------------------------------------------------- text + images
    def __call__(
        self,
        text,
        images=None,
        num_crops: int | None = None,
        padding_side: str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """One prompt with its images, or a batch: `text` a list of prompts and `images` a list of image lists.

        Returns input_ids and attention_mask (padded on `padding_side`: the tokenizer's, right by default; use
        "left" for generation) and, when there are images, pixel_values [num_images, num_crops + 1, 3, 336, 336]
        and image_sizes [num_images, 2] for all images of the batch in order.
        """
        if isinstance(text, str):
            texts = [text]
            if images is None:
                images_per_text = [[]]
            else:
                images_per_text = [list(images) if isinstance(images, (list, tuple)) else [images]]
        else:
            texts = list(text)
            if images is None:
                images_per_text = [[] for _ in texts]
            else:
                if len(images) != len(texts) or not all(isinstance(i, (list, tuple)) for i in images):
                    raise ValueError("for a batch of prompts, pass images as a list with one list of images per prompt")
                images_per_text = [list(i) for i in images]
        for index, text_item in enumerate(texts):
            if not isinstance(text_item, str):
                raise ValueError(f"prompt {index} is a {type(text_item).__name__}, not a string")

        flat_images = [image for group in images_per_text for image in group]
        features = self.image_processor(flat_images, num_crops=num_crops) if flat_images else None
        token_counts = features["num_img_tokens"] if features is not None else []

        limit = max_length or self.tokenizer.model_max_length
        sequences, start = [], 0
        for index, (text_item, group) in enumerate(zip(texts, images_per_text)):
            try:
                ids = self.encode_prompt(text_item, token_counts[start : start + len(group)])
            except ValueError as error:
                raise ValueError(f"prompt {index}: {error}") from None
            if len(ids) > limit:
                raise ValueError(f"prompt {index} is {len(ids)} tokens long, more than the limit of {limit} tokens")
            sequences.append(ids)
            start += len(group)

        side = padding_side or self.tokenizer.padding_side
        input_ids = pad_sequences(sequences, self.pad_token_id, side)
        attention_mask = pad_sequences([[1] * len(s) for s in sequences], 0, side)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if features is not None:
            data["pixel_values"] = features["pixel_values"]
            data["image_sizes"] = features["image_sizes"]
        return BatchFeature(data=data, tensor_type=return_tensors if return_tensors != "pt" else None)

    # ---------------------------------------------------------------- files
    @classmethod
    def from_pretrained(cls, path_or_hub_id, num_crops: int | None = None, **kwargs):
        """Read preprocessor_config.json, tokenizer.json and tokenizer_config.json of a model folder or hub id."""
        image_processor = Phi3VImageProcessor.from_pretrained(path_or_hub_id, num_crops=num_crops, **kwargs)
        tokenizer_file = resolve_file(path_or_hub_id, "tokenizer.json", **kwargs)
        try:
            with open(resolve_file(path_or_hub_id, "tokenizer_config.json", **kwargs)) as f:
                tokenizer_config = json.load(f)
        except FileNotFoundError:
            tokenizer_config = {}
        return cls(image_processor, load_tokenizer(tokenizer_file, tokenizer_config))

    def save_pretrained(self, save_directory):
        """Write the official file set: preprocessor and processor configs in the base model's form (auto_map
        pointing at its repository's processing code, phi3v.official), tokenizer files."""
        os.makedirs(save_directory, exist_ok=True)
        self.image_processor.save_pretrained(save_directory)
        base, repo = self.image_processor.official_base()
        write_json(os.path.join(save_directory, "processor_config.json"), processor_config(base, repo))
        self.tokenizer.backend_tokenizer.save(os.path.join(save_directory, "tokenizer.json"))
        tok = self.tokenizer
        write_json(
            os.path.join(save_directory, "tokenizer_config.json"),
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": tok.bos_token,
                "chat_template": tok.chat_template,
                "clean_up_tokenization_spaces": False,
                "eos_token": tok.eos_token,
                "legacy": False,
                "model_max_length": tok.model_max_length,
                "pad_token": tok.pad_token,
                "padding_side": tok.padding_side,
                "processor_class": "Phi3VProcessor",
                # Not LlamaTokenizer: AutoTokenizer would rebuild it with other ids (docs/DESIGN.md §4.1).
                "tokenizer_class": "PreTrainedTokenizerFast",
                "unk_token": tok.unk_token,
            },
        )
        write_json(
            os.path.join(save_directory, "special_tokens_map.json"),
            {
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "pad_token": tok.pad_token,
                "unk_token": tok.unk_token,
            },
        )


def packaged_processor(num_crops: int = 4) -> Phi3VProcessor:
    """The official Phi-3.5-vision processor from the files shipped in this package (no download)."""
    return Phi3VProcessor(Phi3VImageProcessor(num_crops=num_crops), load_tokenizer(PACKAGED_TOKENIZER))


def as_id_list(ids) -> list[int]:
    """Token ids (a tensor, a list or any sequence) as a list of ints."""
    if isinstance(ids, torch.Tensor):
        return ids.tolist()
    return list(ids)



def inputs_on(inputs, device, dtype) -> dict:
    """The processor's outputs on the model's device, pixel values in its floating dtype (ids stay integers)."""
    moved = {k: v.to(device) for k, v in inputs.items()}
    if "pixel_values" in moved:
        moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return moved


__all__ = [
    "Phi3VProcessor", "as_id_list", "inputs_on", "check_image_tags", "check_text", "pad_sequences", "load_tokenizer",
    "packaged_processor",
]

"""Inference on any folder this project writes: loading, building the chat prompt, generating (streamed).

The one path predict.py (`--prompt`) and serve.py (the chat page) both use, so the page answers exactly as
predict.py does for the same inputs and settings.

- `load_for_inference(path)`: a run's output folder (full fine-tuning, or a LoRA adapter: the base model comes
  from its adapter_config.json, or `base_model`), a merged folder, a `checkpoint-N`, or the base model itself.
- `conversation(turns, system)`: the chat messages, each user turn with one `<|image_k|>` tag line per image of
  that turn in front (numbering continues over the turns), unless the question already has its tags.
- `answer(model, processor, messages, images, settings, streamer)`: the reply to the last user turn.
- `RecordPrompts(records, processor)`: the records of a data file as prompts to answer in batches
  (phi3v.evaluation.generate_answers), each prepared when its batch comes.
"""

import os
import re
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from phi3v.dataset import generation_example
from phi3v.model_setup import attention_implementation, load_adapter, recorded_base_model
from phi3v.modeling import Phi3VForCausalLM
from phi3v.processing import STOP_TOKEN_IDS, Phi3VProcessor, image_tag_block, inputs_on
from phi3v.records import IMAGE_TAG_RE, LLAVA_IMAGE_TAG

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


# ------------------------------------------------------------------------------------------------ the model
def pick_device_and_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """cuda if available, else cpu; bf16 on a GPU, fp32 on a CPU (names as in DTYPES)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, DTYPES[dtype or ("bf16" if device.type == "cuda" else "fp32")]


def describe_model_folder(path, base_model=None) -> tuple[str, str]:
    """("full" or "adapter", where the weights or the base model come from) for a model folder or hub id."""
    if not os.path.isdir(path):
        if os.path.exists(path) or path.startswith((".", "/")):
            raise FileNotFoundError(f"{path}: no such model folder")
        return "full", path  # a hub id
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        if base_model is None:
            base_model = recorded_base_model(path)
        if not base_model:
            raise ValueError(f"{path}: the adapter does not name its base model; pass --base_model")
        if base_model.startswith((".", "/")) and not os.path.isdir(base_model):
            raise FileNotFoundError(
                f"{path}: the adapter's base model {base_model} is not a folder here; pass --base_model"
            )
        return "adapter", base_model
    has_weights = any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES)
    if os.path.isfile(os.path.join(path, "config.json")) and has_weights:
        return "full", path
    missing = "model weights (model.safetensors)" if os.path.isfile(os.path.join(path, "config.json")) else (
        "config.json with model weights (model.safetensors)"
    )
    checkpoints = sorted(n for n in os.listdir(path) if n.startswith("checkpoint-"))
    hint = f"; it holds checkpoints, e.g. {os.path.join(path, checkpoints[-1])}" if checkpoints else ""
    raise FileNotFoundError(
        f"{path} is neither a model nor a LoRA adapter folder: it has no {missing} and no adapter_config.json{hint}"
    )


def load_for_inference(path, base_model=None, dtype=torch.float32, device="cpu", use_flash_attention=False):
    """(model in eval mode on `device`, processor) from any folder `describe_model_folder` accepts."""
    kind, source = describe_model_folder(path, base_model)
    model = Phi3VForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=attention_implementation(use_flash_attention)
    )
    if kind == "adapter":
        # Checked against the base first (another base's adapter: a ValueError naming the tensor); folding LoRA
        # into the weights makes generation as fast as with a full model.
        model = load_adapter(model, path).merge_and_unload()
    # A run's output folder carries the processor it trained with; an adapter folder may not.
    has_processor = os.path.isdir(path) and os.path.isfile(os.path.join(path, "preprocessor_config.json"))
    processor = Phi3VProcessor.from_pretrained(path if has_processor else source)
    return model.to(device).eval(), processor


# ------------------------------------------------------------------------------------------------ the prompt
def llava_tags(prompt, first=1) -> str:
    """LLaVA's <image> tags (as in the training data) -> <|image_first|>, <|image_first+1|>, ... in order."""
    count = iter(range(first, first + prompt.count(LLAVA_IMAGE_TAG)))
    return re.sub(re.escape(LLAVA_IMAGE_TAG), lambda _: f"<|image_{next(count)}|>", prompt)


def user_message(prompt, num_images, first=1) -> str:
    """The prompt with one <|image_k|> tag line per image in front (k from `first`), unless it has tags already,
    <|image_k|> or LLaVA's <image> (the processor then checks they match the images)."""
    prompt = llava_tags(prompt, first)
    if IMAGE_TAG_RE.search(prompt):
        return prompt
    return image_tag_block(range(first, first + num_images)) + prompt


def conversation(turns, system=None) -> list[dict]:
    """Chat messages for `turns`, a list of (question, number of images given with it, answer or None).

    Image tags are numbered over the whole conversation: the images of the first turn are <|image_1|> ...,
    a later turn's continue the count. The last turn normally has no answer yet: the one to generate."""
    messages = [{"role": "system", "content": system}] if system else []
    seen = 0
    for question, num_images, reply in turns:
        messages.append({"role": "user", "content": user_message(question, num_images, seen + 1)})
        seen += num_images
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
    return messages


@dataclass
class RecordPrompts:
    """Records to answer (predict.py --jsonl): each one's generation example (its conversation up to the last
    answer, its images; phi3v.dataset.generation_example) made when generate_answers asks for it. No training
    example is built: nothing is tokenized with labels."""

    records: list
    processor: Phi3VProcessor
    num_crops: int | None = None
    max_num_frames: int = 10
    skip_bad_samples: bool = False

    def __len__(self) -> int:
        return len(self.records)

    def generation_example(self, index) -> dict:
        return generation_example(self.processor, self.records[index], self.max_num_frames)


# ------------------------------------------------------------------------------------------------ generation
@dataclass
class GenerationSettings:
    """What the reply depends on besides the model and the input. Greedy unless do_sample."""

    max_new_tokens: int = 64
    num_crops: int | None = None  # max 336px crops per image; None: the processor's
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.num_crops is not None and self.num_crops < 1:
            raise ValueError(f"num_crops must be at least 1, got {self.num_crops}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0):
            raise ValueError("sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0")

    def generate_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


def model_limit(model) -> int:
    """The longest sequence (prompt + answer) the model takes: its max_position_embeddings."""
    return model.config.max_position_embeddings


def prepare_inputs(model, processor, messages, images, settings: GenerationSettings) -> dict:
    """The model's inputs for the reply to the last user message; ValueError for anything the model cannot take
    (tags that do not match the images, a prompt that leaves no room for max_new_tokens under the model's limit).
    """
    settings.check()
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(prompt, list(images) or None, num_crops=settings.num_crops)
    length, limit = inputs["input_ids"].shape[1], model_limit(model)
    if length + settings.max_new_tokens > limit:
        raise ValueError(
            f"the prompt is {length} tokens long (images included); with max_new_tokens {settings.max_new_tokens} "
            f"that is longer than the model's limit of {limit} tokens"
        )
    return inputs_on(inputs, model.device, model.dtype)


def text_streamer(processor, on_text=None) -> TextStreamer:
    """A streamer of the answer's text: printed to stdout, or each new piece passed to `on_text(piece)`."""
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                            clean_up_tokenization_spaces=False)
    if on_text is not None:
        streamer.on_finalized_text = lambda text, stream_end=False: text and on_text(text)
    return streamer


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(model, processor, inputs, settings: GenerationSettings, streamer=None, stop_event=None) -> str:
    """The answer to prepared `inputs`: generation stops at the end of the assistant turn (or when `stop_event`,
    a threading.Event, is set); returns the decoded answer, stripped."""
    generated = model.generate(
        **inputs,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=STOP_TOKEN_IDS,
        pad_token_id=processor.pad_token_id,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop_event)]) if stop_event is not None else None,
        **settings.generate_kwargs(),
    )
    return processor.decode(generated[0, inputs["input_ids"].shape[1] :]).strip()


def answer(model, processor, messages, images, settings: GenerationSettings, streamer=None, stop_event=None) -> str:
    """The reply to the last user message of `messages` about `images` (all images of the conversation)."""
    inputs = prepare_inputs(model, processor, messages, images, settings)
    return generate(model, processor, inputs, settings, streamer, stop_event)

"""A conversation (chat messages with inline `<|image_k|>` tags) -> what the model takes: the checks of its
messages, the training example (input_ids, labels on the answers only, the processed images) and the generation
prompt of its last answer. The tokenisation layer above Phi3VProcessor; the collator only pads and packs.
"""

from phi3v.processing import IMAGE_TAG, Phi3VProcessor

ROLES = ("system", "user", "assistant")


def check_messages(messages) -> None:
    """ValueError unless `messages` is a non-empty list of dicts, each with a known role and string content (the
    one check of a conversation's messages: records made by a recipe's to_record skip the file loaders' checks)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list, got {messages!r}")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"a message must be a dict with role 'system', 'user' or 'assistant', got {m!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{m['role']} content must be a string, got {type(m.get('content')).__name__}")


IGNORE_INDEX = -100
# Every answer ends the assistant turn and the text, as in the official recipe (docs/DESIGN.md §4.4).
ANSWER_SUFFIX = "<|end|>\n<|endoftext|>"


def tokenize_conversation(
    processor: Phi3VProcessor, messages: list[dict], images: list, num_crops=None, max_length=None
) -> dict:
    """input_ids and labels of a conversation (-100 everywhere but the assistant answers), with its images.

    Each assistant turn is preceded by the chat-template prompt of the messages before it. BOS stands only
    where the processor puts it: at the start and after each image block; a later turn gets no BOS of its own.
    """
    check_messages(messages)  # first: a bad message would otherwise fail deep inside with a TypeError
    features = processor.image_processor(images, num_crops=num_crops) if images else None
    token_counts = features["num_img_tokens"] if features is not None else []
    input_ids, labels, pending, next_image = [], [], [], 1
    for message in messages:
        if message["role"] != "assistant":
            pending.append(message)
            continue
        if not pending:
            raise ValueError("two assistant turns in a row: every answer needs a user turn before it")
        prompt = processor.apply_chat_template(pending, add_generation_prompt=True)
        num_tags = len(IMAGE_TAG.findall(prompt))
        counts = token_counts[next_image - 1 : next_image - 1 + num_tags]
        if len(counts) != num_tags:
            raise ValueError(f"the conversation has more image tags than its {len(images)} image(s)")
        prompt_ids = processor.encode_prompt(prompt, counts, first_image=next_image)
        if input_ids:
            prompt_ids = prompt_ids[1:]
        answer_ids = processor.encode_text(message["content"] + ANSWER_SUFFIX)
        input_ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        next_image += num_tags
        pending = []
    if pending or not input_ids:
        raise ValueError("the conversation must end with an assistant answer")
    if next_image - 1 != len(images):
        raise ValueError(f"the conversation has {next_image - 1} image tag(s) but {len(images)} image(s)")
    if max_length is not None and len(input_ids) > max_length:
        # Never truncate: a cut through the image tokens would silently misalign images and text.
        raise ValueError(f"the example is {len(input_ids)} tokens long, more than max_seq_length {max_length}")
    example = {"input_ids": input_ids, "labels": labels}
    if features is not None:
        example["pixel_values"] = features["pixel_values"]
        example["image_sizes"] = features["image_sizes"]
    return example


def generation_prompt(processor: Phi3VProcessor, messages: list[dict]) -> tuple[str, str]:
    """(prompt up to the last assistant turn, that turn's answer): what evaluation asks and expects."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the conversation must end with an assistant answer")
    return processor.apply_chat_template(messages[:-1], add_generation_prompt=True), messages[-1]["content"]

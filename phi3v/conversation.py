"""A conversation (chat messages with inline `<|image_k|>` tags) -> what the model takes: the checks of its
messages, the training example (input_ids, labels on the answers only, the processed images), the generation
prompt of its last answer, and the prompt ids of an answer to compare or sample (DPO, GRPO). The tokenisation layer
above Phi3VProcessor; the collator only pads and packs.
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


def completion_ids(processor: Phi3VProcessor, text: str) -> list[int]:
    """The ids of an answer as a training example has them: text + ANSWER_SUFFIX, no special tokens."""
    return processor.encode_text(text + ANSWER_SUFFIX)


def check_length(num_tokens: int, max_length: int | None) -> None:
    """ValueError if a whole sequence (a conversation, or a prompt + its longest completion) is over max_length.

    Never truncate: a cut through the image tokens would silently misalign images and text."""
    if max_length is not None and num_tokens > max_length:
        raise ValueError(f"the example is {num_tokens} tokens long, more than max_seq_length {max_length}")


def split_turns(messages: list[dict]) -> list[tuple[list[dict], str | None]]:
    """[(the messages of a turn's prompt, its answer)]: each assistant answer with the messages since the previous
    one; messages after the last answer make a last turn whose answer is None."""
    turns, pending = [], []
    for message in messages:
        if message["role"] != "assistant":
            pending.append(message)
            continue
        if not pending:
            raise ValueError("two assistant turns in a row: every answer needs a user turn before it")
        turns.append((pending, message["content"]))
        pending = []
    if pending:
        turns.append((pending, None))
    return turns


def encode_turns(processor: Phi3VProcessor, messages: list[dict], images: list, num_crops, answered: bool) -> dict:
    """input_ids and labels of the turns of a conversation (-100 everywhere but the answers), with its images
    processed (pixel_values, image_sizes); see turn_ids."""
    features = processor.image_processor(images, num_crops=num_crops) if images else None
    token_counts = features["num_img_tokens"] if features is not None else []
    example = turn_ids(processor, messages, token_counts, answered)
    if features is not None:
        example["pixel_values"] = features["pixel_values"]
        example["image_sizes"] = features["image_sizes"]
    return example


def turn_ids(processor: Phi3VProcessor, messages: list[dict], image_token_counts: list[int], answered: bool) -> dict:
    """input_ids and labels of the turns of a conversation (-100 everywhere but the answers), from its images' token
    counts alone (so lengths are known before any image is decoded: image_processor.num_image_tokens of its size).

    `answered`: the conversation ends with an assistant answer (a training example), else with the user turn to be
    answered, whose prompt comes last, alone. Each answer is preceded by the chat-template prompt of the messages
    before it. BOS stands only where the processor puts it: at the start and after each image block; a later turn
    gets no BOS of its own."""
    check_messages(messages)  # first: a bad message would otherwise fail deep inside with a TypeError
    if answered and messages[-1]["role"] != "assistant":
        raise ValueError("the conversation must end with an assistant answer")
    if not answered and messages[-1]["role"] != "user":
        raise ValueError("the prompt must end with the user turn to answer")
    turns = split_turns(messages)
    input_ids, labels, next_image = [], [], 1
    for prompt_messages, answer in turns:
        prompt = processor.apply_chat_template(prompt_messages, add_generation_prompt=True)
        num_tags = len(IMAGE_TAG.findall(prompt))
        counts = image_token_counts[next_image - 1 : next_image - 1 + num_tags]
        if len(counts) != num_tags:
            raise ValueError(f"the conversation has more image tags than its {len(image_token_counts)} image(s)")
        prompt_ids = processor.encode_prompt(prompt, counts, first_image=next_image)
        if input_ids:
            prompt_ids = prompt_ids[1:]
        answer_ids = completion_ids(processor, answer) if answer is not None else []
        input_ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        next_image += num_tags
    if next_image - 1 != len(image_token_counts):
        raise ValueError(f"the conversation has {next_image - 1} image tag(s) but {len(image_token_counts)} image(s)")
    return {"input_ids": input_ids, "labels": labels}


def tokenize_conversation(
    processor: Phi3VProcessor, messages: list[dict], images: list, num_crops=None, max_length=None
) -> dict:
    """The training example of a conversation that ends with an assistant answer: input_ids, labels (-100
    everywhere but the answers) and, with images, pixel_values and image_sizes (see encode_turns)."""
    example = encode_turns(processor, messages, images, num_crops, answered=True)
    check_length(len(example["input_ids"]), max_length)
    return example


def tokenize_prompt(
    processor: Phi3VProcessor, messages: list[dict], images: list, num_crops=None, max_length=None
) -> dict:
    """The prompt of a compared or sampled answer (DPO, GRPO; docs/DESIGN.md §12): the conversation ends with the
    user turn to answer, after an optional history of user / assistant turns. Returns prompt_ids and, with images,
    pixel_values and image_sizes, so that prompt_ids + completion_ids(processor, answer) are the input_ids
    tokenize_conversation makes of the conversation with that answer appended.

    max_length refuses a prompt that even the shortest answer (ANSWER_SUFFIX alone) would take over it; whole
    sequences are the caller's to check: check_length(len(prompt_ids) + longest completion, max_length)."""
    example = encode_turns(processor, messages, images, num_crops, answered=False)
    del example["labels"]
    example["prompt_ids"] = example.pop("input_ids")
    check_length(len(example["prompt_ids"]) + len(completion_ids(processor, "")), max_length)
    return example


def generation_prompt(processor: Phi3VProcessor, messages: list[dict]) -> tuple[str, str]:
    """(prompt up to the last assistant turn, that turn's answer): what evaluation asks and expects."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the conversation must end with an assistant answer")
    return processor.apply_chat_template(messages[:-1], add_generation_prompt=True), messages[-1]["content"]

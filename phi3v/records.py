"""Read training/eval data files into records, with errors that name the file and line: the record format, the two
file formats it is read from, and the checks of a record. A record's media files: phi3v.media.

Every loader returns "records": dicts (CheckedRecord, a dict marked as checked, see the end of this docstring):

    {
      "id": str,              # from the data, else f"{file_stem}-{index}" (0-based record index)
      "source": str,          # "data/train.jsonl:12" (1-based line) or "data/train.json[3]" (0-based index)
      "images": list[str],    # absolute paths, in the order of the image tags
      "video": str | None,    # absolute path; frames are sampled later by load_record_images
      "messages": list[dict], # [{"role": "system"|"user"|"assistant", "content": str}, ...]
    }

User contents carry Phi-3-V tags <|image_1|> .. <|image_n|>, numbered in textual order across the
whole conversation, each exactly once, n == len(images). A video record keeps one literal "<video>"
placeholder in a user message and has no images until load_record_images samples its frames.

Two input formats are accepted:

* the project's jsonl: {"id", "system"?, "conversations": [{"images"?, "user", "assistant"}, ...]},
  image paths relative to the image root (default: "images/" beside the data file). A turn whose user
  text has no <|image_k|> tags gets one tag line per image of that turn prepended
  ("<|image_3|>\\n<|image_4|>\\n" + user, numbers continuing across turns); if it has tags they must
  be exactly that turn's numbers, in order.
* LLaVA-style JSON (a list, one record per line, or a file holding one record): {"id", "image" | "video",
  "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}]}, paths relative to
  image_folder. <image> tags become <|image_k|>; a record with images but no <image> tag at all gets
  them prepended to its first user turn, as LLaVA tools do.

Each check of a record runs once on every path. A record read from a file is checked when it is parsed: the
format's keys and types, its turns (_check_turns) and its image tags (check_record_tags); it comes back a
CheckedRecord, and phi3v.media.load_record_images does not check it again. Any other record (a recipe's to_record
makes them from hub rows) is checked by load_record_images: its messages (conversation.check_messages) and its image
tags, on the final messages (a video's frame tags in place of its placeholder).
"""

import json
import logging
import os
import re
from pathlib import Path

from phi3v.errors import InputError
from phi3v.processing import IMAGE_TAG as IMAGE_TAG_RE
from phi3v.processing import check_image_tags, check_text, image_tag_block

logger = logging.getLogger(__name__)

VIDEO_PLACEHOLDER = "<video>"
LLAVA_IMAGE_TAG = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MAX_REASONS_LOGGED = 5


class BadSampleError(InputError):
    """A data problem. The message starts with where it came from: "data/train.jsonl:12: ..."."""


class CheckedRecord(dict):
    """A record the file loaders made and checked when they parsed it (see the module docstring): a plain dict
    otherwise, equal to one with the same items. A copy (dict(record)) is a plain dict, checked again when read."""


# --------------------------------------------------------------------------------------------------
# validation shared by both formats


def check_record_tags(messages, num_images, source):
    """A record's image tags: in user messages only, and over the whole conversation <|image_1|>..<|image_n|> in
    textual order, each once, n == num_images (processing.check_image_tags, the one check of the numbering)."""
    for message in messages:
        numbers = IMAGE_TAG_RE.findall(message["content"])
        if numbers and message["role"] != "user":
            raise BadSampleError(
                f"{source}: image tag <|image_{numbers[0]}|> in a {message['role']} message; "
                "tags belong in user messages"
            )
    try:
        check_image_tags("\n".join(message["content"] for message in messages), num_images)
    except ValueError as error:
        raise BadSampleError(f"{source}: {error}") from None


def _check_turns(messages, source):
    """Optional system message, then user/assistant alternating, ending with a non-empty answer."""
    roles = [m["role"] for m in messages]
    if roles and roles[0] == "system":
        roles = roles[1:]
    if not roles:
        raise BadSampleError(f"{source}: conversation has no user/assistant turns")
    for i, role in enumerate(roles):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise BadSampleError(
                f"{source}: turn {i + 1} is from {role!r}, expected {expected!r} "
                "(turns must alternate user/assistant, starting with user)"
            )
    if roles[-1] != "assistant":
        raise BadSampleError(
            f"{source}: conversation ends with a user turn; the last turn must be the assistant's answer"
        )
    for m in messages:  # content is a str: both parsers take it through _require(..., str)
        try:
            check_text(m["content"])  # a JSON "\ud800" escape decodes to a lone surrogate the tokenizer chokes on
        except ValueError as error:
            raise BadSampleError(f"{source}: {m['role']} {error}") from None
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadSampleError(f"{source}: empty assistant answer")


def _resolve_path(path, root, source, kind="image"):
    """Absolute path of a media file; relative paths must stay inside root and the file must exist."""
    if not isinstance(path, str) or not path:
        raise BadSampleError(f"{source}: {kind} path must be a non-empty string, got {path!r}")
    if os.path.isabs(path):
        full = os.path.normpath(path)
    else:
        if root is None:
            raise BadSampleError(f"{source}: relative {kind} path {path!r} needs an image_folder")
        root = os.path.abspath(root)
        # normpath, not realpath: symlinks inside the image folder pointing elsewhere are fine
        full = os.path.normpath(os.path.join(root, path))
        if os.path.commonpath([root, full]) != root:
            raise BadSampleError(f"{source}: {kind} path {path!r} resolves outside the image folder {root}")
    if not os.path.isfile(full):
        raise BadSampleError(f"{source}: {kind} file not found: {full}")
    return full


def _require(obj, key, kind, source):
    if key not in obj:
        raise BadSampleError(f"{source}: missing key {key!r}")
    if not isinstance(obj[key], kind):
        raise BadSampleError(f"{source}: {key!r} must be a {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def _conversation_turns(obj, source, keys):
    """Yield (turn number from 1, "source: turn N", turn) for each turn of a record's "conversations"; a turn that
    is not an object is refused, naming the keys a turn of its format has."""
    for number, turn in enumerate(obj["conversations"], start=1):
        where = f"{source}: turn {number}"
        if not isinstance(turn, dict):
            raise BadSampleError(f"{where}: must be an object with {' and '.join(map(repr, keys))}")
        yield number, where, turn


# --------------------------------------------------------------------------------------------------
# the two record formats


def _parse_project(obj, source, image_root):
    """The project's jsonl record -> record dict (id filled in by the caller)."""
    messages = []
    if "system" in obj:
        messages.append({"role": "system", "content": _require(obj, "system", str, source)})
    images = []
    for _, where, turn in _conversation_turns(obj, source, ("user", "assistant")):
        user = _require(turn, "user", str, where)
        answer = _require(turn, "assistant", str, where)
        paths = turn.get("images") or []
        if not isinstance(paths, list):
            raise BadSampleError(f"{where}: 'images' must be a list of paths")
        numbers = list(range(len(images) + 1, len(images) + len(paths) + 1))
        tagged = [int(k) for k in IMAGE_TAG_RE.findall(user)]
        if not tagged:
            user = image_tag_block(numbers) + user
        elif tagged != numbers:
            want = ", ".join(f"<|image_{k}|>" for k in numbers) or "none"
            got = ", ".join(f"<|image_{k}|>" for k in tagged)
            raise BadSampleError(f"{where}: user text has image tags {got} but this turn's images need {want}")
        images += [_resolve_path(p, image_root, where) for p in paths]
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    _check_turns(messages, source)
    return {"images": images, "video": None, "messages": messages}


def _parse_llava(obj, source, image_folder):
    """A LLaVA-style record -> record dict (id filled in by the caller)."""
    messages = []
    for _, where, turn in _conversation_turns(obj, source, ("from", "value")):
        sender = _require(turn, "from", str, where)
        if sender.lower() not in LLAVA_ROLES:
            known = ", ".join(LLAVA_ROLES)
            raise BadSampleError(f"{where}: unknown 'from' value {sender!r} (expected one of {known})")
        messages.append({"role": LLAVA_ROLES[sender.lower()], "content": _require(turn, "value", str, where)})
    _check_turns(messages, source)  # first: the tag handling below needs a user turn

    if obj.get("image") and obj.get("video"):  # null/empty keys are common in mixed datasets
        raise BadSampleError(f"{source}: record has both 'image' and 'video'")
    paths = obj.get("image") or []
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list):
        raise BadSampleError(f"{source}: 'image' must be a path or a list of paths")
    first_user = next(m for m in messages if m["role"] == "user")

    for tag in (LLAVA_IMAGE_TAG, VIDEO_PLACEHOLDER):
        for m in messages:
            if m["role"] != "user" and tag in m["content"]:
                raise BadSampleError(f"{source}: {tag} tag in a {m['role']} message; tags belong in user messages")

    num_tags = sum(m["content"].count(LLAVA_IMAGE_TAG) for m in messages)
    # already in Phi-3-V form (<|image_k|>): keep, check_record_tags validates them later
    pretagged = num_tags == 0 and any(IMAGE_TAG_RE.search(m["content"]) for m in messages)
    if paths and num_tags == 0 and not pretagged:
        # what LLaVA tools do with untagged images: put them before the first question
        first_user["content"] = (LLAVA_IMAGE_TAG + "\n") * len(paths) + first_user["content"]
    elif num_tags != len(paths) and not pretagged:
        raise BadSampleError(f"{source}: {num_tags} <image> tags but {len(paths)} images")
    counter = iter(range(1, len(paths) + 1))
    for m in messages:
        m["content"] = re.sub(re.escape(LLAVA_IMAGE_TAG), lambda _: f"<|image_{next(counter)}|>", m["content"])

    video = obj.get("video")
    num_video_tags = sum(m["content"].count(VIDEO_PLACEHOLDER) for m in messages)
    if video is not None:
        if num_video_tags == 0:
            first_user["content"] = VIDEO_PLACEHOLDER + "\n" + first_user["content"]
        elif num_video_tags > 1:
            raise BadSampleError(f"{source}: {num_video_tags} <video> tags; a video record needs exactly one")
        video = _resolve_path(video, image_folder, source, kind="video")
    elif num_video_tags:
        raise BadSampleError(f"{source}: <video> tag but the record has no 'video'")

    images = [_resolve_path(p, image_folder, source) for p in paths]
    return {"images": images, "video": video, "messages": messages}


def parse_record(obj, source, default_id, image_folder, data_path):
    """One JSON object of a data file -> a checked record (either format); BadSampleError naming `source`."""
    if not isinstance(obj, dict):
        raise BadSampleError(f"{source}: record must be a JSON object, got {type(obj).__name__}")
    turns = _require(obj, "conversations", list, source)
    if not turns:
        raise BadSampleError(f"{source}: 'conversations' is empty")
    first = turns[0] if isinstance(turns[0], dict) else {}
    if "from" in first or "value" in first:
        record = _parse_llava(obj, source, image_folder)
    elif "user" in first or "assistant" in first:
        image_root = image_folder if image_folder is not None else data_path.parent / "images"
        record = _parse_project(obj, source, image_root)
    else:
        raise BadSampleError(
            f"{source}: cannot tell the format: conversation turns need 'from'/'value' (LLaVA) "
            "or 'user'/'assistant' keys"
        )
    # a video record has no tags yet: load_record_images puts its frames' tags in place of its one <video>
    check_record_tags(record["messages"], len(record["images"]), source)
    record_id = obj.get("id")
    return CheckedRecord(id=str(record_id) if record_id is not None else default_id, source=source, **record)


def _read_raw(path):
    """Yield (source, json-or-error) for each record: a JSON list file, one JSON object per line, or a whole file
    holding one JSON object (one record)."""
    if path.is_dir():
        raise BadSampleError(f"{path}: is a folder; the data path must be a JSON or jsonl file (the images go in "
                             "the image folder)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadSampleError(f"{path}: data file not found") from None
    except UnicodeDecodeError as e:
        raise BadSampleError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            # one broken list spoils the whole file, so this is never skippable
            raise BadSampleError(_json_error(path, text, e)) from None
        for i, obj in enumerate(items):
            yield f"{path}[{i}]", obj
        return
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if len(lines) > 1 and text.lstrip().startswith("{"):  # jsonl, or one object written over several lines
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data" and not _is_json(lines[0][1]):  # not jsonl: one object, broken
                raise BadSampleError(_json_error(path, text, e)) from None
        else:
            yield f"{path}", obj  # the whole file is one record
            return
    for lineno, line in lines:
        source = f"{path}:{lineno}"
        try:
            yield source, json.loads(line)
        except json.JSONDecodeError as e:
            yield source, BadSampleError(f"{source}: line is not valid JSON: {e.msg} (column {e.colno})")


def _is_json(line) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _json_error(path, text, error) -> str:
    """'file:LINE: not valid JSON: ...', a trailing comma reported at the comma's line (Python's json names the
    bracket after it)."""
    before = text[: error.pos].rstrip()
    if text[error.pos : error.pos + 1] in ("]", "}") and before.endswith(","):
        line = before.count("\n") + 1
        closing = text[error.pos]
        return (f"{path}:{line}: not valid JSON: trailing comma before the '{closing}' on line {error.lineno} "
                "(JSON allows no comma after the last item)")
    return f"{path}:{error.lineno}: not valid JSON: {error.msg} (column {error.colno})"


def load_records_with_report(path, image_folder=None, skip_bad_samples=False, parse=parse_record):
    """Load and validate every record of `path`; return (records, reasons the skipped ones were bad).

    parse: what makes one JSON object a record (parse_record's arguments; phi3v.preference's preference pairs)."""
    path = Path(path)
    records, skipped = [], []
    for index, (source, obj) in enumerate(_read_raw(path)):
        try:
            if isinstance(obj, BadSampleError):
                raise obj
            records.append(parse(obj, source, f"{path.stem}-{index}", image_folder, path))
        except BadSampleError as e:
            if not skip_bad_samples:
                raise
            skipped.append(str(e))
    if skipped:
        logger.warning(
            "%s: skipped %d bad record(s), kept %d. First reasons:\n  %s",
            path, len(skipped), len(records), "\n  ".join(skipped[:MAX_REASONS_LOGGED]),
        )
    if not records:
        why = f" ({len(skipped)} skipped as bad)" if skipped else " (the file has no records)"
        raise BadSampleError(f"{path}: no usable records{why}")
    return records, skipped


def load_records(path, image_folder=None, skip_bad_samples=False, parse=parse_record):
    """Load and validate every record of `path` (project jsonl or LLaVA JSON/jsonl; see load_records_with_report)."""
    return load_records_with_report(path, image_folder, skip_bad_samples, parse)[0]

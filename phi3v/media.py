"""A record's media, with errors that name the record and the file: every image and video file looked at before
training (check_media), and a record's images opened or its video's frames sampled when its sample is read
(open_image, load_record_images). Records and their format: phi3v.records."""

import logging
import os
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from phi3v.conversation import check_messages
from phi3v.image_processing import to_rgb
from phi3v.processing import image_tag_block
from phi3v.records import MAX_REASONS_LOGGED, VIDEO_PLACEHOLDER, BadSampleError, CheckedRecord, check_record_tags

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# looking at the files before training


def check_media(records, skip_bad_samples=False, workers=8):
    """Look at every image and video file of `records` before training (the recipes call it before the model
    loads): each image's header (not an image, 1x1, decompression-bomb sized) and each video's container and
    frame count (demuxed, not decoded). A bad file stops here with its record and file, or with
    skip_bad_samples its record is left out (logged); returns the records kept. Damage further inside a file
    (a truncated image) still shows only when the sample is read, and is handled there."""
    from concurrent.futures import ThreadPoolExecutor

    def problem(record):
        try:
            for image in record.get("images") or []:
                if isinstance(image, (str, os.PathLike)):
                    _probe_image(image, record["source"])
            if record.get("video"):
                _probe_video(record["video"], record["source"])
        except BadSampleError as error:
            return error
        return None

    kept, reasons = [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for record, error in zip(records, pool.map(problem, records)):
            if error is None:
                kept.append(record)
            elif skip_bad_samples:
                reasons.append(str(error))
            else:
                raise error
    if reasons:
        logger.warning("skipped %d record(s) with bad media files, kept %d. First reasons:\n  %s",
                       len(reasons), len(kept), "\n  ".join(reasons[:MAX_REASONS_LOGGED]))
        if not kept:
            raise BadSampleError(f"no usable records: all {len(reasons)} have bad media files (first: {reasons[0]})")
    return kept


def _probe_image(path, source) -> None:
    """Read an image file's header: its format and size (no decoding)."""
    name = os.fspath(path)
    _check_size(_read_image_file(name, source, decode=False), name, source)


def _read_image_file(name, source, decode: bool):
    """An image file's size (header only), or with `decode` the whole image, upright. BadSampleError naming the
    record and the file when it is missing, not an image, decompression-bomb sized or corrupt."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(name) as f:
                if not decode:
                    return f.size
                f.load()
                return ImageOps.exif_transpose(f)
    except FileNotFoundError:
        raise BadSampleError(f"{source}: image file not found: {name}") from None
    except UnidentifiedImageError:
        raise BadSampleError(f"{source}: not an image file (or unsupported format): {name}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSampleError(
            f"{source}: image too large, refused as a possible decompression bomb: {name} ({e})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadSampleError(f"{source}: corrupt or truncated image: {name} ({e})") from None


def _check_size(size, name, source) -> None:
    width, height = size
    if width < 2 or height < 2:
        raise BadSampleError(f"{source}: image is {width}x{height} pixels (need at least 2x2): {name}")


def _probe_video(path, source) -> None:
    from phi3v.video import VideoError, count_frames

    try:
        count_frames(path)
    except VideoError as e:
        raise BadSampleError(f"{source}: cannot read video: {e}") from None  # e names the file


# --------------------------------------------------------------------------------------------------
# images and video frames


def open_image(path_or_pil, source):
    """Open an image fully (so truncation shows up now) and return it as an upright RGB image.

    A PIL image passed in (e.g. a video frame, or a hub dataset's image, which the datasets library opens
    lazily) is taken as already oriented; it is decoded now, checked for size and converted to RGB.
    """
    if isinstance(path_or_pil, Image.Image):
        name, img = getattr(path_or_pil, "filename", None) or "<in-memory image>", path_or_pil
        width, height = img.size
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            raise BadSampleError(
                f"{source}: image too large, refused as a possible decompression bomb: {name} "
                f"({width}x{height} pixels, more than PIL.Image.MAX_IMAGE_PIXELS {Image.MAX_IMAGE_PIXELS})"
            )
        try:
            img.load()  # a lazily opened image decodes here: truncation and corruption show up now
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise BadSampleError(f"{source}: corrupt or truncated image: {name} ({e})") from None
    else:
        name = str(path_or_pil)
        img = _read_image_file(name, source, decode=True)
    _check_size(img.size, name, source)
    return to_rgb(img)


def load_record_images(record, max_num_frames=10):
    """Open a record's images, or sample its video's frames; return (images, messages).

    For a video record the "<video>" placeholder (and one newline right after it, if any) is
    replaced by one tag line per frame, "<|image_1|>\\n<|image_2|>\\n...<|image_n|>\\n", so
    "<video>\\nWhat happens?" becomes "<|image_1|>\\n...<|image_n|>\\nWhat happens?".
    The record itself is not modified.

    A record the file loaders made (a CheckedRecord) was checked when it was parsed. Any other record (a
    recipe's to_record makes them) is checked here, once: its messages first, its image tags last, on the
    final messages (a video's frame tags in place of its placeholder).
    """
    source = record["source"]
    checked = isinstance(record, CheckedRecord)
    if not checked:
        try:  # first: a bad message would otherwise fail below with a TypeError
            check_messages(record["messages"])
        except ValueError as error:
            raise BadSampleError(f"{source}: {error}") from None
    messages = [dict(m) for m in record["messages"]]
    if record.get("video"):
        # video decoding pulls in PyAV; only import it when a record has a video
        from phi3v.video import VideoError, read_video_frames

        try:
            frames = read_video_frames(record["video"], max_num_frames, max_frames=True)
        except VideoError as e:
            raise BadSampleError(f"{source}: cannot read video: {e}") from None  # e names the file
        if not frames:
            raise BadSampleError(f"{source}: no frames decoded from video {record['video']}")
        images = [open_image(frame, source) for frame in frames]
        put_frame_tags(messages, len(images), source)
    else:
        images = [open_image(p, source) for p in record["images"]]
    if not checked:
        check_record_tags(messages, len(images), source)
    return images, messages


def put_frame_tags(messages, num_frames, source) -> None:
    """Replace a video record's "<video>" placeholder (and one newline right after it) in `messages` by one tag line
    per frame, "<|image_1|>\\n...<|image_n|>\\n"."""
    tags = image_tag_block(range(1, num_frames + 1))
    placeholders = [m for m in messages if VIDEO_PLACEHOLDER in m["content"]]
    if len(placeholders) != 1 or placeholders[0]["content"].count(VIDEO_PLACEHOLDER) != 1:
        raise BadSampleError(f"{source}: a video record needs exactly one <video> placeholder")
    m = placeholders[0]
    m["content"] = re.sub(re.escape(VIDEO_PLACEHOLDER) + r"\n?", lambda _: tags, m["content"], count=1)


def media_sizes(record, max_num_frames=10) -> tuple[list[tuple[int, int]], list[dict]]:
    """(the (width, height) of each image its sample will have, its messages with a video's frame tags in place),
    from file headers and the video's stream, nothing decoded: what a length check before training needs."""
    from phi3v.video import VideoError, count_frames, frame_size

    source, messages = record["source"], [dict(m) for m in record["messages"]]
    if record.get("video"):
        try:
            frames, size = min(max_num_frames, count_frames(record["video"])), frame_size(record["video"])
        except VideoError as e:
            raise BadSampleError(f"{source}: cannot read video: {e}") from None
        put_frame_tags(messages, frames, source)
        return [size] * frames, messages
    sizes = [image.size if isinstance(image, Image.Image) else _read_image_file(os.fspath(image), source, decode=False)
             for image in record["images"]]
    return sizes, messages

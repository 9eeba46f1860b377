"""Sample frames from a video file: the one place that decides which frames a video becomes.

Used by convert_ucf101.py (videos -> JPEG frames) and by the LLaVA data loader that samples
`"video"` records on the fly, so both pick exactly the same frames for the same video.

Frame rule: split the video into `num_frames` equal segments and take the centre frame of
each, i.e. index `int((i + 0.5) * total_frames / num_frames)` for i = 0..num_frames-1. The
frames cover the whole video, start to end. A video shorter than `num_frames` repeats frames
(total 3, num 8 -> [0, 0, 0, 1, 1, 2, 2, 2]) unless `max_frames=True`, which then returns
every frame once.

Frame counts come from the file itself, never from the container header: webm/mkv streams
often report 0 frames and no duration, and some AVI headers are simply wrong.
"""

import os

import av


class VideoError(ValueError):
    """A file that cannot be used as a video (missing, empty, not a video, no frames)."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # keep (path, reason) when the error crosses a process boundary
        return (VideoError, (self.path, self.reason))


def frame_indices(total_frames, num_frames):
    """Indices of `num_frames` frames spread evenly over a video of `total_frames` frames.

    Frame i is the centre of the i-th of `num_frames` equal segments:
    `int((i + 0.5) * total_frames / num_frames)`. Examples: (10, 4) -> [1, 3, 6, 8];
    (12, 4) -> [1, 4, 7, 10]. When total_frames < num_frames segments are shorter than a
    frame, so frames repeat, in order: (3, 8) -> [0, 0, 0, 1, 1, 2, 2, 2].
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return [int((i + 0.5) * total_frames / num_frames) for i in range(num_frames)]


def _open(path):
    """Open `path` with PyAV, returning (container, first video stream); errors -> VideoError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise VideoError(path, "empty file (0 bytes)")
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        raise VideoError(path, f"cannot open as video: {e.strerror or e}") from e
    if not container.streams.video:
        container.close()
        raise VideoError(path, "no video stream")
    return container, container.streams.video[0]


def count_frames(path):
    """Number of video frames in `path`, counted by demuxing the first video stream.

    Counting packets (without decoding) is cheap and, for the codecs we use (mpeg4, h264,
    mjpeg, vp8, vp9), gives exactly the number of decoded frames; empty packets are demuxer
    flush packets and are not frames. `read_video_frames` double-checks against decoding.
    """
    container, stream = _open(path)
    try:
        with container:
            count = sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as e:
        raise VideoError(path, f"cannot read video packets: {e.strerror or e}") from e
    if count == 0:
        raise VideoError(path, "no video frames")
    return count


def frame_size(path) -> tuple[int, int]:
    """(width, height) of the first video stream's frames, from the stream (nothing decoded)."""
    container, stream = _open(path)
    with container:
        return stream.codec_context.width, stream.codec_context.height


def _decode_at(path, indices):
    """Decode `path` once, front to back, keeping only frames at `indices` (sorted, may repeat).

    Returns (frames, decoded): the RGB frames picked, and how many frames were decoded before
    stopping (we stop right after the last wanted frame, or at the end of the stream).
    """
    wanted = {}  # frame index -> how many times it is wanted
    for i in indices:
        wanted[i] = wanted.get(i, 0) + 1
    last = max(indices)
    frames, decoded = [], 0
    container, stream = _open(path)
    try:
        with container:
            for frame in container.decode(stream):
                if decoded in wanted:
                    image = frame.to_image()  # RGB PIL image
                    frames.append(image)
                    # repeated indices get their own copy so callers may edit frames freely
                    frames.extend(image.copy() for _ in range(wanted[decoded] - 1))
                decoded += 1
                if decoded > last:
                    break
    except av.FFmpegError as e:
        raise VideoError(path, f"cannot decode video: {e.strerror or e}") from e
    return frames, decoded


def read_video_frames(path, num_frames, max_frames=False):
    """RGB PIL frames of `path` at `frame_indices(count_frames(path), num_frames)`.

    With `max_frames=True`, `num_frames` is an upper bound: a video with fewer frames gives
    each of its frames once instead of repeating some. Decoding is one streaming pass that
    keeps only the wanted frames, so memory does not grow with the video length.
    Raises VideoError (naming the file) for anything that is not a readable video.
    """
    total = count_frames(path)
    n = min(num_frames, total) if max_frames else num_frames
    indices = frame_indices(total, n)
    frames, decoded = _decode_at(path, indices)
    if len(frames) < n:
        # Some packets decoded to no frame, so the real count is `decoded`: sample again
        # with it (rare; a second streaming pass, never the whole video in memory).
        if decoded == 0:
            raise VideoError(path, "no decodable video frames")
        n = min(num_frames, decoded) if max_frames else num_frames
        frames, _ = _decode_at(path, frame_indices(decoded, n))
    return frames

"""Tests for phi3v/video.py. Videos are made here with PyAV; frame i is a flat grey of 20*i,
so which frames were picked can be read back from pixel values despite codec loss."""

import random
import struct

import av
import numpy as np
import pytest

from phi3v.video import VideoError, count_frames, frame_indices, read_video_frames


def make_video(path, num_frames, codec="mpeg4", pix_fmt="yuv420p"):
    """A tiny 64x48 video whose frame i is a flat grey of 20*i."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        for i in range(num_frames):
            image = np.full((48, 64, 3), 20 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
    return path


def lie_about_length(path, frames=1000):
    """Rewrite an AVI header so the container claims `frames` frames."""
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, data.find(b"avih") + 8 + 16, frames)  # dwTotalFrames
    struct.pack_into("<I", data, data.find(b"strh") + 8 + 32, frames)  # stream dwLength
    path.write_bytes(bytes(data))


def picked(frames):
    """Frame index each image came from, read back from its grey level."""
    return [round(float(np.asarray(f).mean()) / 20) for f in frames]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    v = {
        "avi": make_video(d / "a.avi", 12),
        "mp4": make_video(d / "b.mp4", 12, "libx264"),
        "mjpeg": make_video(d / "c.avi", 10, "mjpeg", "yuvj420p"),
        "webm": make_video(d / "d.webm", 12, "libvpx-vp9"),
        "short": make_video(d / "short clip é.avi", 3),
        "liar": make_video(d / "liar.avi", 10),
        "empty": d / "empty.avi",
        "text": d / "notes.mp4",
        "random": d / "random.avi",
    }
    lie_about_length(v["liar"])
    v["empty"].write_bytes(b"")
    v["text"].write_text("this is not a video\n")
    v["random"].write_bytes(random.Random(0).randbytes(4096))
    return v


def test_frame_indices_examples():
    assert frame_indices(10, 4) == [1, 3, 6, 8]
    assert frame_indices(12, 4) == [1, 4, 7, 10]
    assert frame_indices(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert frame_indices(1, 3) == [0, 0, 0]
    assert frame_indices(5, 5) == [0, 1, 2, 3, 4]
    for total in range(1, 50):
        idx = frame_indices(total, 8)
        assert idx == sorted(idx) and 0 <= idx[0] and idx[-1] < total


@pytest.mark.parametrize("total, num", [(0, 4), (4, 0), (-1, 4)])
def test_frame_indices_rejects_bad_counts(total, num):
    with pytest.raises(ValueError):
        frame_indices(total, num)


@pytest.mark.parametrize("name, count", [("avi", 12), ("mp4", 12), ("mjpeg", 10), ("webm", 12), ("short", 3)])
def test_count_frames(videos, name, count):
    assert count_frames(videos[name]) == count


def test_count_frames_ignores_container_header(videos):
    with av.open(str(videos["webm"])) as c:
        assert c.streams.video[0].frames == 0  # webm does not store a frame count
    with av.open(str(videos["liar"])) as c:
        assert c.streams.video[0].frames == 1000  # the header lies
    assert count_frames(videos["webm"]) == 12
    assert count_frames(videos["liar"]) == 10


@pytest.mark.parametrize("name", ["avi", "mp4", "mjpeg", "webm", "liar"])
def test_read_video_frames_picks_segment_centres(videos, name):
    frames = read_video_frames(videos[name], 4)
    assert picked(frames) == frame_indices(count_frames(videos[name]), 4)
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)


def test_short_video_repeats_frames(videos):
    frames = read_video_frames(videos["short"], 8)
    assert picked(frames) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert len({id(f) for f in frames}) == 8  # repeats are copies, not the same object


def test_max_frames_is_an_upper_bound(videos):
    assert picked(read_video_frames(videos["short"], 8, max_frames=True)) == [0, 1, 2]
    assert picked(read_video_frames(videos["webm"], 4, max_frames=True)) == [1, 4, 7, 10]
    assert picked(read_video_frames(videos["avi"], 100, max_frames=True)) == list(range(12))


@pytest.mark.parametrize(
    "name, reason",
    [
        ("empty", "empty file (0 bytes)"),
        ("text", "cannot open as video: Invalid data found when processing input"),
        ("random", "cannot open as video: Invalid data found when processing input"),
    ],
)
def test_bad_files_raise_video_error_naming_the_path(videos, name, reason):
    for fn in (count_frames, lambda p: read_video_frames(p, 4)):
        with pytest.raises(VideoError) as err:
            fn(videos[name])
        assert str(err.value) == f"{videos[name]}: {reason}"
        assert err.value.path == str(videos[name]) and err.value.reason == reason
        assert isinstance(err.value, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(VideoError, match="no such file"):
        read_video_frames(tmp_path / "nope.mp4", 4)

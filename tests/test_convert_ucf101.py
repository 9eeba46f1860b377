"""Tests for convert_ucf101.py on a small UCF101-like folder built here with PyAV.

Frame i of every test video is a flat grey of 20*i, so the frames the converter picked can be
read back from the JPEGs. We convert with num_frames=4: a 12-frame video gives frames
[1, 4, 7, 10], a 10-frame one [1, 3, 6, 8], the 3-frame one [0, 1, 1, 2].
"""

import json
import os
import random
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # convert_ucf101.py is a top-level script, not in a package

import convert_ucf101  # noqa: E402
from convert_ucf101 import InputError, convert, main  # noqa: E402

CLASSES = ["ApplyEyeMakeup", "Basketball", "Cricket", "Diving"]
USER = "Classify the video into one of the following classes: ApplyEyeMakeup, Basketball, Cricket, Diving."
INVALID = "cannot open as video: Invalid data found when processing input"


def make_video(path, num_frames, codec="mpeg4"):
    """A tiny 64x48 video whose frame i is a flat grey of 20*i."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(num_frames):
            image = np.full((48, 64, 3), 20 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# Converted videos in id order: (split, class, file name, frames picked with num_frames=4).
# Within a split videos sort by (class, file name), by code point: "UPPER.AVI" < "corrupt.avi".
EXPECTED = [
    ("train", "ApplyEyeMakeup", "clip.webm", [1, 4, 7, 10]),
    ("train", "ApplyEyeMakeup", "v_a 01.avi", [1, 4, 7, 10]),
    ("train", "Basketball", "UPPER.AVI", [1, 4, 7, 10]),
    ("train", "Basketball", "short.avi", [0, 1, 1, 2]),
    ("train", "Cricket", "Zürich_ü.mp4", [1, 4, 7, 10]),
    ("val", "ApplyEyeMakeup", "a.mkv", [1, 4, 7, 10]),
    ("val", "Basketball", "liar.avi", [1, 3, 6, 8]),
    ("test", "Cricket", "c.mov", [1, 4, 7, 10]),
    ("test", "Diving", "d.avi", [1, 4, 7, 10]),
]
SKIPPED = [
    ("train/Basketball/corrupt.avi", INVALID),
    ("train/Cricket/empty.mp4", "empty file (0 bytes)"),
    ("val/Cricket/text.mp4", INVALID),
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """tmp/UCF101_subset/{train,val,test}/{Class}/{video}, laid out like the extracted archive."""
    top = tmp_path_factory.mktemp("ucf")
    d = top / "UCF101_subset"
    make_video(d / "train/ApplyEyeMakeup/clip.webm", 12, "libvpx-vp9")  # container reports 0 frames
    make_video(d / "train/ApplyEyeMakeup/v_a 01.avi", 12)  # space in the name
    make_video(d / "train/Basketball/UPPER.AVI", 12)  # upper-case extension
    make_video(d / "train/Basketball/short.avi", 3)  # fewer frames than asked
    write(d / "train/Basketball/corrupt.avi", random.Random(0).randbytes(4096))
    make_video(d / "train/Cricket/Zürich_ü.mp4", 12, "libx264")  # non-ASCII name
    write(d / "train/Cricket/empty.mp4", b"")  # zero bytes
    write(d / "train/Cricket/notes.txt", b"not a video extension: ignored\n")
    make_video(d / "val/ApplyEyeMakeup/a.mkv", 12, "libx264")
    make_video(d / "val/Basketball/liar.avi", 10)
    data = bytearray((d / "val/Basketball/liar.avi").read_bytes())  # header claims 1000 frames
    struct.pack_into("<I", data, data.find(b"avih") + 8 + 16, 1000)
    struct.pack_into("<I", data, data.find(b"strh") + 8 + 32, 1000)
    (d / "val/Basketball/liar.avi").write_bytes(bytes(data))
    write(d / "val/Cricket/text.mp4", b"hello, I am a text file\n")
    make_video(d / "test/Cricket/c.mov", 12)
    make_video(d / "test/Diving/d.avi", 12)  # class only present in test
    return top


@pytest.fixture(scope="module")
def converted(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    report = convert(dataset, out, num_frames=4, num_workers=1, progress=False)
    return out, report


def expected_records():
    records = {"train": [], "val": [], "test": []}
    for n, (split, cls, name, _) in enumerate(EXPECTED):
        stem = os.path.splitext(name)[0]
        images = [f"{split}/{cls}/{stem}.{k}.jpg" for k in range(4)]
        records[split].append(
            {
                "id": f"{split}-{n:010d}",
                "source": "ucf101",
                "conversations": [{"images": images, "user": USER, "assistant": cls}],
            }
        )
    return records


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def jsonl_bytes(out):
    return {s: (Path(out) / f"ucf101_{s}.jsonl").read_bytes() for s in ["train", "val", "test"]}


def jpeg_mtimes(out):
    return {p: p.stat().st_mtime_ns for p in sorted((Path(out) / "images").rglob("*.jpg"))}


def test_jsonl_records(converted):
    out, _ = converted
    for split, records in expected_records().items():
        got = read_jsonl(out / f"ucf101_{split}.jsonl")
        assert got == records
        assert all(list(r) == ["id", "source", "conversations"] for r in got)
        assert all(list(r["conversations"][0]) == ["images", "user", "assistant"] for r in got)
    assert sorted(p.name for p in out.glob("*.jsonl")) == [
        "ucf101_test.jsonl",
        "ucf101_train.jsonl",
        "ucf101_val.jsonl",
    ]


def test_frames_picked(converted):
    out, _ = converted
    for split, cls, name, frames in EXPECTED:
        stem = os.path.splitext(name)[0]
        greys = []
        for k in range(4):
            image = Image.open(out / "images" / split / cls / f"{stem}.{k}.jpg")
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 48)
            greys.append(round(float(np.asarray(image).mean()) / 20))
        assert greys == frames, name
    # exactly the JPEGs of converted videos, no temp files left behind
    files = sorted(str(p.relative_to(out / "images")) for p in (out / "images").rglob("*") if p.is_file())
    want = sorted(f"{s}/{c}/{os.path.splitext(n)[0]}.{k}.jpg" for s, c, n, _ in EXPECTED for k in range(4))
    assert files == want


def test_report(converted):
    out, report = converted
    assert report.splits == ["train", "val", "test"]
    assert report.classes == CLASSES
    assert report.converted == {"train": 5, "val": 2, "test": 2}
    assert report.skipped == SKIPPED
    assert report.format().splitlines() == [
        "classes (4): " + ", ".join(CLASSES),
        "train: 5 converted, 2 skipped",
        "val: 2 converted, 1 skipped",
        "test: 2 converted, 0 skipped",
        f"skipped train/Basketball/corrupt.avi: {INVALID}",
        "skipped train/Cricket/empty.mp4: empty file (0 bytes)",
        f"skipped val/Cricket/text.mp4: {INVALID}",
        f"wrote {out}/ucf101_train.jsonl",
        f"wrote {out}/ucf101_val.jsonl",
        f"wrote {out}/ucf101_test.jsonl",
    ]


def test_rerun_is_identical_and_skips_finished_videos(converted, dataset, monkeypatch):
    out, _ = converted
    before, mtimes = jsonl_bytes(out), jpeg_mtimes(out)
    decoded = []
    real = convert_ucf101.read_video_frames

    def spy(path, num_frames):
        decoded.append(os.path.relpath(path, dataset / "UCF101_subset"))
        return real(path, num_frames)

    monkeypatch.setattr(convert_ucf101, "read_video_frames", spy)
    report = convert(dataset, out, num_frames=4, num_workers=1, progress=False)
    assert jsonl_bytes(out) == before
    assert jpeg_mtimes(out) == mtimes
    assert sorted(decoded) == [rel for rel, _ in SKIPPED]  # only the failures are retried
    assert report.skipped == SKIPPED

    # a missing JPEG (e.g. a killed run) makes just that video be redone
    (out / "images/train/Basketball/short.2.jpg").unlink()
    decoded.clear()
    convert(dataset, out, num_frames=4, num_workers=1, progress=False)
    assert "train/Basketball/short.avi" in decoded and len(decoded) == 4
    assert jsonl_bytes(out) == before


def test_strict_fails_without_touching_jsonl(converted, dataset, tmp_path, capsys):
    out, _ = converted
    before = jsonl_bytes(out)
    report = convert(dataset, out, num_frames=4, num_workers=1, strict=True, progress=False)
    assert report.skipped == SKIPPED and report.jsonl == []
    assert jsonl_bytes(out) == before
    # fresh out_dir via the command line: exit 1, no jsonl written
    rc = main(["--video_dir", str(dataset), "--out_dir", str(tmp_path), "--num_frames", "4", "--strict", "--no-tqdm"])
    assert rc == 1
    assert list(tmp_path.glob("*.jsonl")) == []
    err = capsys.readouterr().err
    assert "--strict: 3 video(s) skipped, jsonl files not written" in err


def test_strict_passes_on_clean_data(tmp_path):
    clean = tmp_path / "clean"
    make_video(clean / "train/A/x.avi", 5)
    make_video(clean / "train/B/y.avi", 5)
    report = convert(clean, tmp_path / "out", num_frames=2, num_workers=1, strict=True, progress=False)
    assert report.skipped == [] and len(report.jsonl) == 1
    assert [r["id"] for r in read_jsonl(tmp_path / "out/ucf101_train.jsonl")] == [
        "train-0000000000",
        "train-0000000001",
    ]


def test_same_stem_is_converted_once(tmp_path):
    make_video(tmp_path / "in/train/A/x.avi", 5)
    make_video(tmp_path / "in/train/A/x.mp4", 5)
    report = convert(tmp_path / "in", tmp_path / "out", num_frames=2, num_workers=1, progress=False)
    assert report.converted == {"train": 1}
    assert report.skipped == [("train/A/x.mp4", "same name without extension as train/A/x.avi")]


def test_split_order_and_root_detection(dataset):
    assert convert_ucf101.split_order(["zz", "test", "extra", "train", "val"]) == [
        "train",
        "val",
        "test",
        "extra",
        "zz",
    ]
    root = str(dataset / "UCF101_subset")
    assert convert_ucf101.find_root(str(dataset)) == root  # single top folder is followed
    assert convert_ucf101.find_root(root) == root


@pytest.mark.parametrize(
    "args, message",
    [
        (["--video_dir", "/does/not/exist"], "is not a folder"),
        (["--video_dir", "{empty}"], "no videos found"),
        (["--archive", "/does/not/exist.tar.gz"], "is not a file"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "empty/train/A").mkdir(parents=True)
    args = [a.replace("{empty}", str(tmp_path / "empty")) for a in args]
    with pytest.raises(SystemExit) as e:
        main(args + ["--out_dir", str(tmp_path / "out"), "--no-tqdm"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"{os.path.basename(sys.argv[0])}: error: ")


@pytest.mark.parametrize(
    "args", [["--num_frames", "0"], ["--num_workers", "0"], ["--video_dir", "a", "--archive", "b"]]
)
def test_bad_arguments_exit_2(tmp_path, args):
    with pytest.raises(SystemExit) as e:
        main(args + ["--out_dir", str(tmp_path)])
    assert e.value.code == 2


def test_download_failure_points_to_local_options(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(SystemExit) as e:
        main(["--out_dir", str(tmp_path), "--no-tqdm"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "could not download sayakpaul/ucf101-subset" in err and "--archive" in err and "--video_dir" in err


def test_num_frames_change_needs_new_out_dir(converted, dataset, capsys):
    out, _ = converted
    with pytest.raises(SystemExit) as e:
        main(["--video_dir", str(dataset), "--out_dir", str(out), "--num_frames", "8", "--no-tqdm"])
    assert e.value.code == 2 and "--num_frames 4" in str(e.value)
    assert "--num_frames 4" in capsys.readouterr().err


def test_unsafe_archive_is_rejected(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../evil.avi")
        tar.addfile(info)
    with pytest.raises(InputError, match="unsafe path"):
        convert_ucf101.extract_archive(str(archive), str(tmp_path / "out/_videos"))
    assert not (tmp_path / "evil.avi").exists() and os.listdir(tmp_path / "out") == []


def run_script(*args):
    cmd = [sys.executable, str(REPO / "convert_ucf101.py"), *map(str, args), "--num_frames", "4", "--no-tqdm"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_script_with_two_workers_matches_in_process_run(converted, dataset, tmp_path):
    out, report = converted
    proc = run_script("--video_dir", dataset, "--out_dir", tmp_path, "--num_workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == report.format().replace(str(out), str(tmp_path)) + "\n"
    assert jsonl_bytes(tmp_path) == jsonl_bytes(out)  # same output whatever the worker count


def test_script_with_archive(converted, dataset, tmp_path):
    out, _ = converted
    archive = tmp_path / "UCF101_subset.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(dataset / "UCF101_subset", arcname="UCF101_subset")
    proc = run_script("--archive", archive, "--out_dir", tmp_path / "out", "--num_workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "train: 5 converted, 2 skipped" in proc.stdout
    assert jsonl_bytes(tmp_path / "out") == jsonl_bytes(out)
    assert (tmp_path / "out/_videos/UCF101_subset/train/Basketball/short.avi").exists()


def test_converted_folder_trains_with_the_ucf101_recipe(converted, tiny_checkpoint, tmp_path):
    """The converter's output is what finetune_hf_trainer_ucf101.py reads: a few steps train, and it evaluates."""
    data_dir, _ = converted
    out_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "finetune_hf_trainer_ucf101.py"),
         "--model_name_or_path", tiny_checkpoint, "--data_dir", str(data_dir), "--output_dir", str(out_dir),
         "--num_crops", "1", "--max_steps", "2", "--batch_size", "2", "--batch_size_per_gpu", "2",
         "--max_eval_samples", "2", "--eval_batch_size", "2", "--max_new_tokens", "3", "--save_strategy", "no",
         "--report_to", "none", "--dataloader_num_workers", "0", "--no-tqdm", "--deepspeed", "none"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    after = json.loads((out_dir / "eval_after.json").read_text())
    assert after["num_samples"] == 2 and "accuracy" in after
    eval_file = data_dir / "ucf101_test.jsonl"
    golds = [r["conversations"][0]["assistant"] for r in read_jsonl(eval_file)[:2]]
    assert [p["answer"] for p in after["predictions"]] == golds
    assert (out_dir / "eval_before.json").is_file() and (out_dir / "model.safetensors").is_file()

"""Convert the UCF101 subset (videos in {split}/{ClassName}/{video}) into phi3v training data.

    python convert_ucf101.py --out_dir /path/to/converted_ucf101

Each video becomes --num_frames JPEG frames and one classification example:

    out_dir/images/{split}/{ClassName}/{video_stem}.{k}.jpg     k = 0 .. num_frames-1
    out_dir/ucf101_{split}.jsonl
        {"id": "train-0000000000", "source": "ucf101", "conversations": [{"images": [...],
         "user": "Classify the video into one of the following classes: A, B, C.",
         "assistant": "ClassName"}]}

Frames come from phi3v.video.read_video_frames: the centre frame of each of num_frames equal
segments of the whole video; a video with fewer frames than that repeats frames in order
(3 frames, 8 wanted -> 0 0 0 1 1 2 2 2). Videos that cannot be read are skipped and listed in
the final report (--strict turns any skip into a failure). Ids number converted videos only,
counting across splits in the order train, val, test, then other splits by name, and within a
split by (class, file name), so ids are dense and do not depend on --num_workers.

Re-running into the same out_dir is cheap: a video whose JPEGs all exist is not decoded again,
and the jsonl files come out byte-identical.
"""

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from phi3v.errors import InputError, exit_with_error  # a user mistake: one line, exit status 2
from phi3v.video import VideoError, read_video_frames

VIDEO_EXTS = {".avi", ".mp4", ".mkv", ".webm", ".mov"}  # compared lower-cased
SPLIT_ORDER = ["train", "val", "test"]  # other splits follow, sorted by name
STATE_FILE = ".convert_ucf101.json"  # remembers --num_frames of the frames in out_dir
JPEG_QUALITY = 95


# -----------------------------------------------------------------------------
# inputs: archive / folder -> sorted list of videos


def is_video(name):
    return os.path.splitext(name)[1].lower() in VIDEO_EXTS


def _subdirs(path):
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def find_root(video_dir):
    """The folder holding {split}/{ClassName}/{video}: `video_dir` itself, or the single top
    folder an archive extracts to (UCF101_subset/), followed down as long as it is alone."""
    if not os.path.isdir(video_dir):
        raise InputError(f"--video_dir {video_dir!r} is not a folder")
    root = video_dir
    while True:
        has_videos = any(
            is_video(f)
            for split in _subdirs(root)
            for cls in _subdirs(os.path.join(root, split))
            for f in os.listdir(os.path.join(root, split, cls))
        )
        if has_videos:
            return root
        subdirs = _subdirs(root)
        if len(subdirs) != 1:
            raise InputError(f"no videos found in {video_dir!r} (expected {{split}}/{{ClassName}}/{{video}})")
        root = os.path.join(root, subdirs[0])


def split_order(splits):
    """train, val, test first (those present), then any other splits sorted by name."""
    known = [s for s in SPLIT_ORDER if s in splits]
    return known + sorted(s for s in splits if s not in SPLIT_ORDER)


def list_videos(root):
    """Returns (splits, classes, videos): splits in id order, sorted class names (union over
    splits), and videos[split] = [(class, file name), ...] sorted by (class, file name)."""
    splits = split_order(_subdirs(root))
    classes = sorted({c for s in splits for c in _subdirs(os.path.join(root, s))})
    videos = {}
    for split in splits:
        videos[split] = [
            (cls, name)
            for cls in _subdirs(os.path.join(root, split))
            for name in sorted(os.listdir(os.path.join(root, split, cls)))
            if is_video(name) and os.path.isfile(os.path.join(root, split, cls, name))
        ]
    if not any(videos.values()):
        raise InputError(f"no videos found in {root!r} (expected {{split}}/{{ClassName}}/{{video}})")
    return splits, classes, videos


def _safe_members(tar, dest):
    """Members of `tar`, refusing absolute paths, '..' and links that leave `dest`."""
    dest = os.path.realpath(dest)
    for member in tar.getmembers():
        target = os.path.realpath(os.path.join(dest, member.name))
        if os.path.isabs(member.name) or ".." in member.name.split("/") or not target.startswith(dest + os.sep):
            raise InputError(f"unsafe path {member.name!r} in archive, refusing to extract")
        if member.issym() or member.islnk():
            raise InputError(f"link {member.name!r} in archive, refusing to extract")
        yield member


def extract_archive(archive, dest):
    """Extract `archive` into `dest` once; a finished extraction is reused on re-runs.
    Extracts into a temp folder next to `dest` and renames it, so a killed run leaves no
    half-extracted `dest`."""
    if os.path.isdir(dest):
        return dest
    if not os.path.isfile(archive):
        raise InputError(f"--archive {archive!r} is not a file")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=os.path.dirname(dest))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, members=_safe_members(tar, tmp), filter="data")
    except (tarfile.TarError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"cannot extract {archive!r}: {e}") from e
    except InputError:  # unsafe member
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, dest)
    return dest


def download_archive():
    """Fetch UCF101_subset.tar.gz from the Hugging Face Hub (needs network)."""
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id="sayakpaul/ucf101-subset", filename="UCF101_subset.tar.gz", repo_type="dataset")
    except Exception as e:
        raise InputError(
            f"could not download sayakpaul/ucf101-subset ({type(e).__name__}: {e}); "
            "pass --archive PATH/UCF101_subset.tar.gz or --video_dir DIR instead"
        ) from e


# -----------------------------------------------------------------------------
# conversion


def frame_paths(stem, num_frames):
    return [f"{stem}.{k}.jpg" for k in range(num_frames)]


def is_done(image_dir, stem, num_frames):
    return all(os.path.exists(os.path.join(image_dir, p)) for p in frame_paths(stem, num_frames))


def convert_video(job):
    """Worker: decode one video and save its frames. Returns None on success, else the reason.
    Each JPEG is written under a temp name and renamed, so a killed run never leaves a
    truncated JPEG that a re-run would count as done."""
    src, image_dir, stem, num_frames = job
    try:
        frames = read_video_frames(src, num_frames)
    except VideoError as e:
        return e.reason
    os.makedirs(os.path.dirname(os.path.join(image_dir, stem)), exist_ok=True)
    for frame, rel in zip(frames, frame_paths(stem, num_frames)):
        path = os.path.join(image_dir, rel)
        tmp = f"{path}.tmp{os.getpid()}"
        frame.save(tmp, format="JPEG", quality=JPEG_QUALITY)
        os.replace(tmp, path)
    return None


def run_jobs(jobs, num_workers):
    """Yields convert_video(job) for each job, in job order (so output never depends on timing)."""
    if num_workers == 1:
        yield from map(convert_video, jobs)  # in-process: simpler to debug and profile
        return
    with ProcessPoolExecutor(num_workers) as pool:
        yield from pool.map(convert_video, jobs, chunksize=1)


@dataclass
class Report:
    splits: list  # in id order
    classes: list
    converted: dict  # split -> number of videos converted
    skipped: list = field(default_factory=list)  # [(split/Class/file, reason)], sorted
    jsonl: list = field(default_factory=list)  # paths written (empty on --strict failure)

    def format(self):
        lines = [f"classes ({len(self.classes)}): {', '.join(self.classes)}"]
        for split in self.splits:
            n_skip = sum(1 for rel, _ in self.skipped if rel.split("/", 1)[0] == split)
            lines.append(f"{split}: {self.converted[split]} converted, {n_skip} skipped")
        for rel, reason in self.skipped:
            lines.append(f"skipped {rel}: {reason}")
        for path in self.jsonl:
            lines.append(f"wrote {path}")
        return "\n".join(lines)


def _write_atomic(path, text):
    """Write `text` to `path` via a temp file in the same folder + os.replace: never half-written."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def _check_state(out_dir, num_frames):
    """Frames already in out_dir only count as done if they were sampled with the same
    --num_frames (frame k of 8 is not frame k of 4)."""
    path = os.path.join(out_dir, STATE_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)["num_frames"]
        if old != num_frames:
            raise InputError(f"{out_dir!r} holds frames made with --num_frames {old}; use a new --out_dir")
    else:
        _write_atomic(path, json.dumps({"num_frames": num_frames}) + "\n")


def convert(video_dir, out_dir, num_frames=8, num_workers=None, strict=False, progress=True):
    """Convert the videos under `video_dir` into `out_dir`; returns a Report.

    With strict=True any skipped video means no jsonl is written (existing ones are kept);
    check `report.skipped`.
    """
    root = find_root(video_dir)
    splits, classes, videos = list_videos(root)
    os.makedirs(out_dir, exist_ok=True)
    _check_state(out_dir, num_frames)
    image_dir = os.path.join(out_dir, "images")

    # One job per video, in id order. A stem shared by two files (a.avi, a.mp4) would share
    # JPEG names, so only the first one is kept.
    items, skipped, seen = [], [], {}
    for split in splits:
        for cls, name in videos[split]:
            rel = f"{split}/{cls}/{name}"
            stem = f"{split}/{cls}/{os.path.splitext(name)[0]}"
            if stem in seen:
                skipped.append((rel, f"same name without extension as {seen[stem]}"))
                continue
            seen[stem] = rel
            items.append((split, cls, rel, stem))

    # Finished videos are not sent to the workers at all.
    todo = [it for it in items if not is_done(image_dir, it[3], num_frames)]
    jobs = [(os.path.join(root, it[2]), image_dir, it[3], num_frames) for it in todo]
    num_workers = min(num_workers or os.cpu_count() or 1, max(len(jobs), 1))
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="videos", unit="video", disable=not progress)
    failed = {}
    for it, reason in zip(todo, run_jobs(jobs, num_workers)):
        if reason is not None:
            failed[it[2]] = reason
        bar.update(1)
    bar.close()

    # Records in id order; n counts converted videos only, across splits.
    user = f"Classify the video into one of the following classes: {', '.join(classes)}."
    lines = {split: [] for split in splits}
    converted = {split: 0 for split in splits}
    n = 0
    for split, cls, rel, stem in items:
        if rel in failed:
            skipped.append((rel, failed[rel]))
            continue
        record = {
            "id": f"{split}-{n:010d}",
            "source": "ucf101",
            "conversations": [{"images": frame_paths(stem, num_frames), "user": user, "assistant": cls}],
        }
        lines[split].append(json.dumps(record, ensure_ascii=False) + "\n")
        converted[split] += 1
        n += 1
    skipped.sort()
    report = Report(splits=splits, classes=classes, converted=converted, skipped=skipped)

    if strict and skipped:
        return report
    for split in splits:
        path = os.path.join(out_dir, f"ucf101_{split}.jsonl")
        _write_atomic(path, "".join(lines[split]))
        report.jsonl.append(path)
    return report


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert UCF101 videos ({split}/{ClassName}/{video}) to JPEG frames + ucf101_{split}.jsonl.",
        allow_abbrev=False,
    )
    parser.add_argument("--out_dir", required=True, help="output folder (images/ and ucf101_{split}.jsonl)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--archive", help="local UCF101_subset.tar.gz (default: download it from the HF Hub)")
    source.add_argument("--video_dir", help="already extracted folder laid out {split}/{ClassName}/{video}")
    parser.add_argument(
        "--num_frames", type=int, default=8,
        help="frames per video: the centre frame of each of num_frames equal segments of the whole video; "
        "shorter videos repeat frames in order (3 frames, 8 wanted -> 0 0 0 1 1 2 2 2) (default: 8)",
    )
    parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1,
                        help="decoding processes (default: all cores)")
    parser.add_argument("--strict", action="store_true", help="fail (exit 1, no jsonl written) if any video is skipped")
    parser.add_argument("--no-tqdm", dest="progress", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)
    if args.num_frames < 1:
        parser.error("--num_frames must be >= 1")
    if args.num_workers < 1:
        parser.error("--num_workers must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.video_dir is not None:
            video_dir = args.video_dir
        else:
            archive = args.archive if args.archive is not None else download_archive()
            video_dir = extract_archive(archive, os.path.join(args.out_dir, "_videos"))
        report = convert(video_dir, args.out_dir, args.num_frames, args.num_workers, args.strict, args.progress)
    except InputError as e:
        exit_with_error(e)
    print(report.format())
    if args.strict and report.skipped:
        print(f"--strict: {len(report.skipped)} video(s) skipped, jsonl files not written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/bench_data.py in its small mode: a real jsonl + PNG data set on disk, read through the recipes' data
path (SFTDataset + Phi3VDataCollator in a DataLoader) with 0 and the default number of workers, and a JSON report
whose counts match the data set."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from docvqa_pages import PAGE_SIZES  # noqa: E402

SAMPLES = 6  # --small: one cycle of the page sizes


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_data")
    output, data_dir = tmp / "r.json", tmp / "data"
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_data.py"), "--small",
               "--data_dir", str(data_dir), "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(output) as f:
        return json.load(f), done.stdout, data_dir


def test_device_versions_command_and_settings(bench):
    report, _, _ = bench
    assert report["device"] and report["cores"] == os.cpu_count() and report["usable_cores"] >= 1
    for package in ("torch", "transformers", "pillow", "numpy", "tokenizers"):
        assert report["versions"][package]
    assert "--small" in report["command"]
    settings = report["settings"]
    # The recipes' defaults, read from their parser: DocVQA's num_crops 16, one sample per GPU.
    assert settings["num_crops"] == 16 and settings["batch_size_per_gpu"] == 1
    assert settings["image_format"] == "png" and settings["samples"] == SAMPLES


def test_default_and_no_workers_measured_with_matching_counts(bench):
    from phi3v.arguments import default_dataloader_workers

    report, _, _ = bench
    default = default_dataloader_workers()
    assert report["default_workers"] == default
    assert [row["workers"] for row in report["loader"]] == sorted({0, default})
    for row in report["loader"]:
        # Batch 1, one page a sample: every sample of the data set once, as one batch and one image each.
        assert row["samples"] == row["images"] == row["batches"] == report["data_set"]["samples"] == SAMPLES
        assert row["seconds"] > 0 and row["first_batch_seconds"] > 0
        assert row["samples_per_second"] == pytest.approx(row["samples"] / row["seconds"])
        assert row["images_per_second"] == pytest.approx(row["images"] / row["seconds"])
        assert row["steady_samples_per_second"] > 0
    default_row = next(row for row in report["loader"] if row["workers"] == default)
    required = report["settings"]["factor"] * report["settings"]["gpu_rate"]
    assert report["required_samples_per_second"] == pytest.approx(required)
    assert report["meets_target"] == (default_row["samples_per_second"] >= required)


def test_stages_timed_over_every_sample(bench):
    report, _, _ = bench
    stages = report["stages"]
    assert stages["samples"] == stages["images"] == SAMPLES and stages["threads"] == 1
    for stage in ("decode", "hd_transform", "tokenize", "collate", "dataset_item"):
        for kind in ("", "_median", "_cpu"):  # mean and median wall time, mean CPU time
            assert stages[f"{stage}{kind}_ms"] > 0
    for kind in ("", "_median", "_cpu"):
        parts = sum(stages[f"{stage}{kind}_ms"] for stage in ("decode", "hd_transform", "tokenize", "collate"))
        assert stages[f"sum_of_stages{kind}_ms"] == pytest.approx(parts)
    # The image work dominates: decoding and the HD transform of a full page cost more than tokenizing its text.
    assert stages["hd_transform_cpu_ms"] > stages["tokenize_cpu_ms"]
    # DocVQA-shaped at num_crops 16: ~2440 tokens a sample, as bench_train.py reports for the same pages.
    assert 2300 < report["data_set"]["mean_tokens_per_sample"] < 2600


def test_data_set_is_a_real_jsonl_with_png_pages(bench):
    from phi3v.records import load_records

    _, _, data_dir = bench
    records = load_records(data_dir / "train.jsonl")
    assert len(records) == SAMPLES
    for index, record in enumerate(records):
        (path,) = record["images"]
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == PAGE_SIZES[index % len(PAGE_SIZES)]
        assert record["messages"][0]["content"].startswith("<|image_1|>\n")


def test_table_printed(bench):
    _, stdout, _ = bench
    header = next(line for line in stdout.splitlines() if line.lstrip().startswith("workers"))
    for column in ("samples/s", "images/s", "steady/s", "first s", "vs GPU"):
        assert column in header
    assert "<- default" in stdout
    for row in ("wall, mean", "wall, median", "CPU time, mean"):
        assert any(line.startswith(row) for line in stdout.splitlines())

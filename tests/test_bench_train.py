"""benchmarks/bench_train.py end to end on the CPU with the tiny model: the recipe's code path for two strategies
and the stock baseline, a row each in the JSON, and the baseline doing the same work as the optimized path."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_train")
    output = tmp / "r.json"
    command = [
        sys.executable, os.path.join(ROOT, "benchmarks", "bench_train.py"), "--small", "--steps", "2", "--warmup", "1",
        "--strategies", "full,lora", "--output", str(output), "--work_dir", str(tmp / "work"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(output) as f:
        return json.load(f), done.stdout


def test_a_row_per_strategy_and_the_baseline(bench):
    report, _ = bench
    rows = {row["name"]: row for row in report["results"]}
    assert set(rows) == {"full", "lora", "stock"}
    for row in rows.values():
        assert row["images_per_second"] > 0 and row["tokens_per_second"] > 0
        assert row["mfu"] > 0 and row["peak_memory_gb"] > 0
        assert row["measured_steps"] == 2
        # On a CPU the step is always broken down.
        assert row["vision_ms"] > 0 and row["language_ms"] > 0 and row["optimizer_ms"] > 0
    assert rows["stock"]["attention"] == "eager" and rows["full"]["attention"] == "sdpa"
    assert rows["lora"]["trainable_parameters"] < rows["full"]["trainable_parameters"]


def test_device_versions_and_command_recorded(bench):
    report, _ = bench
    assert report["device"].startswith("CPU")
    assert report["versions"]["torch"] and report["versions"]["transformers"]
    assert "--strategies full,lora" in report["command"]
    # DocVQA-shaped samples at num_crops 16: ~2440 tokens each.
    assert 2300 < report["mean_tokens_per_sample"] < 2600


def test_table_printed(bench):
    _, stdout = bench
    assert "tokens a sample on average" in stdout
    header = next(line for line in stdout.splitlines() if line.startswith("run "))
    for column in ("img/s", "tokens/s", "MFU", "peak GB", "vision ms", "lang ms", "optim ms"):
        assert column in header
    for name in ("full", "lora", "stock"):
        assert any(line.startswith(name + " ") for line in stdout.splitlines())


def test_baseline_computes_the_same_loss(bench):
    """Same seed, same first batch: the stock path (eager attention, full logits, CLIP on padding crops) and the
    optimized one must agree on the loss, so that the speed comparison is between equal work."""
    report, _ = bench
    rows = {row["name"]: row for row in report["results"]}
    assert rows["stock"]["first_loss"] == pytest.approx(rows["full"]["first_loss"], abs=1e-5)
    assert rows["lora"]["first_loss"] == pytest.approx(rows["full"]["first_loss"], abs=1e-5)  # LoRA B starts at 0

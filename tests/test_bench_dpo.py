"""benchmarks/bench_dpo.py end to end on the CPU with the tiny model: both layouts through the DPO recipe's code path,
taking turns, a row each in the JSON, the same first-batch log-probabilities in both, and the profile's shares."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, WARMUP = 2, 1


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_dpo")
    output = tmp / "r.json"
    command = [
        sys.executable, os.path.join(ROOT, "benchmarks", "bench_dpo.py"), "--size", "tiny", "--num_crops", "1",
        "--steps", str(STEPS), "--warmup", str(WARMUP), "--profile", "--output", str(output),
        "--work_dir", str(tmp / "work"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(output) as f:
        return json.load(f), done.stdout


def test_a_row_per_layout_measured_in_turns(bench):
    report, _ = bench
    rows = {row["layout"]: row for row in report["results"]}
    assert set(rows) == {"shared", "two_sequence"}
    for row in rows.values():
        # warm-up and measured turns; the profiled step is kept apart
        assert len(row["turns"]) == WARMUP + STEPS and row["measured_turns"] == STEPS
        assert all(turn["turn"] >= turn["step"] > 0 and turn["turn_cpu"] > 0 for turn in row["turns"])
        assert row["pairs_per_second"] == pytest.approx(1 / row["median_turn_seconds"])
        assert row["peak_memory_gb"] > 0 and row["attention"] == "sdpa"
        assert 0 < row["trainable_parameters"] < row["parameters"]  # LoRA, the default strategy
        shares = row["profile"]
        assert shares["matrix_products"] > 0 and shares["other_aten_ops"] > 0
        assert shares["matrix_products"] + shares["other_aten_ops"] + shares["outside_aten"] == pytest.approx(1)
    summary = report["summary"]
    assert summary["speedup"] == pytest.approx(rows["shared"]["pairs_per_second"]
                                               / rows["two_sequence"]["pairs_per_second"])
    assert summary["median_turn_ratio"] > 0 and summary["cpu_time_ratio"] > 0 and summary["memory_ratio"] > 0


def test_both_layouts_train_on_the_same_pairs(bench):
    """Same checkpoint, seed and pairs in the same order: the first batch's log-probabilities agree, so the two
    layouts do the same useful work (the shared row runs the prompt once instead of twice)."""
    report, _ = bench
    rows = {row["layout"]: row for row in report["results"]}
    for key in ("logps/chosen", "logps/rejected"):
        assert rows["shared"]["first_batch"][key] == pytest.approx(rows["two_sequence"]["first_batch"][key],
                                                                    abs=1e-4)
    assert report["summary"]["first_batch_max_difference"] < 1e-4
    pairs = report["pairs"]
    assert pairs["measured_pairs"] == STEPS  # one pair a turn
    # one row of prompt + both answers, against two rows of prompt + the longer answer
    tokens = pairs["tokens_per_pair"]
    assert tokens["shared"] == pytest.approx(pairs["prompt_tokens"] + 2 * pairs["answer_tokens"])
    assert tokens["two_sequence"] >= 2 * pairs["prompt_tokens"] + 2 * pairs["answer_tokens"]


def test_settings_and_table_recorded(bench):
    report, stdout = bench
    assert report["device"].startswith("CPU") and report["versions"]["torch"]
    assert "--size tiny" in report["command"] and report["settings"]["strategy"] == "lora"
    header = next(line for line in stdout.splitlines() if line.startswith("layout "))
    for column in ("pairs/s", "turn s", "step s", "CPU s", "peak GB", "matmul", "python"):
        assert column in header
    assert "shared / two-sequence:" in stdout and "CPU time a pair" in stdout

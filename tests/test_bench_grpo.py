"""benchmarks/bench_grpo.py end to end on the CPU with the tiny model: both layouts through the GRPO recipe's code
path, taking turns, a row each in the JSON, the same first-step completions, loss and log-probabilities in both, and
the settings recorded."""

import contextlib
import io
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, WARMUP, G, LENGTH = 1, 1, 4, 3


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The benchmark's main in this process (its layouts run in worker processes): the report and what it printed."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_grpo

    tmp = tmp_path_factory.mktemp("bench_grpo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        bench_grpo.main(["--size", "tiny", "--num_crops", "1", "--steps", str(STEPS), "--warmup", str(WARMUP),
                         "--num_generations", str(G), "--max_completion_length", str(LENGTH), "--no-profile",
                         "--output", str(tmp / "r.json"), "--work_dir", str(tmp / "work")])
    return json.loads((tmp / "r.json").read_text()), printed.getvalue()


def test_a_row_per_layout_measured_in_turns(bench):
    report, _ = bench
    shared, repeated = report["results"]
    assert (shared["layout"], repeated["layout"]) == ("shared", "repeated")
    for row in (shared, repeated):
        turns = row["turns"]
        assert (len(turns), row["measured_turns"]) == (WARMUP + STEPS, STEPS)
        assert min(t["turn"] - t["step"] for t in turns) >= 0 and min(t["turn_cpu"] for t in turns) > 0
        assert row["groups_per_second"] == pytest.approx(1 / row["median_turn_seconds"])
        assert row["profile"] is None and row["attention"] == "sdpa" and row["peak_memory_gb"] > 0
        assert 0 < row["trainable_parameters"] < row["parameters"]  # LoRA, the default strategy
    summary = report["summary"]
    assert summary["speedup"] == pytest.approx(shared["groups_per_second"] / repeated["groups_per_second"])
    assert min(summary[key] for key in ("median_turn_ratio", "cpu_time_ratio", "memory_ratio")) > 0


def test_both_layouts_sample_the_same_completions(bench):
    """Same checkpoint, seed and prompt: the first step samples the same G answers in both layouts (one prefill
    and a copied cache, or the prompt repeated G times) and gets the same loss and token log-probabilities."""
    report, _ = bench
    shared, repeated = (row["first_batch"] for row in report["results"])
    assert shared["completions"] == repeated["completions"]
    assert len(shared["completions"]) == 1 and len(shared["completions"][0]) == G
    assert len(shared["token_log_probs"]) == sum(len(c) for c in shared["completions"][0])
    assert shared["token_log_probs"] == pytest.approx(repeated["token_log_probs"], abs=1e-4)
    summary = report["summary"]
    assert summary["first_step_same_completions"] and summary["first_step_max_log_prob_difference"] < 1e-4
    assert summary["first_step_loss_difference"] < 1e-5


def test_settings_and_table_recorded(bench):
    report, stdout = bench
    assert report["device"].startswith("CPU") and report["versions"]["torch"]
    assert "--size tiny" in report["command"]
    settings = report["settings"]
    assert (settings["strategy"], settings["num_generations"], settings["max_completion_length"]) == ("lora", G, LENGTH)
    assert report["prompts"]["measured_prompts"] == STEPS and report["prompts"]["prompt_tokens"] > 100
    header = next(line for line in stdout.splitlines() if line.startswith("layout "))
    for column in ("groups/s", "turn s", "step s", "CPU s", "peak GB", "matmul", "python"):
        assert column in header
    assert "shared / repeated:" in stdout and "CPU time a group" in stdout

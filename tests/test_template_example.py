"""The README's worked example of a new task (examples/finetune_hf_trainer_shapes.py, a copy of a recipe) trains."""

import json
import os
import subprocess
import sys

from phi3v.synthetic import shapes_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fifth_task_made_from_a_copy_trains_and_learns(tiny_checkpoint, tmp_path):
    data = shapes_dataset(str(tmp_path / "shapes"), train=128, test=16)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "finetune_hf_trainer_shapes.py"),
         "--model_name_or_path", tiny_checkpoint, "--dataset_path", data, "--output_dir", str(out),
         "--num_crops", "1", "--batch_size", "8", "--batch_size_per_gpu", "8", "--num_train_epochs", "5",
         "--learning_rate", "2e-3", "--warmup_steps", "4", "--logging_steps", "4", "--eval_batch_size", "16",
         "--max_new_tokens", "3", "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0",
         "--no-tqdm", "--deepspeed", "none", "--seed", "0"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before = json.loads((out / "eval_before.json").read_text())["accuracy"]
    after = json.loads((out / "eval_after.json").read_text())["accuracy"]
    print(f"shapes example: accuracy {before:.3f} -> {after:.3f}")
    assert after > before and after >= 0.75
    for name in ("training_curves.png", "eval_comparison.png", "confusion_matrix.png", "run_config.json"):
        assert (out / name).is_file(), name

"""Offline demo: a complete fine-tuning run on a CPU, no network, in a few minutes.

It writes a tiny random Phi-3-V checkpoint (official layout, real tokenizer) and a synthetic Hateful-Memes-shaped
data set (a red disc means "yes", a blue square "no"), then runs the real recipe,
finetune_hf_trainer_hateful_memes.py, on them: only the model path and the data differ from a real run.
Accuracy is printed before training, at each evaluation during training (every 5 steps: --eval_steps) and after
training; after must be far above before. The run's eval_curve.png draws the evaluations.

    python demo.py [--out_dir demo_output]
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--out_dir", default="demo_output")
    parser.add_argument("--train_samples", type=int, default=320)
    parser.add_argument("--eval_samples", type=int, default=64)
    parser.add_argument("--eval_steps", type=int, default=5, help="evaluate every N training steps")
    args = parser.parse_args()
    start = time.time()

    from phi3v.synthetic import memes_rows, save_hf_dataset
    from phi3v.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(os.path.join(args.out_dir, "tiny-phi3v"), num_crops=1)
    # The recipe evaluates on train[:500] and trains on train[500:], as the original.
    data_dir = save_hf_dataset(memes_rows(500 + args.train_samples), os.path.join(args.out_dir, "memes"))
    run_dir = os.path.join(args.out_dir, "run")
    command = [
        sys.executable, os.path.join(HERE, "finetune_hf_trainer_hateful_memes.py"),
        "--model_name_or_path", model_dir,
        "--dataset_path", data_dir,
        "--output_dir", run_dir, "--overwrite_output_dir",
        "--num_crops", "1",
        "--batch_size", "8", "--batch_size_per_gpu", "8",
        "--learning_rate", "2e-3", "--warmup_steps", "10", "--num_train_epochs", "3",
        "--max_eval_samples", str(args.eval_samples), "--eval_batch_size", "16", "--max_new_tokens", "4",
        "--eval_steps", str(args.eval_steps),  # the task's metric during training: eval_step_<N>.json
        "--save_strategy", "no", "--report_to", "none", "--logging_steps", "10",
        "--dataloader_num_workers", "1", "--seed", "0",
    ]
    print("running:", " ".join(command), flush=True)
    status = subprocess.run(command, cwd=HERE).returncode
    if status:  # the recipe has printed why (one line for a user error, phi3v.errors): no traceback of ours on top
        sys.exit(status)

    def accuracy(name):
        with open(os.path.join(run_dir, f"{name}.json")) as f:
            return json.load(f)["accuracy"]

    steps = sorted(int(name[len("eval_step_"):-len(".json")]) for name in os.listdir(run_dir)
                   if name.startswith("eval_step_") and name.endswith(".json"))
    print(f"\naccuracy before fine-tuning: {accuracy('eval_before'):.3f}")
    print("accuracy during fine-tuning: " + ", ".join(f"{accuracy(f'eval_step_{s}'):.3f} (step {s})" for s in steps))
    print(f"accuracy after fine-tuning:  {accuracy('eval_after'):.3f}")
    print(f"demo finished in {time.time() - start:.0f} s; outputs in {run_dir} (eval_curve.png: the evaluations)")


if __name__ == "__main__":
    main()

"""Offline GRPO demo: reinforcement fine-tuning on a CPU, no network, in a few minutes.

It writes the tiny random Phi-3-V checkpoint (as demo.py) and the synthetic Hateful-Memes-shaped data (a red disc
means "yes", a blue square "no"; 128 training memes, 64 of the held-out ones evaluated), then runs two real recipes on
them; only the model path and the data differ from a real run:

1. SFT on shuffled labels (finetune_hf_trainer_hateful_memes.py, 64 steps of 8): a copy of the data whose training
   answers are permuted among the training memes (the held-out memes keep their true answers), so the model learns
   the answer's form, "yes" or "no", and nothing of the image: it answers in the right form, at chance. It must also
   sample in that form: after a shorter SFT the greedy answer is already "yes"/"no", but the sampling distribution
   is still flat over the whole vocabulary, every sampled answer noise and every reward 0.
2. GRPO (finetune_hf_trainer_grpo.py --task finetune_hf_trainer_hateful_memes.py) from that model on the true data:
   for each meme it samples a group of 8 answers (temperature 1.0), scores them with the task's accuracy
   (accuracy_reward) and with the reward function of a user file written here (yes_no_reward: 1 for an answer that
   is exactly a class word; weight 0.5), and moves the policy towards the better answers of each group: 4 memes a
   step (--batch_size 32 counts answers), learning rate 2e-3, 100 steps, evaluated every 20.

Printed: the SFT model's held-out accuracy and the share of its answers that are exactly "yes" or "no", GRPO's
accuracy before, during and after on the same held-out memes (the task recipe's evaluation split), and the GRPO
run's logs (trainer_state.json of its last checkpoint): the reward, each function's mean, the spread within groups.

    python demo_grpo.py [--out_dir demo_output]
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EVAL_SIZE = 500  # the memes recipe evaluates on train[:500] (here: --eval_samples of them) and trains on the rest
TRAIN_SIZE = 128  # training memes
GRPO_STEPS = 100
LOG_WINDOW = 5  # logged steps averaged at the start and at the end

# The user's reward file (--reward_funcs accuracy_reward <this file>): every function named *_reward is a reward
REWARD_FILE = '''"""The demo's reward: the answer's form (phi3v/rewards.py calls every function named *_reward)."""

CLASSES = ("yes", "no")


def yes_no_reward(completions, answers, records):
    """1.0 for an answer that is exactly a class word, else 0.0 (one float per answer). Answers come decoded without
    their stop token, so one that runs on after the word ("no\\n\\n", cut at --max_completion_length) gets 0."""
    return [1.0 if c in CLASSES else 0.0 for c in completions]
'''


def shuffled_copy(rows, seed=0):
    """The rows with the training rows' answers permuted among them (the first EVAL_SIZE, held out, keep theirs)."""
    answers = [row["texts"][0]["assistant"] for row in rows[EVAL_SIZE:]]
    random.Random(seed).shuffle(answers)
    out = rows[:EVAL_SIZE]
    for row, answer in zip(rows[EVAL_SIZE:], answers):
        out.append({**row, "texts": [{**row["texts"][0], "assistant": answer}]})
    return out


def run(command):
    print("running:", " ".join(command), flush=True)
    status = subprocess.run(command, cwd=HERE).returncode
    if status:  # the recipe has printed why (one line for a user error, phi3v.errors): no traceback of ours on top
        sys.exit(status)


def report(run_dir, name):
    with open(os.path.join(run_dir, f"{name}.json")) as f:
        return json.load(f)


def exact_form(report_json):
    """The share of answers that are exactly "yes" or "no"."""
    predictions = [p["prediction"].strip().lower() for p in report_json["predictions"]]
    return sum(p in ("yes", "no") for p in predictions) / len(predictions)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--out_dir", default="demo_output")
    parser.add_argument("--eval_samples", type=int, default=64, help="held-out memes evaluated")
    parser.add_argument("--eval_steps", type=int, default=20, help="evaluate GRPO every N steps")
    args = parser.parse_args()
    start = time.time()

    from phi3v.synthetic import memes_rows, save_hf_dataset
    from phi3v.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(os.path.join(args.out_dir, "tiny-phi3v"), num_crops=1)
    rows = memes_rows(EVAL_SIZE + TRAIN_SIZE)
    data_dir = save_hf_dataset(rows, os.path.join(args.out_dir, "memes-grpo"))  # not demo.py's "memes"
    shuffled_dir = save_hf_dataset(shuffled_copy(rows), os.path.join(args.out_dir, "memes-shuffled"))
    reward_file = os.path.join(args.out_dir, "my_rewards.py")
    with open(reward_file, "w") as f:
        f.write(REWARD_FILE)
    common = ["--num_crops", "1", "--max_eval_samples", str(args.eval_samples), "--eval_batch_size", "16",
              "--max_new_tokens", "4", "--report_to", "none", "--deepspeed", "none", "--dataloader_num_workers", "0",
              "--seed", "0"]

    # 1. SFT on shuffled labels (64 steps of 8): the answer's form, "yes" or "no", at chance
    sft_dir = os.path.join(args.out_dir, "sft-shuffled")
    run([sys.executable, os.path.join(HERE, "finetune_hf_trainer_hateful_memes.py"),
         "--model_name_or_path", model_dir, "--dataset_path", shuffled_dir, "--output_dir", sft_dir,
         "--overwrite_output_dir", "--batch_size", "8", "--batch_size_per_gpu", "8", "--learning_rate", "5e-3",
         "--warmup_steps", "2", "--num_train_epochs", "4", "--logging_steps", "8", "--skip_eval_before",
         "--save_strategy", "no", *common])

    # 2. GRPO from that model on the true answers: 4 memes x 8 answers a step (batch flags count answers), the
    # task's accuracy plus half the user's form reward; the last step's checkpoint keeps trainer_state.json's logs
    grpo_dir = os.path.join(args.out_dir, "grpo")
    run([sys.executable, os.path.join(HERE, "finetune_hf_trainer_grpo.py"),
         "--task", "finetune_hf_trainer_hateful_memes.py", "--dataset_path", data_dir,
         "--model_name_or_path", sft_dir, "--output_dir", grpo_dir, "--overwrite_output_dir",
         "--reward_funcs", "accuracy_reward", reward_file, "--reward_weights", "1.0", "0.5",
         "--num_generations", "8", "--max_completion_length", "4", "--temperature", "1.0",
         "--batch_size", "32", "--batch_size_per_gpu", "32", "--learning_rate", "2e-3",
         "--max_steps", str(GRPO_STEPS), "--eval_steps", str(args.eval_steps), "--logging_steps", "2",
         "--save_strategy", "steps", "--save_steps", str(GRPO_STEPS), *common])

    sft = report(sft_dir, "eval_after")
    before, after = report(grpo_dir, "eval_before"), report(grpo_dir, "eval_after")
    steps = sorted(int(name[len("eval_step_"):-len(".json")]) for name in os.listdir(grpo_dir)
                   if name.startswith("eval_step_") and name.endswith(".json"))
    print(f"\nheld-out memes: {len(after['predictions'])}")
    print(f"SFT on shuffled labels: accuracy {sft['accuracy']:.3f}, answers exactly yes/no {exact_form(sft):.3f}")
    print(f"GRPO accuracy: {before['accuracy']:.3f} before -> {after['accuracy']:.3f} after (answers exactly yes/no "
          f"{exact_form(before):.3f} -> {exact_form(after):.3f})")
    print("GRPO accuracy during training: " + ", ".join(
        f"{report(grpo_dir, f'eval_step_{s}')['accuracy']:.3f} (step {s})" for s in steps))
    with open(os.path.join(grpo_dir, f"checkpoint-{GRPO_STEPS}", "trainer_state.json")) as f:
        logs = [entry for entry in json.load(f)["log_history"] if "reward" in entry]
    print(f"GRPO logs, mean of the first and of the last {LOG_WINDOW} logged steps (of {len(logs)}):")
    for key in ("reward", "rewards/accuracy_reward/mean", "rewards/yes_no_reward/mean", "reward_std",
                "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio"):
        first, last = (sum(e[key] for e in part) / len(part) for part in (logs[:LOG_WINDOW], logs[-LOG_WINDOW:]))
        print(f"  {key + ':':<30} {first:.3f} -> {last:.3f}")
    print("  (kl is logged with --beta > 0; this demo runs TRL's default beta 0, no reference model)")
    print(f"demo finished in {time.time() - start:.0f} s; outputs in {args.out_dir} (grpo/training_curves.png: "
          "rewards, completion length)")


if __name__ == "__main__":
    main()

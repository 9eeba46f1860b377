"""demo_grpo.py's own parts, in seconds (the demo itself runs the recipes for minutes; tests/test_grpo.py runs the
GRPO recipe end to end): the shuffled copy keeps the held-out answers and permutes the training ones, and the reward
file it writes loads as a user reward file and scores as documented in the README."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import demo_grpo  # noqa: E402
import finetune_hf_trainer_hateful_memes as memes_recipe  # noqa: E402
from phi3v.rewards import Rewards  # noqa: E402


def test_shuffled_copy_permutes_only_the_training_answers():
    rows = [{"images": [index], "texts": [{"user": "q", "assistant": "yes" if index % 3 else "no"}]}
            for index in range(demo_grpo.EVAL_SIZE + 40)]
    shuffled = demo_grpo.shuffled_copy(rows)
    answer = [row["texts"][0]["assistant"] for row in rows]
    got = [row["texts"][0]["assistant"] for row in shuffled]
    held_out = demo_grpo.EVAL_SIZE
    assert [row["images"] for row in shuffled] == [row["images"] for row in rows]  # the same memes, in order
    assert got[:held_out] == answer[:held_out]  # held out: true answers
    assert sorted(got[held_out:]) == sorted(answer[held_out:]) and got[held_out:] != answer[held_out:]
    assert [row["texts"][0]["assistant"] for row in rows] == answer  # the input is left as it was


def test_the_reward_file_scores_as_the_readme_says(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(demo_grpo.REWARD_FILE)
    rewards = Rewards(["accuracy_reward", str(path)], [1.0, 0.5], memes_recipe.score, None, classes=["no", "yes"])
    assert rewards.names == ["accuracy_reward", "yes_no_reward"]
    answers = ["yes", "no, it is not", "yes or no", "no", "yes\n\n\n"]  # the last: run on, cut without a stop token
    per_function = rewards(answers, ["yes"] * 5, [{"id": "m"}] * 5)
    assert per_function.tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    assert rewards.combine(per_function).tolist() == [1.5, 0.0, 1.0, 0.5, 1.0]

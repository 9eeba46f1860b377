"""GRPO's rewards: the task's own metric of one answer (accuracy_reward), the answer's form (format_reward), and the
user's reward functions from a Python file (--reward_funcs FILE.py: every function whose name ends in `_reward`).

A reward function takes the sampled answers, the reference answers and the records, one each per answer, and
returns one float per answer (None where it does not apply, as in TRL):

    def length_reward(completions: list[str], answers: list[str], records: list[dict]) -> list[float]:
        return [-abs(len(c) - len(a)) / 100 for c, a in zip(completions, answers)]

A record is the sample's dict (phi3v.records: "id", "source", "messages", "answers" when the task has several gold
answers, media paths). Rewards are combined as sum(weight x reward) with --reward_weights.
"""

import importlib.util
import inspect
import math
import numbers
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from phi3v.errors import InputError, one_line

BUILTIN = ("accuracy_reward", "format_reward")


@dataclass
class RewardFunction:
    name: str  # what the logs call it: rewards/<name>/mean
    origin: str  # "built-in" or the file it comes from, for messages
    function: Callable


def answer_part(text: str, answer_format: str | None) -> str | None:
    """The part of an answer that accuracy scores: the whole text without --answer_format; with it, the group named
    "answer" of a full match (else its last group, else the whole match), or None when the text does not match."""
    if answer_format is None:
        return text
    match = re.fullmatch(answer_format, text.strip(), flags=re.DOTALL)
    if match is None:
        return None
    if "answer" in match.groupdict():
        return match.group("answer")
    return match.group(match.re.groups) if match.re.groups else match.group(0)


def builtin_rewards(score, answer_format: str | None, classes: list[str] | None = None) -> dict[str, Callable]:
    """accuracy_reward: the recipe's score of each answer on its own (accuracy: 1 or 0; DocVQA: ANLS) on its
    answer part (0 when --answer_format does not match); format_reward: 1 when the answer matches --answer_format,
    else 0.

    `classes` (a classification recipe's answers): a classification score parses a prediction onto the gold answers
    it is given, so an answer scored alone would be parsed onto its own gold class only and "yes or no" would be
    right whatever the gold. With `classes`, each answer is scored beside one correct item per other class (the
    prediction its gold), so it is parsed onto every class as in evaluation; its reward is what it adds to that
    mean: n x score - (n - 1) for n items."""

    def accuracy_reward(completions, answers, records):
        rewards = []
        for completion, answer, record in zip(completions, answers, records):
            part = answer_part(completion, answer_format)
            if part is None:
                rewards.append(0.0)
                continue
            item = {"id": record.get("id"), "prediction": part.strip(), "answer": answer}
            if record.get("answers") is not None:
                item["answers"] = list(record["answers"])
            anchors = [{"id": f"class-{c}", "prediction": c, "answer": c} for c in classes or () if c != answer]
            value = float(score([item, *anchors])[1]) * (len(anchors) + 1) - len(anchors)
            rewards.append(round(value, 9) if anchors else value)  # 0.0 not -2.2e-16
        return rewards

    def format_reward(completions, answers, records):
        return [0.0 if answer_part(c, answer_format) is None else 1.0 for c in completions]

    return {"accuracy_reward": accuracy_reward, "format_reward": format_reward}


def import_python_file(path: str, flag: str, module_name: str):
    """A user's Python file imported as a module (a reward file; GRPO's --task recipe); a file that does not load
    ends the run in one line naming the flag, the file (and the line of a syntax error) and why."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise InputError(f"{flag} {path}:{error.lineno}: cannot load it: SyntaxError: {error.msg}") from None
    except Exception as error:  # the user's module failed while it was imported
        raise InputError(f"{flag} {path}: cannot load it: {type(error).__name__}: {one_line(error)}") from None
    return module


def load_reward_file(path: str) -> list[RewardFunction]:
    """Every function of a Python file whose name ends in `_reward`, in the file's order."""
    if not os.path.isfile(path):
        raise InputError(f"--reward_funcs {path}: no such file")
    module = import_python_file(path, "--reward_funcs", f"phi3v_user_rewards_{abs(hash(path))}")
    found = [RewardFunction(name, path, value) for name, value in vars(module).items()
             if name.endswith("_reward") and inspect.isfunction(value) and value.__module__ == module.__name__]
    if not found:
        raise InputError(f"--reward_funcs {path}: no function whose name ends in _reward (a reward is "
                         "f(completions, answers, records) -> one float per completion)")
    return found


class Rewards:
    """The run's reward functions and weights: calls them, checks what they return, and combines them."""

    def __init__(self, specs: list[str], weights: list[float] | None, score, answer_format: str | None,
                 classes: list[str] | None = None):
        builtins = builtin_rewards(score, answer_format, classes)
        self.functions = []
        for spec in specs:
            if spec in builtins:
                if spec == "format_reward" and answer_format is None:
                    raise InputError("--reward_funcs format_reward needs --answer_format (the regular expression an "
                                     "answer must match)")
                self.functions.append(RewardFunction(spec, "built-in", builtins[spec]))
            elif spec.endswith(".py"):
                self.functions.extend(load_reward_file(spec))
            else:
                raise InputError(f"--reward_funcs {spec}: neither a built-in reward ({', '.join(BUILTIN)}) nor a "
                                 ".py file of reward functions")
        names = [f.name for f in self.functions]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise InputError(f"--reward_funcs: two reward functions named {duplicate}")
        weights = [1.0] * len(names) if weights is None else list(weights)
        if len(weights) != len(names):
            raise InputError(f"--reward_weights has {len(weights)} weights for {len(names)} reward functions "
                             f"({', '.join(names)})")
        self.weights = torch.tensor(weights, dtype=torch.float32)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.functions]

    def __call__(self, completions: list[str], answers: list[str], records: list[dict]) -> torch.Tensor:
        """[answers x functions] rewards (NaN where a function returned None); InputError naming the function
        that raised or returned something else than one number (or None) per answer."""
        columns = []
        for reward in self.functions:
            where = f"{reward.origin}:{reward.name}" if reward.origin != "built-in" else reward.name
            try:
                values = reward.function(list(completions), list(answers), list(records))
            except Exception as error:  # the user's function
                raise InputError(f"reward {where} raised {type(error).__name__}: {one_line(error)}") from None
            if not isinstance(values, (list, tuple)) or len(values) != len(completions):
                got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
                raise InputError(f"reward {where} returned {got} for {len(completions)} completions: it must "
                                 "return one float per completion")
            column = []
            for value in values:
                # numbers.Real: int, float and numpy's scalars (np.float32 is no float); a bool is no reward
                if value is not None and (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)):
                    raise InputError(f"reward {where} returned {value!r}: a reward is a float (or None)")
                column.append(math.nan if value is None else float(value))
            columns.append(column)
        return torch.tensor(columns, dtype=torch.float32).T.reshape(len(completions), len(columns))

    def combine(self, per_function: torch.Tensor) -> torch.Tensor:
        """sum over functions of weight x reward, NaN only where every function returned None (as TRL)."""
        total = (per_function * self.weights.to(per_function.device)).nansum(dim=1)
        return total.masked_fill(per_function.isnan().all(dim=1), math.nan)

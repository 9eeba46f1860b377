import importlib.util
import os

import pytest

from phi3v.metrics import (
    accuracy,
    anls,
    gold_choice_accuracy,
    mean_anls,
    mean_exact_match,
    normalise_answer,
    parse_choice,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name):
    """A top-level script of the repository, imported as a module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_normalise_answer():
    assert normalise_answer(" The  Cat.\n") == "the cat"
    assert normalise_answer("Yes.") == normalise_answer("yes") == "yes"
    assert normalise_answer("U.S.A.") == "u.s.a"  # only the periods at either end go
    assert normalise_answer("...") == ""
    assert normalise_answer("no!") == "no!"  # other punctuation stays (parse_choice drops it for classes)


def test_anls_exact_match():
    assert anls("42", ["42"]) == 1.0
    assert anls("", [""]) == 1.0  # two empty strings: distance 0


def test_anls_one_edit():
    assert anls("Hello", ["hallo"]) == pytest.approx(1 - 1 / 5)


def test_anls_normalises_case_and_whitespace():
    assert anls("  New   York\tCity ", ["new york city"]) == 1.0


def test_anls_ignores_end_periods():
    assert anls("1990.", ["1990"]) == 1.0  # the original recipe strips the period before ANLS too
    assert anls("Acme Inc", ["Acme Inc."]) == 1.0


def test_anls_below_threshold_is_zero():
    assert anls("abcdef", ["abcxyz"]) == 0.0  # NL = 3/6 = 0.5, not < 0.5
    assert anls("abcdef", ["abcdez"]) == pytest.approx(5 / 6)
    assert anls("abcdef", ["abcxyz"], threshold=0.6) == pytest.approx(0.5)
    assert anls("", ["abc"]) == 0.0


def test_anls_max_over_golds():
    assert anls("kitten", ["sitting", "kitchen", "dog"]) == pytest.approx(1 - 2 / 7)  # kitten->kitchen: 2 edits
    assert anls("1990", ["1990", "nineteen ninety"]) == 1.0


def test_anls_needs_answers():
    with pytest.raises(ValueError):
        anls("x", [])


def test_mean_anls():
    assert mean_anls(["Hello", "cat", "no"], [["hallo"], ["cat", "dog"], ["yes"]]) == pytest.approx((0.8 + 1 + 0) / 3)
    with pytest.raises(ValueError):
        mean_anls(["a"], [["a"], ["b"]])


def test_parse_choice_exact_after_stripping():
    assert parse_choice("Yes.", ["yes", "no"]) == "yes"
    assert parse_choice("  NO!\n", ["yes", "no"]) == "no"


def test_parse_choice_earliest_whole_word():
    assert parse_choice("The answer is no", ["yes", "no"]) == "no"
    assert parse_choice("No, yes would be wrong.", ["yes", "no"]) == "no"
    assert parse_choice("It is not clear", ["yes", "no"]) is None  # "no" inside "not" does not count
    assert parse_choice("Nothing here", ["yes", "no"]) is None


def test_parse_choice_class_names():
    classes = ["ApplyEyeMakeup", "ApplyLipstick", "Archery", "BabyCrawling"]
    assert parse_choice("ApplyLipstick", classes) == "ApplyLipstick"
    assert parse_choice("applyeyemakeup.", classes) == "ApplyEyeMakeup"
    assert parse_choice("The person is doing Archery, not BabyCrawling.", classes) == "Archery"
    assert parse_choice("Action: BabyCrawlingX", classes) is None


def test_parse_choice_longest_wins_at_same_position():
    choices = ["Apply Eye", "Apply Eye Makeup"]
    assert parse_choice("I think Apply Eye Makeup.", choices) == "Apply Eye Makeup"
    assert parse_choice("I think apply  eye here", choices) == "Apply Eye"


def test_accuracy():
    choices = ["yes", "no"]
    preds = ["Yes.", "The answer is no", "maybe", "no"]
    golds = ["yes", "no", "no", "Yes"]
    assert accuracy(preds, golds, choices) == 0.5
    with pytest.raises(ValueError):
        accuracy(["yes"], [], choices)


def test_mean_exact_match():
    predictions = ["Yes.", "the  cat", "dog", "Paris"]
    answers = [["yes"], ["The cat."], ["cat"], ["London", "paris"]]
    assert mean_exact_match(predictions, answers) == 0.75
    with pytest.raises(ValueError):
        mean_exact_match(["a"], [])


def test_gold_choice_accuracy():
    predictions = [{"prediction": "Yes.", "answer": "yes"}, {"prediction": "I think no", "answer": "Yes."},
                   {"prediction": "no", "answer": "No"}, {"prediction": "maybe", "answer": "no"}]
    assert gold_choice_accuracy(predictions) == 0.5  # classes {"yes", "no"}: right, wrong, right, none


def test_every_caller_scores_answers_alike():
    """predict.py and the custom recipe compute exact match, accuracy and ANLS with phi3v.metrics' one
    normalisation: the same predictions get the same numbers from each."""
    predict, custom = script("predict"), script("finetune_hf_trainer_custom")
    predictions = [{"prediction": "Yes.", "answer": "yes"}, {"prediction": " the  Cat", "answer": "The cat."},
                   {"prediction": "Paris", "answer": "London", "answers": ["London", "paris"]},
                   {"prediction": "I think no", "answer": "yes"}]
    assert predict.score(predictions, "exact") == 0.75
    assert custom.score(predictions)[:2] == ("exact_match", 0.75)
    assert predict.score(predictions, "anls") == custom.score(predictions)[2]["anls"] == 0.75
    assert predict.score(predictions, "accuracy") == gold_choice_accuracy(predictions) == 0.5  # classes: the golds

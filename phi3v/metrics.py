"""Evaluation metrics in pure Python: ANLS (DocVQA), exact match and multiple-choice accuracy, all comparing answers
as normalise_answer makes them."""

import re
import string


def normalise_answer(text: str) -> str:
    """The one answer normalisation of every metric here (exact match, classes, ANLS): lower-cased, whitespace and
    periods at either end dropped, inner whitespace runs made one space: " The  cat." -> "the cat".

    As the original recipe (strip, strip ".", lower-case), plus the whitespace runs that DocVQA's ANLS ignores."""
    return " ".join(text.strip(string.whitespace + ".").lower().split())


def _levenshtein(a, b):
    """Edit distance (insertions, deletions, substitutions all cost 1), two rows of DP."""
    if len(a) < len(b):
        a, b = b, a  # keep the rows as short as the shorter string
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction, answers, threshold=0.5):
    """ANLS of one prediction: max over gold answers of 1 - NL, or 0 where NL >= threshold.

    NL = _levenshtein(a, b) / max(len(a), len(b)) on strings made by normalise_answer (0 for two empty strings).
    """
    if isinstance(answers, str):
        answers = [answers]  # a bare string would otherwise be scored character by character
    if not answers:
        raise ValueError("anls needs at least one gold answer")
    pred = normalise_answer(prediction)
    best = 0.0
    for answer in answers:
        gold = normalise_answer(answer)
        longest = max(len(pred), len(gold))
        nl = _levenshtein(pred, gold) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def mean_anls(predictions, answers_list, threshold=0.5):
    """Average ANLS over a dataset; answers_list[i] holds the gold answers of predictions[i]."""
    if len(predictions) != len(answers_list):
        raise ValueError(f"{len(predictions)} predictions but {len(answers_list)} answer lists")
    if not predictions:
        raise ValueError("mean_anls of no predictions")
    return sum(anls(p, a, threshold) for p, a in zip(predictions, answers_list)) / len(predictions)


def free_text_score(predictions):
    """A recipe's score (phi3v.evaluation) for free-text answers: exact match, and ANLS beside it, of each
    prediction against its gold answers ("answers" where a record has several, else "answer"), both on
    normalise_answer. The custom, DPO and GRPO recipes' metric."""
    texts, golds = [p["prediction"] for p in predictions], [p.get("answers") or [p["answer"]] for p in predictions]
    return "exact_match", mean_exact_match(texts, golds), {"anls": mean_anls(texts, golds)}


def parse_choice(text, choices):
    """Map a generated answer to one of `choices`, or None (which counts as wrong).

    1. Strip whitespace and trailing punctuation; a case-insensitive exact match wins.
    2. Otherwise take the choice found as a whole word/phrase (not inside a longer word) at the
       earliest position in the text; at the same position the longest choice wins, so with
       choices "Apply Eye" and "Apply Eye Makeup" the text "Apply Eye Makeup." gives the latter.
    3. Otherwise None.
    """
    cleaned = normalise_answer(text.rstrip(string.punctuation + string.whitespace))
    for choice in choices:
        if normalise_answer(choice) == cleaned:
            return choice

    best, best_key = None, None
    for choice in choices:
        words = choice.split()
        if not words:
            continue
        # whole phrase: no word character right before or after; any whitespace between words
        pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
        match = re.search(pattern, text, flags=re.IGNORECASE)
        if match:
            key = (match.start(), -len(choice))
            if best_key is None or key < best_key:
                best, best_key = choice, key
    return best


def mean_exact_match(predictions, answers_list) -> float:
    """Fraction of predictions equal to one of their gold answers after normalise_answer; answers_list[i] holds the
    gold answers of predictions[i]."""
    if len(predictions) != len(answers_list):
        raise ValueError(f"{len(predictions)} predictions but {len(answers_list)} answer lists")
    if not predictions:
        raise ValueError("mean_exact_match of no predictions")
    return sum(normalise_answer(p) in {normalise_answer(a) for a in answers}
               for p, answers in zip(predictions, answers_list)) / len(predictions)


def accuracy(predictions, golds, choices):
    """Fraction of predictions whose parse_choice equals the gold class (case-insensitive)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold labels")
    if not predictions:
        raise ValueError("accuracy of no predictions")
    correct = 0
    for prediction, gold in zip(predictions, golds):
        parsed = parse_choice(prediction, choices)
        correct += parsed is not None and normalise_answer(parsed) == normalise_answer(gold)
    return correct / len(predictions)


def gold_choice_accuracy(predictions: list[dict]) -> float:
    """Accuracy when the classes are the distinct gold answers: each prediction is parsed onto them."""
    golds = [normalise_answer(p["answer"]) for p in predictions]
    return accuracy([p["prediction"] for p in predictions], golds, sorted(set(golds)))

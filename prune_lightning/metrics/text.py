"""Scores of generated text against references: the downstream tasks of the general-ability evaluation.

One functional and one :class:`~torchmetrics.Metric` per score; every metric class has the same ``update(preds,
references)`` signature, where ``preds`` are strings and each reference is a string or a sequence of strings (any
may match; ROUGE takes the best), so an evaluator can treat them alike (see :func:`build_text_metric`).

- GSM8K (reasoning): :func:`gsm8k_correct` / :class:`NumberMatch` - the gold number appears in the generation.
  Numbers are compared as whole numbers, not substrings: ``"18"`` does not match ``"180"`` or ``"-18"``; commas,
  ``"$"`` and trailing decimal zeros are normalised away (``"$1,000.00"`` equals ``"1000"``).
- SAMSum (summarization): :func:`rouge_mean` / :class:`RougeMean` - the mean of the ROUGE-1, ROUGE-2 and ROUGE-L
  F-measures, computed by torchmetrics (``rouge_keys=("rouge1", "rouge2", "rougeL")``: the default keys include
  ``rougeLsum``, which needs nltk's punkt data, a download) per example and averaged over examples.
- Natural Questions (open-domain QA): :func:`span_exact_match` / :class:`ExactMatch` - a reference, normalised
  SQuAD-style (:func:`normalize_answer`), appears as a contiguous run of words in the normalised generation. The
  paper checks that the answer is contained in the generation; matching whole words keeps ``"1"`` from matching
  ``"10"``. ``ExactMatch(mode="exact")`` is SQuAD's exact match (normalised strings equal).
- RTE (NLI): :class:`LabelAccuracy` - the predicted label (after the task's mapping of the generation, e.g.
  :func:`prune_lightning.data.tasks.rte_label_from_generation`) equals the reference label.
"""

from __future__ import annotations

import functools
import re
import string
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "ExactMatch",
    "LabelAccuracy",
    "NumberMatch",
    "RougeMean",
    "ROUGE_KEYS",
    "TEXT_METRICS",
    "build_text_metric",
    "exact_match",
    "gsm8k_correct",
    "label_accuracy",
    "normalize_answer",
    "normalize_number",
    "number_match",
    "register_text_metric",
    "rouge_mean",
    "rouge_scores",
    "span_exact_match",
]

References = Union[str, Sequence[str]]
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
_EXACT_MATCH_MODES = ("span", "exact")

# --------------------------------------------------------------------------------------------------------------------
# shared checks
# --------------------------------------------------------------------------------------------------------------------


def _as_references(references: References, where: str) -> tuple[str, ...]:
    if isinstance(references, str):
        return (references,)
    if not isinstance(references, (list, tuple)) or not references:
        raise ValueError(f"{where} must be a string or a non-empty sequence of strings, got {references!r}")
    for ref in references:
        if not isinstance(ref, str):
            raise ValueError(f"{where} must hold strings only, got {type(ref).__name__} ({ref!r})")
    return tuple(references)


def _check_batch(preds: Sequence[str], references: Sequence[References]) -> list[tuple[str, ...]]:
    if isinstance(preds, str):
        raise ValueError("preds must be a sequence of strings, not a single string; wrap it in a list")
    if isinstance(references, str):
        raise ValueError("references must hold one entry per prediction, not a single string; wrap it in a list")
    if len(preds) != len(references):
        raise ValueError(f"got {len(preds)} predictions but {len(references)} references; give one entry each")
    for i, pred in enumerate(preds):
        if not isinstance(pred, str):
            raise ValueError(f"preds[{i}] must be a string, got {type(pred).__name__}")
    return [_as_references(r, f"references[{i}]") for i, r in enumerate(references)]


def _mean(values: list[float]) -> Tensor:
    return torch.tensor(sum(values) / len(values)) if values else torch.tensor(float("nan"))


class _MeanOfScores(Metric):
    """Accumulates per-example scores as a sum and a count (``dist_reduce_fx="sum"``); computes their mean."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _score(self, pred: str, refs: tuple[str, ...]) -> float:
        raise NotImplementedError

    def update(self, preds: Sequence[str], references: Sequence[References]) -> None:
        """Adds a batch of examples.

        Args:
            preds: The generated (or post-processed) texts.
            references: One entry per prediction: a string or a sequence of acceptable strings.
        """
        refs = _check_batch(preds, references)
        scores = [self._score(p, r) for p, r in zip(preds, refs)]
        self.score_sum += float(sum(scores))
        self.total += float(len(scores))

    def compute(self) -> Tensor:
        """The mean score over all examples so far (NaN before any)."""
        if self.total == 0:
            return torch.tensor(float("nan"))
        return (self.score_sum / self.total).float()


# --------------------------------------------------------------------------------------------------------------------
# exact match (Natural Questions)
# --------------------------------------------------------------------------------------------------------------------

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop ASCII punctuation, drop articles, collapse whitespace.

    Args:
        s: Any text.

    Example:
        >>> normalize_answer("  The Eiffel-Tower, in PARIS! ")
        'eiffeltower in paris'
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _contains_span(words: list[str], span: list[str]) -> bool:
    n = len(span)
    return any(words[i : i + n] == span for i in range(len(words) - n + 1))


def span_exact_match(prediction: str, references: References) -> float:
    """1.0 if a normalised reference occurs as a contiguous run of words in the normalised prediction, else 0.0.

    A reference that normalises to nothing (``"The"``) never matches.

    Args:
        prediction: The generated text.
        references: One acceptable answer or several.

    Example:
        >>> span_exact_match("It was awarded to Wilhelm Röntgen in 1901.", ["Wilhelm Conrad Röntgen", "Röntgen"])
        1.0
        >>> span_exact_match("In 1910.", "1901")
        0.0
    """
    words = normalize_answer(prediction).split()
    for ref in _as_references(references, "references"):
        span = normalize_answer(ref).split()
        if span and _contains_span(words, span):
            return 1.0
    return 0.0


def _strict_exact_match(prediction: str, references: References) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in _as_references(references, "references")))


def _check_mode(mode: str) -> str:
    if mode not in _EXACT_MATCH_MODES:
        raise ValueError(f"mode must be one of {list(_EXACT_MATCH_MODES)}, got {mode!r}")
    return mode


def exact_match(preds: Sequence[str], references: Sequence[References], mode: str = "span") -> Tensor:
    """The mean exact match of a batch: :func:`span_exact_match` (``mode="span"``) or normalised equality.

    Args:
        preds: Generated texts.
        references: One entry per prediction: a string or a sequence of acceptable answers.
        mode: ``"span"`` (the reference is contained in the prediction) or ``"exact"`` (SQuAD's EM).

    Returns:
        A 0-d float tensor in ``[0, 1]`` (NaN for an empty batch).
    """
    score = span_exact_match if _check_mode(mode) == "span" else _strict_exact_match
    refs = _check_batch(preds, references)
    return _mean([score(p, r) for p, r in zip(preds, refs)])


class ExactMatch(_MeanOfScores):
    """Accumulated exact match over generated answers (see :func:`exact_match`).

    Args:
        mode: ``"span"`` (a normalised reference appears as words of the normalised prediction; the Natural
            Questions protocol) or ``"exact"`` (normalised strings are equal).
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = ExactMatch()
        >>> metric.update(["Paris, of course", "Lyon"], [["Paris"], "Marseille"])
        >>> float(metric.compute())
        0.5
    """

    def __init__(self, mode: str = "span", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mode = _check_mode(mode)

    def _score(self, pred: str, refs: tuple[str, ...]) -> float:
        return span_exact_match(pred, refs) if self.mode == "span" else _strict_exact_match(pred, refs)


# --------------------------------------------------------------------------------------------------------------------
# ROUGE (SAMSum)
# --------------------------------------------------------------------------------------------------------------------


def rouge_scores(preds: Sequence[str], references: Sequence[References]) -> Tensor:
    """Per example, the mean of the ROUGE-1, ROUGE-2 and ROUGE-L F-measures (torchmetrics' ROUGE).

    Args:
        preds: Generated summaries.
        references: One entry per prediction: a reference summary or several (the best one counts).

    Returns:
        A float tensor of shape ``(len(preds),)``.
    """
    from torchmetrics.functional.text import rouge_score

    refs = _check_batch(preds, references)
    values = []
    for pred, ref in zip(preds, refs):
        scores = rouge_score(pred, [list(ref)], accumulate="best", rouge_keys=ROUGE_KEYS)
        values.append(torch.stack([scores[f"{key}_fmeasure"] for key in ROUGE_KEYS]).float().mean())
    return torch.stack(values) if values else torch.zeros(0)


def rouge_mean(preds: Sequence[str], references: Sequence[References]) -> Tensor:
    """The mean over examples of :func:`rouge_scores`; equals the mean of ``torchmetrics.text.ROUGEScore(
    rouge_keys=("rouge1", "rouge2", "rougeL"))``'s three F-measures over the same batch.

    Args:
        preds: Generated summaries.
        references: One entry per prediction: a reference summary or several.

    Returns:
        A 0-d float tensor in ``[0, 1]`` (NaN for an empty batch).

    Example:
        >>> round(float(rouge_mean(["the cat sat on the mat"], ["the cat is on the mat"])), 4)
        0.7556
    """
    scores = rouge_scores(preds, references)
    return scores.mean() if scores.numel() else torch.tensor(float("nan"))


class RougeMean(_MeanOfScores):
    """Accumulated mean of ROUGE-1/2/L F-measures over generated summaries (see :func:`rouge_mean`).

    Per-example scores are summed, so the state is two numbers (not torchmetrics ROUGE's per-sample lists) and
    syncs with ``dist_reduce_fx="sum"``; the result equals ROUGEScore's over the same examples.

    Example:
        >>> metric = RougeMean()
        >>> metric.update(["the cat sat on the mat"], ["the cat is on the mat"])
        >>> round(float(metric.compute()), 4)
        0.7556
    """

    def _score(self, pred: str, refs: tuple[str, ...]) -> float:
        return float(rouge_scores([pred], [refs])[0])


# --------------------------------------------------------------------------------------------------------------------
# labels (RTE)
# --------------------------------------------------------------------------------------------------------------------


def _label_score(pred: str, refs: tuple[str, ...], ignore_case: bool) -> float:
    def norm(s: str) -> str:
        return s.strip().lower() if ignore_case else s.strip()

    return float(any(norm(pred) == norm(r) for r in refs))


def label_accuracy(preds: Sequence[str], references: Sequence[References], ignore_case: bool = True) -> Tensor:
    """The share of predicted labels equal to the reference label (surrounding whitespace ignored).

    Args:
        preds: Predicted labels (e.g. ``"entailment"``), already mapped from the generations.
        references: One entry per prediction: the gold label (or several accepted labels).
        ignore_case: Compare case-insensitively.

    Returns:
        A 0-d float tensor in ``[0, 1]`` (NaN for an empty batch).
    """
    refs = _check_batch(preds, references)
    return _mean([_label_score(p, r, ignore_case) for p, r in zip(preds, refs)])


class LabelAccuracy(_MeanOfScores):
    """Accumulated accuracy of string labels (see :func:`label_accuracy`).

    Args:
        ignore_case: Compare case-insensitively.
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = LabelAccuracy()
        >>> metric.update(["entailment", "invalid"], ["entailment", "not_entailment"])
        >>> float(metric.compute())
        0.5
    """

    def __init__(self, ignore_case: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(ignore_case, bool):
            raise ValueError(f"ignore_case must be a bool, got {ignore_case!r}")
        self.ignore_case = ignore_case

    def _score(self, pred: str, refs: tuple[str, ...]) -> float:
        return _label_score(pred, refs, self.ignore_case)


# --------------------------------------------------------------------------------------------------------------------
# numbers (GSM8K)
# --------------------------------------------------------------------------------------------------------------------

# an optional minus, an optional "$", then digits (with thousands commas) and an optional decimal part
_NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalize_number(text: str) -> Optional[str]:
    """A canonical spelling of a number: no ``"$"``, no commas, no leading zeros, no trailing decimal zeros.

    Args:
        text: ``"$1,000.50"``, ``"18.0"``, ``"-7"``, ...

    Returns:
        ``"1000.5"``, ``"18"``, ``"-7"``, ...; ``None`` if ``text`` is not a number.

    Example:
        >>> normalize_number("$1,000.00"), normalize_number("0.50"), normalize_number("twelve")
        ('1000', '0.5', None)
    """
    s = text.strip().replace("$", "").replace(",", "").rstrip(".")
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    sign = "-" if s.startswith("-") else ""
    whole, _, frac = s.lstrip("-").partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    number = f"{whole}.{frac}" if frac else whole
    return "0" if number == "0" else sign + number


def gsm8k_correct(prediction: str, gold_number: str) -> bool:
    """True when the gold number appears, as a whole number, among the numbers written in the prediction.

    Args:
        prediction: The generation (for the paper's protocol: 5 tokens after "the answer (arabic numerals) is:").
        gold_number: The number after ``####`` in GSM8K's answer.

    Raises:
        ValueError: If ``gold_number`` is not a number.

    Example:
        >>> gsm8k_correct(" $1,800.00 is the", "1800"), gsm8k_correct(" 180", "18")
        (True, False)
    """
    gold = normalize_number(gold_number)
    if gold is None:
        raise ValueError(f"gold_number must be a number, got {gold_number!r}")
    return any(normalize_number(m.group(0)) == gold for m in _NUMBER.finditer(prediction))


def number_match(preds: Sequence[str], references: Sequence[References]) -> Tensor:
    """The share of predictions for which :func:`gsm8k_correct` holds (for any of the gold numbers given).

    Args:
        preds: Generations.
        references: One entry per prediction: the gold number (or several).

    Returns:
        A 0-d float tensor in ``[0, 1]`` (NaN for an empty batch).
    """
    refs = _check_batch(preds, references)
    return _mean([float(any(gsm8k_correct(p, g) for g in r)) for p, r in zip(preds, refs)])


class NumberMatch(_MeanOfScores):
    """Accumulated GSM8K accuracy: the gold number appears in the generation (see :func:`gsm8k_correct`).

    Example:
        >>> metric = NumberMatch()
        >>> metric.update([" 18.", " 7 eggs"], ["18", "8"])
        >>> float(metric.compute())
        0.5
    """

    def _score(self, pred: str, refs: tuple[str, ...]) -> float:
        return float(any(gsm8k_correct(pred, g) for g in refs))


# --------------------------------------------------------------------------------------------------------------------
# by name
# --------------------------------------------------------------------------------------------------------------------

TEXT_METRICS: dict[str, Callable[..., Metric]] = {
    "number_match": NumberMatch,
    "rouge_mean": RougeMean,
    "span_exact_match": ExactMatch,
    "exact_match": functools.partial(ExactMatch, mode="exact"),
    "label_accuracy": LabelAccuracy,
}


def register_text_metric(name: str, factory: Callable[..., Metric], overwrite: bool = False) -> None:
    """Makes a metric available by name to :func:`build_text_metric` (and so to task specs).

    Args:
        name: The name tasks refer to.
        factory: Called with keyword arguments; returns a metric whose ``update(preds, references)`` takes
            strings and per-example references.
        overwrite: Replace an existing entry of that name.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise ValueError(f"factory for {name!r} must be callable, got {factory!r}")
    if name in TEXT_METRICS and not overwrite:
        raise ValueError(f"a text metric named {name!r} is already registered; pass overwrite=True to replace it")
    TEXT_METRICS[name] = factory


def build_text_metric(name: str, **kwargs: Any) -> Metric:
    """A fresh metric by name: ``number_match``, ``rouge_mean``, ``span_exact_match``, ``exact_match``,
    ``label_accuracy`` (or one added with :func:`register_text_metric`).

    Args:
        name: The metric's name.
        **kwargs: Passed to its constructor.
    """
    if name not in TEXT_METRICS:
        raise ValueError(f"unknown text metric {name!r}; known: {sorted(TEXT_METRICS)}")
    return TEXT_METRICS[name](**kwargs)

"""torchmetrics metrics for sequential editing: edit success and the downstream tasks of general abilities.

Each score comes as a stateful :class:`~torchmetrics.Metric` (accumulates sums, syncs across processes) beside a
pure function that computes it for one batch:

- :mod:`prune_lightning.metrics.edit` - CounterFact (:func:`target_nll`, :func:`counterfact_scores`,
  :class:`CounterFactScore`), zsRE (:func:`teacher_forced_accuracy`, :class:`ZsREScore`) and top-1 token accuracy on
  any prompts (:func:`teacher_forced_scores`, :class:`TokenAccuracyScore`): teacher-forced.
- :mod:`prune_lightning.metrics.free_generation` - what greedy generation says: :func:`free_generation_scores`
  (``exact_match``, ``contains``), :class:`FreeGenerationScore`.
- :mod:`prune_lightning.metrics.text` - GSM8K (:func:`gsm8k_correct`, :class:`NumberMatch`), SAMSum
  (:func:`rouge_mean`, :class:`RougeMean`), Natural Questions (:func:`span_exact_match`, :class:`ExactMatch`),
  RTE (:class:`LabelAccuracy`), and :func:`build_text_metric` to make one by name.
"""

from prune_lightning.metrics.edit import (
    CaseMeans,
    CounterFactScore,
    TokenAccuracyScore,
    ZsREScore,
    continuation_ids,
    counterfact_scores,
    target_nll,
    teacher_forced_accuracy,
    teacher_forced_predictions,
    teacher_forced_scores,
)
from prune_lightning.metrics.free_generation import (
    FreeGenerationScore,
    free_generation_scores,
    generation_contains,
    generation_exact_match,
    normalize_generation,
)
from prune_lightning.metrics.text import (
    ROUGE_KEYS,
    TEXT_METRICS,
    ExactMatch,
    LabelAccuracy,
    NumberMatch,
    RougeMean,
    build_text_metric,
    exact_match,
    gsm8k_correct,
    label_accuracy,
    normalize_answer,
    normalize_number,
    number_match,
    register_text_metric,
    rouge_mean,
    rouge_scores,
    span_exact_match,
)

__all__ = [
    "CaseMeans",
    "CounterFactScore",
    "ExactMatch",
    "FreeGenerationScore",
    "LabelAccuracy",
    "NumberMatch",
    "ROUGE_KEYS",
    "RougeMean",
    "TEXT_METRICS",
    "TokenAccuracyScore",
    "ZsREScore",
    "build_text_metric",
    "continuation_ids",
    "counterfact_scores",
    "exact_match",
    "free_generation_scores",
    "generation_contains",
    "generation_exact_match",
    "gsm8k_correct",
    "label_accuracy",
    "normalize_answer",
    "normalize_generation",
    "normalize_number",
    "number_match",
    "register_text_metric",
    "rouge_mean",
    "rouge_scores",
    "span_exact_match",
    "target_nll",
    "teacher_forced_accuracy",
    "teacher_forced_predictions",
    "teacher_forced_scores",
]

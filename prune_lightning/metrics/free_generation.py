"""Free generation: does the edited model *say* the new object when nothing is fed to it?

Teacher-forced scores (:mod:`prune_lightning.metrics.edit`) feed the target to the model and read its
probabilities: the new object may win against the true one, or be the argmax token by token given the right prefix,
while greedy decoding from the prompt alone writes something else. "The Mirage of Model Editing" (Yang et al. 2025,
arXiv 2502.11177) shows that this flatters editors a great deal. Here the model continues each prompt greedily
(:func:`prune_lightning.generation.generate_batched_ids`) and the continuation is checked against the target, two
ways:

**exact_match.** The target's tokens are those of :func:`prune_lightning.tokens.continuation_ids` - ``" " + target``
as it follows the prompt in running text, the tokens the editors teach and the teacher-forced scores read. The
continuation matches when its first ``len(target tokens)`` generated token ids *are* those ids. So

- a continuation that goes on after the target matches (``" Paris, France"`` for ``"Paris"``): only the first
  ``len(target tokens)`` tokens are compared - so does one that extends the target's last token into a longer word
  (``" Rome"`` + ``"o"`` for ``"Rome"``);
- a continuation shorter than the target (generation stopped at end-of-sequence) does not match, nor does an empty
  one;
- case and spelling count, and so does the tokenization: the same text in other pieces (``" Par"`` + ``"is"`` where
  the target is the one token ``" Paris"``) does not match. Greedy decoding rarely splits that way, and it is not what
  the edit taught.

**contains.** The normalised target occurs in the normalised text of the continuation's first ``window`` tokens
(decoded with special tokens skipped). Normalising casefolds, turns every run of whitespace into one space and
strips the ends (:func:`normalize_generation`). It is a substring test, not a word match: ``"Rome"`` is contained in
``"Romeo"``. The window (``max_new_tokens`` of the scorer) is the target's token count plus a small slack by default,
so a short hedge before the answer (``" the city of Paris"``) can still count, while a long ramble does not.

Both are per prompt 0 / 1 values; :func:`free_generation_scores` computes them from generated token ids and texts,
without a model. :class:`FreeGenerationScore` accumulates them per case like the teacher-forced metrics: the edited
prompt (``exact_match``, ``contains``), its paraphrases (``generalization_*``, averaged within the case first) and the
neighborhood prompts (``locality_*``: there the expected answer is the prompt's own, ``target_true`` for CounterFact
and the ``loc`` answer for zsRE).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from prune_lightning.metrics.edit import CaseMeans, PerCase

__all__ = [
    "FreeGenerationScore",
    "free_generation_scores",
    "generation_contains",
    "generation_exact_match",
    "normalize_generation",
]


def normalize_generation(text: str) -> str:
    """``text`` casefolded, every run of whitespace one space, the ends stripped."""
    return " ".join(text.casefold().split())


def generation_exact_match(generated_ids: Sequence[int], target_ids: Sequence[int]) -> bool:
    """Whether the first ``len(target_ids)`` generated token ids are ``target_ids``.

    Args:
        generated_ids: The new tokens of a greedy continuation (up to end-of-sequence).
        target_ids: The target's tokens after the prompt (:func:`~prune_lightning.tokens.continuation_ids`).

    Raises:
        ValueError: If ``target_ids`` is empty.
    """
    target = [int(t) for t in target_ids]
    if not target:
        raise ValueError("target_ids is empty: an empty target would match every continuation")
    return [int(t) for t in list(generated_ids)[: len(target)]] == target


def generation_contains(generated_text: str, target: str) -> bool:
    """Whether the normalised ``target`` occurs in the normalised ``generated_text`` (:func:`normalize_generation`).

    Raises:
        ValueError: If ``target`` normalises to nothing.
    """
    needle = normalize_generation(target)
    if not needle:
        raise ValueError(f"target {target!r} is empty after normalising: it would be contained in every continuation")
    return needle in normalize_generation(generated_text)


def free_generation_scores(
    generated_ids: Sequence[Sequence[int]],
    generated_texts: Sequence[str],
    target_ids: Sequence[Sequence[int]],
    targets: Sequence[str],
) -> dict[str, Tensor]:
    """``exact_match`` and ``contains`` of each generated continuation (see the module docstring).

    Args:
        generated_ids: Per prompt, the new token ids of its greedy continuation (at least as many as its target's
            tokens, unless generation stopped earlier).
        generated_texts: Per prompt, the decoded continuation over the ``contains`` window.
        target_ids: Per prompt, the target's token ids after the prompt.
        targets: Per prompt, the target text (without the leading space).

    Returns:
        ``{"exact_match": ..., "contains": ...}``, float tensors of 0 / 1 of shape ``(prompts,)``.
    """
    lengths = {"generated_ids": len(generated_ids), "generated_texts": len(generated_texts),
               "target_ids": len(target_ids), "targets": len(targets)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"free_generation_scores needs one entry per prompt in each argument, got lengths {lengths}")
    for i, text in enumerate(generated_texts):
        if not isinstance(text, str):
            raise ValueError(f"generated_texts[{i}] must be a string, got {type(text).__name__}")
    exact = [float(generation_exact_match(g, t)) for g, t in zip(generated_ids, target_ids)]
    contains = [float(generation_contains(text, target)) for text, target in zip(generated_texts, targets)]
    return {"exact_match": torch.tensor(exact), "contains": torch.tensor(contains)}


class FreeGenerationScore(CaseMeans):
    """Accumulates free-generation ``exact_match`` / ``contains`` per case, on three kinds of prompt.

    Feed it per-prompt values of :func:`free_generation_scores`; per-case shapes as in
    :mod:`prune_lightning.metrics.edit`. Any part may be left out of an update.

    Example:
        >>> import torch
        >>> metric = FreeGenerationScore()
        >>> metric.update(exact_match=torch.tensor([1.0, 0.0]), contains=torch.tensor([1.0, 1.0]),
        ...               generalization_contains=[[1.0, 0.0], []])
        >>> {k: float(v) for k, v in metric.compute().items() if k.endswith("contains")}
        {'contains': 1.0, 'generalization_contains': 0.5, 'locality_contains': nan}
    """

    parts = ("exact_match", "contains", "generalization_exact_match", "generalization_contains",
             "locality_exact_match", "locality_contains")

    def update(  # type: ignore[override]
        self,
        exact_match: Optional[PerCase] = None,
        contains: Optional[PerCase] = None,
        generalization_exact_match: Optional[PerCase] = None,
        generalization_contains: Optional[PerCase] = None,
        locality_exact_match: Optional[PerCase] = None,
        locality_contains: Optional[PerCase] = None,
    ) -> None:
        """Adds cases.

        Args:
            exact_match: Per-case exact match of ``target_new`` on the edited prompt(s).
            contains: Per-case ``contains`` of ``target_new`` on the edited prompt(s).
            generalization_exact_match: Per-case exact matches of ``target_new`` on the paraphrases.
            generalization_contains: The same for ``contains``.
            locality_exact_match: Per-case exact matches of each neighborhood prompt's own answer.
            locality_contains: The same for ``contains``.
        """
        super().update(exact_match=exact_match, contains=contains,
                       generalization_exact_match=generalization_exact_match,
                       generalization_contains=generalization_contains,
                       locality_exact_match=locality_exact_match, locality_contains=locality_contains)

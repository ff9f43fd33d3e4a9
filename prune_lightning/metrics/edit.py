"""Edit success: how well edits took (efficacy, generalization) and what they left alone (locality).

Two protocols, both teacher-forced (the target is fed to the model; nothing is generated; for what the model says
when nothing is fed, see :mod:`prune_lightning.metrics.free_generation`):

**CounterFact** (ROME, Meng et al. 2022). For every prompt the model scores two continuations, ``" " + target_new``
and ``" " + target_true``, by their mean per-token negative log-likelihood (:func:`target_nll`). Then, per case:

- *efficacy*: the new object beats the true one on the edited prompt, ``nll_new < nll_true``;
- *generalization*: the same on each paraphrase prompt, averaged over the case's paraphrases;
- *locality*: the true object still beats the new one on each neighborhood prompt (other subjects with the same
  old object), ``nll_true < nll_new``, averaged over the case's neighborhood prompts;

and each score is averaged over cases (cases without paraphrases / neighbours do not count for that score).
The *margins* are the matching probability differences, with ``p = exp(-mean token NLL)``, oriented so that
positive is good: ``p_new - p_true`` for efficacy and generalization, ``p_true - p_new`` for locality (ROME's
``*_diff`` summaries use the same orientation). They are averaged like the scores.

**zsRE** (MEND, Mitchell et al. 2022; ROME). The target is fed after the prompt and each target token counts as
correct when it is the model's argmax at the previous position (:func:`teacher_forced_accuracy`): a per-prompt
fraction of correct tokens. Efficacy uses the edit question, generalization its rephrasing, locality the
unrelated ``loc`` question. *Locality choice*: by default the ``loc`` prompt is scored against the tokens of its
own answer ``loc_ans``, as MEND / ROME / MEMIT report it (so an unedited model does not score 1.0). Pass the
pre-edit predictions (:func:`teacher_forced_predictions` on the unedited model) as ``reference=`` to score instead
the share of tokens where the edited model's argmax equals the unedited model's (EasyEdit's definition).
:class:`ZsREScore` only accumulates the per-prompt fractions, so it serves either choice.

Per-case inputs (both metric classes, and :func:`counterfact_scores`) may be given as

- a 0-d tensor or a float: one case with one prompt;
- a 1-d tensor ``(cases,)``: one prompt per case (the usual shape of efficacy values for a batch of cases);
- a 2-d tensor ``(cases, prompts)``: the same number of prompts in every case;
- a list / tuple with one entry per case, each entry a float, a 0-d or 1-d tensor or a list of floats: a varying
  number of prompts per case (an empty entry is a case without such prompts).

Tokenization. A prompt is tokenized as the tokenizer does by default (with its BOS token, if it adds one); the
target's tokens are those of ``" " + target`` as it follows the prompt in running text
(:func:`prune_lightning.tokens.continuation_ids`, the definition the editors use too), and the two id lists are
concatenated. For GPT-2 that is ``tok(" " + target)``, as in the authors' evaluation (``kmeng01/rome``
``experiments/py/eval_utils_counterfact.py``). Batches are right-padded with an attention mask.

**Top-1 token accuracy on CounterFact prompts.** The zsRE measure applies to CounterFact requests too: the share of
``target_new``'s tokens that are the argmax at their position on the edited prompt and its paraphrases (EasyEdit's
``rewrite_acc`` and ``rephrase_acc``), and of ``target_true``'s on the neighborhood prompts.
:func:`teacher_forced_scores` gives the NLL and this accuracy from the same forward pass, and
:class:`TokenAccuracyScore` (of which :class:`ZsREScore` is the zsRE-named case) accumulates it beside
:class:`CounterFactScore`'s probability comparison.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from prune_lightning.tokens import continuation_ids

__all__ = [
    "CaseMeans",
    "CounterFactScore",
    "TokenAccuracyScore",
    "ZsREScore",
    "continuation_ids",
    "counterfact_scores",
    "target_nll",
    "teacher_forced_accuracy",
    "teacher_forced_predictions",
    "teacher_forced_scores",
]

PerCase = Union[float, Tensor, Sequence[Any]]

_CF_PARTS = ("efficacy", "paraphrase", "neighborhood")
_CF_SCORES = {"efficacy": "efficacy", "paraphrase": "generalization", "neighborhood": "locality"}
_ZSRE_PARTS = ("efficacy", "generalization", "locality")


# --------------------------------------------------------------------------------------------------------------------
# teacher forcing on a causal LM
# --------------------------------------------------------------------------------------------------------------------


def _prompt_ids(tokenizer: Any, prompt: str, index: int) -> list[int]:
    if not isinstance(prompt, str):
        raise ValueError(f"prompts[{index}] must be a string, got {type(prompt).__name__}")
    ids = list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise ValueError(
            f"prompts[{index}] = {prompt!r} tokenizes to no tokens: the first target token would have nothing to "
            "condition on"
        )
    return ids


def _check_pairs(prompts: Sequence[str], targets: Sequence[str], batch_size: int) -> None:
    if isinstance(prompts, str) or isinstance(targets, str):
        raise ValueError("prompts and targets must be sequences of strings, not a single string")
    if len(prompts) != len(targets):
        raise ValueError(f"got {len(prompts)} prompts but {len(targets)} targets; give one target per prompt")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _teacher_forced(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], batch_size: int
) -> list[tuple[Tensor, Tensor]]:
    """For each (prompt, target): ``(target_ids, log_probs)`` with ``log_probs`` of shape ``(len(target_ids), V)``.

    Only the rows of the positions that predict target tokens are kept (on the CPU, float32), so memory stays at
    ``target length x vocabulary`` per example.
    """
    _check_pairs(prompts, targets, batch_size)
    encoded = [
        (_prompt_ids(tokenizer, p, i), continuation_ids(tokenizer, t, p))
        for i, (p, t) in enumerate(zip(prompts, targets))
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start : start + batch_size]
                width = max(len(p) + len(t) for p, t in chunk)
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, (p, t) in enumerate(chunk):
                    ids = p + t
                    input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    attention[row, : len(ids)] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
                for row, (p, t) in enumerate(chunk):
                    # the logits at position j predict the token at j + 1
                    rows = logits[row, len(p) - 1 : len(p) + len(t) - 1].float()
                    out.append((torch.tensor(t, dtype=torch.long), torch.log_softmax(rows, dim=-1).cpu()))
    finally:
        model.train(was_training)
    return out


def target_nll(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 16
) -> Tensor:
    """Teacher-forced mean per-token negative log-likelihood of ``" " + target`` after each prompt.

    Args:
        model: A causal LM (``model(input_ids=..., attention_mask=...).logits``); put in eval mode for the call and
            restored afterwards.
        tokenizer: Its tokenizer.
        prompts: Complete prompts, e.g. ``"The mother tongue of Danielle Darrieux is"``.
        targets: One continuation per prompt, without the leading space (``"French"``).
        batch_size: Prompts per forward pass.

    Returns:
        A float tensor of shape ``(len(prompts),)`` (on the CPU): the mean NLL of the target's tokens, in nats.
    """
    scored = _teacher_forced(model, tokenizer, prompts, targets, batch_size)
    values = [-lp.gather(1, ids[:, None]).mean() for ids, lp in scored]
    return torch.stack(values) if values else torch.zeros(0)


def teacher_forced_scores(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 16
) -> tuple[Tensor, Tensor]:
    """:func:`target_nll` and :func:`teacher_forced_accuracy` of each ``(prompt, target)`` from one forward pass.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        prompts: Complete prompts.
        targets: One continuation per prompt, without the leading space.
        batch_size: Prompts per forward pass.

    Returns:
        ``(nll, accuracy)``, two float tensors of shape ``(len(prompts),)`` (on the CPU): the mean NLL of the target's
        tokens, and the share of them that are the argmax at their position.
    """
    scored = _teacher_forced(model, tokenizer, prompts, targets, batch_size)
    if not scored:
        return torch.zeros(0), torch.zeros(0)
    nll = torch.stack([-lp.gather(1, ids[:, None]).mean() for ids, lp in scored])
    accuracy = torch.stack([(lp.argmax(dim=-1) == ids).float().mean() for ids, lp in scored])
    return nll, accuracy


def teacher_forced_predictions(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 16
) -> list[Tensor]:
    """The model's argmax token at every target position, with the target fed in (teacher forcing).

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        prompts: Complete prompts.
        targets: One continuation per prompt, without the leading space.
        batch_size: Prompts per forward pass.

    Returns:
        One long tensor per prompt, as long as the target's tokens (:func:`continuation_ids`).
    """
    return [lp.argmax(dim=-1) for _, lp in _teacher_forced(model, tokenizer, prompts, targets, batch_size)]


def teacher_forced_accuracy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 16,
    reference: Optional[Sequence[Tensor]] = None,
) -> Tensor:
    """Per example, the share of target tokens that the model predicts by argmax under teacher forcing.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        prompts: Complete prompts (zsRE questions).
        targets: One answer per prompt, without the leading space.
        batch_size: Prompts per forward pass.
        reference: Optional token ids to compare against instead of the target's own tokens, one tensor per prompt
            (e.g. :func:`teacher_forced_predictions` of the unedited model, for EasyEdit-style locality).

    Returns:
        A float tensor of shape ``(len(prompts),)`` with values in ``[0, 1]``.
    """
    scored = _teacher_forced(model, tokenizer, prompts, targets, batch_size)
    if reference is not None and len(reference) != len(scored):
        raise ValueError(f"reference has {len(reference)} entries but there are {len(scored)} prompts")
    values = []
    for i, (ids, lp) in enumerate(scored):
        expected = ids if reference is None else torch.as_tensor(reference[i], dtype=torch.long).cpu()
        if expected.shape != ids.shape:
            raise ValueError(
                f"reference[{i}] has {expected.numel()} tokens but target {targets[i]!r} has {ids.numel()}"
            )
        values.append((lp.argmax(dim=-1) == expected).float().mean())
    return torch.stack(values) if values else torch.zeros(0)


# --------------------------------------------------------------------------------------------------------------------
# per-case values
# --------------------------------------------------------------------------------------------------------------------


def _as_cases(values: PerCase, name: str) -> list[Tensor]:
    """Per-case values (see the module docstring) -> one 1-d float tensor per case."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return [torch.tensor([float(values)])]
    if isinstance(values, Tensor):
        t = values.detach().float().cpu()
        if t.dim() == 0:
            return [t.reshape(1)]
        if t.dim() == 1:
            return [v.reshape(1) for v in t]
        if t.dim() == 2:
            return list(t)
        raise ValueError(f"{name} must be 0-, 1- or 2-dimensional, got shape {tuple(values.shape)}")
    if isinstance(values, (list, tuple)):
        cases = []
        for i, entry in enumerate(values):
            try:
                t = torch.as_tensor(entry, dtype=torch.float32).detach().cpu()
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"{name}[{i}] is not a number or a list of numbers: {err}") from None
            if t.dim() > 1:
                raise ValueError(f"{name}[{i}] must be a number or 1-dimensional, got shape {tuple(t.shape)}")
            cases.append(t.reshape(-1))
        return cases
    raise ValueError(f"{name} must be a tensor, a float or a list of per-case values, got {type(values).__name__}")


def _paired_cases(new: PerCase, true: PerCase, part: str) -> tuple[list[Tensor], list[Tensor]]:
    a = _as_cases(new, f"{part}_nll_new")
    b = _as_cases(true, f"{part}_nll_true")
    if len(a) != len(b):
        raise ValueError(f"{part}_nll_new has {len(a)} cases but {part}_nll_true has {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"case {i}: {part}_nll_new has {x.numel()} prompts but {part}_nll_true has {y.numel()}")
    return a, b


def _counterfact_update(
    parts: dict[str, tuple[PerCase, PerCase]],
) -> tuple[int, dict[str, tuple[Tensor, Tensor, Tensor]]]:
    """Per part: ``(sum of per-case success rates, sum of per-case margins, number of cases with prompts)``."""
    totals: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    n_cases: Optional[int] = None
    for part, (new, true) in parts.items():
        a, b = _paired_cases(new, true, part)
        if n_cases is not None and len(a) != n_cases:
            raise ValueError(f"{part} values hold {len(a)} cases but efficacy values hold {n_cases}")
        n_cases = len(a) if n_cases is None else n_cases
        success, margin, count = torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0)
        for x, y in zip(a, b):
            if x.numel() == 0:
                continue
            p_new, p_true = torch.exp(-x), torch.exp(-y)
            if part == "neighborhood":
                success = success + (y < x).float().mean()
                margin = margin + (p_true - p_new).mean()
            else:
                success = success + (x < y).float().mean()
                margin = margin + (p_new - p_true).mean()
            count = count + 1
        totals[part] = (success, margin, count)
    return n_cases or 0, totals


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return num / den if den > 0 else torch.tensor(float("nan"))


def counterfact_scores(nll_new: dict[str, PerCase], nll_true: dict[str, PerCase]) -> dict[str, Tensor]:
    """CounterFact efficacy, generalization and locality from per-prompt NLLs of the new and the true object.

    Args:
        nll_new: ``{"efficacy": ..., "paraphrase": ..., "neighborhood": ...}``: per-case NLLs of ``target_new``
            (:func:`target_nll`) on the edited prompt, the paraphrase prompts and the neighborhood prompts.
            ``"efficacy"`` is required; the other two may be left out. Per-case shapes: see the module docstring.
        nll_true: The same for ``target_true``.

    Returns:
        ``efficacy``, ``generalization``, ``locality`` (success rates in ``[0, 1]``) and ``efficacy_margin``,
        ``generalization_margin``, ``locality_margin`` (probability differences, positive is good). A score without
        any case holding its prompts is NaN.

    Example:
        >>> import torch
        >>> s = counterfact_scores({"efficacy": torch.tensor([0.5, 3.0])}, {"efficacy": torch.tensor([2.0, 1.0])})
        >>> float(s["efficacy"])
        0.5
    """
    unknown = sorted((set(nll_new) | set(nll_true)) - set(_CF_PARTS))
    if unknown:
        raise ValueError(f"unknown CounterFact prompt kind(s) {unknown}; expected keys among {list(_CF_PARTS)}")
    if set(nll_new) != set(nll_true):
        raise ValueError(f"nll_new has keys {sorted(nll_new)} but nll_true has {sorted(nll_true)}")
    if "efficacy" not in nll_new:
        raise ValueError("nll_new and nll_true need an 'efficacy' entry (the edited prompts)")
    parts = {p: (nll_new[p], nll_true[p]) for p in _CF_PARTS if p in nll_new}
    _, totals = _counterfact_update(parts)
    out: dict[str, Tensor] = {}
    for part in _CF_PARTS:
        success, margin, count = totals.get(part, (torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0)))
        out[_CF_SCORES[part]] = _safe_div(success, count)
        out[f"{_CF_SCORES[part]}_margin"] = _safe_div(margin, count)
    return out


class CounterFactScore(Metric):
    """Accumulates CounterFact efficacy / generalization / locality over cases (see :func:`counterfact_scores`).

    Each score is the mean over cases of the case's success rate; cases are counted per score, so a case
    without neighborhood prompts does not dilute locality. States are sums (``dist_reduce_fx="sum"``).

    Example:
        >>> import torch
        >>> metric = CounterFactScore()
        >>> metric.update(torch.tensor([0.5]), torch.tensor([2.0]),
        ...               neighborhood_nll_new=[torch.tensor([3.0, 0.1])],
        ...               neighborhood_nll_true=[torch.tensor([1.0, 1.0])])
        >>> {k: round(float(v), 2) for k, v in metric.compute().items() if not k.endswith("margin")}
        {'efficacy': 1.0, 'generalization': nan, 'locality': 0.5}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for part in _CF_PARTS:
            score = _CF_SCORES[part]
            self.add_state(f"{score}_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{score}_margin_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{score}_cases", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        efficacy_nll_new: PerCase,
        efficacy_nll_true: PerCase,
        paraphrase_nll_new: Optional[PerCase] = None,
        paraphrase_nll_true: Optional[PerCase] = None,
        neighborhood_nll_new: Optional[PerCase] = None,
        neighborhood_nll_true: Optional[PerCase] = None,
    ) -> None:
        """Adds cases: the NLLs of the new and the true object on each kind of prompt (:func:`target_nll`).

        Args:
            efficacy_nll_new: Per-case NLL of ``target_new`` on the edited prompt(s).
            efficacy_nll_true: Per-case NLL of ``target_true`` on the same prompts.
            paraphrase_nll_new: Per-case NLLs of ``target_new`` on the paraphrases (optional).
            paraphrase_nll_true: The same for ``target_true``.
            neighborhood_nll_new: Per-case NLLs of ``target_new`` on the neighborhood prompts (optional).
            neighborhood_nll_true: The same for ``target_true``.
        """
        parts = {"efficacy": (efficacy_nll_new, efficacy_nll_true)}
        for part, new, true in (
            ("paraphrase", paraphrase_nll_new, paraphrase_nll_true),
            ("neighborhood", neighborhood_nll_new, neighborhood_nll_true),
        ):
            if (new is None) != (true is None):
                raise ValueError(f"give both {part}_nll_new and {part}_nll_true, or neither")
            if new is not None:
                parts[part] = (new, true)
        _, totals = _counterfact_update(parts)
        for part, values in totals.items():
            score = _CF_SCORES[part]
            for state, value in zip((f"{score}_sum", f"{score}_margin_sum", f"{score}_cases"), values):
                setattr(self, state, getattr(self, state) + value.to(self.device, torch.float64))

    def compute(self) -> dict[str, Tensor]:
        """``efficacy``, ``generalization``, ``locality`` and their ``*_margin``; NaN where no case counted."""
        out: dict[str, Tensor] = {}
        for part in _CF_PARTS:
            score = _CF_SCORES[part]
            cases = getattr(self, f"{score}_cases")
            out[score] = _safe_div(getattr(self, f"{score}_sum"), cases).float()
            out[f"{score}_margin"] = _safe_div(getattr(self, f"{score}_margin_sum"), cases).float()
        return out


class CaseMeans(Metric):
    """Means over cases of per-prompt values in ``[0, 1]``, one mean per named part.

    Each update gives, per part, per-case values (see the module docstring for the shapes): a case's prompts are
    averaged first, then the cases; a case without prompts for a part does not count for that part. States are sums
    and case counts (``dist_reduce_fx="sum"``). Subclasses name the parts (``parts``) and give ``update`` a typed
    signature: :class:`TokenAccuracyScore`, :class:`ZsREScore`,
    :class:`~prune_lightning.metrics.free_generation.FreeGenerationScore`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    parts: tuple[str, ...] = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for part in self.parts:
            self.add_state(f"{part}_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{part}_cases", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, **values: Optional[PerCase]) -> None:
        """Adds cases: ``part=per-case values`` for any of :attr:`parts` (``None`` or left out: none)."""
        unknown = sorted(set(values) - set(self.parts))
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown part(s) {unknown}; expected among {list(self.parts)}")
        for part in self.parts:
            if values.get(part) is None:
                continue
            cases = [c for c in _as_cases(values[part], part) if c.numel()]
            for c in cases:
                if bool(((c < 0) | (c > 1)).any()):
                    raise ValueError(f"{part} values must lie in [0, 1], got {c.tolist()}")
            total = torch.stack([c.mean() for c in cases]).sum() if cases else torch.tensor(0.0)
            setattr(self, f"{part}_sum", getattr(self, f"{part}_sum") + total.to(self.device, torch.float64))
            setattr(self, f"{part}_cases", getattr(self, f"{part}_cases") + float(len(cases)))

    def compute(self) -> dict[str, Tensor]:
        """One mean per part; NaN where no case counted."""
        return {
            part: _safe_div(getattr(self, f"{part}_sum"), getattr(self, f"{part}_cases")).float()
            for part in self.parts
        }


class TokenAccuracyScore(CaseMeans):
    """Accumulates teacher-forced top-1 token accuracies on the edited prompt, its paraphrases and the neighbours.

    Feed it per-prompt fractions of :func:`teacher_forced_accuracy` (or the second value of
    :func:`teacher_forced_scores`): ``efficacy`` on the edited prompt(s), ``generalization`` on the paraphrases,
    ``locality`` on the neighborhood prompts, each against the answer that prompt should give. Any of the three may
    be left out of an update.
    """

    parts = ("efficacy", "generalization", "locality")

    def update(  # type: ignore[override]
        self,
        efficacy: Optional[PerCase] = None,
        generalization: Optional[PerCase] = None,
        locality: Optional[PerCase] = None,
    ) -> None:
        """Adds cases.

        Args:
            efficacy: Per-case token accuracy on the edited prompt(s).
            generalization: Per-case token accuracy on the paraphrases.
            locality: Per-case token accuracy (or agreement) on the neighborhood prompts.
        """
        super().update(efficacy=efficacy, generalization=generalization, locality=locality)


class ZsREScore(TokenAccuracyScore):
    """Accumulates zsRE efficacy / generalization / locality: means over cases of teacher-forced token accuracies.

    Feed it the per-prompt fractions of :func:`teacher_forced_accuracy` (edit question for efficacy, rephrasing for
    generalization, ``loc`` question for locality: against ``loc_ans`` by default, or against the unedited model's
    predictions via ``reference=``; see the module docstring). Per-case values may hold several prompts; they are
    averaged within the case first. Any of the three may be left out of an update.

    Example:
        >>> import torch
        >>> metric = ZsREScore()
        >>> metric.update(efficacy=torch.tensor([1.0, 0.5]), locality=torch.tensor([1.0, 1.0]))
        >>> {k: float(v) for k, v in metric.compute().items()}
        {'efficacy': 0.75, 'generalization': nan, 'locality': 1.0}
    """

"""Edit quality of a batch of ``EditRequest``: the prompts to score, scored in one pass, fed to the metrics.

Teacher-forced (:func:`update_edit_quality`). A CounterFact request (it has ``target_true``) is scored by NLL
comparison on its edited prompt, paraphrases and neighborhood prompts (:class:`~prune_lightning.metrics.
CounterFactScore`) and, from the same forward passes, by top-1 token accuracy (:class:`~prune_lightning.metrics.edit.
TokenAccuracyScore`: ``target_new`` on the edited prompt and paraphrases, ``target_true`` on the neighbours); a zsRE
request (no ``target_true``) by teacher-forced token accuracy of ``target_new`` on its question and rephrasings and of
its ``neighborhood_targets`` on the locality questions (:class:`~prune_lightning.metrics.ZsREScore`).

Free generation (:func:`update_free_generation`). Every one of those prompts is continued greedily
(:func:`~prune_lightning.generation.generate_batched_ids`, the batched generation of the general-ability
evaluation, which keeps a sharded model's ranks in lockstep) and the continuation is checked against the answer the
prompt should give (:mod:`prune_lightning.metrics.free_generation`: ``exact_match`` and ``contains``).

Names. :class:`EditQualityMetrics` holds the metrics of one scoring and reports them as ``<protocol>/<kind>/<score>``,
the names that :class:`~prune_lightning.callbacks.EditQualityEvaluator` logs under ``edit_quality/<timing>/`` and
:class:`~prune_lightning.SequentialEditor` under ``val/`` and ``test/``. The contract (per request, then the mean over
requests; a case's several paraphrases or neighbours are averaged first):

=================  ===========  =================================  ====================================================
protocol           kind         score                              what
=================  ===========  =================================  ====================================================
teacher_forced     counterfact  ``probability_success``            edited prompt: P(new) > P(true) (ROME's efficacy
                                                                   score; ``CounterFactScore``'s ``efficacy``)
teacher_forced     counterfact  ``probability_margin``             edited prompt: p(new) - p(true)
teacher_forced     counterfact  ``top1_accuracy``                  edited prompt: share of ``target_new``'s tokens that
                                                                   are the argmax (EasyEdit's ``rewrite_acc``)
teacher_forced     counterfact  ``generalization``                 paraphrases: P(new) > P(true)
teacher_forced     counterfact  ``generalization_margin``          paraphrases: p(new) - p(true)
teacher_forced     counterfact  ``generalization_top1_accuracy``   paraphrases: top-1 token accuracy of ``target_new``
teacher_forced     counterfact  ``locality``                       neighbours: P(true) > P(new)
teacher_forced     counterfact  ``locality_margin``                neighbours: p(true) - p(new)
teacher_forced     counterfact  ``locality_top1_accuracy``         neighbours: top-1 token accuracy of ``target_true``
teacher_forced     zsre         ``top1_accuracy``                  question: top-1 token accuracy of ``target_new``
                                                                   (``ZsREScore``'s ``efficacy``)
teacher_forced     zsre         ``generalization``                 rephrasings: top-1 token accuracy of ``target_new``
teacher_forced     zsre         ``locality``                       ``loc`` questions: top-1 token accuracy of
                                                                   ``loc_ans``
free_generation    both         ``exact_match``                    edited prompt: the greedy continuation begins with
                                                                   ``target_new``'s tokens
free_generation    both         ``contains``                       edited prompt: the continuation contains
                                                                   ``target_new`` (normalised text)
free_generation    both         ``generalization_exact_match``,    paraphrases / rephrasings, against ``target_new``
                                ``generalization_contains``
free_generation    both         ``locality_exact_match``,          neighbours, against each one's own answer
                                ``locality_contains``              (``target_true``; zsRE: ``loc_ans``)
=================  ===========  =================================  ====================================================

For every score higher is better. A kind of request without cases is left out (see :meth:`EditQualityMetrics.compute`).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from prune_lightning.distributed import lockstep
from prune_lightning.generation import generate_batched_ids
from prune_lightning.metrics.edit import (CounterFactScore, TokenAccuracyScore, ZsREScore, teacher_forced_accuracy,
                                          teacher_forced_scores)
from prune_lightning.metrics.free_generation import FreeGenerationScore, free_generation_scores
from prune_lightning.tokens import continuation_ids

__all__ = ["KINDS", "PROTOCOLS", "EditQualityMetrics", "request_kind", "update_edit_quality",
           "update_free_generation"]

PROTOCOLS = ("teacher_forced", "free_generation")
KINDS = ("counterfact", "zsre")

# The metrics of one scoring, by slot "<protocol>/<kind>[/<part>]", and how their keys are named in the contract.
_RENAMES: dict[str, dict[str, str]] = {
    "teacher_forced/counterfact": {"efficacy": "probability_success", "efficacy_margin": "probability_margin"},
    "teacher_forced/counterfact/top1": {"efficacy": "top1_accuracy", "generalization": "generalization_top1_accuracy",
                                        "locality": "locality_top1_accuracy"},
    "teacher_forced/zsre": {"efficacy": "top1_accuracy"},
}
# The score that says whether a kind was scored at all: every request of the kind has its edited prompt.
_HEADLINE = {"counterfact": "teacher_forced/counterfact/probability_success",
             "zsre": "teacher_forced/zsre/top1_accuracy"}


def request_kind(request: Any) -> str:
    """``"counterfact"`` for a request with a ``target_true``, else ``"zsre"``."""
    return "counterfact" if request.target_true is not None else "zsre"


def _split(values: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(values, list(sizes))) if len(values) else [values[:0] for _ in sizes]


def update_edit_quality(
    counterfact: CounterFactScore,
    zsre: ZsREScore,
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence,
    batch_size: int = 16,
    counterfact_top1: Optional[TokenAccuracyScore] = None,
) -> None:
    """Scores ``requests`` on ``model`` by teacher forcing and adds them to the matching metric.

    Args:
        counterfact: Receives the requests that have a ``target_true``.
        zsre: Receives the others.
        model: The (edited) causal LM.
        tokenizer: Its tokenizer.
        requests: ``EditRequest`` objects.
        batch_size: Prompts per forward pass.
        counterfact_top1: Optionally receives the top-1 token accuracies of the CounterFact requests, from the same
            forward passes.
    """
    # A sharded model (FSDP): every rank enters, also one without requests, and the forwards stay paired.
    with lockstep(model):
        cf = [r for r in requests if r.target_true is not None]
        zs = [r for r in requests if r.target_true is None]
        if cf:
            groups = [[r.rendered_prompt] for r in cf], [list(r.paraphrase_prompts) for r in cf], \
                [list(r.neighborhood_prompts) for r in cf]
            prompts, new, true, sizes = [], [], [], []
            for group in groups:
                for request, group_prompts in zip(cf, group):
                    prompts += group_prompts
                    new += [request.target_new] * len(group_prompts)
                    true += [request.target_true] * len(group_prompts)
                    sizes.append(len(group_prompts))
            nll_new, accuracy_new = (_split(v, sizes) for v in teacher_forced_scores(model, tokenizer, prompts, new,
                                                                                    batch_size))
            nll_true, accuracy_true = (_split(v, sizes) for v in teacher_forced_scores(model, tokenizer, prompts, true,
                                                                                      batch_size))
            n = len(cf)
            counterfact.update(
                torch.stack([v[0] for v in nll_new[:n]]), torch.stack([v[0] for v in nll_true[:n]]),
                paraphrase_nll_new=nll_new[n:2 * n], paraphrase_nll_true=nll_true[n:2 * n],
                neighborhood_nll_new=nll_new[2 * n:], neighborhood_nll_true=nll_true[2 * n:],
            )
            if counterfact_top1 is not None:
                counterfact_top1.update(efficacy=torch.stack([v[0] for v in accuracy_new[:n]]),
                                        generalization=accuracy_new[n:2 * n], locality=accuracy_true[2 * n:])
        if zs:
            prompts, targets = [], []
            for request in zs:
                prompts.append(request.rendered_prompt)
                targets.append(request.target_new)
            for request in zs:
                prompts += list(request.paraphrase_prompts)
                targets += [request.target_new] * len(request.paraphrase_prompts)
            for request in zs:
                prompts += list(request.neighborhood_prompts)
                targets += list(request.neighborhood_targets)
            sizes = [1] * len(zs) + [len(r.paraphrase_prompts) for r in zs] + [len(r.neighborhood_prompts) for r in zs]
            accuracy = _split(teacher_forced_accuracy(model, tokenizer, prompts, targets, batch_size), sizes)
            n = len(zs)
            zsre.update(efficacy=accuracy[:n], generalization=accuracy[n:2 * n], locality=accuracy[2 * n:])


def _answers(request: Any) -> list[tuple[str, list[str], list[str]]]:
    """The prompts of ``request`` by part and the answer each should give: ``(part, prompts, answers)``."""
    paraphrases, neighbours = list(request.paraphrase_prompts), list(request.neighborhood_prompts)
    local = [request.target_true] * len(neighbours) if request.target_true is not None else \
        list(request.neighborhood_targets)
    return [("", [request.rendered_prompt], [request.target_new]),
            ("generalization_", paraphrases, [request.target_new] * len(paraphrases)),
            ("locality_", neighbours if local else [], local)]


def update_free_generation(
    counterfact: FreeGenerationScore,
    zsre: FreeGenerationScore,
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence,
    batch_size: int = 16,
    max_new_tokens: Optional[int] = None,
    new_token_slack: int = 3,
) -> None:
    """Continues every prompt of ``requests`` greedily and adds ``exact_match`` / ``contains`` to the matching metric.

    The edited prompt and the paraphrases are checked against ``target_new``, the neighborhood prompts against their
    own answer (``target_true``; a zsRE request's ``neighborhood_targets``, and none where it has none). All prompts
    are generated in one :func:`~prune_lightning.generation.generate_batched_ids` call, as many new tokens as the
    longest need; greedy continuations do not depend on their batch, so each prompt's is cut to its own length.

    Args:
        counterfact: Receives the requests that have a ``target_true``.
        zsre: Receives the others.
        model: The (edited) causal LM.
        tokenizer: Its tokenizer.
        requests: ``EditRequest`` objects.
        batch_size: Prompts per ``generate`` call.
        max_new_tokens: The ``contains`` window, in tokens: ``None`` - each target's token count plus
            ``new_token_slack``. ``exact_match`` always reads the target's token count, generating that many if more.
        new_token_slack: Tokens beyond the target's for the default window.
    """
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be None or an int >= 1, got {max_new_tokens!r}")
    if isinstance(new_token_slack, bool) or not isinstance(new_token_slack, int) or new_token_slack < 0:
        raise ValueError(f"new_token_slack must be an int >= 0, got {new_token_slack!r}")
    # (request index, part, prompt, answer, answer's token ids, contains window)
    items = []
    for index, request in enumerate(requests):
        for part, prompts, answers in _answers(request):
            for prompt, answer in zip(prompts, answers):
                ids = continuation_ids(tokenizer, answer, prompt)
                window = max_new_tokens if max_new_tokens is not None else len(ids) + new_token_slack
                items.append((index, part, prompt, answer, ids, window))
    longest = max((max(len(ids), window) for *_, ids, window in items), default=1)
    # Called also without prompts: on a sharded model every rank joins the forwards (distributed.lockstep).
    generated = generate_batched_ids(model, tokenizer, [item[2] for item in items], longest, batch_size=batch_size)
    texts = [tokenizer.decode(ids[:window], skip_special_tokens=True) for ids, (*_, window) in zip(generated, items)]
    scores = free_generation_scores(generated, texts, [item[4] for item in items], [item[3] for item in items])
    per_request: list[dict[str, list[float]]] = [{} for _ in requests]
    for (index, part, *_), exact, contains in zip(items, scores["exact_match"].tolist(), scores["contains"].tolist()):
        per_request[index].setdefault(f"{part}exact_match", []).append(exact)
        per_request[index].setdefault(f"{part}contains", []).append(contains)
    for kind, metric in (("counterfact", counterfact), ("zsre", zsre)):
        cases = [values for request, values in zip(requests, per_request) if request_kind(request) == kind]
        if cases:
            metric.update(**{part: [case.get(part, []) for case in cases] for part in FreeGenerationScore.parts})


class EditQualityMetrics:
    """The metrics of one scoring of edit requests, by protocol and kind, reported under the contract's names.

    Args:
        free_generation: Also score by greedy generation (:func:`update_free_generation`).
        max_new_tokens: The free-generation ``contains`` window (``None``: each target's tokens plus
            ``new_token_slack``).
        new_token_slack: See :func:`update_free_generation`.
        **metric_kwargs: Passed to every torchmetrics metric (e.g. ``sync_on_compute=False`` for states that are
            already totals over all ranks).
    """

    def __init__(self, free_generation: bool = False, max_new_tokens: Optional[int] = None, new_token_slack: int = 3,
                 **metric_kwargs: Any) -> None:
        self.free_generation = free_generation
        self.max_new_tokens = max_new_tokens
        self.new_token_slack = new_token_slack
        self.metrics: dict[str, Metric] = {
            "teacher_forced/counterfact": CounterFactScore(**metric_kwargs),
            "teacher_forced/counterfact/top1": TokenAccuracyScore(**metric_kwargs),
            "teacher_forced/zsre": ZsREScore(**metric_kwargs),
        }
        if free_generation:
            self.metrics["free_generation/counterfact"] = FreeGenerationScore(**metric_kwargs)
            self.metrics["free_generation/zsre"] = FreeGenerationScore(**metric_kwargs)

    def to(self, device: Any) -> "EditQualityMetrics":
        """Moves every metric to ``device`` (where NCCL sums the states across ranks); returns ``self``."""
        self.metrics = {slot: metric.to(device) for slot, metric in self.metrics.items()}
        return self

    def update(self, model: nn.Module, tokenizer: Any, requests: Sequence, batch_size: int = 16) -> None:
        """Scores ``requests`` on ``model`` by every protocol held. Every rank of a sharded model must call it, also
        with no requests."""
        with lockstep(model):
            update_edit_quality(self.metrics["teacher_forced/counterfact"], self.metrics["teacher_forced/zsre"], model,
                                tokenizer, requests, batch_size=batch_size,
                                counterfact_top1=self.metrics["teacher_forced/counterfact/top1"])
            if self.free_generation:
                update_free_generation(self.metrics["free_generation/counterfact"],
                                       self.metrics["free_generation/zsre"], model, tokenizer, requests,
                                       batch_size=batch_size, max_new_tokens=self.max_new_tokens,
                                       new_token_slack=self.new_token_slack)

    def compute(self) -> dict[str, float]:
        """``{"<protocol>/<kind>/<score>": value}`` for every kind that has cases (its edited-prompt score is not
        NaN). Every rank must call it: the metrics sum their states across ranks here (unless built with
        ``sync_on_compute=False``)."""
        values: dict[str, float] = {}
        for slot, metric in self.metrics.items():
            protocol, kind = slot.split("/")[:2]
            renames = _RENAMES.get(slot, {})
            with warnings.catch_warnings():
                # Merged states without an update() call, or a rank without requests: compute() is still right.
                warnings.filterwarnings("ignore", message=r".*compute.* was called before the .*update.*")
                computed = metric.compute()
            values.update({f"{protocol}/{kind}/{renames.get(key, key)}": float(value)
                           for key, value in computed.items()})
        scored = {kind for kind, headline in _HEADLINE.items() if values[headline] == values[headline]}
        return {key: value for key, value in values.items() if key.split("/")[1] in scored}

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def state(self) -> dict[str, dict[str, float]]:
        """The metrics' states (sums, case counts) as plain floats, ``{slot: {state: value}}``: checkpoint data."""
        return {slot: {name: float(value) for name, value in metric.metric_state.items()}
                for slot, metric in self.metrics.items()}

    def state_vector(self, device: Any = None) -> Tensor:
        """All states in one float64 vector, in a fixed order (:meth:`state`'s), e.g. to sum across ranks."""
        values = [value for slot in self.state().values() for value in slot.values()]
        return torch.tensor(values, dtype=torch.float64, device=device)

    def state_from_vector(self, vector: Tensor) -> dict[str, dict[str, float]]:
        """:meth:`state_vector`'s inverse: ``vector`` as ``{slot: {state: value}}``."""
        flat, out, position = vector.tolist(), {}, 0
        for slot, names in self.state().items():
            out[slot] = dict(zip(names, flat[position:position + len(names)]))
            position += len(names)
        return out

    def merge_state(self, state: dict[str, dict[str, float]]) -> None:
        """Adds ``state`` (:meth:`state`'s form) to the metrics; slots and states it lacks count as zero."""
        for slot, metric in self.metrics.items():
            given = state.get(slot, {})
            device = next(iter(metric.metric_state.values())).device
            metric.merge_state({name: torch.tensor(float(given.get(name, 0.0)), dtype=torch.float64, device=device)
                                for name in metric.metric_state})

"""Edit quality as edits accumulate, at explicit timings and by two protocols, under names that say both.

Sequential editing can undo itself: a later write may overwrite an earlier fact, and a restraint such as PRUNE
trades some edit strength for general abilities. And a score that feeds the target to the model (teacher forcing)
can report an edit that greedy generation never shows ("The Mirage of Model Editing", arXiv 2502.11177).
``EditQualityEvaluator`` therefore measures during ``Trainer.fit``, for each request edited so far,

- by **protocol**: ``teacher_forced`` (CounterFact's probability comparison and top-1 token accuracy side by side;
  zsRE's token accuracy) and ``free_generation`` (greedy continuation of each prompt, checked by ``exact_match`` and
  ``contains`` against the answer; ``free_generation=False`` turns it off, it costs a ``generate`` per prompt);
- per **kind**: ``counterfact`` for requests with a ``target_true``, ``zsre`` for the others;
- at four **timings**:

  ===================  ======================================================================  ===================
  timing               what is scored                                                          switch
  ===================  ======================================================================  ===================
  ``before_own_edit``  each batch on the model right before its own write (``on_train_batch_   ``pre_edit``
                       start``); the running mean over the requests edited so far
  ``after_own_edit``   each batch right after its own write and its restraints (PRUNE online,  ``after_own_edit``
                       RECT); the running mean over the requests edited so far
  ``retention``        all requests edited so far, every ``every_n_edits`` writes and at the   ``retention``
                       end of fit (after a post-hoc restraint)
  ``after_sequence``   all requests, once at the end of fit, after any post-hoc restraint      always
  ===================  ======================================================================  ===================

and logs ``edit_quality/<timing>/<protocol>/<kind>/<score>`` at the step = edits so far, e.g.
``edit_quality/after_sequence/teacher_forced/counterfact/probability_success`` or
``edit_quality/retention/free_generation/zsre/exact_match``. The scores (the contract for dashboards; defined in
:mod:`prune_lightning.metrics.quality` and :mod:`prune_lightning.metrics.free_generation`):

===============  ==================================  ============================================================
protocol         score                               prompts and rule (per request; a request's paraphrases or
                                                     neighbours are averaged first, then the requests)
===============  ==================================  ============================================================
teacher_forced   ``probability_success``             CounterFact, edited prompt: P(new) > P(true) (was
                                                     ``efficacy``)
teacher_forced   ``probability_margin``              CounterFact, edited prompt: p(new) - p(true) (was
                                                     ``efficacy_margin``)
teacher_forced   ``top1_accuracy``                   edited prompt: share of ``target_new``'s tokens that are
                                                     the argmax (EasyEdit's ``rewrite_acc``; zsRE: was
                                                     ``efficacy``)
teacher_forced   ``generalization``                  paraphrases: CounterFact P(new) > P(true); zsRE top-1
                                                     accuracy
teacher_forced   ``generalization_margin``           CounterFact paraphrases: p(new) - p(true)
teacher_forced   ``generalization_top1_accuracy``    CounterFact paraphrases: top-1 accuracy of
                                                     ``target_new``
teacher_forced   ``locality``                        neighbours: CounterFact P(true) > P(new); zsRE top-1
                                                     accuracy of ``loc_ans``
teacher_forced   ``locality_margin``                 CounterFact neighbours: p(true) - p(new)
teacher_forced   ``locality_top1_accuracy``          CounterFact neighbours: top-1 accuracy of ``target_true``
free_generation  ``exact_match``                     edited prompt: the greedy continuation's first tokens
                                                     are ``target_new``'s (as many as it has)
free_generation  ``contains``                        edited prompt: the normalised continuation
                                                     (``max_new_tokens`` tokens) contains the normalised
                                                     ``target_new``
free_generation  ``generalization_exact_match``      the same on the paraphrases, against ``target_new``
free_generation  ``generalization_contains``
free_generation  ``locality_exact_match``            the same on the neighbours, against each one's own
                                                     answer (CounterFact ``target_true``, zsRE ``loc_ans``)
free_generation  ``locality_contains``
===============  ==================================  ============================================================

A kind of request that has not been edited yet is not logged. The timings share every step: the running means are
logged at the retention points (every ``every_n_edits`` writes and the end), so that at the same x the curve
``before_own_edit`` < ``after_own_edit`` shows what the edits achieved and ``after_own_edit`` > ``retention`` what
later writes (or a restraint) took back. The end-of-fit evaluation is logged as both ``retention`` and
``after_sequence``, so the retention curve ends on the after-sequence score: after a post-hoc restraint it is a
second point at the last step (the model changed after the last write was evaluated); without one, when the last
step was just evaluated, its scores are logged again as ``after_sequence`` rather than recomputed.

:attr:`EditQualityEvaluator.history` has one row per logged value: ``step``, ``requests`` (edited so far),
``timing``, ``protocol``, ``kind``, ``score``, ``value`` (and ``pre_edit``, ``timing == "before_own_edit"``, kept for
readers of the rows of earlier versions). At the end of fit the whole history goes to the loggers that take tables
(W&B's ``log_table``, key ``edit_quality``, columns :data:`TABLE_COLUMNS`). Like the other measuring callbacks it runs
after the restraint callbacks (PRUNE, RECT) of the same write.

Cost. A retention point scores every request edited so far: after ``N`` edits, about ``N * N / every_n_edits``
request scorings in all; choose ``every_n_edits`` accordingly for long runs, or turn ``retention`` or
``free_generation`` off. The own-edit timings score each request once each.

Requests are collected from the training batches (``list[EditRequest]``, as :class:`~prune_lightning.data.
EditDataModule` serves them) and kept in the checkpoint as plain dicts with the history and the running sums (metric
states) of the own-edit timings, so a resumed fit goes on where it stopped. Works inside
:class:`~prune_lightning.SequentialEditor` and inside any LightningModule that has ``.model`` and ``.tokenizer`` and
trains on batches of ``EditRequest``.

Validate / test. This callback acts during fit only. ``prune-edit test`` (and ``validate``) already score the edit
quality of the requests by teacher forcing: ``SequentialEditor.test_step`` logs ``test/teacher_forced/<kind>/<score>``
with the scores above, so the callback adds nothing there.

Distributed. Under :class:`~prune_lightning.SequentialEditor` every rank edits every request (see
:mod:`prune_lightning.distributed`), so every rank keeps them all; each scores its shard (requests
``rank::world_size``, of the batch for the own-edit timings) and the metrics' states (sums and case counts) are summed
across ranks - in ``compute()``, which every rank calls, for retention and after-sequence; right after each batch for
the own-edit running sums, so every rank (and the checkpoint, written by rank 0) holds the totals. Generation keeps a
sharded model's ranks in lockstep (:func:`~prune_lightning.generation.generate_batched_ids`). The logged scores are
those of all requests, and :attr:`EditQualityEvaluator.history` holds them on every rank. In a data-parallel loop
whose ranks receive different batches (the first batch tells, by one small collective), each rank scores all of its
own requests and the states are summed in ``compute()`` alike.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from prune_lightning import distributed
from prune_lightning.callbacks._matrices import log_metrics
from prune_lightning.callbacks._schedule import EditSchedule, Scheduled, run_after_restraints
from prune_lightning.data.requests import EditRequest
from prune_lightning.generation import find_language_model
from prune_lightning.loggers import log_table
from prune_lightning.metrics.quality import EditQualityMetrics

__all__ = ["EditQualityEvaluator", "TABLE_COLUMNS", "TIMINGS"]

TIMINGS = ("before_own_edit", "after_own_edit", "retention", "after_sequence")
_OWN_EDIT = ("before_own_edit", "after_own_edit")

# The whole history, logged at the end of fit to the loggers that take tables (W&B's log_table).
TABLE_KEY = "edit_quality"
TABLE_COLUMNS = ["step", "requests", "timing", "protocol", "kind", "score", "value"]


def metric_name(timing: str, key: str) -> str:
    """The logged name of ``key`` (``"<protocol>/<kind>/<score>"``) at ``timing``."""
    return f"edit_quality/{timing}/{key}"


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"EditQualityEvaluator: {name} must be a bool, got {value!r}")
    return value


class EditQualityEvaluator(Scheduled, Callback):
    """Logs the edit quality of the requests edited so far: before / after each own edit, every n edits, at the end.

    Args:
        every_n_edits: Score all requests edited so far (``retention``) and log the own-edit running means after
            every n-th write (optimizer step). The end of fit is evaluated too (``after_sequence``; rescored unless
            that step was just evaluated and no restraint runs post hoc).
        batch_size: Prompts per forward pass or ``generate`` call.
        pre_edit: Score each batch before its own write (timing ``before_own_edit``).
        after_own_edit: Score each batch right after its own write and its restraints (timing ``after_own_edit``).
        retention: Score all requests edited so far every ``every_n_edits`` writes (timing ``retention``).
        free_generation: Also score by greedy generation (protocol ``free_generation``) at every timing.
        max_new_tokens: Free generation's ``contains`` window in tokens (``None``: each target's token count plus
            ``new_token_slack``).
        new_token_slack: Tokens beyond the target's in the default window.
    """

    def __init__(
        self,
        every_n_edits: int = 10,
        batch_size: int = 16,
        pre_edit: bool = True,
        after_own_edit: bool = True,
        retention: bool = True,
        free_generation: bool = True,
        max_new_tokens: Optional[int] = None,
        new_token_slack: int = 3,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"EditQualityEvaluator: batch_size must be an int >= 1, got {batch_size!r}")
        for name, value in (("pre_edit", pre_edit), ("after_own_edit", after_own_edit), ("retention", retention),
                            ("free_generation", free_generation)):
            _check_bool(name, value)
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens < 1):
            raise ValueError(
                f"EditQualityEvaluator: max_new_tokens must be None or an int >= 1, got {max_new_tokens!r}")
        if isinstance(new_token_slack, bool) or not isinstance(new_token_slack, int) or new_token_slack < 0:
            raise ValueError(f"EditQualityEvaluator: new_token_slack must be an int >= 0, got {new_token_slack!r}")
        self.schedule = EditSchedule("EditQualityEvaluator", every_n_edits)
        self.batch_size = batch_size
        self.pre_edit = pre_edit
        self.after_own_edit = after_own_edit
        self.retention = retention
        self.free_generation = free_generation
        self.max_new_tokens = max_new_tokens
        self.new_token_slack = new_token_slack
        self.requests: list[EditRequest] = []
        self.history: list[dict[str, Any]] = []
        # Running sums of the own-edit timings' metric states: timing -> slot -> state -> value (floats: checkpoints).
        self._running: dict[str, dict[str, dict[str, float]]] = {}
        self._pending_before: Optional[dict[str, dict[str, float]]] = None
        # Whether all ranks walk the same request stream (decided at the first batch of a fit; True on one process).
        self._replicated: Optional[bool] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_edits=self.every_n_edits, pre_edit=self.pre_edit)

    @property
    def timings(self) -> tuple[str, ...]:
        """The timings this evaluator logs, in :data:`TIMINGS` order."""
        on = {"before_own_edit": self.pre_edit, "after_own_edit": self.after_own_edit, "retention": self.retention,
              "after_sequence": True}
        return tuple(timing for timing in TIMINGS if on[timing])

    # ------------------------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        find_language_model(pl_module, type(self).__name__)
        run_after_restraints(trainer, self)
        self._replicated = None

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        requests = _as_requests(batch)
        if self._replicated is None:
            self._replicated = distributed.same_on_all_ranks(requests)
        self._pending_before = self._score_batch(trainer, pl_module, requests) if self.pre_edit else None

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        requests = _as_requests(batch)
        self.requests.extend(requests)
        if self._pending_before is not None:
            self._add_running("before_own_edit", self._pending_before)
            self._pending_before = None
        if self.after_own_edit:
            # This callback runs behind the restraints (run_after_restraints): the write is restrained already.
            self._add_running("after_own_edit", self._score_batch(trainer, pl_module, requests))
        if self.schedule.after_write(trainer):
            self.evaluate(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        last = self._last_retention()
        if self.schedule.at_end(trainer, after_restraints=True) or last is None:
            self.evaluate(trainer, pl_module, end=True)
        else:
            # The last step was just scored and nothing changed the model since: that is the after-sequence score.
            self._log(trainer, {metric_name("after_sequence", key): value for key, value in last.items()})
        log_table(trainer, TABLE_KEY, TABLE_COLUMNS, [[row[c] for c in TABLE_COLUMNS] for row in self.history])

    # ------------------------------------------------------------------------------------------------------------
    # scoring
    # ------------------------------------------------------------------------------------------------------------

    def _metrics(self, device: torch.device, **kwargs: Any) -> EditQualityMetrics:
        return EditQualityMetrics(free_generation=self.free_generation, max_new_tokens=self.max_new_tokens,
                                  new_token_slack=self.new_token_slack, **kwargs).to(device)

    def _score(self, trainer: Trainer, pl_module: LightningModule, requests: list[EditRequest]) -> EditQualityMetrics:
        """Fresh metrics holding this rank's share of ``requests`` scored on the current model."""
        model, tokenizer = find_language_model(pl_module, type(self).__name__)
        metrics = self._metrics(next(model.parameters()).device)
        # Called also with an empty shard: on a sharded model every rank joins the forwards (distributed.lockstep).
        metrics.update(model, tokenizer, self._shard(trainer, requests), batch_size=self.batch_size)
        return metrics

    def _score_batch(self, trainer: Trainer, pl_module: LightningModule,
                     requests: list[EditRequest]) -> dict[str, dict[str, float]]:
        """The metric states (sums, counts) of ``requests`` on the current model, summed over the ranks' shards."""
        metrics = self._score(trainer, pl_module, requests)
        totals = metrics.state_vector(device=next(pl_module.model.parameters()).device)
        if self._replicated is not False:
            totals = distributed.all_reduce_sum_(totals)
        return metrics.state_from_vector(totals)

    def _add_running(self, timing: str, state: dict[str, dict[str, float]]) -> None:
        totals = self._running.setdefault(timing, {})
        for slot, values in state.items():
            slot_totals = totals.setdefault(slot, {})
            for name, value in values.items():
                slot_totals[name] = slot_totals.get(name, 0.0) + value

    def _running_means(self, device: torch.device) -> dict[str, float]:
        """The own-edit timings' running means, ``{logged name: value}``; every rank must call it."""
        values: dict[str, float] = {}
        for timing in _OWN_EDIT:
            if timing not in self.timings:
                continue
            # Replicated: the running sums are totals over all ranks already; else compute() sums them.
            metrics = self._metrics(device, sync_on_compute=self._replicated is False)
            metrics.merge_state(self._running.get(timing, {}))
            values.update({metric_name(timing, key): value for key, value in metrics.compute().items()})
        return values

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, end: bool = False) -> dict[str, float]:
        """Logs the own-edit running means and, with ``retention`` or at the ``end``, scores every request edited so far
        on the current model; returns the logged values.

        Args:
            trainer: The trainer.
            pl_module: The module with ``.model`` and ``.tokenizer``.
            end: The end-of-fit evaluation: also logged as ``after_sequence``.
        """
        model, _ = find_language_model(pl_module, type(self).__name__)
        device = next(model.parameters()).device
        # A second evaluation at the same step (after a post-hoc restraint) has nothing new for the own-edit means.
        values = self._running_means(device) if trainer.global_step != self.last_step else {}
        if self.retention or end:
            scores = self._score(trainer, pl_module, self.requests).compute()  # every rank computes: sums the states
            timings = (["retention"] if self.retention else []) + (["after_sequence"] if end else [])
            for timing in timings:
                values.update({metric_name(timing, key): value for key, value in scores.items()})
        self.schedule.done(trainer)
        self._log(trainer, values)
        return values

    def _log(self, trainer: Trainer, values: dict[str, float]) -> None:
        step = trainer.global_step
        for key, value in values.items():
            _, timing, protocol, kind, score = key.split("/")
            self.history.append({"step": step, "requests": len(self.requests), "timing": timing, "protocol": protocol,
                                 "kind": kind, "score": score, "value": value,
                                 "pre_edit": timing == "before_own_edit"})
        log_metrics(trainer, values, step)

    def _last_retention(self) -> Optional[dict[str, float]]:
        """The scores of the last retention evaluation, ``{"<protocol>/<kind>/<score>": value}``, if it was at the
        last evaluated step; else ``None``."""
        rows = [row for row in self.history if row["timing"] == "retention" and row["step"] == self.last_step]
        if not rows:
            return None
        return {f"{row['protocol']}/{row['kind']}/{row['score']}": row["value"] for row in rows}

    def _shard(self, trainer: Trainer, requests: list[EditRequest]) -> list[EditRequest]:
        """This rank's share of ``requests``: its shard when all ranks hold the same ones, else all of them."""
        if self._replicated is False:
            return list(requests)
        return distributed.shard(requests, trainer.global_rank, trainer.world_size)

    # ------------------------------------------------------------------------------------------------------------
    # checkpoint
    # ------------------------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "requests": [request.to_dict() for request in self.requests],
            **self.schedule.state_dict(),
            "history": [dict(row) for row in self.history],
            "running": {timing: {slot: dict(state) for slot, state in slots.items()}
                        for timing, slots in self._running.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.requests = [EditRequest.from_dict(data) for data in state_dict.get("requests", [])]
        self.schedule.load_state_dict(state_dict)
        if "running" not in state_dict and ("pre_states" in state_dict or state_dict.get("history")):
            raise ValueError(
                "EditQualityEvaluator: this checkpoint was written before the evaluator logged timings and protocols "
                "(it has no 'running' state); its history cannot be continued under the new names. Resume without "
                "the evaluator's state (a fresh EditQualityEvaluator), or from a newer checkpoint."
            )
        self.history = [dict(row) for row in state_dict.get("history", [])]
        self._running = {timing: {slot: {name: float(value) for name, value in state.items()}
                                  for slot, state in slots.items()}
                         for timing, slots in state_dict.get("running", {}).items()}


def _as_requests(batch: Any) -> list[EditRequest]:
    """The batch as a list of ``EditRequest`` (dicts from ``EditRequest.to_dict`` are accepted too)."""
    if isinstance(batch, (str, bytes, Mapping)) or not isinstance(batch, Sequence):
        raise TypeError(
            f"EditQualityEvaluator expects training batches of EditRequest (as EditDataModule serves them), "
            f"got a {type(batch).__name__}"
        )
    requests = []
    for i, item in enumerate(batch):
        if isinstance(item, EditRequest):
            requests.append(item)
        elif isinstance(item, Mapping):
            requests.append(EditRequest.from_dict(item))
        else:
            raise TypeError(
                f"EditQualityEvaluator expects training batches of EditRequest (as EditDataModule serves them); "
                f"batch[{i}] is a {type(item).__name__}"
            )
    return requests

"""Edit quality as edits accumulate: efficacy, generalization and locality of the requests edited so far.

Sequential editing can undo itself: a later write may overwrite an earlier fact, and a restraint such as PRUNE
trades some edit strength for general abilities. ``EditQualityEvaluator`` measures that during ``Trainer.fit``:
after every ``every_n_edits``-th write and at the end of fit, it scores *all* requests edited so far on the current
model, with the CounterFact protocol for requests that have a ``target_true`` and the zsRE protocol for the others
(:func:`~prune_lightning.metrics.quality.update_edit_quality`, fresh metrics each time), and logs

- ``edit_quality/counterfact/<score>``: ``efficacy``, ``generalization``, ``locality`` and their ``*_margin``;
- ``edit_quality/zsre/<score>``: ``efficacy``, ``generalization``, ``locality``;

at the step = edits so far. A kind of request that has not been edited yet is not logged. At the end of fit the whole
history goes to the loggers that take tables (W&B's ``log_table``, key ``edit_quality``). Like the other
measuring callbacks it runs after the restraint callbacks (PRUNE, RECT) of the same write, and the end-of-fit
evaluation follows a post-hoc restraint (it is skipped when that step was just evaluated and none runs).

Pre-edit baseline. With ``pre_edit=True`` each batch is also scored on the model *before* its own edit
(``on_train_batch_start``, before ``training_step`` writes), and the running mean over the requests edited so far is
logged beside the post-edit values as ``edit_quality_pre/<kind>/<score>``: both are means over the same requests, so
``edit_quality/counterfact/efficacy`` against ``edit_quality_pre/counterfact/efficacy`` is what the edits achieved.
(Pre-edit locality is the unedited model's, the reference point of the post-edit locality.)

Cost. Every evaluation scores every request edited so far: after ``N`` edits, about ``N * N / every_n_edits``
request scorings in all; choose ``every_n_edits`` accordingly for long runs.

Requests are collected from the training batches (``list[EditRequest]``, as :class:`~prune_lightning.data.
EditDataModule` serves them) and kept in the checkpoint as plain dicts, so a resumed fit goes on scoring them. Works
inside :class:`~prune_lightning.SequentialEditor` and inside any LightningModule that has ``.model`` and
``.tokenizer`` and trains on batches of ``EditRequest``.

Validate / test. This callback acts during fit only. ``prune-edit test`` (and ``validate``) already score the edit
quality of the requests: ``SequentialEditor.test_step`` logs ``test/counterfact/*`` and ``test/zsre/*``, so the
callback adds nothing there.

Distributed. Under :class:`~prune_lightning.SequentialEditor` every rank edits every request (see
:mod:`prune_lightning.distributed`), so every rank keeps them all; each scores its shard (requests
``rank::world_size``, of the batch for the pre-edit values) and the metrics' states (sums and case counts) are summed
across ranks - in ``compute()``, which every rank calls, for the post-edit scores; right after each batch for the
pre-edit running sums, so every rank (and the checkpoint, written by rank 0) holds the totals. The logged scores are
those of all requests, and :attr:`EditQualityEvaluator.history` holds them on every rank. In a data-parallel loop
whose ranks receive different batches (the first batch tells, by one small collective), each rank scores all of its
own requests and the states are summed in ``compute()`` alike.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from prune_lightning import distributed
from prune_lightning.callbacks._matrices import log_metrics
from prune_lightning.loggers import log_table
from prune_lightning.callbacks._schedule import EditSchedule, Scheduled, run_after_restraints
from prune_lightning.data.requests import EditRequest
from prune_lightning.generation import find_language_model
from prune_lightning.metrics.edit import CounterFactScore, ZsREScore
from prune_lightning.metrics.quality import update_edit_quality

__all__ = ["EditQualityEvaluator"]

_KINDS = ("counterfact", "zsre")

# The whole history, logged at the end of fit to the loggers that take tables (W&B's log_table).
TABLE_KEY = "edit_quality"
TABLE_COLUMNS = ["step", "requests", "kind", "score", "pre_edit", "value"]


def _fresh_metrics(device: torch.device) -> dict[str, Any]:
    """A new metric per kind of request, on ``device`` (where the states are summed across ranks)."""
    return {"counterfact": CounterFactScore().to(device), "zsre": ZsREScore().to(device)}


def _pre_edit_metric(kind: str, state: Optional[dict[str, float]], device: torch.device, totals: bool) -> Any:
    """A new metric of ``kind`` holding the accumulated pre-edit ``state`` (sums and counts); with ``totals`` these are
    already summed over all ranks, and the metric does not sync."""
    metric = (CounterFactScore if kind == "counterfact" else ZsREScore)(sync_on_compute=not totals).to(device)
    if state:
        metric.merge_state({name: torch.tensor(value, dtype=torch.float64, device=device)
                            for name, value in state.items()})
    return metric


def _kind(request: EditRequest) -> str:
    return "counterfact" if request.target_true is not None else "zsre"


class EditQualityEvaluator(Scheduled, Callback):
    """Logs efficacy / generalization / locality of the requests edited so far, every n edits and at the end.

    Args:
        every_n_edits: Evaluate after every n-th write (optimizer step). The end of fit is evaluated too (unless
            that step was just evaluated and no restraint runs post hoc).
        batch_size: Prompts per forward pass when scoring.
        pre_edit: Also score each request on the model before its edit and log the running mean as
            ``edit_quality_pre/...``.
    """

    def __init__(self, every_n_edits: int = 10, batch_size: int = 16, pre_edit: bool = True) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"EditQualityEvaluator: batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(pre_edit, bool):
            raise ValueError(f"EditQualityEvaluator: pre_edit must be a bool, got {pre_edit!r}")
        self.schedule = EditSchedule("EditQualityEvaluator", every_n_edits)
        self.batch_size = batch_size
        self.pre_edit = pre_edit
        self.requests: list[EditRequest] = []
        self.history: list[dict[str, Any]] = []
        # Running sums of the pre-edit metrics' states (kind -> state name -> value), plain floats for checkpoints.
        self._pre_states: dict[str, dict[str, float]] = {}
        self._pending_pre: Optional[dict[str, dict[str, float]]] = None
        # Whether all ranks walk the same request stream (decided at the first batch of a fit; True on one process).
        self._replicated: Optional[bool] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_edits=self.every_n_edits, pre_edit=self.pre_edit)

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
        self._pending_pre = self._score_pre_edit(trainer, pl_module, requests) if self.pre_edit else None

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.requests.extend(_as_requests(batch))
        if self._pending_pre is not None:
            for kind, state in self._pending_pre.items():
                totals = self._pre_states.setdefault(kind, dict.fromkeys(state, 0.0))
                for name, value in state.items():
                    totals[name] = totals.get(name, 0.0) + value
            self._pending_pre = None
        if self.schedule.after_write(trainer):
            self.evaluate(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule.at_end(trainer, after_restraints=True):
            self.evaluate(trainer, pl_module)
        log_table(trainer, TABLE_KEY, TABLE_COLUMNS, [[row[c] for c in TABLE_COLUMNS] for row in self.history])

    # ------------------------------------------------------------------------------------------------------------
    # scoring
    # ------------------------------------------------------------------------------------------------------------

    def _score_pre_edit(self, trainer: Trainer, pl_module: LightningModule,
                        requests: list[EditRequest]) -> dict[str, dict[str, float]]:
        """The metric states (sums, counts) of ``requests`` on the current model, summed over the ranks' shards."""
        model, tokenizer = find_language_model(pl_module, type(self).__name__)
        device = next(model.parameters()).device
        metrics = _fresh_metrics(device)
        # Called also with an empty shard: on a sharded model every rank joins the forwards (distributed.lockstep).
        shard = self._shard(trainer, requests)
        update_edit_quality(metrics["counterfact"], metrics["zsre"], model, tokenizer, shard, batch_size=self.batch_size)
        kinds = [kind for kind in _KINDS if any(_kind(r) == kind for r in requests)]  # the same on every rank
        names = {kind: list(metrics[kind].metric_state) for kind in kinds}
        values = [metrics[kind].metric_state[name].to(device, torch.float64) for kind in kinds for name in names[kind]]
        totals = torch.stack(values) if values else torch.zeros(0)
        if self._replicated is not False:
            totals = distributed.all_reduce_sum_(totals)
        totals = totals.tolist()
        out, position = {}, 0
        for kind in kinds:
            out[kind] = dict(zip(names[kind], totals[position:position + len(names[kind])]))
            position += len(names[kind])
        return out

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Scores every request edited so far on the current model and logs the scores; returns the logged values."""
        model, tokenizer = find_language_model(pl_module, type(self).__name__)
        device = next(model.parameters()).device
        step = trainer.global_step
        metrics = _fresh_metrics(device)
        # Called also with an empty shard: on a sharded model every rank joins the forwards (distributed.lockstep).
        shard = self._shard(trainer, self.requests)
        update_edit_quality(metrics["counterfact"], metrics["zsre"], model, tokenizer, shard, batch_size=self.batch_size)
        kinds = {_kind(r) for r in self.requests}
        values: dict[str, float] = {}
        for kind in _KINDS:
            # Every rank computes every kind (the states are summed across ranks); only edited kinds are logged.
            scores = _compute(metrics[kind])
            if kind in kinds:
                values.update({f"edit_quality/{kind}/{name}": value for name, value in scores.items()})
            if self.pre_edit:
                pre_scores = _compute(_pre_edit_metric(kind, self._pre_states.get(kind), device,
                                                       totals=self._replicated is not False))
                if kind in self._pre_states:
                    values.update({f"edit_quality_pre/{kind}/{name}": value for name, value in pre_scores.items()})
        for key, value in values.items():
            _, kind, score = key.split("/")
            self.history.append({"step": step, "kind": kind, "score": score, "value": value,
                                 "pre_edit": key.startswith("edit_quality_pre/"), "requests": len(self.requests)})
        self.schedule.done(trainer)
        log_metrics(trainer, values, step)
        return values

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
            "pre_states": {kind: dict(state) for kind, state in self._pre_states.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.requests = [EditRequest.from_dict(data) for data in state_dict.get("requests", [])]
        self.schedule.load_state_dict(state_dict)
        self.history = [dict(row) for row in state_dict.get("history", [])]
        self._pre_states = {kind: {k: float(v) for k, v in state.items()}
                            for kind, state in state_dict.get("pre_states", {}).items()}


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


def _compute(metric: Any) -> dict[str, float]:
    # The metric may hold merged states without an update() call; its compute() is still right (sums / counts).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*compute.* was called before the .*update.*")
        return {name: float(value) for name, value in metric.compute().items()}

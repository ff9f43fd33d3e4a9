"""The shared schedule of the callbacks that rewrite the accumulated update (PRUNE, RECT).

Online: after every ``every_n_edits``-th write (optimizer step), so later edits see the restrained model. Post hoc:
once at the end of fit. Each restraint reads ``dW`` of every selected matrix from the registry, lets the subclass
rewrite it (:meth:`RestraintCallback.restrain_matrix`), writes ``W = W_0 + dW`` back and logs what changed.

Distributed (DDP; see :mod:`prune_lightning.distributed`). Every rank holds the same ``dW``, and must end with the same
restrained one. The selected matrices are dealt out round-robin (matrix ``i`` to rank ``i % world_size``); each rank
restrains its own, then every matrix's result is broadcast from its rank - the values to log (a few floats, pickled)
and, if it changed, the restrained update (the low-rank factors in one tensor, or the dense matrix, with
``torch.distributed.broadcast``) - and every rank writes ``W = W_0 + dW``. So the replicas are identical by
construction, not by trusting the linear algebra to be bit-reproducible, and an editor that writes several matrices
(MEMIT) has them restrained in parallel.

Measured against restraining on every rank (``benchmarks/ddp_editing.py --part sync``: 2 processes, gloo, 2 CPU
cores that other work shared; one matrix, per write, the slower rank, median of 5):

=======================================  ===============  =======================
matrix, accumulated update               every rank (ms)  rank 0 + broadcast (ms)
=======================================  ===============  =======================
tiny GPT-2 ``c_proj`` 256x64, rank 10    1.1              3.4
tiny GPT-2 ``c_proj`` 256x64, dense      6.3              4.9
GPT-2 XL ``c_proj`` 6400x1600, rank 100  141              75
GPT-2 XL ``c_proj`` 6400x1600, dense     15885            7856
=======================================  ===============  =======================

The broadcast costs one to two milliseconds (two small collectives and the factors; the dense 6400x1600 update, 41
MB, well under the SVD's time). Where the ranks share compute (CPU cores here) computing once is about twice as fast
as computing on every rank; where each rank has its own device it costs those milliseconds more than recomputing -
against tens of milliseconds to seconds of restraint and seconds of editing per write - and buys replicas that are
identical whatever the kernels do, plus parallelism over matrices.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from prune_lightning import distributed
from prune_lightning.callbacks._matrices import MatrixCallback, log_metrics, short_name
from prune_lightning.callbacks._schedule import EditSchedule, Scheduled
from prune_lightning.strategies import broadcast_restraint, refuse_flattened_shards
from prune_lightning.registry import EditedMatrix

_MODES = ("online", "post_hoc")


class RestraintCallback(Scheduled, MatrixCallback):
    """Base class: when to restrain, bookkeeping, logging, checkpoint state.

    Args:
        mode: ``"online"`` (after every ``every_n_edits``-th write) or ``"post_hoc"`` (once at the end of fit).
        every_n_edits: In online mode, restrain after every n-th write (optimizer step).
        modules: Names or glob patterns of the matrices to restrain (default: every edited matrix). Required outside
            ``SequentialEditor``.
        offload_w0: When this callback snapshots ``W_0`` itself, keep the copies in CPU memory.
    """

    #: Prefix of the logged metric keys, e.g. ``prune/<matrix>/...``.
    metric_prefix = "restraint"
    #: Marks a callback that rewrites the weights (measuring callbacks run after it; see ``_schedule``).
    rewrites_weights = True

    def __init__(
        self,
        mode: str = "online",
        every_n_edits: int = 1,
        modules: Union[str, Sequence[str], None] = None,
        offload_w0: bool = False,
    ) -> None:
        super().__init__(modules=modules, offload_w0=offload_w0)
        name = type(self).__name__
        if mode not in _MODES:
            raise ValueError(f"{name}: mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self.schedule = EditSchedule(name, every_n_edits)
        self.restraints = 0
        self.history: list[dict[str, Any]] = []

    def restrain_matrix(self, entry: EditedMatrix) -> dict[str, float]:
        """Rewrites ``entry.delta`` in place; returns the values to log for it (``changed`` > 0 if it changed)."""
        raise NotImplementedError

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_flattened_shards(trainer, type(self).__name__)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.mode == "online" and self.schedule.after_write(trainer):
            self.restrain(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode == "post_hoc" and self.schedule.at_end(trainer):
            self.restrain(trainer, pl_module)

    def restrain(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Restrains every selected matrix now, rewrites ``W = W_0 + dW`` and logs what it did."""
        registry = self._registry(pl_module)
        names = self._names(registry)
        registry.sync(names)
        step = trainer.global_step
        rank, world_size = distributed.rank(), distributed.world_size()
        # This rank's matrices first (in parallel with the other ranks' own), then each one's result from its rank.
        results: dict[int, dict[str, float]] = {}
        for i in distributed.shard_indices(len(names), rank, world_size):
            results[i] = self.restrain_matrix(registry[names[i]])
        if world_size > 1:
            for i, name in enumerate(names):
                results[i] = broadcast_restraint(registry[name].delta, results.get(i), src=i % world_size)
        metrics: dict[str, float] = {}
        for i, name in enumerate(names):
            values = results[i]
            if values.get("changed", 1.0):
                registry.write([name])
            values.pop("changed", None)
            metrics.update({f"{self.metric_prefix}/{short_name(name)}/{k}": float(v) for k, v in values.items()})
            self.history.append({"step": step, "name": name, **values})
        self.restraints += 1
        self.schedule.done(trainer)
        log_metrics(trainer, metrics, step)
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"restraints": self.restraints, **self.schedule.state_dict(), "history": list(self.history),
                **self._registry_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restraints = int(state_dict.get("restraints", 0))
        self.schedule.load_state_dict(state_dict)
        self.history = list(state_dict.get("history", []))
        self._load_registry_state(state_dict)

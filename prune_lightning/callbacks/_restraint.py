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

from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from prune_lightning import distributed
from prune_lightning.callbacks._matrices import MatrixCallback, log_metrics, short_name
from prune_lightning.registry import EditedMatrix
from prune_lightning.spectral import DeltaTracker

_MODES = ("online", "post_hoc")


class RestraintCallback(MatrixCallback):
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
        if every_n_edits < 1:
            raise ValueError(f"{name}: every_n_edits must be >= 1, got {every_n_edits}")
        self.mode = mode
        self.every_n_edits = every_n_edits
        self.restraints = 0
        self.last_step = -1
        self.history: list[dict[str, Any]] = []

    def restrain_matrix(self, entry: EditedMatrix) -> dict[str, float]:
        """Rewrites ``entry.delta`` in place; returns the values to log for it (``changed`` > 0 if it changed)."""
        raise NotImplementedError

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise NotImplementedError(
                f"{type(self).__name__} does not support {strategy}: its flattened parameter shards are not matrices. "
                "Shard with FSDP2 (ModelParallelStrategy), whose sharded matrices it gathers, or use DDP."
            )

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.mode == "online" and step != self.last_step and step % self.every_n_edits == 0:
            self.restrain(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode == "post_hoc" and trainer.global_step != self.last_step:
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
                results[i] = _share_restraint(registry[name].delta, results.get(i), src=i % world_size)
        metrics: dict[str, float] = {}
        for i, name in enumerate(names):
            values = results[i]
            if values.get("changed", 1.0):
                registry.write([name])
            values.pop("changed", None)
            metrics.update({f"{self.metric_prefix}/{short_name(name)}/{k}": float(v) for k, v in values.items()})
            self.history.append({"step": step, "name": name, **values})
        self.restraints += 1
        self.last_step = step
        log_metrics(trainer, metrics, step)
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"restraints": self.restraints, "last_step": self.last_step, "history": list(self.history),
                **self._registry_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restraints = int(state_dict.get("restraints", 0))
        self.last_step = int(state_dict.get("last_step", -1))
        self.history = list(state_dict.get("history", []))
        self._load_registry_state(state_dict)


_LAYOUTS = ("empty", "lowrank", "dense")


def _share_restraint(tracker: DeltaTracker, values: Optional[dict[str, float]], src: int) -> dict[str, float]:
    """Rank ``src``'s restraint of one matrix on every rank: its logged values and, if it changed, its update.

    Args:
        tracker: This rank's tracker of the matrix; rank ``src`` restrained its own, the others receive it.
        values: What ``restrain_matrix`` returned on rank ``src`` (``None`` elsewhere).
        src: The rank that restrained the matrix.
    """
    mine = distributed.rank() == src
    header: list[Any] = [None]
    if mine:
        layout = None
        if values.get("changed", 1.0):
            state = tracker.state_dict()
            columns = state["left"].shape[1] if state["mode"] == "lowrank" else 0
            layout = (state["mode"], columns, state["compressed_columns"])
        header = [{"values": values, "layout": layout}]
    dist.broadcast_object_list(header, src=src)  # a few floats and ints
    values, layout = header[0]["values"], header[0]["layout"]
    if layout is None:
        return values
    mode, columns, compressed = layout
    m, n = tracker.shape
    if mode == "lowrank":
        if mine:
            left, right = tracker.factors()
            flat = torch.cat([left.reshape(-1), right.reshape(-1)])
        else:
            flat = torch.empty((m + n) * columns, dtype=tracker.dtype, device=tracker.device)
        distributed.broadcast_(flat, src=src)
        if not mine:
            tracker.load_state_dict({"shape": [m, n], "mode": "lowrank", "compressed_columns": compressed,
                                     "left": flat[: m * columns].view(m, columns),
                                     "right": flat[m * columns:].view(n, columns)})
    elif mode == "dense":
        delta = tracker.dense() if mine else torch.empty(m, n, dtype=tracker.dtype, device=tracker.device)
        distributed.broadcast_(delta, src=src)
        if not mine:
            tracker.load_state_dict({"shape": [m, n], "mode": "dense", "delta": delta})
    elif not mine:
        tracker.load_state_dict({"shape": [m, n], "mode": "empty"})
    return values

"""The shared schedule of the callbacks that rewrite the accumulated update (PRUNE, RECT).

Online: after every ``every_n_edits``-th write (optimizer step), so later edits see the restrained model. Post hoc:
once at the end of fit. Each restraint reads ``dW`` of every selected matrix from the registry, lets the subclass
rewrite it (:meth:`RestraintCallback.restrain_matrix`), writes ``W = W_0 + dW`` back and logs what changed.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from prune_lightning.callbacks._matrices import MatrixCallback, log_metrics, short_name
from prune_lightning.registry import EditedMatrix

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
                f"{type(self).__name__} does not support {strategy} yet: it needs the full edited matrices on every "
                "rank."
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
        metrics: dict[str, float] = {}
        for name in names:
            entry = registry[name]
            values = self.restrain_matrix(entry)
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

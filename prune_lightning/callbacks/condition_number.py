r"""Condition numbers of the edited matrices as edits accumulate.

The PRUNE paper's central quantity: the condition number :math:`\kappa(W) = \sigma_{\max}(W) / \sigma_{\min}(W)`
of each edited matrix :math:`W = W_0 + \Delta W`. Its growth over sequential edits tracks the loss of general
abilities; a restraint such as PRUNE should keep it near :math:`\kappa(W_0)`.

``ConditionNumberMonitor`` logs, for every edited matrix, at edit 0 (before any edit) and every ``every_n_edits``
writes: ``kappa``, ``sigma_max`` and ``sigma_min`` of ``W``, and ``sigma_max`` of the accumulated update ``dW``.
Cheap where that is exact: ``sigma_max(dW)`` comes from the low-rank factors, and an unedited matrix reuses the
spectrum of ``W_0`` computed once; ``kappa(W)`` of an edited matrix needs both extreme singular values and is
computed exactly (no randomized estimate).

Measurements always follow the restraint callbacks of the same write (PRUNE, RECT), whatever order the callbacks
are listed in. Works inside :class:`~prune_lightning.SequentialEditor` and, given ``modules``, inside any
LightningModule.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from prune_lightning.callbacks._matrices import MatrixCallback, log_metrics, run_after_restraints, short_name
from prune_lightning.spectral import singular_value_extremes


class ConditionNumberMonitor(MatrixCallback):
    """Logs ``kappa(W)``, ``sigma_max(W)``, ``sigma_min(W)`` and ``sigma_max(dW)`` of the edited matrices.

    Args:
        every_n_edits: Log after every n-th write (optimizer step); edit 0 is always logged.
        modules: Names or glob patterns of the matrices to watch (default: every edited matrix). Required outside
            ``SequentialEditor``.
        offload_w0: When this callback snapshots ``W_0`` itself, keep the copies in CPU memory.
    """

    def __init__(
        self,
        every_n_edits: int = 1,
        modules: Union[str, Sequence[str], None] = None,
        offload_w0: bool = False,
    ) -> None:
        super().__init__(modules=modules, offload_w0=offload_w0)
        if every_n_edits < 1:
            raise ValueError(f"ConditionNumberMonitor: every_n_edits must be >= 1, got {every_n_edits}")
        self.every_n_edits = every_n_edits
        self.last_step = -1
        self.history: list[dict[str, Any]] = []
        self._w0_extremes: dict[str, tuple[float, float]] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_edits=self.every_n_edits, modules=self.modules)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise NotImplementedError(
                f"ConditionNumberMonitor does not support {strategy} yet: it needs the full matrices on every rank."
            )
        run_after_restraints(trainer, self)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step == 0 and self.last_step < 0:
            self.measure(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step != self.last_step and step % self.every_n_edits == 0:
            self.measure(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Measures the final state, including a post-hoc restraint by a callback listed before this one.
        self.measure(trainer, pl_module, final=True)

    def measure(self, trainer: Trainer, pl_module: LightningModule, final: bool = False) -> dict[str, float]:
        """Computes and logs the spectra of the watched matrices now; returns the logged values.

        Args:
            final: Marks the history entries as the end-of-fit measurement.
        """
        step = trainer.global_step
        registry = self._registry(pl_module)
        names = self._names(registry)
        registry.sync(names)
        metrics: dict[str, float] = {}
        for name in names:
            entry = registry[name]
            if entry.delta.is_empty:
                if name not in self._w0_extremes:
                    self._w0_extremes[name] = singular_value_extremes(entry.w0.float())
                sigma_max, sigma_min = self._w0_extremes[name]
                sigma_max_dw = 0.0
            else:
                sigma_max, sigma_min = singular_value_extremes(registry.parameter(name).detach().float())
                sigma_max_dw = entry.delta.sigma_max()
            kappa = sigma_max / sigma_min if sigma_min > 0 else float("inf")
            key = f"condition/{short_name(name)}"
            metrics.update({f"{key}/kappa": kappa, f"{key}/sigma_max": sigma_max,
                            f"{key}/sigma_min": sigma_min, f"{key}/sigma_max_dW": sigma_max_dw})
            self.history.append({"step": step, "name": name, "kappa": kappa, "sigma_max": sigma_max,
                                 "sigma_min": sigma_min, "sigma_max_dW": sigma_max_dw, "final": final})
        self.last_step = step
        log_metrics(trainer, metrics, step)
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "history": list(self.history), **self._registry_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict.get("last_step", -1))
        self.history = list(state_dict.get("history", []))
        self._load_registry_state(state_dict)


__all__ = ["ConditionNumberMonitor"]

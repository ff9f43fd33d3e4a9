r"""Condition numbers of the edited matrices as edits accumulate.

The PRUNE paper's central quantity: the condition number :math:`\kappa(W) = \sigma_{\max}(W) / \sigma_{\min}(W)`
of each edited matrix :math:`W = W_0 + \Delta W`. Its growth over sequential edits tracks the loss of general
abilities; a restraint such as PRUNE should keep it near :math:`\kappa(W_0)`.

``ConditionNumberMonitor`` logs, for every edited matrix, at edit 0 (before any edit) and every ``every_n_edits``
writes: ``kappa``, ``sigma_max`` and ``sigma_min`` of ``W``, and ``sigma_max`` of the accumulated update ``dW``.
Cheap where that is exact: ``sigma_max(dW)`` comes from the low-rank factors, and an unedited matrix reuses the
spectrum of ``W_0`` computed once; ``kappa(W)`` of an edited matrix needs both extreme singular values and is
computed exactly (no randomized estimate).

With ``spectrum_every_n_edits``, the whole singular-value spectra of ``W`` and of ``dW`` are logged too, at edit 0, at
every measurement whose edit count is a multiple of it, and at the end: W&B gets a histogram per matrix
(``spectrum/<matrix>/W/histogram``, ``.../dW/histogram``) and every logger, the CSV logger included, the quantiles
``spectrum/<matrix>/{W,dW}/q00 .. q100`` with the number of values (``count``) and, for ``dW``, how many singular
values reach ``sigma_max(W_0)`` (``dW/above_sigma_max_W0``: what PRUNE restrains). The spectrum of ``W`` costs what its
extremes cost (the same float64 Gram eigenvalues); it is computed on rank 0, which logs it.

Measurements always follow the restraint callbacks of the same write (PRUNE, RECT), whatever order the callbacks
are listed in. Works inside :class:`~prune_lightning.SequentialEditor` and, given ``modules``, inside any
LightningModule.

Distributed. Every rank holds the same matrices (see :mod:`prune_lightning.distributed`), so the spectra need to be
computed once, not once per rank: the watched matrices are dealt out round-robin (matrix ``i`` to rank
``i % world_size``), each rank computes its own and one ``all_reduce`` of a ``(matrices, 3)`` float64 tensor gives
every rank all values - the history is the same everywhere, and an editor that writes several matrices (MEMIT) has
them measured in parallel. With one matrix this is "rank 0 computes, the others receive three floats": measured with
``benchmarks/ddp_editing.py --part sync`` (2 processes, gloo, 2 shared CPU cores, median of 5), the extremes of a
6400 x 1600 edited matrix took 3.5 s on every rank against 1.7 s on rank 0 plus the broadcast (the ranks competed for
the cores); for the tiny 256 x 64 matrix 0.8 ms against 1.4 ms - the broadcast of three floats costs about half a
millisecond.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

import torch

from prune_lightning import distributed
from prune_lightning.registry import is_sharded
from prune_lightning.callbacks._matrices import MatrixCallback, log_metrics, short_name
from prune_lightning.callbacks._schedule import EditSchedule, Scheduled, check_every_n_edits, run_after_restraints
from prune_lightning.loggers import log_spectrum
from prune_lightning.strategies import refuse_flattened_shards
from prune_lightning.spectral import singular_value_extremes, singular_values


class ConditionNumberMonitor(Scheduled, MatrixCallback):
    """Logs ``kappa(W)``, ``sigma_max(W)``, ``sigma_min(W)`` and ``sigma_max(dW)`` of the edited matrices.

    Args:
        every_n_edits: Log after every n-th write (optimizer step); edit 0 is always logged.
        modules: Names or glob patterns of the matrices to watch (default: every edited matrix). Required outside
            ``SequentialEditor``.
        offload_w0: When this callback snapshots ``W_0`` itself, keep the copies in CPU memory.
        spectrum_every_n_edits: Also log the singular-value spectra of ``W`` and ``dW`` (histograms for W&B,
            quantiles for every logger) at edit 0, the end, and every measurement whose edit count is a multiple of
            this; a multiple of ``every_n_edits``. ``None``: no spectra.
    """

    def __init__(
        self,
        every_n_edits: int = 1,
        modules: Union[str, Sequence[str], None] = None,
        offload_w0: bool = False,
        spectrum_every_n_edits: Optional[int] = None,
    ) -> None:
        super().__init__(modules=modules, offload_w0=offload_w0)
        self.schedule = EditSchedule("ConditionNumberMonitor", every_n_edits)
        if spectrum_every_n_edits is not None:
            check_every_n_edits("ConditionNumberMonitor: spectrum_every_n_edits", spectrum_every_n_edits)
            if spectrum_every_n_edits % every_n_edits:
                raise ValueError(
                    f"ConditionNumberMonitor: spectrum_every_n_edits={spectrum_every_n_edits} must be a multiple of "
                    f"every_n_edits={every_n_edits} (spectra are taken at the measurements)"
                )
        self.spectrum_every_n_edits = spectrum_every_n_edits
        # The spectra of the last measurement that took them, {matrix: {"W": values, "dW": values}} (rank 0 only).
        self.last_spectra: dict[str, dict[str, torch.Tensor]] = {}
        self.history: list[dict[str, Any]] = []
        self._w0_extremes: dict[str, tuple[float, float]] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_edits=self.every_n_edits, modules=self.modules,
                                        spectrum_every_n_edits=self.spectrum_every_n_edits)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_flattened_shards(trainer, type(self).__name__)
        run_after_restraints(trainer, self)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule.at_start(trainer):
            self.measure(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.schedule.after_write(trainer):
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
        # Rows: sigma_max(W), sigma_min(W), sigma_max(dW) per matrix; each rank fills its own rows, the sum has all.
        spectra = torch.zeros(len(names), 3, dtype=torch.float64)
        rank, world_size = distributed.rank(), distributed.world_size()
        whole = self._spectrum_due(step, final) and trainer.is_global_zero
        values: dict[str, torch.Tensor] = {}
        for i in distributed.shard_indices(len(names), rank, world_size):
            spectra[i] = torch.tensor(self._spectrum(registry, names[i], values if whole else None),
                                      dtype=torch.float64)
        spectra = distributed.all_reduce_sum_(spectra).tolist()
        metrics: dict[str, float] = {}
        for name, (sigma_max, sigma_min, sigma_max_dw) in zip(names, spectra):
            kappa = sigma_max / sigma_min if sigma_min > 0 else float("inf")
            key = f"condition/{short_name(name)}"
            metrics.update({f"{key}/kappa": kappa, f"{key}/sigma_max": sigma_max,
                            f"{key}/sigma_min": sigma_min, f"{key}/sigma_max_dW": sigma_max_dw})
            self.history.append({"step": step, "name": name, "kappa": kappa, "sigma_max": sigma_max,
                                 "sigma_min": sigma_min, "sigma_max_dW": sigma_max_dw, "final": final})
        if whole:
            metrics.update(self._log_spectra(trainer, registry, names, values, step))
        self.schedule.done(trainer)
        log_metrics(trainer, metrics, step)
        return metrics

    def _spectrum_due(self, step: int, final: bool) -> bool:
        every = self.spectrum_every_n_edits
        return every is not None and (final or step % every == 0)

    def _spectrum(self, registry: Any, name: str,
                  keep: Optional[dict[str, torch.Tensor]] = None) -> tuple[float, float, float]:
        """``(sigma_max(W), sigma_min(W), sigma_max(dW))`` of one watched matrix now; with ``keep``, also stores the
        whole spectrum of ``W`` there under ``name``."""
        entry = registry[name]
        if entry.delta.is_empty and keep is None:
            if name not in self._w0_extremes:
                self._w0_extremes[name] = singular_value_extremes(entry.w0.float())
            return (*self._w0_extremes[name], 0.0)
        s = singular_values(self._weight(registry, name))
        if keep is not None:
            keep[name] = s.cpu()
        sigma_max, sigma_min = (float(s[0]), float(s[-1])) if s.numel() else (0.0, 0.0)
        return sigma_max, sigma_min, entry.delta.sigma_max()

    @staticmethod
    def _weight(registry: Any, name: str) -> torch.Tensor:
        entry = registry[name]
        if entry.delta.is_empty:
            return entry.w0.float()
        param = registry.parameter(name)
        # A sharded (FSDP2) weight is not gathered here (this loop runs on a subset of the matrices per rank, and a
        # gather is a collective): its whole matrix is W_0 + dW from the replicated registry, bit for bit in float32.
        return entry.weight() if is_sharded(param) else param.detach().float()

    def _log_spectra(self, trainer: Trainer, registry: Any, names: list[str], values: dict[str, torch.Tensor],
                     step: int) -> dict[str, float]:
        """Rank 0: the spectra of ``W`` (those another rank measured are computed here) and of ``dW``, logged as
        histograms and quantiles; returns the quantile metrics."""
        spectra: dict[str, torch.Tensor] = {}
        extra: dict[str, float] = {}
        self.last_spectra = {}
        for name in names:
            entry = registry[name]
            w = values[name] if name in values else singular_values(self._weight(registry, name)).cpu()
            dw = (entry.delta.svd()[1].to(torch.float64).cpu() if not entry.delta.is_empty
                  else torch.zeros(0, dtype=torch.float64))
            key = f"spectrum/{short_name(name)}"
            spectra[f"{key}/W"], spectra[f"{key}/dW"] = w, dw
            extra[f"{key}/dW/above_sigma_max_W0"] = float((dw >= entry.sigma_max0).sum())
            self.last_spectra[name] = {"W": w, "dW": dw}
        return {**log_spectrum(trainer, spectra, step), **extra}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.schedule.state_dict(), "history": list(self.history), **self._registry_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict)
        self.history = list(state_dict.get("history", []))
        self._load_registry_state(state_dict)


__all__ = ["ConditionNumberMonitor"]

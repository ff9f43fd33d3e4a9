"""Logging of an editing run: the number of edits as the x-axis, spectra and tables for every logger.

- :data:`EDITS_KEY` (``"edits"``): the requests written so far. The module logs it with every edit, and every callback
  of this library with every measurement, so a CSV row and a W&B point both say after how many edits they were taken.
- :class:`EditWandbLogger`: Lightning's ``WandbLogger`` whose runs plot every metric against ``edits``
  (``define_metric``), not against the trainer's step. One step writes one batch, so with MEMIT's 100 facts per
  step the two differ a hundredfold. ``loggers/wandb.yaml`` is its config fragment.
- :func:`log_spectrum`: singular values as a W&B histogram where a W&B logger is attached, and as a few quantile
  columns for every logger (the CSV logger included), so both dashboards show how the spectrum moves.
- :func:`log_table`: a table for the loggers that take tables (W&B's ``log_table``).

Works with plain Lightning loggers too: a ``WandbLogger`` gets the histograms and tables, its x-axis stays the
trainer's step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["EDITS_KEY", "SPECTRUM_QUANTILES", "EditWandbLogger", "edits_so_far", "log_spectrum", "log_table",
           "spectrum_summary"]

EDITS_KEY = "edits"

# The quantiles of a spectrum that every logger gets as columns (0 = smallest singular value, 1 = largest).
SPECTRUM_QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


class EditWandbLogger(WandbLogger):
    """A ``WandbLogger`` whose x-axis is the number of edits (:data:`EDITS_KEY`), for every metric of the run.

    Takes ``WandbLogger``'s arguments (``project``, ``name``, ``save_dir``, ``offline``, ``log_model``, ...); the
    project defaults to ``"prune-lightning"``. Offline runs (``offline=True`` or ``WANDB_MODE=offline``) are written
    under ``<save_dir>/wandb/offline-run-*`` and uploaded later with ``wandb sync``.
    """

    def __init__(self, *args: Any, project: Optional[str] = "prune-lightning", **kwargs: Any) -> None:
        super().__init__(*args, project=project, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            # Lightning always passes the key; W&B >= 0.19 warns about it even as None, and it has no effect.
            self._wandb_init.pop("anonymous", None)
        self._edits_axis = False

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None and self._save_dir is not None:
            # W&B looks for a git repository from its folder and warns when the folder is not there yet.
            Path(self._save_dir).mkdir(parents=True, exist_ok=True)
        experiment = super().experiment
        if not self._edits_axis and callable(getattr(experiment, "define_metric", None)):
            # Lightning has just declared "*" against trainer/global_step; the later declaration of the same glob
            # replaces it. step_sync fills in the last edit count where a call logs no "edits" of its own.
            experiment.define_metric(EDITS_KEY)
            experiment.define_metric("*", step_metric=EDITS_KEY, step_sync=True)
            self._edits_axis = True
        return experiment

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_edits_axis"] = False  # a copy in another process declares the axis on its own experiment
        return state


def edits_so_far(trainer: Trainer) -> int:
    """The requests written so far: ``SequentialEditor.requests_edited``; the trainer's step in any other module
    (one step = one write)."""
    module = getattr(trainer, "lightning_module", None)
    edited = getattr(module, "requests_edited", None)
    return int(edited) if isinstance(edited, int) else int(trainer.global_step)


def spectrum_summary(values: torch.Tensor, prefix: str) -> dict[str, float]:
    """``<prefix>/q<percent>`` for :data:`SPECTRUM_QUANTILES` and ``<prefix>/count`` of a spectrum (nothing for an
    empty one but the count)."""
    values = values.detach().to(torch.float64).flatten()
    summary = {f"{prefix}/count": float(values.numel())}
    if values.numel():
        quantiles = torch.quantile(values.cpu(), torch.tensor(SPECTRUM_QUANTILES, dtype=torch.float64))
        summary.update({f"{prefix}/q{round(q * 100):02d}": float(v) for q, v in zip(SPECTRUM_QUANTILES, quantiles)})
    return summary


def log_spectrum(trainer: Trainer, spectra: dict[str, torch.Tensor], step: int) -> dict[str, float]:
    """Logs spectra ``{key: singular values}``: a histogram per key for each W&B logger, and the quantiles of
    :func:`spectrum_summary` as metrics for every logger. Returns the quantile metrics."""
    metrics: dict[str, float] = {}
    for key, values in spectra.items():
        metrics.update(spectrum_summary(values, key))
    if trainer.sanity_checking:
        return metrics
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            _log_histograms(logger, spectra, step, edits_so_far(trainer))
    return metrics


@rank_zero_only
def _log_histograms(logger: WandbLogger, spectra: dict[str, torch.Tensor], step: int, edits: int) -> None:
    import wandb

    data: dict[str, Any] = {f"{key}/histogram": wandb.Histogram(values.detach().double().cpu().numpy(), num_bins=64)
                            for key, values in spectra.items() if values.numel()}
    if data:
        logger.experiment.log({**data, EDITS_KEY: edits, "trainer/global_step": step})


def log_table(trainer: Trainer, key: str, columns: Sequence[str], data: list[list[Any]]) -> None:
    """Logs a table to every logger that takes tables (``log_table``: W&B); the others keep their metrics."""
    if not data or trainer.sanity_checking:
        return
    for logger in trainer.loggers:
        if callable(getattr(logger, "log_table", None)):
            logger.log_table(key=key, columns=list(columns), data=data)

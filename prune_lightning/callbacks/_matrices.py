"""What the spectral callbacks share: finding the edited matrices of whatever LightningModule they run in.

Inside :class:`~prune_lightning.SequentialEditor` they use the module's registry, which records every write as
low-rank factors. Inside any other LightningModule (a user's continual fine-tuning loop), the first callback that
needs it snapshots ``W_0`` of the parameters named by its ``modules`` patterns at fit start and attaches the registry
to the module as ``edit_registry``, so a second callback shares the same ``W_0`` copies instead of making its own;
``dW`` is then read off the weights (dense path). The callback that created the registry keeps it in its checkpoint
state.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from prune_lightning.loggers import EDITS_KEY, edits_so_far
from prune_lightning.registry import EditRegistry, find_registry, matches


def normalize_patterns(modules: Union[str, Sequence[str], None]) -> Optional[list[str]]:
    if modules is None:
        return None
    if isinstance(modules, str):
        return [modules]
    return list(modules)


class MatrixCallback(Callback):
    """Base of the callbacks that act on edited matrices; subclasses implement the hooks.

    Args:
        modules: Parameter or module names, or glob patterns (``"transformer.h.*.mlp.c_proj"``), selecting the
            matrices to act on. Inside ``SequentialEditor`` the default (``None``) is every matrix the editor writes;
            elsewhere ``modules`` is required and its matrices are snapshotted at fit start.
        offload_w0: When this callback snapshots ``W_0`` itself, keep the copies in CPU memory.
    """

    def __init__(self, modules: Union[str, Sequence[str], None] = None, offload_w0: bool = False) -> None:
        self.modules = normalize_patterns(modules)
        self.offload_w0 = offload_w0
        self._owned_registry: Optional[EditRegistry] = None
        self._pending_registry_state: Optional[dict] = None

    # ------------------------------------------------------------------------------------------------------------

    def _registry(self, pl_module: LightningModule) -> EditRegistry:
        registry = find_registry(pl_module)
        if registry is None:
            if self.modules is None:
                raise ValueError(
                    f"{type(self).__name__} runs inside {type(pl_module).__name__}, which keeps no edit registry: "
                    "name the parameters to watch with `modules=[...]` (names or glob patterns)."
                )
            registry = EditRegistry(offload=self.offload_w0, snapshot=True)
            pl_module.edit_registry = registry
            self._owned_registry = registry
        if registry.snapshot and self.modules is not None:
            names = [n for n, p in pl_module.named_parameters() if p.ndim == 2 and matches(n, self.modules)]
            if not names:
                matrices = [n for n, p in pl_module.named_parameters() if p.ndim == 2]
                raise ValueError(
                    f"{type(self).__name__}: no matrix parameter matches modules={self.modules}. "
                    f"Matrices: {', '.join(matrices[:40])}"
                )
            registry.track(pl_module, names)
        return registry

    def _names(self, registry: EditRegistry) -> list[str]:
        names = registry.names(self.modules)
        if self.modules is not None and not names:
            raise ValueError(
                f"{type(self).__name__}: modules={self.modules} selects none of the edited matrices "
                f"{registry.names()}"
            )
        return names

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        registry = self._registry(pl_module)
        if self._pending_registry_state is not None and self._owned_registry is registry:
            registry.load_state_dict(self._pending_registry_state, model=pl_module)
            self._pending_registry_state = None

    def _registry_state(self) -> dict[str, Any]:
        return {"registry": self._owned_registry.state_dict()} if self._owned_registry is not None else {}

    def _load_registry_state(self, state: dict[str, Any]) -> None:
        if "registry" in state:
            self._pending_registry_state = state["registry"]


def short_name(name: str) -> str:
    """A parameter name for metric keys: ``transformer.h.17.mlp.c_proj.weight`` -> ``transformer.h.17.mlp.c_proj``."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def log_metrics(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    """Sends metrics straight to every logger at ``step`` (writes so far), also from hooks where ``self.log`` is not
    allowed (``on_train_start``, ``on_train_end``), and without ``log_every_n_steps`` thinning the curve. Each call
    carries the number of requests edited so far (``edits``, the x-axis of :class:`~prune_lightning.loggers.EditWandbLogger`)."""
    if not metrics or trainer.sanity_checking:
        return
    metrics = {**metrics, EDITS_KEY: float(edits_so_far(trainer))}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    trainer.callback_metrics.update({k: _as_tensor(v) for k, v in metrics.items()})


def _as_tensor(value: float):
    import torch

    return torch.tensor(float(value))


__all__ = ["MatrixCallback", "log_metrics", "normalize_patterns", "short_name"]

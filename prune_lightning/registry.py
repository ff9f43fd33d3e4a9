"""The registry of edited matrices: for each parameter, its original ``W_0`` and the accumulated update ``dW``.

Sequential editing writes ``W_n = W_0 + dW``. Everything that reasons about the perturbation - PRUNE's restraint,
condition numbers, RECT - needs ``W_0`` (one copy, kept in the checkpoint), ``sigma_max(W_0)`` (computed once,
exactly) and ``dW``. :class:`EditRegistry` holds them:

- inside :class:`~prune_lightning.SequentialEditor`, the module records every update the editor returns, so ``dW``
  stays in low-rank factors (ROME: rank one per edit) and its spectrum is cheap;
- inside someone else's LightningModule (a continual fine-tuning loop), a callback snapshots ``W_0`` of the
  parameters it is given at fit start (``snapshot=True``); ``dW = W - W_0`` is then read off the weights, densely,
  whenever a callback needs it.

The weight itself is always rewritten from the registry as ``W = W_0 + dW`` (:meth:`EditedMatrix.write`), so the
registry and the model cannot drift apart, whatever the parameter's dtype.

Sharded parameters (FSDP2, ``torch.distributed.fsdp.fully_shard``: the parameter is a ``DTensor`` whose local part is
one shard). The registry holds ``W_0`` and ``dW`` in full on every rank - they are what PRUNE and the condition
numbers work on, and every rank computes the same values from them - and touches the sharded parameter only through
:func:`full_weight` (gathers *that one* matrix: an all-gather every rank takes part in) and :func:`write_weight`
(each rank copies its own shard of the new full matrix: no communication). Nothing else of the model is gathered.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from prune_lightning.models import full_weight, get_parameter, is_sharded, write_weight
from prune_lightning.spectral import DeltaTracker, Update, spectral_norm

__all__ = ["EditRegistry", "EditedMatrix", "find_registry", "full_weight", "is_sharded", "matches", "write_weight"]


class EditedMatrix:
    """One edited matrix: ``W_0``, ``sigma_max(W_0)`` (lazily, once) and the tracker of ``dW``.

    Args:
        name: The parameter's full name, e.g. ``"transformer.h.17.mlp.c_proj.weight"``.
        w0: The original weight, as stored (any layout). A detached copy is kept.
        offload: Keep the ``W_0`` copy in CPU memory (for large models on an accelerator).
        dense_rank_fraction: Passed to :class:`~prune_lightning.spectral.DeltaTracker`.
    """

    def __init__(self, name: str, w0: torch.Tensor, offload: bool = False, dense_rank_fraction: float = 0.25) -> None:
        if w0.ndim != 2:
            raise ValueError(f"Only matrices can be tracked; {name!r} has shape {tuple(w0.shape)}")
        self.name = name
        self.offload = offload
        w0 = full_weight(w0)
        self.w0 = w0.to("cpu" if offload else w0.device, copy=True)
        self.delta = DeltaTracker(tuple(w0.shape), dtype=torch.float32, device=w0.device,
                                  dense_rank_fraction=dense_rank_fraction)
        self._sigma_max0: Optional[float] = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w0.shape)

    @property
    def sigma_max0(self) -> float:
        """``sigma_max(W_0)``, exact, computed on first use and then kept (also in the checkpoint)."""
        if self._sigma_max0 is None:
            self._sigma_max0 = spectral_norm(self.w0.float())
        return self._sigma_max0

    def w0_on(self, device: torch.device) -> torch.Tensor:
        return self.w0.to(device=device, dtype=torch.float32)

    def record(self, update: Update) -> None:
        """Adds one write's update to ``dW`` (low-rank factors stay factors)."""
        self.delta.add(update)

    def weight(self) -> torch.Tensor:
        """``W = W_0 + dW`` in float32, whole (what the parameter holds, shards put together)."""
        device = self.delta.device
        return self.w0_on(device) + self.delta.dense().to(device)

    @torch.no_grad()
    def write(self, param: torch.Tensor) -> None:
        """Sets the parameter to ``W_0 + dW`` (a sharded parameter: its own shard of it)."""
        write_weight(param, self.weight())

    @torch.no_grad()
    def sync_from(self, param: torch.Tensor) -> None:
        """Reads ``dW = W - W_0`` off the weights (the dense path for modules that change weights by themselves).

        A sharded parameter is gathered: every rank must call this for the same matrices.
        """
        full = full_weight(param).float()
        self.delta.set_dense(full - self.w0_on(full.device))

    def to(self, device: torch.device) -> EditedMatrix:
        """Moves ``dW`` (and ``W_0``, unless offloaded) to ``device``; returns ``self``."""
        if not self.offload:
            self.w0 = self.w0.to(device)
        self.delta.to(device)
        return self

    def state_dict(self) -> dict:
        return {
            "w0": self.w0,
            "offload": self.offload,
            "sigma_max0": self._sigma_max0 if self._sigma_max0 is not None else -1.0,
            "delta": self.delta.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.w0 = state["w0"].to("cpu" if self.offload else self.w0.device)
        sigma = float(state["sigma_max0"])
        self._sigma_max0 = sigma if sigma >= 0 else None
        self.delta.load_state_dict(state["delta"])


def matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    """Whether a parameter name is selected by glob patterns (``None`` selects everything).

    A pattern may name the parameter (``"transformer.h.*.mlp.c_proj.weight"``) or its module
    (``"transformer.h.*.mlp.c_proj"``).
    """
    if patterns is None:
        return True
    module = name.rsplit(".", 1)[0]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module, p) for p in patterns)


class EditRegistry:
    """Edited matrices by parameter name.

    Args:
        offload: Keep the ``W_0`` copies in CPU memory.
        snapshot: ``dW`` is read off the weights (``W - W_0``) rather than recorded write by write; set by callbacks
            that run inside a LightningModule which is not a :class:`~prune_lightning.SequentialEditor`.
        dense_rank_fraction: When a tracked update's rank passes this fraction of ``min(m, n)`` it is kept dense.
    """

    def __init__(self, offload: bool = False, snapshot: bool = False, dense_rank_fraction: float = 0.25) -> None:
        self.offload = offload
        self.snapshot = snapshot
        self.dense_rank_fraction = dense_rank_fraction
        self._entries: dict[str, EditedMatrix] = {}
        self._root: Optional[nn.Module] = None

    @property
    def root(self) -> nn.Module:
        """The module the tracked names are relative to (the Hugging Face model inside ``SequentialEditor``)."""
        if self._root is None:
            raise RuntimeError("The registry tracks no module yet: call track(model, names) first")
        return self._root

    def parameter(self, name: str) -> nn.Parameter:
        """The live parameter of a tracked matrix."""
        return get_parameter(self.root, name)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> EditedMatrix:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self, patterns: Optional[Sequence[str]] = None) -> list[str]:
        """The tracked parameter names selected by ``patterns`` (all when ``None``)."""
        return [n for n in self._entries if matches(n, patterns)]

    def track(self, model: nn.Module, names: Iterable[str]) -> list[str]:
        """Snapshots ``W_0`` of every named parameter of ``model`` not tracked yet; returns the newly tracked names.

        ``model`` becomes the registry's root: all names are relative to it, and one registry has one root.
        """
        if self._root is not None and self._root is not model:
            raise ValueError("This registry already tracks parameters of another module")
        self._root = model
        new = []
        for name in names:
            if name in self._entries:
                continue
            param = get_parameter(model, name)
            self._entries[name] = EditedMatrix(name, param, offload=self.offload,
                                               dense_rank_fraction=self.dense_rank_fraction)
            new.append(name)
        return new

    def record(self, name: str, update: Update) -> None:
        self._entries[name].record(update)

    def sync(self, names: Optional[Iterable[str]] = None) -> None:
        """In snapshot mode, refreshes ``dW = W - W_0`` of the named (default: all) matrices from the weights."""
        if not self.snapshot:
            return
        for name in names if names is not None else self._entries:
            self._entries[name].sync_from(self.parameter(name))

    def write(self, names: Optional[Iterable[str]] = None) -> None:
        """Rewrites the named (default: all) parameters as ``W_0 + dW``."""
        for name in names if names is not None else self._entries:
            self._entries[name].write(self.parameter(name))

    def to_parameter_devices(self) -> None:
        """Moves every entry to the device of its parameter (of this rank's shard of it)."""
        for name, entry in self._entries.items():
            entry.to(_local_device(self.parameter(name)))

    def state_dict(self) -> dict:
        return {
            "snapshot": self.snapshot,
            "offload": self.offload,
            "entries": {name: entry.state_dict() for name, entry in self._entries.items()},
        }

    def load_state_dict(self, state: dict, model: Optional[nn.Module] = None) -> None:
        """Restores the entries; entries not yet tracked are created (from ``state``'s ``W_0``) on ``model``."""
        self.snapshot = bool(state.get("snapshot", self.snapshot))
        if model is not None:
            if self._root is not None and self._root is not model:
                raise ValueError("This registry already tracks parameters of another module")
            self._root = model
        for name, entry_state in state["entries"].items():
            if name not in self._entries:
                w0 = entry_state["w0"]
                if self._root is not None:
                    w0 = w0.to(_local_device(self.parameter(name)))
                self._entries[name] = EditedMatrix(name, w0, offload=self.offload,
                                                   dense_rank_fraction=self.dense_rank_fraction)
            self._entries[name].load_state_dict(entry_state)


def _local_device(param: torch.Tensor) -> torch.device:
    return param.to_local().device if is_sharded(param) else param.device


def find_registry(module: nn.Module) -> Optional[EditRegistry]:
    """The registry a LightningModule carries (``edit_registry`` attribute), if any."""
    registry = getattr(module, "edit_registry", None)
    return registry if isinstance(registry, EditRegistry) else None

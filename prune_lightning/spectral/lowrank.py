"""A weight update kept as low-rank factors, ``left @ right.T``: what the editors return and the tracker records.

ROME's update of a matrix is rank one, a MEMIT batch of ``k`` facts rank ``<= k``; keeping them as factors is what
makes the spectra of the accumulated update cheap (:class:`~prune_lightning.spectral.DeltaTracker`). The factors are
in the parameter's own layout (GPT-2's ``Conv1D`` stores ``(in, out)``); a dense update is a plain tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

__all__ = ["LowRankUpdate", "Update", "update_to_dense"]


@dataclass
class LowRankUpdate:
    """A weight update ``left @ right.T`` of shape ``(left.shape[0], right.shape[0])``, in the parameter's layout.

    Args:
        left: ``(m, r)`` (a vector is one column).
        right: ``(n, r)`` (a vector is one column).
    """

    left: torch.Tensor
    right: torch.Tensor

    def __post_init__(self) -> None:
        if self.left.ndim == 1:
            self.left = self.left[:, None]
        if self.right.ndim == 1:
            self.right = self.right[:, None]
        if self.left.ndim != 2 or self.right.ndim != 2 or self.left.shape[1] != self.right.shape[1]:
            raise ValueError(
                f"LowRankUpdate needs left (m, r) and right (n, r); got {tuple(self.left.shape)} and "
                f"{tuple(self.right.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[0])

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def dense(self) -> torch.Tensor:
        return self.left @ self.right.T


Update = Union[LowRankUpdate, torch.Tensor]


def update_to_dense(update: Update) -> torch.Tensor:
    """The update as a dense matrix."""
    return update.dense() if isinstance(update, LowRankUpdate) else update

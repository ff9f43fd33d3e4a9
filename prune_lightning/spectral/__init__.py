"""The linear algebra of sequential editing: PRUNE's restraint, low-rank delta tracking, condition numbers.

- :mod:`~prune_lightning.spectral.restraint`: the restraint function ``F`` and its application to a dense update or
  to one kept as factors ``L R^T`` (thin QR + small SVD, never an ``m x n`` SVD).
- :mod:`~prune_lightning.spectral.delta`: :class:`DeltaTracker`, the accumulated update ``W_n - W_0`` of one matrix.
- :mod:`~prune_lightning.spectral.condition`: exact ``sigma_max``, ``sigma_min`` and ``kappa = sigma_max / sigma_min``.
- :mod:`~prune_lightning.spectral.lowrank`: :class:`LowRankUpdate`, an update kept as factors ``left @ right.T``.

The package depends on nothing above it: plain tensors in, plain tensors (or its own types) out.
"""

from prune_lightning.spectral.condition import condition_number, singular_value_extremes, singular_values, spectral_norm
from prune_lightning.spectral.delta import DeltaTracker
from prune_lightning.spectral.lowrank import LowRankUpdate, Update, update_to_dense
from prune_lightning.spectral.restraint import (
    count_restrained,
    lowrank_svd,
    restrain_dense,
    restrain_lowrank,
    restrain_singular_values,
    restraint_threshold_shrinks,
)

__all__ = [
    "DeltaTracker",
    "LowRankUpdate",
    "Update",
    "condition_number",
    "count_restrained",
    "lowrank_svd",
    "restrain_dense",
    "restrain_lowrank",
    "restrain_singular_values",
    "restraint_threshold_shrinks",
    "singular_value_extremes",
    "singular_values",
    "spectral_norm",
    "update_to_dense",
]

r"""Tracking the accumulated update :math:`\Delta W_n = W_n - W_0` of one edited matrix.

Every write of an editor adds an update to an edited matrix: rank one for ROME, rank :math:`\le k` for a MEMIT batch
of :math:`k` facts, dense for fine-tuning. PRUNE and the condition-number monitor need the SVD of the *sum*, after
every write. A :class:`DeltaTracker` keeps that sum in the cheapest exact form:

- **low rank** while the number of factor columns :math:`r` is small: :math:`\Delta W = L R^\top` with
  :math:`L \in \mathbb{R}^{m \times r}`, :math:`R \in \mathbb{R}^{n \times r}`. Adding :math:`a b^\top` appends a
  column to each factor; the SVD comes from :func:`~prune_lightning.spectral.restraint.lowrank_svd` (thin QR of both
  factors, SVD of the :math:`r \times r` core) at :math:`O((m+n) r^2 + r^3)` instead of :math:`O(mn\min(m,n))`.
- **dense** once :math:`r` exceeds ``dense_rank_fraction * min(m, n)`` (default a quarter), or as soon as a dense
  update arrives: beyond that point the factors cost more memory and time than the matrix.

Columns can be redundant (a fact re-edited, updates that share directions, components cancelled by a restraint), so
:meth:`DeltaTracker.compress` re-factors :math:`L R^\top = (Q_L U_c \Sigma)(Q_R V_c)^\top` at its numerical rank. It
runs automatically whenever the column count has doubled since the last compression (amortized :math:`O(1)` QRs per
added column), and before switching to dense, so a tracker only goes dense when the *rank* is large.

The factors accumulate in the tracker's dtype (float32 by default); every QR and SVD runs in float64, so
:meth:`~DeltaTracker.sigma_max` and :meth:`~DeltaTracker.svd` are exact for the stored factors.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from prune_lightning.spectral.condition import spectral_norm
from prune_lightning.spectral.lowrank import LowRankUpdate, Update
from prune_lightning.spectral.restraint import (
    check_alpha,
    check_factors,
    check_kind,
    check_sigma,
    dense_svd,
    lowrank_svd64,
    restrain_dense_counted,
    restrain_factors_counted,
)

__all__ = ["DeltaTracker"]

# Compress automatically once the columns reach twice those left by the last compression, but never below this.
_MIN_COLUMNS_BEFORE_COMPRESS = 8


class DeltaTracker:
    r"""The accumulated update :math:`\Delta W = W_n - W_0` of one edited matrix, low rank while that is cheaper.

    Args:
        shape: ``(m, n)``, the shape of the edited parameter in its own layout (GPT-2's ``Conv1D`` ``(in, out)`` or
            ``nn.Linear``'s ``(out, in)``; the tracker does not care which).
        dtype: dtype the update accumulates in.
        device: device the update lives on (default: torch's default device).
        dense_rank_fraction: switch to a dense matrix once the factors have more than
            ``dense_rank_fraction * min(m, n)`` columns (after a compression). In ``[0, 1]``; ``0`` means always dense.
    """

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, dense_rank_fraction: float = 0.25) -> None:
        shape = tuple(int(d) for d in shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape must be (m, n) with m, n >= 1, got {shape}")
        if not (0.0 <= float(dense_rank_fraction) <= 1.0):
            raise ValueError(f"dense_rank_fraction must be in [0, 1], got {dense_rank_fraction!r}")
        self.shape: tuple[int, int] = shape
        self.dtype: torch.dtype = dtype
        self.device: torch.device = torch.device(device) if device is not None else torch.empty(0).device
        self.dense_rank_fraction = float(dense_rank_fraction)
        self._left: torch.Tensor | None = None
        self._right: torch.Tensor | None = None
        self._delta: torch.Tensor | None = None
        self._compressed_columns = 0

    # ------------------------------------------------------------------------------------------------ state
    @property
    def is_empty(self) -> bool:
        """No update recorded (or everything recorded was reset)."""
        return self._delta is None and self._left is None

    @property
    def is_lowrank(self) -> bool:
        """Kept as factors (also true when empty: zero factor columns)."""
        return self._delta is None

    @property
    def rank(self) -> int:
        """Factor columns (an upper bound on the true rank) while low rank, ``min(m, n)`` when dense, 0 when empty."""
        if self._delta is not None:
            return min(self.shape)
        return 0 if self._left is None else self._left.shape[1]

    @property
    def _dense_column_limit(self) -> float:
        return self.dense_rank_fraction * min(self.shape)

    def __repr__(self) -> str:
        mode = "empty" if self.is_empty else ("lowrank" if self.is_lowrank else "dense")
        return (f"DeltaTracker(shape={self.shape}, mode={mode!r}, rank={self.rank}, dtype={self.dtype}, "
                f"device={self.device})")

    def _cast(self, tensor: torch.Tensor, copy: bool = False) -> torch.Tensor:
        return tensor.detach().to(dtype=self.dtype, device=self.device, copy=copy)

    def _check_shape(self, shape: tuple[int, ...], what: str) -> None:
        if tuple(shape) != self.shape:
            raise ValueError(f"{what} has shape {tuple(shape)} but this tracker's matrix has shape {self.shape}")

    # ------------------------------------------------------------------------------------------------ updates
    def add(self, update: Update) -> None:
        """Add one write's update.

        Args:
            update: A :class:`~prune_lightning.spectral.LowRankUpdate` ``left @ right.T`` or a dense tensor of the
                tracker's shape. A dense update switches the tracker to dense. Cast to the tracker's dtype and device.

        Raises:
            ValueError: If the update's shape differs from the tracker's.
            TypeError: If the update is neither a tensor nor a ``LowRankUpdate``.
        """
        if isinstance(update, torch.Tensor):
            self._check_shape(update.shape, "dense update")
            if self._delta is not None:
                self._delta.add_(self._cast(update))
            elif self._left is None:
                self._delta = self._cast(update, copy=True)
            else:
                self._delta = self._left @ self._right.T + self._cast(update)
                self._left = self._right = None
                self._compressed_columns = 0
            return
        if not isinstance(update, LowRankUpdate):
            raise TypeError(f"update must be a LowRankUpdate or a dense torch.Tensor, got {type(update).__name__}")
        self._check_shape(update.shape, "low-rank update")
        left, right = self._cast(update.left), self._cast(update.right)
        if left.shape[1] == 0:
            return
        if self._delta is not None:
            self._delta.addmm_(left, right.T)
            return
        if self._left is None:  # own the first factors: the caller may reuse its buffers
            self._left, self._right = left.clone(), right.clone()
        else:
            self._left = torch.cat([self._left, left], dim=1)
            self._right = torch.cat([self._right, right], dim=1)
        self._after_columns_grew()

    def _after_columns_grew(self) -> None:
        columns = self._left.shape[1]
        if columns > self._dense_column_limit:
            self.compress()
            if self._left is not None and self._left.shape[1] > self._dense_column_limit:
                self._delta = self._left @ self._right.T
                self._left = self._right = None
        elif columns >= max(2 * self._compressed_columns, _MIN_COLUMNS_BEFORE_COMPRESS):
            self.compress()

    def compress(self) -> None:
        """Re-factor the low-rank factors at their numerical rank (float64 QR + core SVD); no-op when dense/empty.

        The new factors are ``left = U diag(S)``, ``right = V``. Components that are numerically zero (cancelled or
        repeated directions) are dropped; if nothing is left the tracker becomes empty.
        """
        if self._left is None:
            return
        u, s, v = lowrank_svd64(self._left, self._right)
        if s.numel() == 0:
            self._left = self._right = None
            self._compressed_columns = 0
            return
        self._left, self._right = self._cast(u * s), self._cast(v)
        self._compressed_columns = self._left.shape[1]

    def set_lowrank(self, left: torch.Tensor, right: torch.Tensor) -> None:
        """Replace the accumulated update by ``left @ right.T`` (e.g. the restrained factors).

        Args:
            left: ``(m, r)``.
            right: ``(n, r)``.
        """
        left, right = check_factors(left, right)
        self._check_shape((left.shape[0], right.shape[0]), "left @ right.T")
        self._delta = None
        if left.shape[1] == 0:
            self._left = self._right = None
            self._compressed_columns = 0
            return
        self._left, self._right = self._cast(left, copy=True), self._cast(right, copy=True)
        self._compressed_columns = self._left.shape[1]
        if self._left.shape[1] > self._dense_column_limit:
            self._after_columns_grew()

    def set_dense(self, delta: torch.Tensor) -> None:
        """Replace the accumulated update by a dense matrix (copied; the tracker becomes dense).

        Args:
            delta: ``(m, n)``.
        """
        self._check_shape(delta.shape, "delta")
        self._left = self._right = None
        self._compressed_columns = 0
        self._delta = self._cast(delta, copy=True)

    # ------------------------------------------------------------------------------------------------ reading
    def dense(self) -> torch.Tensor:
        """The accumulated update as an ``(m, n)`` matrix (zeros when empty); a new tensor."""
        if self._delta is not None:
            return self._delta.clone()
        if self._left is None:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return self._left @ self._right.T

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` with ``left @ right.T`` the update; zero-column factors when empty.

        The tracker's own tensors, not copies: do not modify them in place (use :meth:`set_lowrank`).

        Raises:
            RuntimeError: If the tracker is dense.
        """
        if self._delta is not None:
            raise RuntimeError(f"{self!r} is dense: it has no factors; use dense() or svd()")
        if self._left is None:
            m, n = self.shape
            return (torch.zeros(m, 0, dtype=self.dtype, device=self.device),
                    torch.zeros(n, 0, dtype=self.dtype, device=self.device))
        return self._left, self._right

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thin SVD ``(U (m, k), S (k,), V (n, k))`` of the update up to its numerical rank, in the tracker's dtype.

        Low rank: float64 QR of the factors and SVD of the core. Dense: a float64 thin SVD of the matrix.
        """
        if self._delta is not None:
            u, s, v = dense_svd(self._delta)
        elif self._left is None:
            u, s, v = lowrank_svd64(*self.factors())
        else:
            u, s, v = lowrank_svd64(self._left, self._right)
        return u.to(self.dtype), s.to(self.dtype), v.to(self.dtype)

    def sigma_max(self) -> float:
        """The exact largest singular value of the update (0.0 when empty); cheap on the low-rank path."""
        if self._delta is not None:
            return spectral_norm(self._delta)
        if self._left is None:
            return 0.0
        s = lowrank_svd64(self._left, self._right)[1]
        return float(s[0]) if s.numel() else 0.0

    # ------------------------------------------------------------------------------------------------ restraint
    def restrain(self, sigma_max0: float, alpha: float = math.e, kind: str = "log") -> int:
        r"""Apply the PRUNE restraint to the update in place (see :mod:`prune_lightning.spectral.restraint`).

        Low rank: the factors are replaced by the restrained, compressed factors. Dense: the restrained components'
        change is subtracted from the matrix (in float64). Nothing changes when no value reaches the threshold.

        Args:
            sigma_max0: :math:`\sigma_{\max}(W_0)`, the threshold (compute it once per matrix).
            alpha: Base of the logarithm, any finite number > 1.
            kind: ``"log"`` or ``"linear"``.

        Returns:
            How many singular values were ``>= sigma_max0`` (and so were restrained).
        """
        alpha = check_alpha(alpha)
        kind = check_kind(kind)
        sigma = check_sigma(sigma_max0)
        if self._delta is not None:
            restrained, count = restrain_dense_counted(self._delta, sigma, alpha, kind)
            if restrained is not None:
                self._delta = restrained
            return count
        if self._left is None:
            return 0
        left, right, count = restrain_factors_counted(self._left, self._right, sigma, alpha, kind)
        if count:
            self.set_lowrank(left, right)
        return count

    # ------------------------------------------------------------------------------------------------ moving / saving
    def to(self, device: torch.device | str) -> DeltaTracker:
        """Move the tracked tensors to ``device`` (in place); returns ``self``."""
        self.device = torch.device(device)
        for name in ("_left", "_right", "_delta"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.to(self.device))
        return self

    def state_dict(self) -> dict[str, Any]:
        """Tensors and small metadata, loadable with ``torch.load(weights_only=True)``.

        Keys: ``shape`` (list), ``mode`` (``"empty"``, ``"lowrank"`` or ``"dense"``), ``dtype`` (e.g. ``"float32"``),
        ``dense_rank_fraction``,
        ``compressed_columns`` and ``left``/``right`` (low rank) or ``delta`` (dense). Like ``Module.state_dict`` the
        tensors are shared, not copied: clone them if you keep them while adding to a dense tracker.
        """
        state: dict[str, Any] = {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
                                 "dense_rank_fraction": self.dense_rank_fraction,
                                 "compressed_columns": self._compressed_columns}
        if self._delta is not None:
            state.update(mode="dense", delta=self._delta)
        elif self._left is not None:
            state.update(mode="lowrank", left=self._left, right=self._right)
        else:
            state["mode"] = "empty"
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (tensors cast to this tracker's dtype and device).

        Raises:
            ValueError: If the saved shape differs from this tracker's, or the mode is unknown.
        """
        self._check_shape(tuple(state["shape"]), "the saved tracker")
        mode = state["mode"]
        if "dense_rank_fraction" in state:
            self.dense_rank_fraction = float(state["dense_rank_fraction"])
        if mode == "empty":
            self._left = self._right = self._delta = None
            self._compressed_columns = 0
        elif mode == "lowrank":
            self.set_lowrank(state["left"], state["right"])
            self._compressed_columns = int(state.get("compressed_columns", self._compressed_columns))
        elif mode == "dense":
            self.set_dense(state["delta"])
        else:
            raise ValueError(f"unknown tracker mode {mode!r} in state (expected 'empty', 'lowrank' or 'dense')")

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str | None = None) -> DeltaTracker:
        """A new tracker from :meth:`state_dict`, in the saved dtype.

        Args:
            state: What :meth:`state_dict` returned.
            device: Where to put it (default: where the saved tensors are).
        """
        saved = state.get("delta", state.get("left"))
        dtype = saved.dtype if saved is not None else torch.float32
        if isinstance(state.get("dtype"), str) and isinstance(getattr(torch, state["dtype"], None), torch.dtype):
            dtype = getattr(torch, state["dtype"])
        if device is None and saved is not None:
            device = saved.device
        tracker = cls(tuple(state["shape"]), dtype=dtype, device=device,
                      dense_rank_fraction=state.get("dense_rank_fraction", 0.25))
        tracker.load_state_dict(state)
        return tracker

r"""PRUNE: restrain the large singular values of the accumulated edit update.

After :math:`n` sequential edits an edited matrix is :math:`W_n = W_0 + \Delta W_n`. PRUNE (Ma et al., ICLR 2025,
"Perturbation-Restrained Sequential Model Editing") observes that the condition number of :math:`W_n` grows with
:math:`n` because the large singular values of :math:`\Delta W_n` grow, and restrains them. With the SVD

.. math::

    \Delta W_n = U \Sigma V^\top = \sum_i \sigma_i\, u_i v_i^\top

and :math:`\bar\sigma = \sigma_{\max}(W_0)` the largest singular value of the *original* matrix, every
:math:`\sigma_i \ge \bar\sigma` is replaced by

.. math::

    F(\sigma_i) = \log_\alpha(\sigma_i) - \log_\alpha(\bar\sigma) + \bar\sigma
                = \bar\sigma + \frac{\ln(\sigma_i / \bar\sigma)}{\ln \alpha}
    \qquad (\texttt{kind="log"}, \ \alpha > 1)

or, as a simpler variant, :math:`F(\sigma_i) = (\sigma_i + \bar\sigma) / 2` (``kind="linear"``); values below
:math:`\bar\sigma` are kept. Both are continuous at the threshold (:math:`F(\bar\sigma) = \bar\sigma`). The restrained
update and the edited matrix are

.. math::

    \overline{\Delta W}_n = U\, F(\Sigma)\, V^\top, \qquad W_n \leftarrow W_0 + \overline{\Delta W}_n .

When does it shrink? :math:`F'(\sigma) = 1 / (\sigma \ln\alpha)`, so just above the threshold
:math:`F(\sigma) < \sigma` only when :math:`\bar\sigma \ln \alpha > 1` (or :math:`= 1`;
:func:`restraint_threshold_shrinks`). Otherwise the log map *enlarges* the values in :math:`(\bar\sigma, \sigma^*)`,
up to the second crossing :math:`\sigma^*` of :math:`F(\sigma) = \sigma`, and shrinks only those above it. The
linear variant always shrinks.

Two ways to compute it
----------------------
*Dense* (:func:`restrain_dense`): a thin SVD of the :math:`m \times n` update, :math:`O(m n \min(m,n))`. Only the
restrained components change, so the result is formed as

.. math::

    \overline{\Delta W} = \Delta W - \sum_{\sigma_i \ge \bar\sigma} (\sigma_i - F(\sigma_i))\, u_i v_i^\top ,

which equals :math:`U F(\Sigma) V^\top` in exact arithmetic; numerically, the unrestrained part of :math:`\Delta W`
carries no reconstruction error and nothing of it is dropped. It runs in float64: the restrained components usually
dominate the update, so the subtraction cancels most of :math:`\Delta W`, and float32 would lose digits there.

*Low rank* (:func:`restrain_lowrank`): ROME edits are rank one and a MEMIT batch of :math:`k` facts has rank
:math:`\le k`, so the accumulated update is kept as factors :math:`\Delta W = L R^\top` with
:math:`L \in \mathbb{R}^{m\times r}`, :math:`R \in \mathbb{R}^{n\times r}`, :math:`r \ll \min(m, n)`. With thin QR
factorizations :math:`L = Q_L R_L` and :math:`R = Q_R R_R`,

.. math::

    L R^\top = Q_L \underbrace{(R_L R_R^\top)}_{C \,\in\, \mathbb{R}^{r \times r}} Q_R^\top, \qquad
    C = U_c \Sigma V_c^\top \ \Longrightarrow\ \Delta W = (Q_L U_c)\, \Sigma\, (Q_R V_c)^\top ,

an SVD of :math:`\Delta W` (:func:`lowrank_svd`) in :math:`O((m + n) r^2 + r^3)`, without ever forming an
:math:`m \times n` matrix. The restrained factors are :math:`L' = Q_L U_c F(\Sigma)` and :math:`R' = Q_R V_c`. QR and
the core SVD run in float64, so the singular values are exact for the factors as given.

Numerical rank: components with :math:`\sigma_i \le \max(m, n)\, \epsilon\, \sigma_1` (``torch.linalg.matrix_rank``'s
default tolerance, :math:`\epsilon` of the dtype the SVD ran in) are numerically zero and dropped. On the low-rank
path :math:`\sigma_1` is replaced by :math:`\max(\sigma_1, \|L\|_F \|R\|_F)`, the scale of the rounding errors, so
factors whose columns cancel exactly give rank 0 rather than a "rank" of pure noise.

Layout: singular values are the same for :math:`W` and :math:`W^\top`, so nothing here assumes :math:`m \ge n`; GPT-2's
``Conv1D`` ``(in, out)`` weights and ``nn.Linear``'s ``(out, in)`` go through the same code.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Union

import torch

from prune_lightning.spectral.condition import spectral_norm

__all__ = [
    "count_restrained",
    "lowrank_svd",
    "restrain_dense",
    "restrain_lowrank",
    "restrain_singular_values",
    "restraint_threshold_shrinks",
]

KINDS = ("log", "linear")

SigmaOrMatrix = Union[torch.Tensor, float]


# --------------------------------------------------------------------------------------------------------- checks
def check_alpha(alpha: float) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a real number > 1, got {alpha!r}") from None
    if not (value > 1.0 and math.isfinite(value)):
        raise ValueError(f"alpha must be a finite number > 1 (the base of the logarithm), got {alpha!r}")
    return value


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def check_sigma(sigma_max: SigmaOrMatrix) -> float:
    """A threshold given as a number or a 0-d tensor, checked to be finite and > 0."""
    if isinstance(sigma_max, torch.Tensor):
        if sigma_max.ndim != 0:
            raise ValueError(f"sigma_max must be a number or a 0-d tensor, got a tensor of shape "
                             f"{tuple(sigma_max.shape)}")
        value = float(sigma_max)
    elif isinstance(sigma_max, Real) and not isinstance(sigma_max, bool):
        value = float(sigma_max)
    else:
        raise ValueError(f"sigma_max must be a number or a 0-d tensor, got {type(sigma_max).__name__}")
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"sigma_max must be a finite number > 0, got {value!r}")
    return value


def _resolve_sigma_max(w0: SigmaOrMatrix, shape: tuple[int, int]) -> float:
    """``sigma_max(W_0)`` from the matrix itself (same shape as the update) or from a precomputed number."""
    if isinstance(w0, torch.Tensor) and w0.ndim == 2:
        if tuple(w0.shape) != tuple(shape):
            raise ValueError(f"w0 has shape {tuple(w0.shape)} but the update has shape {tuple(shape)}")
        return check_sigma(spectral_norm(w0))
    if isinstance(w0, torch.Tensor) and w0.ndim != 0:
        raise ValueError(f"w0 must be the matrix W_0 or its sigma_max (a number or 0-d tensor), got a tensor of "
                         f"shape {tuple(w0.shape)}")
    return check_sigma(w0)


def check_factors(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if left.ndim == 1:
        left = left[:, None]
    if right.ndim == 1:
        right = right[:, None]
    if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[1]:
        raise ValueError(f"factors must be left (m, r) and right (n, r); got {tuple(left.shape)} and "
                         f"{tuple(right.shape)}")
    return left, right


def _rank_tolerance(s: torch.Tensor, shape: tuple[int, int], scale: float = 0.0) -> float:
    """``matrix_rank``'s default tolerance ``max(m, n) * eps * max(sigma_1, scale)`` for singular values ``s``
    (descending). ``scale`` is the size of the rounding errors' source when that can exceed ``sigma_1``: for a
    product ``L R^T`` whose columns cancel, ``sigma_1`` is itself rounding noise of order ``eps * |L| |R|``."""
    if s.numel() == 0:
        return 0.0
    return max(shape) * torch.finfo(s.dtype).eps * max(float(s[0]), scale)


# ----------------------------------------------------------------------------------------------- scalar restraint
def restrain_singular_values(s: torch.Tensor, sigma_max: SigmaOrMatrix, alpha: float = math.e,
                             kind: str = "log") -> torch.Tensor:
    r"""Apply PRUNE's restraint function :math:`F` to singular values.

    Every :math:`s_i \ge \bar\sigma` becomes :math:`\log_\alpha(s_i) - \log_\alpha(\bar\sigma) + \bar\sigma`
    (``kind="log"``) or :math:`(s_i + \bar\sigma)/2` (``kind="linear"``); smaller values are returned unchanged.

    Args:
        s: Singular values (any shape; applied elementwise).
        sigma_max: The threshold :math:`\bar\sigma = \sigma_{\max}(W_0)`, a number or 0-d tensor, > 0.
        alpha: Base of the logarithm, any finite number > 1 (the paper's default is :math:`e`).
        kind: ``"log"`` (the paper's function) or ``"linear"``.

    Returns:
        A new tensor of the same shape, dtype and device as ``s``.

    Raises:
        ValueError: For ``alpha <= 1``, an unknown ``kind`` or ``sigma_max <= 0``.
    """
    alpha = check_alpha(alpha)
    kind = check_kind(kind)
    sigma = check_sigma(sigma_max)
    above = s >= sigma
    if kind == "log":
        # ln(max(s / sigma, 1)) is 0 below the threshold, so no log of 0 or negative numbers is ever taken.
        ratio = torch.clamp(s / sigma, min=1.0)
        restrained = sigma + torch.log(ratio) / math.log(alpha)
    else:
        restrained = (s + sigma) / 2
    return torch.where(above, restrained, s)


def count_restrained(s: torch.Tensor, sigma_max: SigmaOrMatrix) -> int:
    r"""How many singular values the restraint changes: the number of :math:`s_i \ge \bar\sigma`.

    Args:
        s: Singular values.
        sigma_max: The threshold :math:`\bar\sigma = \sigma_{\max}(W_0)`.

    Returns:
        The count as a Python int.
    """
    return int((s >= check_sigma(sigma_max)).sum())


def restraint_threshold_shrinks(sigma_max: SigmaOrMatrix, alpha: float = math.e) -> bool:
    r"""Whether the log restraint shrinks the values just above the threshold: :math:`\bar\sigma \ln\alpha \ge 1`.

    :math:`F'(\sigma) = 1/(\sigma\ln\alpha)` is below one at :math:`\bar\sigma` when :math:`\bar\sigma\ln\alpha > 1`.
    At equality :math:`F'(\bar\sigma) = 1` but :math:`F(\sigma) < \sigma` still holds for every
    :math:`\sigma > \bar\sigma` (:math:`\ln x < x - 1`), so equality counts as shrinking. Below it, values between
    :math:`\bar\sigma` and the second fixed point of :math:`F` are *enlarged*; callers should warn.

    Args:
        sigma_max: The threshold :math:`\bar\sigma = \sigma_{\max}(W_0)`.
        alpha: Base of the logarithm, > 1.

    Returns:
        ``True`` when :math:`\bar\sigma \ln\alpha \ge 1` (in practice: :math:`> 1`; equality has measure zero).
    """
    return check_sigma(sigma_max) * math.log(check_alpha(alpha)) >= 1.0


# --------------------------------------------------------------------------------------------------------- SVDs
def dense_svd(delta: torch.Tensor, compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """Thin SVD ``delta = U diag(S) V^T`` up to numerical rank, in ``compute_dtype`` (default float64).

    LAPACK is faster on tall matrices, so a wide matrix is decomposed as its transpose."""
    if delta.ndim != 2:
        raise ValueError(f"delta must be a matrix (2-D), got shape {tuple(delta.shape)}")
    x = delta.detach().to(compute_dtype or torch.float64)
    m, n = x.shape
    if x.numel() == 0:
        return x.new_zeros(m, 0), x.new_zeros(0), x.new_zeros(n, 0)
    if m < n:
        v, s, uh = torch.linalg.svd(x.T, full_matrices=False)
        u, vh = uh.T, v.T
    else:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = int((s > _rank_tolerance(s, (m, n))).sum())
    return u[:, :k], s[:k], vh[:k].T


def lowrank_svd64(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``left @ right.T`` in float64 from two thin QRs and the SVD of the small core."""
    left, right = check_factors(left, right)
    l64 = left.detach().to(torch.float64)
    r64 = right.detach().to(torch.float64)
    m, n, r = l64.shape[0], r64.shape[0], l64.shape[1]
    if r == 0 or m == 0 or n == 0:
        return l64.new_zeros(m, 0), l64.new_zeros(0), l64.new_zeros(n, 0)
    q_l, r_l = torch.linalg.qr(l64, mode="reduced")
    q_r, r_r = torch.linalg.qr(r64, mode="reduced")
    u_c, s, vh_c = torch.linalg.svd(r_l @ r_r.T, full_matrices=False)
    scale = float(torch.linalg.matrix_norm(r_l) * torch.linalg.matrix_norm(r_r))  # ||L||_F ||R||_F
    k = int((s > _rank_tolerance(s, (m, n), scale)).sum())
    return q_l @ u_c[:, :k], s[:k], q_r @ vh_c[:k].T


def lowrank_svd(left: torch.Tensor, right: torch.Tensor,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Thin SVD of :math:`L R^\top` up to numerical rank, without forming the :math:`m \times n` product.

    Thin QR of both factors plus an SVD of the :math:`r \times r` core :math:`R_L R_R^\top`, all in float64 (see the
    module docstring). Cost :math:`O((m+n) r^2 + r^3)`.

    Args:
        left: ``(m, r)`` (or ``(m,)`` for rank one).
        right: ``(n, r)`` (or ``(n,)``).
        dtype: dtype of the results; default: the promoted dtype of ``left`` and ``right``.

    Returns:
        ``(U, S, V)`` with ``U`` ``(m, k)``, ``S`` ``(k,)`` descending and ``V`` ``(n, k)``, ``k`` the numerical rank,
        such that ``left @ right.T == U @ diag(S) @ V.T``.
    """
    left, right = check_factors(left, right)
    out = dtype or torch.promote_types(left.dtype, right.dtype)
    u, s, v = lowrank_svd64(left, right)
    return u.to(out), s.to(out), v.to(out)


# --------------------------------------------------------------------------------------------- matrix restraint
def restrain_dense_counted(delta: torch.Tensor, sigma_max: float, alpha: float,
                               kind: str) -> tuple[torch.Tensor | None, int]:
    """The restrained update in ``delta``'s dtype (``None`` when nothing reaches the threshold) and the count.

    Everything runs in float64: the restrained components usually dominate the update (that is why they are
    restrained), so ``delta - correction`` cancels most of ``delta`` and float32 would lose digits there."""
    u, s, v = dense_svd(delta)
    count = count_restrained(s, sigma_max)
    if count == 0:
        return None, 0
    # s is descending, so the restrained values are the leading `count`.
    s_k = s[:count]
    shrink = s_k - restrain_singular_values(s_k, sigma_max, alpha, kind)
    restrained = delta.detach().to(torch.float64) - (u[:, :count] * shrink) @ v[:, :count].T
    return restrained.to(delta.dtype), count


def restrain_factors_counted(left: torch.Tensor, right: torch.Tensor, sigma_max: float, alpha: float,
                      kind: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Restrained factors ``(Q_L U_c F(S), Q_R V_c)`` in the factors' promoted dtype, and the restrained count."""
    out = torch.promote_types(left.dtype, right.dtype)
    u, s, v = lowrank_svd64(left, right)
    count = count_restrained(s, sigma_max)
    f = restrain_singular_values(s, sigma_max, alpha, kind)
    return (u * f).to(out), v.to(out), count


def restrain_dense(w0: SigmaOrMatrix, delta: torch.Tensor, alpha: float = math.e,
                   kind: str = "log") -> torch.Tensor:
    r"""Restrain a dense update: :math:`U F(\Sigma) V^\top` from a thin SVD of ``delta``.

    Computed as ``delta`` minus the change of the restrained components (module docstring), so the part of the update
    below the threshold is returned unchanged. The SVD runs in float64 (see
    ``restrain_dense_counted`` for why), on the tall orientation of ``delta``.

    Args:
        w0: The original matrix :math:`W_0` (same shape as ``delta``), or its precomputed :math:`\sigma_{\max}` as a
            number or 0-d tensor (cheaper: compute it once per matrix).
        delta: The accumulated update :math:`\Delta W = W_n - W_0`, either layout.
        alpha: Base of the logarithm, any finite number > 1.
        kind: ``"log"`` or ``"linear"``.

    Returns:
        The restrained update, a new tensor with the shape, dtype and device of ``delta``.

    Raises:
        ValueError: For bad ``alpha`` / ``kind`` / ``sigma_max``, or a ``w0`` whose shape differs from ``delta``'s.
    """
    check_alpha(alpha)
    check_kind(kind)
    if not isinstance(delta, torch.Tensor) or delta.ndim != 2:
        raise ValueError(f"delta must be a matrix (2-D tensor), got {getattr(delta, 'shape', type(delta))}")
    sigma = _resolve_sigma_max(w0, tuple(delta.shape))
    restrained, _ = restrain_dense_counted(delta, sigma, alpha, kind)
    return delta.detach().clone() if restrained is None else restrained


def restrain_lowrank(w0: SigmaOrMatrix, left: torch.Tensor, right: torch.Tensor, alpha: float = math.e,
                     kind: str = "log") -> tuple[torch.Tensor, torch.Tensor]:
    r"""Restrain an update given as factors :math:`\Delta W = L R^\top`, never forming an :math:`m \times n` matrix.

    Same result as ``restrain_dense(w0, left @ right.T)``, from thin QRs of the factors and an SVD of the
    :math:`r \times r` core (module docstring). Numerically zero components are dropped, so the result may have fewer
    columns than the input: a compressed factorization of the restrained update.

    Args:
        w0: The original matrix :math:`W_0` (shape ``(m, n)``), or its precomputed :math:`\sigma_{\max}` as a number
            or 0-d tensor. Pass the number on every write: a dense :math:`W_0` costs an exact spectral norm each call.
        left: ``(m, r)`` (or ``(m,)``).
        right: ``(n, r)`` (or ``(n,)``).
        alpha: Base of the logarithm, any finite number > 1.
        kind: ``"log"`` or ``"linear"``.

    Returns:
        ``(left2, right2)`` of shapes ``(m, r')`` and ``(n, r')``, ``r'`` the numerical rank, in the factors' promoted
        dtype, with ``left2 @ right2.T`` the restrained update.

    Raises:
        ValueError: For bad ``alpha`` / ``kind`` / ``sigma_max``, mismatched factors, or a ``w0`` of another shape.
    """
    check_alpha(alpha)
    check_kind(kind)
    left, right = check_factors(left, right)
    sigma = _resolve_sigma_max(w0, (left.shape[0], right.shape[0]))
    left2, right2, _ = restrain_factors_counted(left, right, sigma, alpha, kind)
    return left2, right2

r"""Exact extreme singular values and the condition number of an edited matrix.

The PRUNE paper's central quantity is the condition number of an edited weight matrix,

.. math::

    \kappa(W) = \frac{\sigma_{\max}(W)}{\sigma_{\min}(W)},

taken over the :math:`\min(m, n)` singular values of :math:`W \in \mathbb{R}^{m \times n}`. Sequential edits make
:math:`\kappa(W_0 + \Delta W_n)` grow, and with it the sensitivity of the model to small perturbations; the restraint
(:mod:`prune_lightning.spectral.restraint`) keeps it near :math:`\kappa(W_0)`.

How the extremes are computed
-----------------------------
Only two singular values are needed, so a full SVD is wasteful, and a randomized estimate
(``torch.svd_lowrank``) is not exact enough: it underestimated the top singular value of a flat-spectrum random matrix
by 8.9% (STACK.md). Instead we use the eigenvalues of the *smaller* Gram matrix, formed in float64:

.. math::

    G = W W^\top \ (m \le n) \quad\text{or}\quad G = W^\top W \ (m > n), \qquad
    \sigma_i(W) = \sqrt{\lambda_i(G)}.

Products of float32 (or lower) numbers are exact in float64, so :math:`G` carries only float64 rounding, and
``eigvalsh`` of a :math:`k \times k` symmetric matrix (:math:`k = \min(m, n)`) is much cheaper than an SVD of the
rectangular matrix. Measured on this project's 2-core CPU (float32 input, medians):

==========================================  ==========================  ===========================
method                                      1600 x 6400 (GPT-2 XL)      11008 x 4096 (LLaMA-7B)
==========================================  ==========================  ===========================
``torch.linalg.matrix_norm(ord=2)``         5.3 s                       ~26 s (same as svdvals)
``torch.linalg.svdvals``                    4.8 s                       25.8 s
float64 Gram + ``eigvalsh`` (used here)     0.9 s                       10.8 s
==========================================  ==========================  ===========================

Accuracy: :math:`\lambda_{\max}` comes out to float64 precision, so :math:`\sigma_{\max}` is exact to ~1e-15
relative. The absolute error of :math:`\lambda_{\min}` is about :math:`\epsilon_{64}\,\lambda_{\max}`, i.e. the
relative error of :math:`\sigma_{\min}` is about :math:`\epsilon_{64}\,\kappa^2`. When the Gram estimate of
:math:`\kappa` exceeds ``1e5`` (relative error no longer below ~1e-6) :func:`singular_value_extremes` falls back to an
exact float64 ``svdvals``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["condition_number", "singular_value_extremes", "singular_values", "spectral_norm"]

# Above this (Gram-estimated) condition number, sigma_min from the Gram eigenvalues loses digits: use svdvals.
_GRAM_KAPPA_LIMIT = 1e5


def _check_matrix(w: torch.Tensor, name: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.ndim != 2:
        raise ValueError(f"{name} must be a matrix (2-D), got shape {tuple(w.shape)}")


def _gram64(w: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of ``w`` (``w w^T`` or ``w^T w``), in float64."""
    w64 = w.detach().to(torch.float64)
    return w64 @ w64.T if w64.shape[0] <= w64.shape[1] else w64.T @ w64


def spectral_norm(w: torch.Tensor) -> float:
    r"""The exact largest singular value :math:`\sigma_{\max}(W) = \|W\|_2`.

    Computed as the square root of the largest eigenvalue of the smaller Gram matrix in float64 (see the module
    docstring for why this and not ``matrix_norm(ord=2)`` or ``svd_lowrank``). Works for either layout.

    Args:
        w: A matrix of any floating dtype, ``(out, in)`` or ``(in, out)``.

    Returns:
        :math:`\sigma_{\max}` as a Python float (``0.0`` for an empty or all-zero matrix).
    """
    _check_matrix(w)
    if w.numel() == 0:
        return 0.0
    lam_max = torch.linalg.eigvalsh(_gram64(w))[-1]
    return math.sqrt(max(float(lam_max), 0.0))


def singular_values(w: torch.Tensor) -> torch.Tensor:
    r"""All :math:`\min(m, n)` singular values of ``w``, largest first, as a float64 tensor on ``w``'s device.

    The same computation as :func:`singular_value_extremes` (float64 Gram eigenvalues, exact ``svdvals`` when they
    suggest :math:`\kappa > 10^5`), so the whole spectrum costs what the extremes cost.
    """
    _check_matrix(w)
    if w.numel() == 0:
        return torch.zeros(0, dtype=torch.float64, device=w.device)
    lam = torch.linalg.eigvalsh(_gram64(w)).clamp_min(0.0)
    lam_max, lam_min = float(lam[-1]), float(lam[0])
    if lam_max == 0.0 or lam_min > lam_max / _GRAM_KAPPA_LIMIT**2:
        return lam.flip(0).sqrt()
    return torch.linalg.svdvals(w.detach().to(torch.float64))


def singular_value_extremes(w: torch.Tensor) -> tuple[float, float]:
    r"""The exact largest and smallest of the :math:`\min(m, n)` singular values of ``w``.

    Uses the float64 Gram eigenvalues; if they suggest :math:`\kappa > 10^5`, where :math:`\sigma_{\min}` from the
    Gram matrix would lose digits, recomputes both with float64 ``svdvals`` (:func:`singular_values`).

    Args:
        w: A matrix of any floating dtype, either layout.

    Returns:
        ``(sigma_max, sigma_min)`` as Python floats.
    """
    s = singular_values(w)
    if s.numel() == 0:
        return 0.0, 0.0
    return float(s[0]), float(s[-1])


def condition_number(w: torch.Tensor) -> float:
    r"""The spectral condition number :math:`\kappa(W) = \sigma_{\max} / \sigma_{\min}`.

    Taken over the :math:`\min(m, n)` singular values, so it is the same for ``W`` and ``W.T`` (GPT-2's ``Conv1D``
    layout and ``nn.Linear``'s give the same value), and matches ``numpy.linalg.cond(W)``.

    Args:
        w: A matrix of any floating dtype, either layout.

    Returns:
        :math:`\kappa` as a Python float; ``inf`` when :math:`\sigma_{\min} = 0` (including the zero matrix).
    """
    sigma_max, sigma_min = singular_value_extremes(w)
    if sigma_min == 0.0:
        return math.inf
    return sigma_max / sigma_min

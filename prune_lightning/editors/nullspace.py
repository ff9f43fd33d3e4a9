r"""The null-space projection of AlphaEdit: ``P`` from the second moment ``C`` of a layer's keys, cached beside ``C``.

AlphaEdit (Fang et al., ICLR 2025) keeps the values of the keys a layer sees in ordinary text - the *preserved* keys
``K_0`` - unchanged by projecting every update onto the null space of ``K_0 K_0^T``: if ``P K_0 = 0`` then
``(dW P) K_0 = 0``. ``K_0 K_0^T`` is never formed; its per-token average is the second moment the statistics job
already computes and caches (:mod:`.stats`)::

    C = E[k k^T] = K_0 K_0^T / N                     (in_dim x in_dim, symmetric, positive semi-definite)
    C = U diag(s) U^T                                 eigendecomposition, s >= 0
    U_0 = the columns of U with s < threshold         the (numerical) null space of C
    P = U_0 U_0^T                                     the orthogonal projector onto it: P = P^T = P^2

The threshold is absolute, on the eigenvalues of ``C`` as normalised above (per token), which is how the authors'
statistics are normalised too: ``jianghoucheng/AlphaEdit`` ``experiments/evaluate.py`` (``get_project``) takes the
singular values of ``C`` - for a symmetric matrix the absolute values of its eigenvalues - and keeps the singular
vectors with ``s < nullspace_threshold``, 0.02 in every published hyperparameter file (GPT-2 XL, GPT-J, LLaMA-3-8B).
Here the eigendecomposition is done in float64 of the symmetrised ``C`` and compares ``|s|`` with the threshold, so
the selection is the reference's; ``P`` is the same matrix whatever basis the solver picks inside a repeated
eigenvalue, as long as the same eigenvalues are kept.

The cache. Eigendecomposing ``C`` of a large model takes minutes on a CPU (LLaMA-3-8B: 14336 x 14336), so ``P`` is
written next to ``C`` as safetensors (a temporary sibling, then renamed), with ``C``'s provenance copied into its
metadata (model id, module, corpus, number of documents, dtype, truncation length and whatever else ``C``'s file
records) plus the threshold, the dimension of the null space, ``P``'s dtype and the SHA-256 of ``C``'s bytes. A cached
``P`` is used only when the threshold, the dtype and the digest of the ``C`` at hand all match, so a stale file can
never stand in for a new ``C``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional, Union

import torch
from lightning.pytorch.utilities import rank_zero_warn

from prune_lightning.io import atomic_target

__all__ = [
    "NULLSPACE_THRESHOLD",
    "PROJECTION_FORMAT",
    "load_or_compute_projection",
    "moment_digest",
    "null_space_projection",
    "projection_cache_path",
]

#: The reference's ``nullspace_threshold``: the same in its GPT-2 XL, GPT-J and LLaMA-3-8B hyperparameter files.
NULLSPACE_THRESHOLD = 2e-2
PROJECTION_FORMAT = "prune_lightning.nullspace_projection/1"
_PROJECTION_KEY = "projection"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def null_space_projection(moment: torch.Tensor, threshold: float = NULLSPACE_THRESHOLD) -> tuple[torch.Tensor, int]:
    """``P = U_0 U_0^T`` for the eigenvectors ``U_0`` of ``moment`` whose eigenvalues are below ``threshold``.

    A pure function of the matrix: no model, no cache. Computed in float64 on ``moment``'s device.

    Args:
        moment: The second moment ``C`` of the keys, ``(d, d)``.
        threshold: Eigenvalues ``s`` with ``|s| < threshold`` span the null space (absolute, as in the reference).

    Returns:
        ``(P, dim)``: the float64 ``(d, d)`` projector and the dimension of the null space (its rank).
    """
    if moment.ndim != 2 or moment.shape[0] != moment.shape[1]:
        raise ValueError(f"The second moment must be a square matrix, got shape {tuple(moment.shape)}")
    _check_threshold(threshold)
    sym = moment.detach().to(torch.float64)
    sym = (sym + sym.T) / 2
    values, vectors = torch.linalg.eigh(sym)
    null = vectors[:, values.abs() < threshold]
    return null @ null.T, int(null.shape[1])


def moment_digest(moment: torch.Tensor) -> str:
    """SHA-256 of the matrix's float32 bytes: what a cached projection is tied to."""
    data = moment.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def projection_cache_path(moment_path: Union[str, Path], threshold: float, dtype: str) -> Path:
    """Where the projection of the ``C`` cached at ``moment_path`` is cached: beside it, threshold and dtype named.

    Args:
        moment_path: The cache file of ``C`` (or any path whose folder and stem the projection's file should share).
        threshold: The eigenvalue threshold.
        dtype: ``P``'s dtype name.
    """
    moment_path = Path(moment_path)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{moment_path.stem}__nullspace-{float(threshold):g}__{dtype}")
    return moment_path.with_name(name + ".safetensors")


def load_or_compute_projection(
    moment: torch.Tensor,
    threshold: float = NULLSPACE_THRESHOLD,
    cache_path: Optional[Union[str, Path]] = None,
    provenance: Optional[dict[str, str]] = None,
    dtype: str = "float32",
    write: bool = True,
) -> tuple[torch.Tensor, int]:
    """The projector of :func:`null_space_projection`, read from ``cache_path`` when it matches, else computed.

    Args:
        moment: The second moment ``C``.
        threshold: The eigenvalue threshold.
        cache_path: The projection's cache file (:func:`projection_cache_path`); ``None``: no cache.
        provenance: ``C``'s provenance (its cache file's metadata, or what is known of a user's file), copied into
            the projection's metadata.
        dtype: ``"float32"`` or ``"float64"``: the dtype ``P`` is returned and cached in.
        write: Write a computed projection to ``cache_path`` (one process of several writes).

    Returns:
        ``(P, dim)``: ``P`` in ``dtype`` on ``moment``'s device, and the dimension of the null space.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"The projection's dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    _check_threshold(threshold)
    digest = moment_digest(moment)
    expected = {
        "format": PROJECTION_FORMAT,
        "threshold": repr(float(threshold)),
        "projection_dtype": dtype,
        "moment_sha256": digest,
    }
    side = moment.shape[0]
    if cache_path is not None and Path(cache_path).exists():
        cached = _load(Path(cache_path), expected, side)
        if cached is not None:
            projection, dim = cached
            return projection.to(device=moment.device, dtype=_DTYPES[dtype]), dim
    projection, dim = null_space_projection(moment, threshold)
    projection = projection.to(_DTYPES[dtype])
    if cache_path is not None and write:
        metadata = {f"moment_{k}" if k == "format" else k: str(v) for k, v in (provenance or {}).items()}
        metadata.update(expected)
        metadata["null_space_dim"] = str(dim)
        _save_atomic(Path(cache_path), projection, metadata)
    return projection, dim


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def _check_threshold(threshold: float) -> None:
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and threshold > 0
            and threshold != float("inf")):
        raise ValueError(f"nullspace_threshold must be a positive number, got {threshold!r}")


def _load(path: Path, expected: dict[str, str], side: int) -> Optional[tuple[torch.Tensor, int]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            projection = f.get_tensor(_PROJECTION_KEY)
    except Exception as err:  # unreadable / foreign file: recompute
        rank_zero_warn(f"Ignoring unreadable projection cache {path} ({err}); recomputing it.")
        return None
    stale = {k: (metadata.get(k), v) for k, v in expected.items() if metadata.get(k) != v}
    if stale or tuple(projection.shape) != (side, side) or "null_space_dim" not in metadata:
        rank_zero_warn(f"Projection cache {path} does not match this C and threshold; recomputing it.")
        return None
    return projection, int(metadata["null_space_dim"])


def _save_atomic(path: Path, projection: torch.Tensor, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_target(path) as tmp:
        save_file({_PROJECTION_KEY: projection.detach().cpu().contiguous()}, str(tmp), metadata=metadata)

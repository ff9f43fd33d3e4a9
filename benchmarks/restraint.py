r"""Per-write cost of the PRUNE restraint: the low-rank path against the dense recipe of the paper's released code.

After every write, PRUNE restrains the singular values of the accumulated update :math:`\Delta W` that reach
:math:`\sigma_{\max}(W_0)`. Two ways to do that for one edited matrix, side by side in one process:

- **low rank** (this package): :math:`\Delta W = L R^\top` is kept as factors of rank :math:`r`;
  :func:`prune_lightning.spectral.restrain_lowrank` does two thin QRs, an :math:`r \times r` SVD and rebuilds the
  factors. :math:`\sigma_{\max}(W_0)` was computed once (as ``PRUNECallback`` does) and is not part of the timing.
- **dense** (what the paper's released code runs per restraint, in numpy): full SVDs (``np.linalg.svd``,
  ``full_matrices=True``, numpy's default) of :math:`\Delta W`, of :math:`W_0` and of the edited matrix
  :math:`W_0 + \Delta W`, ``np.linalg.matrix_rank(dW)``, then the restraint of the singular values and the rebuild
  :math:`U_r F(\Sigma_r) V_r^\top`.

The dense cost hardly depends on the rank, so it is timed once per shape (at rank 100, or the ``--ranks`` entry
nearest to it) and reused for the ratio of the other rows. The accuracy column compares, for every rank, the
low-rank result with a dense numpy restraint of the same :math:`\Delta W` (the timed recipe at the timed rank; one
reduced numpy SVD at the others): ``||A - B||_F / ||B||_F`` on the ``m x n`` result.

Run time: dominated by the numpy side (STACK.md: a full numpy SVD of 11008x4096 takes ~49 s on 2 CPU threads), about
5 minutes in all on an idle 2-core machine, much longer when other processes share the cores. Timings on a shared
machine vary; the table therefore also gives the fastest low-rank repeat.

Usage::

    python benchmarks/restraint.py            # 6400x1600 (GPT-2 XL c_proj) and 11008x4096 (LLaMA-7B down_proj)
    python benchmarks/restraint.py --quick    # 6400x1600 only
    python benchmarks/restraint.py --ranks 1 10 100
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    from prune_lightning.spectral import restrain_lowrank, spectral_norm
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from prune_lightning.spectral import restrain_lowrank, spectral_norm

SHAPES = [(6400, 1600), (11008, 4096)]
DEFAULT_RANKS = [1, 10, 100, 1000]
DENSE_TIMED_RANK = 100  # the rank the (rank-independent) dense recipe is timed at
DENSE_RANK_FRACTION = 0.25  # DeltaTracker's default switch to dense


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _f_numpy(s: np.ndarray, sigma: float, alpha: float) -> np.ndarray:
    """The paper's log restraint in numpy: log_a(s) - log_a(sigma) + sigma for s >= sigma."""
    with np.errstate(divide="ignore"):
        above = np.log(s) / np.log(alpha) - np.log(sigma) / np.log(alpha) + sigma
    return np.where(s >= sigma, above, s).astype(s.dtype)


def _paper_dense_restraint(w0: np.ndarray, dw: np.ndarray, alpha: float) -> np.ndarray:
    """One restraint the way the paper's released code does it: full SVDs of dW, W_0 and W_0 + dW, and matrix_rank."""
    u, s, vt = np.linalg.svd(dw)  # full_matrices=True (numpy default)
    _, s_w0, _ = np.linalg.svd(w0)
    _, s_w, _ = np.linalg.svd(w0 + dw)  # the edited matrix (the released code also decomposes it)
    r = int(np.linalg.matrix_rank(dw))
    del s_w
    return (u[:, :r] * _f_numpy(s[:r], float(s_w0[0]), alpha)) @ vt[:r]


def _reference_dense_restraint(dw: np.ndarray, sigma0: float, alpha: float) -> np.ndarray:
    """The same restraint from one reduced numpy SVD of dW and a known sigma_max(W_0) (accuracy reference only)."""
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    r = int((s > max(dw.shape) * np.finfo(s.dtype).eps * s[0]).sum())  # matrix_rank's tolerance
    return (u[:, :r] * _f_numpy(s[:r], sigma0, alpha)) @ vt[:r]


def _factors(m: int, n: int, rank: int, sigma0: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-orthogonal float32 factors whose product has singular values ~ sigma0 * 10 ... sigma0 / 10: the top half
    is restrained, the rest is not (as after many edits of varying strength)."""
    s = sigma0 * torch.logspace(1, -1, rank, dtype=torch.float64) if rank > 1 else torch.tensor([10.0 * sigma0])
    left = torch.randn(m, rank, generator=gen, dtype=torch.float64) / math.sqrt(m) * s
    right = torch.randn(n, rank, generator=gen, dtype=torch.float64) / math.sqrt(n)
    return left.float(), right.float()


def _rel_fro(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a64 - b64) / np.linalg.norm(b64))


def run_shape(shape: tuple[int, int], ranks: list[int], repeats: int, alpha: float, seed: int) -> list[dict]:
    """All low-rank timings of one shape first (no numpy work in between), then the dense recipe and references."""
    m, n = shape
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(m, n, generator=gen) / math.sqrt(max(m, n))
    sigma0 = spectral_norm(w0)  # once per matrix, as PRUNECallback does; not part of the per-write timing
    timed_rank = min(ranks, key=lambda r: abs(r - DENSE_TIMED_RANK))
    _log(f"[{m}x{n}] sigma_max(W_0) = {sigma0:.4f}; dense recipe timed at rank {timed_rank}")

    rows = []
    for rank in ranks:
        left, right = _factors(m, n, rank, sigma0, gen)
        restrain_lowrank(sigma0, left, right, alpha=alpha)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            left2, right2 = restrain_lowrank(sigma0, left, right, alpha=alpha)
            times.append(time.perf_counter() - start)
        rows.append({"shape": f"{m}x{n}", "rank": rank, "lowrank_ms": 1e3 * statistics.median(times),
                     "lowrank_min_ms": 1e3 * min(times), "timed": rank == timed_rank,
                     "tracker_dense": rank > DENSE_RANK_FRACTION * min(m, n),
                     "factors": (left, right), "restrained": (left2, right2)})
        _log(f"[{m}x{n}] rank {rank}: low-rank median {rows[-1]['lowrank_ms']:.2f} ms")

    w0_np, dense_seconds = w0.numpy(), None
    for row in rows:
        left, right = row.pop("factors")
        left2, right2 = row.pop("restrained")
        dw = (left @ right.T).numpy()
        if row["timed"]:
            _log(f"[{m}x{n}] rank {row['rank']}: dense recipe (3 full SVDs + matrix_rank) ...")
            start = time.perf_counter()
            dense_result = _paper_dense_restraint(w0_np, dw, alpha)
            dense_seconds = time.perf_counter() - start
            _log(f"[{m}x{n}] dense recipe: {dense_seconds:.1f} s")
        else:
            _log(f"[{m}x{n}] rank {row['rank']}: dense accuracy reference (1 reduced SVD) ...")
            dense_result = _reference_dense_restraint(dw, sigma0, alpha)
        row["rel_diff"] = _rel_fro((left2 @ right2.T).numpy(), dense_result)
        _log(f"[{m}x{n}] rank {row['rank']}: rel diff {row['rel_diff']:.2e}")
        del dw, dense_result
    for row in rows:
        row["dense_s"] = dense_seconds
        row["ratio"] = dense_seconds / (row["lowrank_ms"] / 1e3)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the 6400x1600 matrix")
    parser.add_argument("--ranks", type=int, nargs="+", default=DEFAULT_RANKS, help="accumulated ranks to time")
    parser.add_argument("--repeats", type=int, default=7, help="repeats of the low-rank restraint (median)")
    parser.add_argument("--alpha", type=float, default=math.e)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    shapes = SHAPES[:1] if args.quick else SHAPES
    _log(f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}")
    rows = []
    for shape in shapes:
        rows += run_shape(shape, sorted(set(args.ranks)), args.repeats, args.alpha, args.seed)

    print("| shape | rank | low-rank ms (median) | low-rank ms (min) | dense s | dense / low-rank (median) "
          "| rel. diff (Frobenius) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        dense = f"{row['dense_s']:.1f}" + ("" if row["timed"] else "*")
        rank = f"{row['rank']}" + ("\u2020" if row["tracker_dense"] else "")
        print(f"| {row['shape']} | {rank} | {row['lowrank_ms']:.2f} | {row['lowrank_min_ms']:.2f} | {dense} | "
              f"{row['ratio']:,.0f}x | {row['rel_diff']:.1e} |")
    print("\n* dense recipe timed once per shape (its cost does not depend on the rank) and reused; the accuracy of "
          "those rows is against one reduced numpy SVD of the same dW.")
    print(f"\u2020 above DeltaTracker's default dense switch ({DENSE_RANK_FRACTION} * min(m, n) columns): in training "
          "this update would be held dense.")
    print("low-rank: float32 factors, QR + core SVD in float64, sigma_max(W_0) precomputed; "
          "dense: numpy float32, 3 full SVDs + matrix_rank + rebuild. Median of "
          f"{args.repeats} low-rank repeats; all low-rank timings of a shape run before its numpy work.")

    ok = True
    for row in rows:
        if row["shape"] == "6400x1600" and row["rank"] == DENSE_TIMED_RANK:
            fast, exact = row["ratio"] >= 300, row["rel_diff"] <= 1e-4
            ok = fast and exact
            print(f"\nrequirement at 6400x1600, rank 100: >= 300x faster ({row['ratio']:,.0f}x: "
                  f"{'met' if fast else 'NOT met'}), equal to 1e-4 ({row['rel_diff']:.1e}: "
                  f"{'met' if exact else 'NOT met'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

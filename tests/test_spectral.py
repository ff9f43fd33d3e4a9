"""The PRUNE restraint, the low-rank SVD and the condition number, against an independent numpy float64 reference."""

import math
import re

import numpy as np
import pytest
import torch

from prune_lightning.spectral import (
    condition_number,
    count_restrained,
    lowrank_svd,
    restrain_dense,
    restrain_lowrank,
    restrain_singular_values,
    restraint_threshold_shrinks,
    singular_value_extremes,
    spectral_norm,
)

SHAPES = [(24, 40), (40, 24), (33, 33)]  # wide (GPT-2 Conv1D-like), tall (Linear-like), square
ALPHAS = [1.5, math.e, 10.0]
KINDS = ["log", "linear"]


# ----------------------------------------------------------------------------------------------- the reference
def _ref_f(s: np.ndarray, sigma: float, alpha: float, kind: str) -> np.ndarray:
    """The paper's F, written literally: log_a(s) - log_a(sigma) + sigma above the threshold."""
    if kind == "log":
        with np.errstate(divide="ignore"):  # log(0) below the threshold, discarded by np.where
            above = np.log(s) / np.log(alpha) - np.log(sigma) / np.log(alpha) + sigma
    else:
        above = (s + sigma) / 2.0
    return np.where(s >= sigma, above, s)


def _ref_restrain(w0: np.ndarray, delta: np.ndarray, alpha: float, kind: str) -> np.ndarray:
    sigma = np.linalg.norm(w0, 2)
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    r = np.linalg.matrix_rank(delta)
    return (u[:, :r] * _ref_f(s[:r], sigma, alpha, kind)) @ vt[:r]


def _rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))[0]


def _problem(shape, seed, multiples=(6.0, 2.5, 1.3, 0.7, 0.2)):
    """W_0 (float32) and a low-rank update whose singular values are the given multiples of sigma_max(W_0)."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    w0 = torch.randn(m, n, generator=gen)
    sigma = np.linalg.norm(w0.double().numpy(), 2)
    k = len(multiples)
    s = torch.tensor(multiples, dtype=torch.float64) * sigma
    left = (_orthonormal(m, k, gen) * s).float()
    right = _orthonormal(n, k, gen).float()
    return w0, left, right


# ------------------------------------------------------------------------------------- restrain_singular_values
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", KINDS)
def test_restrain_singular_values_matches_formula(alpha, kind):
    sigma = 3.0
    s = torch.tensor([100.0, 20.0, 7.5, 3.0, 2.999, 1.0, 0.0], dtype=torch.float64)
    got = restrain_singular_values(s, sigma, alpha=alpha, kind=kind)
    np.testing.assert_allclose(got.numpy(), _ref_f(s.numpy(), sigma, alpha, kind), rtol=1e-12)
    np.testing.assert_array_equal(got[4:].numpy(), s[4:].numpy())  # below the threshold: untouched
    assert got.dtype == s.dtype and got.shape == s.shape


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", KINDS)
def test_restrain_singular_values_continuous_and_monotone(alpha, kind):
    sigma = torch.tensor(2.0, dtype=torch.float64)  # 0-d tensor threshold
    eps = 1e-9
    s = torch.tensor([2.0 - eps, 2.0, 2.0 + eps], dtype=torch.float64)
    got = restrain_singular_values(s, sigma, alpha=alpha, kind=kind)
    assert got[1] == pytest.approx(2.0, abs=1e-15)
    assert abs(float(got[2] - got[0])) < 1e-8
    grid = torch.linspace(0.1, 50.0, 500, dtype=torch.float64)
    assert bool((restrain_singular_values(grid, sigma, alpha, kind).diff() > 0).all())


def test_restrain_singular_values_defaults_are_log_base_e():
    s = torch.tensor([10.0 * math.e**2], dtype=torch.float64)
    assert float(restrain_singular_values(s, 10.0)) == pytest.approx(12.0, rel=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 0.5, -2.0, float("nan"), float("inf")])
def test_alpha_must_exceed_one(alpha):
    s = torch.ones(3)
    with pytest.raises(ValueError, match=r"alpha.*got " + re.escape(repr(alpha))):
        restrain_singular_values(s, 1.0, alpha=alpha)
    w0, left, right = _problem((8, 6), 0)
    with pytest.raises(ValueError, match="alpha"):
        restrain_dense(w0, left @ right.T, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        restrain_lowrank(w0, left, right, alpha=alpha)


def test_bad_kind_and_threshold_raise():
    s = torch.ones(3)
    with pytest.raises(ValueError, match=r"kind.*'sqrt'"):
        restrain_singular_values(s, 1.0, kind="sqrt")
    w0, left, right = _problem((8, 6), 0)
    with pytest.raises(ValueError, match="kind"):
        restrain_lowrank(w0, left, right, kind="cubic")
    with pytest.raises(ValueError, match="kind"):
        restrain_dense(w0, left @ right.T, kind="Log")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma_max"):
            restrain_singular_values(s, bad)
        with pytest.raises(ValueError, match="sigma_max"):
            restrain_lowrank(bad, left, right)
    with pytest.raises(ValueError, match=r"\(6, 8\).*\(8, 6\)"):
        restrain_dense(w0.T, left @ right.T)  # W_0 in the other layout than the update
    with pytest.raises(ValueError, match="factors"):
        restrain_lowrank(w0, left, right[:, :2])


def test_count_restrained():
    s = torch.tensor([5.0, 3.0, 2.9999, 0.0])
    assert count_restrained(s, 3.0) == 2
    assert count_restrained(s, 10.0) == 0
    assert count_restrained(s, torch.tensor(0.5)) == 3


# sigma * ln(alpha) == 1 (first case) still shrinks: F(s) = 1 + ln(s) < s for every s > 1.
@pytest.mark.parametrize(("sigma", "alpha", "expected"), [(1.0, math.e, True), (2.0, math.e, True),
                                                           (0.5, math.e, False), (0.5, 10.0, True),
                                                           (30.0, 1.01, False), (30.0, 1.05, True)])
def test_threshold_shrinks_iff_f_below_identity_just_above(sigma, alpha, expected):
    assert restraint_threshold_shrinks(sigma, alpha) is expected
    s = torch.tensor([sigma * 1.001], dtype=torch.float64)
    shrinks = bool(restrain_singular_values(s, sigma, alpha) < s)
    assert shrinks is expected


# ------------------------------------------------------------------------------------- restrain_dense / lowrank
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", KINDS)
def test_restrain_dense_and_lowrank_match_reference(shape, alpha, kind):
    w0, left, right = _problem(shape, seed=hash((shape, alpha, kind)) % 1000)
    delta = left @ right.T
    want = _ref_restrain(w0.double().numpy(), delta.double().numpy(), alpha, kind)

    dense = restrain_dense(w0, delta, alpha=alpha, kind=kind)
    assert dense.shape == delta.shape and dense.dtype == delta.dtype
    assert _rel(dense.numpy(), want) < 1e-5

    left2, right2 = restrain_lowrank(w0, left, right, alpha=alpha, kind=kind)
    assert left2.dtype == left.dtype and left2.shape == (shape[0], 5) and right2.shape == (shape[1], 5)
    lowrank = (left2.double() @ right2.double().T).numpy()
    assert _rel(lowrank, want) < 1e-5
    assert _rel(lowrank, dense.numpy()) < 1e-5
    # The restraint really changed something: 3 of the 5 values are above the threshold.
    assert _rel(want, delta.double().numpy()) > 0.1


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_sigma_max_may_be_given_as_number_or_0d_tensor(shape):
    w0, left, right = _problem(shape, 1)
    sigma = np.linalg.norm(w0.double().numpy(), 2)
    by_matrix = restrain_dense(w0, left @ right.T)
    for given in (float(sigma), torch.tensor(sigma)):
        assert _rel(restrain_dense(given, left @ right.T).numpy(), by_matrix.numpy()) < 1e-6
        l2, r2 = restrain_lowrank(given, left, right)
        assert _rel((l2 @ r2.T).numpy(), by_matrix.numpy()) < 1e-5


def test_layout_is_irrelevant():
    w0, left, right = _problem((20, 45), 2)
    out_in = restrain_dense(w0, left @ right.T, kind="log")
    in_out = restrain_dense(w0.T, right @ left.T, kind="log")  # GPT-2's Conv1D layout
    assert _rel(in_out.T.numpy(), out_in.numpy()) < 1e-6
    l2, r2 = restrain_lowrank(w0.T, right, left)
    assert _rel((r2 @ l2.T).numpy(), out_in.numpy()) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_no_change_when_every_value_is_below_threshold(kind):
    w0, left, right = _problem((25, 40), 3, multiples=(0.9, 0.5, 0.1))
    delta = left @ right.T
    dense = restrain_dense(w0, delta, kind=kind)
    np.testing.assert_array_equal(dense.numpy(), delta.numpy())
    assert dense.data_ptr() != delta.data_ptr()  # a new tensor, never an alias
    l2, r2 = restrain_lowrank(w0, left, right, kind=kind)
    assert _rel((l2 @ r2.T).numpy(), delta.numpy()) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_rank_and_singular_vectors_preserved(kind):
    w0, left, right = _problem((30, 45), 4)
    delta = left.double() @ right.double().T  # exactly rank 5 (a float32 product carries rounding rank)
    restrained = restrain_dense(w0, delta, kind=kind).numpy()
    assert np.linalg.matrix_rank(delta.numpy()) == 5
    assert np.linalg.matrix_rank(restrained) == 5
    # Same singular subspaces: projecting the restrained update onto delta's row space changes nothing.
    _, _, vt = np.linalg.svd(delta.double().numpy(), full_matrices=False)
    p = vt[:5].T @ vt[:5]
    np.testing.assert_allclose(restrained @ p, restrained, atol=1e-5 * np.abs(restrained).max())


def test_lowrank_drops_numerically_zero_components():
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(40, 1, generator=gen, dtype=torch.float64), torch.randn(40, 1, generator=gen,
                                                                                 dtype=torch.float64)
    c, d = torch.randn(30, 1, generator=gen, dtype=torch.float64), torch.randn(30, 1, generator=gen,
                                                                                 dtype=torch.float64)
    left = torch.cat([a, 2 * a, b, -b], dim=1)  # columns 1-2 share a direction; b-terms cancel
    right = torch.cat([c, c, d, d], dim=1)
    l2, r2 = restrain_lowrank(0.5, left, right)
    assert l2.shape == (40, 1) and r2.shape == (30, 1)
    want = _ref_restrain(np.full((1, 1), 0.5), (left @ right.T).numpy(), math.e, "log")
    assert _rel((l2 @ r2.T).numpy(), want) < 1e-10


def test_lowrank_never_forms_the_dense_matrix():
    # 100k x 100k in float32 would be 40 GB: this only passes if nothing m x n is ever allocated.
    gen = torch.Generator().manual_seed(6)
    m, n = 100_000, 100_000
    s = torch.tensor([50.0, 2.0], dtype=torch.float64)
    u, v = _orthonormal(m, 2, gen), _orthonormal(n, 2, gen)
    l2, r2 = restrain_lowrank(5.0, (u * s).float(), v.float())
    uu, ss, vv = lowrank_svd(l2, r2, dtype=torch.float64)
    np.testing.assert_allclose(ss.numpy(), [5.0 + math.log(10.0), 2.0], rtol=1e-6)
    assert abs(float(uu[:, 0] @ u[:, 0])) == pytest.approx(1.0, abs=1e-6)
    assert abs(float(vv[:, 1] @ v[:, 1])) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_restraint_lowers_condition_number_when_update_dominates(seed):
    gen = torch.Generator().manual_seed(seed)
    m, n = 40, 60
    s0 = torch.linspace(2.0, 4.0, m, dtype=torch.float64)  # kappa(W_0) = 2, sigma_max(W_0) = 4
    w0 = (_orthonormal(m, m, gen) * s0) @ _orthonormal(n, m, gen).T
    left = _orthonormal(m, 3, gen) * torch.tensor([400.0, 200.0, 100.0], dtype=torch.float64)
    right = _orthonormal(n, 3, gen)
    delta = left @ right.T
    restrained = restrain_dense(w0, delta)
    l2, r2 = restrain_lowrank(w0, left, right)
    kappa_edited = np.linalg.cond((w0 + delta).numpy())
    kappa_restrained = np.linalg.cond((w0 + restrained).numpy())
    assert kappa_restrained < kappa_edited / 5
    assert condition_number(w0 + l2 @ r2.T) == pytest.approx(kappa_restrained, rel=1e-6)


def test_dtypes_are_kept():
    w0, left, right = _problem((20, 30), 7)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        delta = (left @ right.T).to(dtype)
        assert restrain_dense(w0, delta).dtype == dtype
        l2, r2 = restrain_lowrank(w0, left.to(dtype), right.to(dtype))
        assert l2.dtype == r2.dtype == dtype


# ------------------------------------------------------------------------------------------------ lowrank_svd
@pytest.mark.parametrize("shape", SHAPES)
def test_lowrank_svd_matches_numpy(shape):
    gen = torch.Generator().manual_seed(8)
    m, n = shape
    left, right = torch.randn(m, 6, generator=gen), torch.randn(n, 6, generator=gen)
    u, s, v = lowrank_svd(left, right)
    assert u.shape == (m, 6) and s.shape == (6,) and v.shape == (n, 6) and s.dtype == torch.float32
    dense = left.double().numpy() @ right.double().numpy().T
    np.testing.assert_allclose(s.numpy(), np.linalg.svd(dense, compute_uv=False)[:6], rtol=1e-6)
    assert _rel((u.double() * s.double()) @ v.double().T, dense) < 1e-6
    np.testing.assert_allclose(u.double().T @ u.double(), np.eye(6), atol=1e-6)
    np.testing.assert_allclose(v.double().T @ v.double(), np.eye(6), atol=1e-6)


def test_lowrank_svd_rank_one_vectors_and_empty():
    u, s, v = lowrank_svd(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0, 0.0]))
    assert s.tolist() == pytest.approx([5.0])
    u, s, v = lowrank_svd(torch.zeros(5, 0), torch.zeros(7, 0))
    assert u.shape == (5, 0) and s.shape == (0,) and v.shape == (7, 0)


# --------------------------------------------------------------------------------------- norms and conditioning
@pytest.mark.parametrize("shape", [(1600 // 40, 6400 // 40), (6400 // 40, 1600 // 40), (17, 17), (1, 9)])
def test_spectral_norm_and_condition_number_match_numpy(shape):
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(*shape, generator=gen)
    ref = w.double().numpy()
    assert spectral_norm(w) == pytest.approx(np.linalg.norm(ref, 2), rel=1e-12)
    assert condition_number(w) == pytest.approx(np.linalg.cond(ref), rel=1e-9)
    s = np.linalg.svd(ref, compute_uv=False)
    assert singular_value_extremes(w) == pytest.approx((s[0], s[-1]), rel=1e-9)
    assert condition_number(w.T) == pytest.approx(condition_number(w), rel=1e-12)


def test_condition_number_of_ill_conditioned_matrix_is_exact():
    gen = torch.Generator().manual_seed(10)
    s = torch.logspace(0, -8, 20, dtype=torch.float64)  # kappa = 1e8: the Gram estimate alone would be off
    w = (_orthonormal(30, 20, gen) * s) @ _orthonormal(20, 20, gen).T
    assert condition_number(w) == pytest.approx(np.linalg.cond(w.numpy()), rel=1e-6)
    assert condition_number(w) == pytest.approx(1e8, rel=1e-6)


def test_condition_number_is_inf_for_singular_and_zero_matrices():
    w = torch.zeros(3, 5)
    w[0, 0], w[1, 2] = 3.0, 2.0
    assert condition_number(w) == math.inf
    assert condition_number(torch.zeros(4, 6)) == math.inf
    assert spectral_norm(torch.zeros(4, 6)) == 0.0
    assert spectral_norm(w) == pytest.approx(3.0)


def test_norm_functions_reject_non_matrices():
    with pytest.raises(ValueError, match=r"2-D.*\(5,\)"):
        spectral_norm(torch.ones(5))
    with pytest.raises(ValueError, match="2-D"):
        condition_number(torch.ones(2, 3, 4))

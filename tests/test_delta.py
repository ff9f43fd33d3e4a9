"""DeltaTracker: the accumulated update of one edited matrix, low rank while cheap, against numpy references."""

import math

import numpy as np
import pytest
import torch

from prune_lightning.editors.base import LowRankUpdate
from prune_lightning.spectral import DeltaTracker, restrain_dense


def _rank_ones(shape, count, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    return [LowRankUpdate(scale * torch.randn(m, generator=gen), torch.randn(n, generator=gen)) for _ in range(count)]


def _numpy_sum(updates, shape) -> np.ndarray:
    total = np.zeros(shape)
    for up in updates:
        if isinstance(up, LowRankUpdate):
            total += up.left.double().numpy() @ up.right.double().numpy().T
        else:
            total += up.double().numpy()
    return total


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _mode(tracker: DeltaTracker) -> str:
    return "empty" if tracker.is_empty else ("lowrank" if tracker.is_lowrank else "dense")


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_rank_one_updates_accumulate(shape):
    tracker = DeltaTracker(shape)
    assert tracker.is_empty and tracker.rank == 0 and tracker.is_lowrank
    np.testing.assert_array_equal(tracker.dense().numpy(), np.zeros(shape))
    updates = _rank_ones(shape, 5, seed=0)
    for i, up in enumerate(updates, 1):
        tracker.add(up)
        assert tracker.rank == i and tracker.is_lowrank and not tracker.is_empty
    assert _rel(tracker.dense().numpy(), _numpy_sum(updates, shape)) < 1e-6
    left, right = tracker.factors()
    assert left.shape == (shape[0], 5) and right.shape == (shape[1], 5)
    assert tracker.dense().dtype == torch.float32


def test_switches_to_dense_past_fraction():
    shape = (40, 20)  # limit: 0.25 * 20 = 5 columns
    tracker = DeltaTracker(shape, dense_rank_fraction=0.25)
    updates = _rank_ones(shape, 7, seed=1)
    for up in updates[:5]:
        tracker.add(up)
    assert tracker.is_lowrank and tracker.rank == 5
    tracker.add(updates[5])
    assert not tracker.is_lowrank and tracker.rank == 20
    with pytest.raises(RuntimeError, match="dense"):
        tracker.factors()
    tracker.add(updates[6])  # low-rank update into a dense tracker
    assert _rel(tracker.dense().numpy(), _numpy_sum(updates, shape)) < 1e-6


def test_zero_fraction_is_always_dense():
    tracker = DeltaTracker((6, 4), dense_rank_fraction=0.0)
    tracker.add(_rank_ones((6, 4), 1, seed=2)[0])
    assert not tracker.is_lowrank


def test_correlated_updates_do_not_grow_columns_or_go_dense():
    shape = (40, 20)
    gen = torch.Generator().manual_seed(3)
    u, v = torch.randn(40, 2, generator=gen), torch.randn(20, 2, generator=gen)
    tracker = DeltaTracker(shape)  # dense past 5 columns
    updates = []
    for i in range(30):  # 30 updates inside one 2-dimensional subspace
        c = torch.randn(2, generator=gen)
        updates.append(LowRankUpdate(u @ c, v[:, i % 2]))
        tracker.add(updates[-1])
    assert tracker.is_lowrank and tracker.rank <= 5
    tracker.compress()
    assert tracker.rank == 2
    assert _rel(tracker.dense().numpy(), _numpy_sum(updates, shape)) < 1e-5


def test_compress_drops_cancelled_updates():
    tracker = DeltaTracker((10, 12))
    up = _rank_ones((10, 12), 1, seed=4)[0]
    tracker.add(up)
    tracker.add(LowRankUpdate(-up.left, up.right))
    assert tracker.rank == 2
    tracker.compress()
    assert tracker.is_empty and tracker.rank == 0 and tracker.sigma_max() == 0.0


def test_dense_update_switches_to_dense_and_sums():
    shape = (15, 25)
    gen = torch.Generator().manual_seed(5)
    updates = _rank_ones(shape, 2, seed=5) + [torch.randn(shape, generator=gen, dtype=torch.float64)]
    tracker = DeltaTracker(shape)
    for up in updates:
        tracker.add(up)
    assert not tracker.is_lowrank and tracker.dense().dtype == torch.float32
    assert _rel(tracker.dense().numpy(), _numpy_sum(updates, shape)) < 1e-6
    first = torch.randn(shape, generator=gen)
    fresh = DeltaTracker(shape)
    fresh.add(first)
    first.zero_()  # the tracker copied the update: changing the caller's tensor changes nothing
    assert float(fresh.dense().abs().sum()) > 0


def test_tracker_owns_its_factors():
    gen = torch.Generator().manual_seed(11)
    u, v = torch.randn(20, generator=gen), torch.randn(30, generator=gen)
    want = torch.outer(u, v)
    tracker = DeltaTracker((20, 30))
    tracker.add(LowRankUpdate(u, v))
    left, right = torch.randn(20, 2, generator=gen), torch.randn(30, 2, generator=gen)
    other = DeltaTracker((20, 30))
    other.set_lowrank(left, right)
    want_other = left @ right.T
    u.zero_()
    left.zero_()
    np.testing.assert_allclose(tracker.dense().numpy(), want.numpy(), rtol=1e-6)
    np.testing.assert_allclose(other.dense().numpy(), want_other.numpy(), rtol=1e-6)


def test_shape_mismatch_and_bad_updates_raise():
    tracker = DeltaTracker((8, 6))
    with pytest.raises(ValueError, match=r"\(6, 8\).*\(8, 6\)"):
        tracker.add(LowRankUpdate(torch.ones(6), torch.ones(8)))
    with pytest.raises(ValueError, match=r"\(8, 7\).*\(8, 6\)"):
        tracker.add(torch.zeros(8, 7))
    with pytest.raises(ValueError, match=r"\(6, 8\).*\(8, 6\)"):
        tracker.set_dense(torch.zeros(6, 8))
    with pytest.raises(TypeError, match="LowRankUpdate"):
        tracker.add((torch.ones(8), torch.ones(6)))
    with pytest.raises(ValueError, match="dense_rank_fraction"):
        DeltaTracker((8, 6), dense_rank_fraction=1.5)
    assert tracker.is_empty


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("shape", [(30, 45), (45, 30)])
def test_svd_and_sigma_max_match_numpy(shape, dense):
    updates = _rank_ones(shape, 4, seed=6)
    tracker = DeltaTracker(shape, dense_rank_fraction=0.0 if dense else 0.25)
    for up in updates:
        tracker.add(up)
    assert tracker.is_lowrank is not dense
    ref = tracker.dense().double().numpy()  # the stored delta itself, so dense mode has no rounding in the reference
    if not dense:
        ref = _numpy_sum(updates, shape)
    s_ref = np.linalg.svd(ref, compute_uv=False)
    u, s, v = tracker.svd()
    assert s.dtype == torch.float32 and u.shape[1] == s.shape[0] == v.shape[1]
    np.testing.assert_allclose(s[:4].numpy(), s_ref[:4], rtol=1e-5)
    assert _rel((u.double() * s.double()) @ v.double().T, ref) < 1e-5
    assert tracker.sigma_max() == pytest.approx(s_ref[0], rel=1e-6)


def test_empty_tracker_reads():
    tracker = DeltaTracker((7, 9))
    u, s, v = tracker.svd()
    assert u.shape == (7, 0) and s.shape == (0,) and v.shape == (9, 0)
    assert tracker.sigma_max() == 0.0
    assert tracker.restrain(1.0) == 0
    left, right = tracker.factors()
    assert left.shape == (7, 0) and right.shape == (9, 0)


@pytest.mark.parametrize("kind", ["log", "linear"])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("shape", [(30, 45), (45, 30)])
def test_restrain_in_place_equals_restrain_dense(shape, dense, kind):
    updates = _rank_ones(shape, 6, seed=7, scale=3.0)
    tracker = DeltaTracker(shape, dense_rank_fraction=0.0 if dense else 0.5)
    for up in updates:
        tracker.add(up)
    assert tracker.is_lowrank is not dense
    before = tracker.dense()
    s = np.linalg.svd(before.double().numpy(), compute_uv=False)
    sigma0 = float(s[2] * 0.9)  # three values above the threshold
    want = restrain_dense(sigma0, before, alpha=math.e, kind=kind)
    count = tracker.restrain(sigma0, alpha=math.e, kind=kind)
    assert count == int((s >= sigma0).sum()) == 3
    assert _rel(tracker.dense().numpy(), want.numpy()) < 1e-5
    assert _rel(tracker.dense().numpy(), before.numpy()) > 0.05
    assert tracker.is_lowrank is not dense
    assert tracker.sigma_max() < s[0]


def test_restrain_below_threshold_changes_nothing():
    shape = (20, 30)
    tracker = DeltaTracker(shape)
    for up in _rank_ones(shape, 3, seed=8):
        tracker.add(up)
    before = tracker.dense()
    left_before = tracker.factors()[0]
    assert tracker.restrain(tracker.sigma_max() * 1.01) == 0
    np.testing.assert_array_equal(tracker.dense().numpy(), before.numpy())
    assert tracker.factors()[0] is left_before
    with pytest.raises(ValueError, match="alpha"):
        tracker.restrain(1.0, alpha=1.0)
    with pytest.raises(ValueError, match="kind"):
        tracker.restrain(1.0, kind="exp")


@pytest.mark.parametrize("mode", ["empty", "lowrank", "dense"])
def test_state_dict_round_trips_through_weights_only_load(tmp_path, mode):
    shape = (12, 18)
    tracker = DeltaTracker(shape, dtype=torch.float64)
    if mode != "empty":
        for up in _rank_ones(shape, 3, seed=9):
            tracker.add(up)
    if mode == "dense":
        tracker.add(torch.ones(shape))
    path = tmp_path / "tracker.pt"
    torch.save(tracker.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["mode"] == mode and state["shape"] == [12, 18]

    restored = DeltaTracker.from_state_dict(state)
    assert _mode(restored) == mode and restored.rank == tracker.rank and restored.dtype == torch.float64
    np.testing.assert_array_equal(restored.dense().numpy(), tracker.dense().numpy())

    other = DeltaTracker(shape)  # float32: load casts
    other.load_state_dict(state)
    assert _mode(other) == mode and other.dense().dtype == torch.float32
    assert _rel(other.dense().numpy(), tracker.dense().numpy()) < 1e-6 or mode == "empty"

    with pytest.raises(ValueError, match=r"\(18, 12\)"):
        DeltaTracker((18, 12)).load_state_dict(state)


def test_load_state_dict_replaces_previous_content():
    shape = (5, 4)
    source = DeltaTracker(shape)
    target = DeltaTracker(shape)
    target.add(torch.ones(shape))
    target.load_state_dict(source.state_dict())
    assert target.is_empty and target.is_lowrank


def test_set_lowrank_and_set_dense():
    shape = (16, 10)
    tracker = DeltaTracker(shape)
    tracker.set_dense(torch.ones(shape, dtype=torch.float64))
    assert not tracker.is_lowrank and tracker.dense().dtype == torch.float32
    gen = torch.Generator().manual_seed(10)
    left, right = torch.randn(16, 2, generator=gen), torch.randn(10, 2, generator=gen)
    tracker.set_lowrank(left, right)
    assert tracker.is_lowrank and tracker.rank == 2
    np.testing.assert_allclose(tracker.dense().numpy(), (left @ right.T).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(10, 16\)"):
        tracker.set_lowrank(right, left)


def test_to_moves_and_returns_self():
    tracker = DeltaTracker((40, 30))
    tracker.add(LowRankUpdate(torch.ones(40), torch.ones(30)))
    assert tracker.to("cpu") is tracker and tracker.device == torch.device("cpu")
    assert tracker.factors()[0].device == torch.device("cpu")

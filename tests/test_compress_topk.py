"""psrv.compress.topk: top-k (Aji & Heafield, EMNLP 2017) keeps the largest magnitudes and contracts, and the
fast kernel (a sampled threshold) gives exactly the argpartition set (up to ties, broken towards
the lowest indices), whatever the sample, including samples that miss the top."""

from __future__ import annotations

import numpy as np
import pytest

from psrv.compress import make_compressor, topk
from psrv.compress.topk import topk_indices
from psrv.payload import to_dense


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.3, 1.0])
def test_topk_keeps_largest_and_contracts(ratio: float) -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_cauchy(10_000)
    c = make_compressor("topk", ratio=ratio)
    p = c.compress(v, rng)
    k = c.k_for(v.size)
    assert len(p.indices) == k and np.all(np.diff(p.indices) > 0)
    kept = np.abs(v[p.indices])
    dropped = np.delete(np.abs(v), p.indices)
    assert dropped.size == 0 or kept.min() >= dropped.max()
    err = to_dense(p) - v
    assert err @ err <= (1 - k / v.size) * (v @ v) + 1e-9 * (v @ v)
    assert c.compressor_class(v.size).constant == pytest.approx(k / v.size)


def _check_topk(x: np.ndarray, k: int, idx: np.ndarray, lowest_ties: bool = True) -> None:
    """``idx`` is a valid exact top-k: sorted, unique, k of them, nothing outside beats anything inside,
    the argpartition set where there are no ties at the k-th magnitude and, with ``lowest_ties``,
    the lowest indices among those ties."""
    mag = np.abs(np.asarray(x, dtype=np.float64))
    d = mag.size
    assert idx.dtype == np.int64 and idx.shape == (k,)
    assert np.all(np.diff(idx) > 0) and (k == 0 or (idx[0] >= 0 and idx[-1] < d))
    if k in (0, d):
        assert np.array_equal(idx, np.arange(k))
        return
    ref = np.sort(np.argpartition(mag, d - k)[d - k :])
    kth = mag[ref].min()
    above = np.flatnonzero(mag > kth)
    ties = np.flatnonzero(mag == kth)
    assert np.isin(above, idx).all() and (mag[idx] >= kth).all()
    if lowest_ties:
        np.testing.assert_array_equal(idx, np.sort(np.concatenate([above, ties[: k - above.size]])))
    if ties.size == 1:
        np.testing.assert_array_equal(idx, ref)


def _vectors() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(123)
    d = 5000
    spike = rng.normal(size=d) * 1e-3
    spike[4321] = 1e30
    zeros = np.zeros(d)
    zeros[rng.choice(d, 30, replace=False)] = rng.normal(size=30)
    clustered = rng.normal(size=d) * 1e-6
    clustered[100:160] = 50.0 + np.arange(60)  # the whole top in one run
    return [
        ("normal", rng.normal(size=d)),
        ("normal32", rng.normal(size=d).astype(np.float32)),
        ("float16", rng.normal(size=d).astype(np.float16)),
        ("cauchy", rng.standard_cauchy(d)),
        ("ties", rng.integers(-3, 4, size=d).astype(np.float64)),
        ("all_equal", np.full(d, -2.5)),
        ("many_zeros", zeros),
        ("all_zero", np.zeros(d, dtype=np.float32)),
        ("negative_only", -np.abs(rng.normal(size=d)) - 1.0),
        ("spike", spike),
        ("clustered", clustered),
        ("signed_zeros", np.where(rng.random(d) < 0.5, -0.0, 0.0) + (rng.random(d) < 0.01)),
        ("integers", rng.integers(-1000, 1000, size=d)),
        ("big_endian", rng.normal(size=d).astype(">f4")),
        ("strided", rng.normal(size=2 * d)[::2]),
    ]


@pytest.mark.parametrize("name,x", _vectors(), ids=[n for n, _ in _vectors()])
@pytest.mark.parametrize("k", [1, 2, 37, 500, 4999, 5000])
def test_topk_threshold_equals_argpartition(name: str, x: np.ndarray, k: int) -> None:
    fast = [topk_indices(x, k, np.random.default_rng(seed), method="threshold") for seed in range(3)]
    for idx in fast:
        _check_topk(x, k, idx)
        np.testing.assert_array_equal(idx, fast[0])
    legacy = topk_indices(x, k, None, method="argpartition")
    _check_topk(x, k, legacy, lowest_ties=False)
    mag = np.abs(np.asarray(x, dtype=np.float64))
    if k < x.size:
        np.testing.assert_array_equal(legacy, np.sort(np.argpartition(np.abs(x), x.size - k)[x.size - k :]))
        if np.count_nonzero(mag == np.sort(mag)[x.size - k]) == 1:  # no ties: one answer
            np.testing.assert_array_equal(legacy, fast[0])
    # small d: auto keeps psrv's old argpartition selection, ties included
    np.testing.assert_array_equal(topk_indices(x, k, np.random.default_rng(9)), legacy)


@pytest.mark.parametrize("sample_size", [1, 2, 3, 10, 50])
@pytest.mark.parametrize("name,x", _vectors(), ids=[n for n, _ in _vectors()])
def test_topk_tiny_samples_force_retries_but_stay_exact(name: str, x: np.ndarray, sample_size: int) -> None:
    for k in (1, 50, 1000):
        for seed in range(4):
            idx = topk_indices(x, k, np.random.default_rng(seed), method="threshold", sample_size=sample_size)
            _check_topk(x, k, idx)


def test_topk_sample_that_misses_the_top() -> None:
    """The 60 largest entries sit in one run the sample never hits; a lone spike; a sample of one."""
    rng = np.random.default_rng(5)
    d = 200_000
    x = rng.normal(size=d).astype(np.float32)
    x[1000:1060] = 1e6
    x[150_000] = -3e38
    for k in (1, 30, 61, 2000):
        for seed in range(5):
            _check_topk(x, k, topk_indices(x, k, np.random.default_rng(seed)))
            _check_topk(x, k, topk_indices(x, k, np.random.default_rng(seed), sample_size=1))


@pytest.mark.parametrize("d", [1, 2, 7, 1 << 15, 100_003, 300_000])
def test_topk_auto_over_sizes_and_seeds(d: int) -> None:
    rng = np.random.default_rng(d)
    for gen in (rng.standard_normal, rng.standard_cauchy):
        x = gen(d).astype(np.float32)
        for k in sorted({1, max(1, d // 100), max(1, d // 4), d}):
            idx = topk_indices(x, k, np.random.default_rng(k))
            _check_topk(x, k, idx, lowest_ties=d >= topk.FAST_MIN_DIM and k <= topk.FAST_MAX_SHARE * d)


class _RiggedRng:
    """Stands in for the Generator: the "random" sample is whatever indices the test chooses."""

    def __init__(self, indices: np.ndarray) -> None:
        self.indices = np.asarray(indices)

    def integers(self, low: int, high: int, size: int) -> np.ndarray:
        return np.resize(self.indices, size)


def test_topk_rigged_samples_retry_then_fall_back() -> None:
    rng = np.random.default_rng(21)
    d = 100_000
    x = rng.normal(size=d)
    x[[10, 20_000, 99_999]] = [40.0, -50.0, 60.0]
    top = np.argsort(np.abs(x))[::-1]
    for k in (1, 3, 4, 100, 1000, 20_000):
        # a sample of only the very largest entries: every threshold it offers is too high
        _check_topk(x, k, topk_indices(x, k, _RiggedRng([99_999]), method="threshold"))
        # mostly the top 50, some ordinary entries: the first threshold fails, a deeper one works
        rigged = np.concatenate([np.repeat(top[:50], 40), rng.integers(0, d, 1000)])
        _check_topk(x, k, topk_indices(x, k, _RiggedRng(rigged), method="threshold", sample_size=3000))
        # only the smallest entries: the threshold is far too low, still exact
        _check_topk(x, k, topk_indices(x, k, _RiggedRng(top[-10:]), method="threshold"))


def test_topk_exactly_k_nonzero_and_k_zero() -> None:
    x = np.zeros(10_000, dtype=np.float32)
    x[[5, 500, 9000]] = [1.0, -2.0, 3.0]
    for k in (2, 3, 4, 9):
        for seed in range(3):
            _check_topk(x, k, topk_indices(x, k, np.random.default_rng(seed), method="threshold"))
    assert topk_indices(x, 0).tolist() == []
    assert topk_indices(np.zeros(0), 0).tolist() == []


def test_topk_ties_keep_lowest_indices() -> None:
    x = np.array([1.0, -3.0, 3.0, 2.0, -3.0, 3.0, 0.5] * 5000)
    assert x.size >= topk.FAST_MIN_DIM
    for method in ("threshold", "auto"):
        idx = topk_indices(x, 3, np.random.default_rng(0), method=method)
        np.testing.assert_array_equal(idx, [1, 2, 4])


def test_topk_nan_counts_as_largest_like_argpartition() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=50_000)
    x[777] = np.nan
    for method in ("threshold", "argpartition"):
        idx = topk_indices(x, 10, np.random.default_rng(1), method=method)
        assert 777 in idx
        np.testing.assert_array_equal(idx, np.sort(np.argpartition(np.abs(x), x.size - 10)[-10:]))


def test_topk_rejects_bad_k() -> None:
    with pytest.raises(ValueError):
        topk_indices(np.ones(3), 4)
    with pytest.raises(ValueError):
        topk_indices(np.ones(3), 1, method="magic")


def test_topk_compressor_output_format_unchanged() -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_cauchy(100_000)
    c = make_compressor("topk", ratio=0.01)
    p = c.compress(x, np.random.default_rng(0))
    assert p.kind == "sparse" and p.dim == x.size
    assert p.indices.dtype == np.int64 and p.values.dtype == np.float32
    old = np.sort(np.argpartition(np.abs(x), x.size - 1000)[-1000:])  # the previous implementation
    np.testing.assert_array_equal(p.indices, old)
    np.testing.assert_array_equal(p.values, x[old].astype(np.float32))
    np.testing.assert_array_equal(c.compress(x).indices, old)  # rng is optional
    assert make_compressor("topk", k=1).compress(np.array([5.0])).indices.tolist() == [0]


def test_topk_module_constants_sane() -> None:
    assert 0 < topk.SAMPLE_SHARE < 1 and topk.FAST_MIN_DIM > 0

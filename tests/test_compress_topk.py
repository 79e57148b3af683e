"""The fast kernels give exactly what the straightforward ones give.

- top-k with a sampled threshold: the argpartition set (up to ties, broken towards the
  lowest indices), whatever the sample, including samples that miss the top;
- blocked LAQ quantizer: eq. 5 on whole float64 arrays, bit for bit;
- bit packing: the original per-plane layout, byte for byte.
"""

from __future__ import annotations

import numpy as np
import pytest

from psrv import bitpack
from psrv.compress import laq, make_compressor, topk
from psrv.compress.topk import topk_indices
from psrv.payload import Payload, laq_innovation

# --------------------------------------------------------------------------- top-k


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


# --------------------------------------------------------------------------- LAQ


def _eq5_reference(grad: np.ndarray, q_prev: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
    """Eq. 5 on whole float64 arrays, as psrv has always computed it."""
    diff = np.asarray(grad, dtype=np.float64) - q_prev
    levels = 2**bits - 1
    radius = float(np.max(np.abs(diff))) if diff.size else 0.0
    r32 = np.float32(radius)
    if float(r32) < radius:
        r32 = np.nextafter(r32, np.float32(np.inf))
    dtype = np.uint8 if bits <= 8 else np.uint16
    if r32 == 0:
        return np.zeros(diff.size, dtype=dtype), float(r32)
    r = float(r32)
    codes = np.floor((diff + r) * (levels / (2.0 * r)) + 0.5)
    return np.clip(codes, 0, levels, out=codes).astype(dtype), float(r32)


def _assert_same(p: Payload, grad: np.ndarray, q_prev: np.ndarray, bits: int) -> None:
    codes, scale = _eq5_reference(grad, q_prev, bits)
    assert p.kind == "laq" and p.bits == bits and p.dim == codes.size
    assert p.codes.dtype == codes.dtype
    np.testing.assert_array_equal(p.codes, codes)
    assert p.scale == scale


@pytest.fixture(params=[7, 1000, 1 << 16], ids=lambda b: f"block{b}")
def block(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(laq, "_BLOCK", request.param)
    return request.param


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8, 9, 12, 16])
@pytest.mark.parametrize(
    "gdt,qdt", [("f8", "f8"), ("f4", "f8"), ("f4", "f4"), ("f8", "f4"), ("i8", "f8"), ("f2", "i4")]
)
def test_laq_blocked_equals_eq5_reference(block: int, bits: int, gdt: str, qdt: str) -> None:
    rng = np.random.default_rng([bits, block, len(gdt + qdt)])
    for n in (1, 2, 999, 3001):
        g = (rng.standard_t(3, size=n) * 10).astype(gdt)
        q = (rng.normal(size=n) * 3).astype(qdt)
        _assert_same(laq.quantize(g, q, bits), g, q, bits)
        _assert_same(laq.quantize(g, np.zeros(n, dtype=qdt), bits), g, np.zeros(n, dtype=qdt), bits)


@pytest.mark.parametrize("bits", [1, 2, 3, 8, 16])
def test_laq_grid_midpoints_and_neighbours(block: int, bits: int) -> None:
    """Innovations on, and one ulp either side of, every rounding boundary of the grid."""
    rng = np.random.default_rng(bits)
    levels = 2**bits - 1
    radius = 1.7
    r = float(np.float32(radius))
    j = np.arange(min(levels, 300) + 1, dtype=np.float64)
    mids = (j + 0.5) * (2.0 * r / levels) - r
    diff = np.concatenate([mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf), [r, -r, 0.0]])
    diff = np.clip(diff, -r, r)
    rng.shuffle(diff)
    q = rng.normal(size=diff.size)
    g = q + diff
    _assert_same(laq.quantize(g, q, bits), g, q, bits)
    _assert_same(laq.quantize(diff, np.zeros_like(diff), bits), diff, np.zeros_like(diff), bits)


def test_laq_random_large_and_float32_radius_edges(block: int) -> None:
    rng = np.random.default_rng(77)
    n = 200_001
    g = rng.normal(size=n).astype(np.float32)
    q = rng.normal(size=n) * 0.5
    for bits in (3, 4):
        _assert_same(laq.quantize(g, q, bits), g, q, bits)
    tiny = np.full(10, 1e-45, dtype=np.float64)  # radius below the float32 subnormals
    _assert_same(laq.quantize(tiny, np.zeros(10), 3), tiny, np.zeros(10), 3)


def test_laq_special_inputs_match_reference() -> None:
    g = np.arange(10.0)
    for grad, q in [
        (g, g.copy()),  # zero innovation
        (np.zeros(0), np.zeros(0)),
        (g, 0.0),  # broadcast previous Q
        (g.reshape(2, 5), np.zeros((2, 5))),
        (np.array([1e39, 0.0]), np.zeros(2)),  # radius beyond float32
        (g.astype(np.longdouble), np.zeros(10)),  # not float32/64: the reference path
    ]:
        with np.errstate(all="ignore"):
            p = laq.quantize(grad, q, 3)
            ref = laq.quantize_reference(grad, q, 3)
        np.testing.assert_array_equal(p.codes, ref.codes)
        assert p.scale == ref.scale or (np.isnan(p.scale) and np.isnan(ref.scale))
    with np.errstate(all="ignore"):
        for bad in (np.array([1.0, np.nan, 2.0]), np.array([1.0, np.inf])):
            p, ref = laq.quantize(bad, np.zeros(bad.size), 3), laq.quantize_reference(bad, np.zeros(bad.size), 3)
            np.testing.assert_array_equal(p.codes, ref.codes)
    with pytest.raises(ValueError):
        laq.quantize(g, g, 0)


def test_laq_reconstruction_is_the_shared_eq6() -> None:
    rng = np.random.default_rng(8)
    g, q = rng.normal(size=70_000).astype(np.float32), rng.normal(size=70_000)
    p = laq.quantize(g, q, 3)
    tau = 1 / 7
    assert np.max(np.abs(g - (q + laq_innovation(p)))) <= tau * p.scale * (1 + 1e-12)


# --------------------------------------------------------------------------- bitpack


def _old_pack(values: np.ndarray, width: int) -> bytes:
    v = np.ascontiguousarray(values).astype(np.uint32 if width > 8 else np.uint8, copy=False)
    planes = [np.packbits(((v >> j) & 1).astype(np.uint8, copy=False), bitorder="little") for j in range(width)]
    return b"".join(p.tobytes() for p in planes)


def _old_unpack(data: bytes, count: int, width: int) -> np.ndarray:
    out_dtype = np.uint32 if width > 8 else np.uint8
    planes = np.frombuffer(data, dtype=np.uint8).reshape(width, -1) if count else np.zeros((width, 0), np.uint8)
    out = np.zeros(count, dtype=out_dtype)
    for j in range(width):
        bits = np.unpackbits(planes[j], count=count, bitorder="little").astype(out_dtype, copy=False)
        out |= bits << out_dtype(j)
    return out


@pytest.mark.parametrize("width", range(1, 33))
def test_bitpack_matches_original_layout(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bitpack, "_UNPACK_BLOCK", 3)  # many blocks even for small counts
    rng = np.random.default_rng(width)
    for count in (0, 1, 5, 8, 9, 63, 64, 65, 1001):
        values = rng.integers(0, 2**width, size=count, dtype=np.uint64)
        dtypes = [np.uint64, np.int64] + ([np.uint32] if width <= 32 else []) + ([np.uint8] if width <= 8 else [])
        for dt in dtypes:
            v = values.astype(dt)
            data = bitpack.pack(v, width)
            assert data == _old_pack(v, width)
            back = bitpack.unpack(data, count, width)
            assert back.dtype == (np.uint32 if width > 8 else np.uint8)
            np.testing.assert_array_equal(back, values.astype(back.dtype))
        garbage = rng.integers(0, 256, size=bitpack.packed_size(count, width), dtype=np.uint8).tobytes()
        np.testing.assert_array_equal(bitpack.unpack(garbage, count, width), _old_unpack(garbage, count, width))


def test_bitpack_bool_signs_and_large_arrays() -> None:
    rng = np.random.default_rng(0)
    signs = rng.random(100_003) < 0.5
    assert bitpack.pack(signs, 1) == _old_pack(signs.astype(np.uint8), 1)
    codes = rng.integers(0, 8, size=1_000_003, dtype=np.uint8)
    data = bitpack.pack(codes, 3)
    assert data == _old_pack(codes, 3)
    np.testing.assert_array_equal(bitpack.unpack(data, codes.size, 3), codes)
    idx = np.sort(rng.choice(10**7, 100_000, replace=False)).astype(np.int64)
    data = bitpack.pack(idx, 24)
    assert data == _old_pack(idx, 24)
    np.testing.assert_array_equal(bitpack.unpack(data, idx.size, 24), idx)


@pytest.mark.parametrize("width", [1, 3, 8, 9, 24, 32])
def test_bitpack_still_rejects_values_that_do_not_fit(width: int) -> None:
    with pytest.raises(ValueError, match="do not fit"):
        bitpack.pack(np.array([0, 2**width], dtype=np.uint64), width)
    with pytest.raises(ValueError, match="do not fit"):
        bitpack.pack(np.array([3, -1], dtype=np.int64), width)
    if width < 8:
        with pytest.raises(ValueError, match="do not fit"):
            bitpack.pack(np.array([2**width], dtype=np.uint8), width)


def test_topk_module_constants_sane() -> None:
    assert 0 < topk.SAMPLE_SHARE < 1 and topk.FAST_MIN_DIM > 0

"""Threshold (seed 000 D1/D2), QSGD (seed 001 Part 05), S+Q (seed 004 eq. 3), fp16/bf16: the math and the wire."""

from __future__ import annotations

import math

import numpy as np
import pytest

from psrv import codec
from psrv.algorithms import RoundInfo, make_algorithm
from psrv.compress import CompressorClass, make_compressor
from psrv.compress.qsgd import omega as qsgd_omega
from psrv.compress.qsgd import variance as qsgd_variance
from psrv.compress.sq import beta
from psrv.payload import from_bfloat16, payload_bits, to_dense
from psrv.v1 import psrv_pb2 as pb


class FixedUniform:
    """A stand-in for ``np.random.Generator`` whose ``random(d)`` returns a chosen vector."""

    def __init__(self, u: np.ndarray) -> None:
        self.u = np.asarray(u, dtype=np.float64)

    def random(self, size: int | None = None) -> np.ndarray:
        assert size == self.u.size
        return self.u.copy()


def wire(p, d: int):
    data = codec.upload_to_proto("w0", 3, 0.5, p).SerializeToString()
    return codec.upload_from_proto(pb.Upload.FromString(data), d), len(data)


# --------------------------------------------------------------------------- threshold (D1)


def test_threshold_keeps_exactly_entries_at_or_above_t_including_ties() -> None:
    rng = np.random.default_rng(0)
    t = 0.5  # exactly representable: ties are real ties
    x = rng.normal(size=2000)
    x[[3, 17, 400]] = [t, -t, np.nextafter(t, 0.0)]
    p = make_compressor("threshold", threshold=t).compress(x, rng)
    assert p.kind == "sparse" and p.values.dtype == np.float32 and p.indices.dtype == np.int64
    np.testing.assert_array_equal(p.indices, np.flatnonzero(np.abs(x) >= t))
    assert {3, 17} <= set(p.indices.tolist()) and 400 not in p.indices
    np.testing.assert_array_equal(p.values, x[p.indices].astype(np.float32))
    dropped = np.delete(x, p.indices)
    err = to_dense(p) - x
    # the documented absolute bound (not a contraction): ||Q(x) - x||^2 = sum of dropped^2 <= d t^2
    assert np.abs(dropped).max() < t and err @ err <= x.size * t * t


def test_threshold_compares_exactly_not_against_a_float32_rounded_threshold() -> None:
    a = np.float32(0.1)  # 0.100000001490116...
    t = float(a) + 1e-10  # float32(t) == a, but a < t
    x = np.array([a, np.nextafter(a, np.float32(1)), -a], dtype=np.float32)
    p = make_compressor("threshold", threshold=t).compress(x, None)
    np.testing.assert_array_equal(p.indices, [1])
    p = make_compressor("threshold", threshold=0.1).compress(x, None)  # float32(0.1) > 0.1
    np.testing.assert_array_equal(p.indices, [0, 1, 2])


def test_threshold_class_and_options() -> None:
    c = make_compressor("threshold", threshold=1.0)
    assert c.compressor_class(100) == CompressorClass("biased", 0.0)
    assert make_compressor("threshold-mem", threshold=2.0).compressor_class(5).kind == "biased"
    # all entries below t: Q(x) = 0, so no delta > 0 can hold
    assert make_compressor("threshold", threshold=1.0).compress(np.full(10, 0.9), None).indices.size == 0
    for bad in ({}, {"threshold": -1.0}, {"threshold": math.inf}, {"ratio": 0.1}):
        with pytest.raises(ValueError):
            make_compressor("threshold", **bad)


# --------------------------------------------------------------------------- threshold-mem (D2) with EF


def test_threshold_mem_with_error_feedback_follows_d2_and_loses_nothing() -> None:
    rng = np.random.default_rng(1)
    d, t = 500, 1.5
    algo = make_algorithm("gd", {"threshold": t, "ef": 1}, "threshold-mem")
    assert algo.ef and algo.compressor.name == "threshold-mem"
    memory = algo.init(d)
    inputs, sent_sum = np.zeros(d), np.zeros(d)
    accumulated_small = 0
    for k in range(300):
        g = rng.normal(scale=0.5, size=d)
        dec = algo.step(memory, g, RoundInfo(k, 1), rng)
        v_tilde = memory + g  # D2: v~^(k) = v^(k) + (v~^(k-1) - Q(v^(k-1)))
        sent = to_dense(dec.payload)
        # D2 compares the compensated vector v~, not the raw gradient
        np.testing.assert_array_equal(dec.payload.indices, np.flatnonzero(np.abs(v_tilde) >= t))
        accumulated_small += int(np.sum(np.abs(g[dec.payload.indices]) < t))
        # unsent coordinates keep all of v~; sent ones keep only the float32 rounding residual
        off = np.abs(v_tilde) < t
        np.testing.assert_array_equal(dec.state[off], v_tilde[off])
        assert np.all(np.abs(dec.state[~off]) <= 2.0**-24 * np.abs(v_tilde[~off]))
        memory = dec.state
        inputs += g
        sent_sum += sent
    np.testing.assert_allclose(sent_sum + memory, inputs, rtol=0, atol=1e-9)
    assert accumulated_small > 0  # memory made small gradients cross the threshold
    assert np.abs(memory).max() > 0.1  # and something really is held back


# --------------------------------------------------------------------------- QSGD


@pytest.mark.parametrize("s", [1, 4, 300])
def test_qsgd_codes_signs_and_payload(s: int) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_cauchy(3000)
    x[::7] = 0.0
    p = make_compressor("qsgd", levels=float(s)).compress(x, rng)
    assert p.kind == "qsgd" and p.bits == s and p.dim == x.size
    assert p.codes.dtype == (np.uint8 if s <= 255 else np.uint16)
    assert p.codes.max() <= s and not p.codes[::7].any()
    nz = x != 0
    np.testing.assert_array_equal(p.signs[nz], x[nz] < 0)
    assert p.scale == float(np.float32(p.scale)) and p.scale >= np.linalg.norm(x)
    assert p.scale <= np.linalg.norm(x) * (1 + 2.0**-23)
    # each code is one of the two levels around r_j = s |x_j| / N
    r = np.abs(x) / p.scale * s
    assert np.all((p.codes == np.floor(r)) | (p.codes == np.floor(r) + 1))
    # the same seed gives the same payload: all randomness is the rng argument
    c = make_compressor("qsgd", levels=s)
    first, again = (c.compress(x, np.random.default_rng(7)).codes for _ in range(2))
    np.testing.assert_array_equal(first, again)


def test_qsgd_zero_vector() -> None:
    p = make_compressor("qsgd", levels=4).compress(np.zeros(17), np.random.default_rng(0))
    assert p.scale == 0.0 and not p.codes.any() and not to_dense(p).any()
    back, _ = wire(p, 17)
    assert not to_dense(back).any()


def test_qsgd_is_exactly_unbiased_given_the_float32_norm() -> None:
    """Recover each coordinate's Bernoulli probability by bisecting the uniform draw; then
    E[Q(x)_j] = N/s (floor(r_j) + P(round up)) must equal x_j to float64 precision. This fails
    if the levels were computed from the float64 norm but decoded with the float32 one."""
    x = np.array([0.3, 0.7, -1.1, 2.9, -0.05, 1e-3])
    s = 3
    c = make_compressor("qsgd", levels=s)
    assert float(np.float32(np.linalg.norm(x))) != np.linalg.norm(x)  # the rounding matters here
    top = c.compress(x, FixedUniform(np.full(x.size, np.nextafter(1.0, 0.0))))  # never rounds up
    floor = top.codes.astype(np.float64)
    lo, hi = np.zeros(x.size), np.ones(x.size)
    for _ in range(60):
        mid = (lo + hi) / 2
        up = c.compress(x, FixedUniform(mid)).codes > floor  # rounds up iff u < P(round up)
        lo, hi = np.where(up, mid, lo), np.where(up, hi, mid)
    expected = np.where(top.signs, -1.0, 1.0) * top.scale / s * (floor + hi)
    np.testing.assert_allclose(expected, x, rtol=1e-13, atol=0)


def test_qsgd_monte_carlo_mean_and_variance() -> None:
    rng = np.random.default_rng(3)
    d, s, n = 40, 2, 20_000
    x = rng.normal(size=d)
    c = make_compressor("qsgd", levels=s)
    samples = np.stack([to_dense(c.compress(x, rng)) for _ in range(n)])
    norm = c.compress(x, rng).scale
    r = np.abs(x) / norm * s
    tau = r - np.floor(r)
    var_j = (norm / s) ** 2 * tau * (1 - tau)  # per-coordinate variance of Q(x)_j
    assert np.all(np.abs(samples.mean(axis=0) - x) <= 5 * np.sqrt(var_j / n) + 1e-12)
    sq_err = ((samples - x) ** 2).sum(axis=1)
    assert abs(sq_err.mean() - var_j.sum()) <= 5 * sq_err.std() / math.sqrt(n)
    assert var_j.sum() == pytest.approx(qsgd_variance(x, s), rel=1e-12)


@pytest.mark.parametrize(("d", "s"), [(100, 1), (1000, 4), (64, 8), (10, 16)])
def test_qsgd_variance_within_omega(d: int, s: int) -> None:
    rng = np.random.default_rng(d + s)
    omega = min(d / s**2, math.sqrt(d) / s)
    c = make_compressor("qsgd", levels=s)
    assert c.compressor_class(d) == CompressorClass("unbiased", pytest.approx(omega))
    assert qsgd_omega(d, s) == pytest.approx(omega)
    # equal magnitudes nearly attain the sqrt(d)/s branch when s = 1 (ratio 1 - 1/sqrt(d))
    for x in (np.full(d, 0.1) * np.where(rng.random(d) < 0.5, -1, 1), rng.normal(size=d), rng.standard_cauchy(d)):
        n = 2000
        errs = np.array([np.sum((to_dense(c.compress(x, rng)) - x) ** 2) for _ in range(n)])
        bound = omega * (x @ x)
        assert errs.mean() <= bound + 5 * errs.std() / math.sqrt(n)
        assert qsgd_variance(x, s) <= bound * (1 + 2.0**-22)
    assert qsgd_variance(np.ones(100), 1) == pytest.approx(0.9 * 1 * 100 * 10, rel=1e-6)  # 0.9 of omega||x||^2


def test_qsgd_options() -> None:
    for bad in (0, -1, 2.5, 70_000):
        with pytest.raises(ValueError):
            make_compressor("qsgd", levels=bad)
    assert make_compressor("qsgd").levels == 4 and isinstance(make_compressor("qsgd", levels=8.0).levels, int)


# --------------------------------------------------------------------------- S+Q


@pytest.mark.parametrize("T", [1, 7, 100, 1000])
def test_sq_support_is_top_t_and_values_are_signed_norm(T: int) -> None:
    rng = np.random.default_rng(4)
    g = rng.standard_cauchy(1000)
    p = make_compressor("sq", k=float(T)).compress(g, rng)
    assert p.kind == "sign_sparse" and p.indices.dtype == np.int64 and len(p.indices) == T
    assert np.all(np.diff(p.indices) > 0)
    kept, dropped = np.abs(g[p.indices]), np.abs(np.delete(g, p.indices))
    assert dropped.size == 0 or kept.min() >= dropped.max()
    np.testing.assert_array_equal(p.signs, g[p.indices] < 0)
    assert p.scale == float(np.float32(np.linalg.norm(g)))
    out = to_dense(p)
    expected = np.zeros_like(g)
    expected[p.indices] = np.float32(np.linalg.norm(g)) * np.sign(g[p.indices])
    np.testing.assert_array_equal(out, expected)


def test_sq_ratio_zero_entries_and_zero_vector() -> None:
    c = make_compressor("sq", ratio=0.05)
    assert c.k_for(1000) == 50 and c.k_for(10) == 1
    g = np.zeros(20)
    g[[2, 9, 15]] = [1.0, -3.0, 0.5]
    p = make_compressor("sq", k=5).compress(g, None)  # sign(0) = 0: zeros are not sent
    np.testing.assert_array_equal(p.indices, [2, 9, 15])
    np.testing.assert_array_equal(p.signs, [False, True, False])
    z = make_compressor("sq", k=3).compress(np.zeros(8), None)
    assert z.indices.size == 0 and z.scale == 0.0
    assert c.compressor_class(1000) == CompressorClass("biased", 0.0)


def test_sq_beta_matches_lemma_3() -> None:
    rng = np.random.default_rng(5)
    g = rng.normal(size=300) * rng.exponential(size=300)
    for T in (1, 5, 60, 300):
        q = to_dense(make_compressor("sq", k=T).compress(g, None))
        definition = (g @ q) ** 2 / (T * (g @ g) ** 2)  # (1/T) <g, Q_T(g)>^2 / ||g||^4
        assert beta(g, T) == pytest.approx(definition, rel=1e-6)  # q carries the float32 norm
        top = np.sort(np.abs(g))[::-1][:T].sum()
        assert beta(g, T) == pytest.approx(top**2 / (T * (g @ g)), rel=1e-12)
        assert 0 < beta(g, T) <= 1
    # equal magnitudes: beta(T) = T/d; a 1-sparse g: beta(1) = 1; Q_T(g) is longer than g for T > 1
    assert beta(np.full(50, -2.0), 10) == pytest.approx(10 / 50)
    assert beta(np.eye(1, 9, 4).ravel(), 1) == pytest.approx(1.0)
    assert beta(np.zeros(4), 2) == 0.0
    q = to_dense(make_compressor("sq", k=300).compress(g, None))
    assert (q - g) @ (q - g) > g @ g  # not a contraction


# --------------------------------------------------------------------------- fp16 / bf16


def _signed_lognormal(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    mag = np.exp(rng.uniform(math.log(lo), math.log(hi), n))
    return mag * np.where(rng.random(n) < 0.5, -1.0, 1.0)


def test_fp16_relative_error_and_clipping() -> None:
    rng = np.random.default_rng(6)
    x = _signed_lognormal(rng, 50_000, 2.0**-14, 65_000.0)
    p = make_compressor("fp16").compress(x, rng)
    assert p.kind == "dense" and p.values.dtype == np.float16
    out = to_dense(p)
    assert np.all(np.abs(out - x) <= 2.0**-11 * np.abs(x))
    assert (np.abs(out - x) / np.abs(x)).max() > 0.9 * 2.0**-11  # rounding to nearest attains close to the bound
    np.testing.assert_array_equal(p.values, x.astype(np.float16))
    big = np.array([1e6, -1e9, 65519.0, 65520.0, 3.0])
    q = make_compressor("fp16").compress(big, rng)
    np.testing.assert_array_equal(to_dense(q), [65504.0, -65504.0, 65504.0, 65504.0, 3.0])
    back, _ = wire(q, big.size)  # no inf reaches the codec
    np.testing.assert_array_equal(to_dense(back), to_dense(q))
    assert make_compressor("fp16").compressor_class(5) == CompressorClass("biased", 0.0)


def test_bf16_relative_error_clipping_and_payload_round_trip() -> None:
    rng = np.random.default_rng(7)
    x = _signed_lognormal(rng, 50_000, 1e-30, 1e30)
    p = make_compressor("bf16").compress(x, rng)
    assert p.kind == "dense" and p.value_format == "bfloat16" and p.values.dtype == np.uint16
    out = to_dense(p)
    np.testing.assert_array_equal(out, from_bfloat16(p.values).astype(np.float64))
    assert np.all(np.abs(out - x) <= 2.0**-8 * np.abs(x))
    rel = np.abs(out - x) / np.abs(x)
    assert rel.max() > 0.9 * 2.0**-8  # rounding to nearest attains close to the bound
    x32 = x.astype(np.float32)
    assert np.all(np.abs(to_dense(make_compressor("bf16").compress(x32, rng)) - x32) <= 2.0**-8 * np.abs(x32))
    # ties to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7
    tie = to_dense(make_compressor("bf16").compress(np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8]), rng))
    np.testing.assert_array_equal(tie, [1.0, 1 + 2.0**-6])
    big = np.array([1e39, -3.4e38, 1.0])
    q = make_compressor("bf16").compress(big, rng)
    assert np.all(np.isfinite(to_dense(q))) and to_dense(q)[2] == 1.0
    back, _ = wire(q, big.size)
    np.testing.assert_array_equal(to_dense(back), to_dense(q))
    assert make_compressor("bf16").compressor_class(5) == CompressorClass("biased", 0.0)


# --------------------------------------------------------------------------- the wire

NEW = [
    ("threshold", {"threshold": 1.5}),
    ("threshold-mem", {"threshold": 0.2}),
    ("qsgd", {"levels": 4.0}),
    ("qsgd", {"levels": 1.0}),
    ("qsgd", {"levels": 300.0}),
    ("sq", {"ratio": 0.01}),
    ("sq", {"k": 3.0}),
    ("fp16", {}),
    ("bf16", {}),
]


@pytest.mark.parametrize(("name", "options"), NEW)
@pytest.mark.parametrize("d", [1, 37, 10_000, 20_001])
def test_wire_round_trip_and_size(name: str, options: dict, d: int) -> None:
    rng = np.random.default_rng(d)
    x = rng.normal(size=d)
    p = make_compressor(name, **options).compress(x, rng)
    back, nbytes = wire(p, d)
    assert back.kind == p.kind
    np.testing.assert_array_equal(to_dense(back), to_dense(p))
    assert payload_bits(back) == payload_bits(p)
    if d >= 10_000:
        bits = payload_bits(p)
        assert 8 * nbytes <= 1.02 * bits + 64 * 8, (name, 8 * nbytes, bits)
        if p.indices is None:  # sparse supports may beat the formula through delta-varint indices
            assert abs(8 * nbytes - bits) <= 0.02 * bits + 64 * 8, (name, 8 * nbytes, bits)

"""psrv.compress.qsgd: QSGD (Alistarh et al. 2017), the math and the wire."""

from __future__ import annotations

import math

import numpy as np
import pytest

from psrv.compress import CompressorClass, make_compressor
from psrv.compress.qsgd import omega as qsgd_omega
from psrv.compress.qsgd import variance as qsgd_variance
from psrv.payload import to_dense
from tests.helpers.wire import WIRE_DIMS, check_wire_round_trip_and_size, wire


class FixedUniform:
    """A stand-in for ``np.random.Generator`` whose ``random(d)`` returns a chosen vector."""

    def __init__(self, u: np.ndarray) -> None:
        self.u = np.asarray(u, dtype=np.float64)

    def random(self, size: int | None = None) -> np.ndarray:
        assert size == self.u.size
        return self.u.copy()


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


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("qsgd", {"levels": 4.0}),
        ("qsgd", {"levels": 1.0}),
        ("qsgd", {"levels": 300.0}),
    ],
)
@pytest.mark.parametrize("d", WIRE_DIMS)
def test_wire_round_trip_and_size(name: str, options: dict, d: int) -> None:
    check_wire_round_trip_and_size(name, options, d)

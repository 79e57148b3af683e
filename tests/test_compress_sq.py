"""psrv.compress.sq: S+Q (Khirirat et al., eq. 3), the math and the wire."""

from __future__ import annotations

import numpy as np
import pytest

from psrv.compress import CompressorClass, make_compressor
from psrv.compress.sq import beta
from psrv.payload import to_dense
from tests.helpers.wire import WIRE_DIMS, check_wire_round_trip_and_size


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


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("sq", {"ratio": 0.01}),
        ("sq", {"k": 3.0}),
    ],
)
@pytest.mark.parametrize("d", WIRE_DIMS)
def test_wire_round_trip_and_size(name: str, options: dict, d: int) -> None:
    check_wire_round_trip_and_size(name, options, d)

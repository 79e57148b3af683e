"""psrv.compress.lowprec: fp16 and bf16, the math and the wire."""

from __future__ import annotations

import math

import numpy as np
import pytest

from psrv.compress import CompressorClass, make_compressor
from psrv.payload import from_bfloat16, to_dense
from tests.helpers.wire import WIRE_DIMS, check_wire_round_trip_and_size, wire


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


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("fp16", {}),
        ("bf16", {}),
    ],
)
@pytest.mark.parametrize("d", WIRE_DIMS)
def test_wire_round_trip_and_size(name: str, options: dict, d: int) -> None:
    check_wire_round_trip_and_size(name, options, d)

"""psrv.compress.threshold: threshold (after Strom 2015, D1) and threshold-mem with error feedback (D2): the math
and the wire."""

from __future__ import annotations

import math

import numpy as np
import pytest

from psrv.algorithms import RoundInfo, make_algorithm
from psrv.compress import CompressorClass, make_compressor
from psrv.payload import to_dense
from tests.helpers.wire import WIRE_DIMS, check_wire_round_trip_and_size


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


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("threshold", {"threshold": 1.5}),
        ("threshold-mem", {"threshold": 0.2}),
    ],
)
@pytest.mark.parametrize("d", WIRE_DIMS)
def test_wire_round_trip_and_size(name: str, options: dict, d: int) -> None:
    check_wire_round_trip_and_size(name, options, d)

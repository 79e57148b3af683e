"""psrv.compress.laq: the blocked LAQ quantizer gives eq. 5 on whole float64 arrays, bit for bit
(the fast kernel against the straightforward one). The LAQ algorithm: tests/test_algorithms_laq.py."""

from __future__ import annotations

import numpy as np
import pytest

from psrv.compress import laq
from psrv.payload import Payload, laq_innovation


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

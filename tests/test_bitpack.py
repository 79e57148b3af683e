"""psrv.bitpack: the fast bit packing gives the original per-plane layout, byte for byte.
(Round trips, widths and length checks as the codec uses them: tests/test_codec.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from psrv import bitpack


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

"""Fixed-width packing of non-negative integers into bytes, vectorised.

Layout (shared by LAQ codes and sparse indices): bit-plane by bit-plane. Plane j
holds bit j of every value, packed 8 values per byte, least significant bit first
(``np.packbits(..., bitorder="little")``), each plane padded to a whole byte. A
vector of n values of width w costs ``w * ceil(n / 8)`` bytes, i.e. at most w*n
bits plus 7 bits of padding per plane.

Why planes: packing one plane is a single vectorised pass over n bytes, whereas
packing an (n, w) bit matrix is 10-30x slower on this hardware (PRODUCT.md).
"""

from __future__ import annotations

import numpy as np

MAX_WIDTH = 32


def packed_size(count: int, width: int) -> int:
    """Bytes taken by ``count`` values of ``width`` bits."""
    return width * ((count + 7) // 8)


def index_width(dim: int) -> int:
    """Bits needed for an index in ``[0, dim)``: ceil(log2(dim)), at least 1."""
    return max(1, int(dim - 1).bit_length())


def pack(values: np.ndarray, width: int) -> bytes:
    """Pack integers in ``[0, 2**width)`` into ``packed_size(len(values), width)`` bytes."""
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"width must be in [1, {MAX_WIDTH}], got {width}")
    v = np.ascontiguousarray(values)
    if v.ndim != 1:
        raise ValueError("pack expects a 1-D array")
    if v.size and (v.min() < 0 or int(v.max()) >> width):
        raise ValueError(f"values do not fit in {width} bits")
    v = v.astype(np.uint32 if width > 8 else np.uint8, copy=False)
    planes = [np.packbits(((v >> j) & 1).astype(np.uint8, copy=False), bitorder="little") for j in range(width)]
    return b"".join(p.tobytes() for p in planes)


def unpack(data: bytes, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack`; raises ``ValueError`` if ``data`` has the wrong length."""
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"width must be in [1, {MAX_WIDTH}], got {width}")
    expected = packed_size(count, width)
    if len(data) != expected:
        raise ValueError(f"packed data has {len(data)} bytes, expected {expected} for {count} values of {width} bits")
    out_dtype = np.uint32 if width > 8 else np.uint8
    planes = np.frombuffer(data, dtype=np.uint8).reshape(width, -1) if count else np.zeros((width, 0), np.uint8)
    out = np.zeros(count, dtype=out_dtype)
    for j in range(width):
        bits = np.unpackbits(planes[j], count=count, bitorder="little").astype(out_dtype, copy=False)
        out |= bits << out_dtype(j)
    return out

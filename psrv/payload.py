"""What a worker uploads, as a self-describing object the server decodes alone.

A :class:`Payload` carries everything needed to rebuild the vector it stands for
(``to_dense``); nothing is "kept locally" by the sender. ``payload_bits`` is the
size the papers charge for it, which the wire is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from psrv.bitpack import index_width

KINDS = ("dense", "sparse", "laq", "qsgd", "sign_sparse")

#: Bits per value of each float dtype psrv puts on the wire.
VALUE_BITS = {"float32": 32, "float64": 64, "float16": 16, "bfloat16": 16}


@dataclass(frozen=True, eq=False)
class Payload:
    """An encoded vector of length ``dim``.

    kind "dense": ``values`` holds all ``dim`` entries.
    kind "sparse": ``indices`` (sorted, unique int64) and ``values`` of equal length.
    kind "laq": ``codes`` (``dim`` integers in ``[0, 2**bits)``) and ``scale`` = radius R;
    the vector is the LAQ innovation ``2*tau*R*codes - R`` (Sun et al., NeurIPS 2019, eq. 6).
    kind "qsgd": ``codes`` (``dim`` integers in ``[0, levels]``, levels in ``bits``),
    ``signs`` (bool, True = negative) and ``scale`` = norm: ``norm * sign * codes / levels``.
    kind "sign_sparse": ``indices``, ``signs`` and ``scale``: ``scale * sign`` on the support.
    ``value_format`` "bfloat16" marks ``values`` as raw bfloat16 bit patterns (uint16).
    """

    kind: str
    dim: int
    values: np.ndarray | None = None
    indices: np.ndarray | None = None
    codes: np.ndarray | None = None
    scale: float = 0.0
    bits: int = 0
    signs: np.ndarray | None = None
    value_format: str = ""

    @property
    def value_dtype(self) -> str:
        return self.value_format or ("float32" if self.values is None else str(self.values.dtype))


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the raw uint16 bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def from_bfloat16(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)


def values_of(p: Payload) -> np.ndarray:
    """The payload's values as floats (decoding bfloat16 bit patterns)."""
    return from_bfloat16(p.values) if p.value_format == "bfloat16" else p.values


def _signed(signs: np.ndarray, magnitude: np.ndarray | float) -> np.ndarray:
    return np.where(signs, -1.0, 1.0) * magnitude


def dense(values: np.ndarray) -> Payload:
    v = np.ascontiguousarray(values).reshape(-1)
    return Payload("dense", v.size, values=v)


def sparse(dim: int, indices: np.ndarray, values: np.ndarray) -> Payload:
    return Payload(
        "sparse", dim, values=np.ascontiguousarray(values), indices=np.ascontiguousarray(indices, dtype=np.int64)
    )


def laq_innovation(p: Payload) -> np.ndarray:
    """``delta Q = 2 tau R q - R 1`` in float64 (Sun et al., NeurIPS 2019, eq. 6); the one definition both
    sides use."""
    tau = 1.0 / (2**p.bits - 1)
    radius = float(np.float32(p.scale))
    return (2.0 * tau * radius) * p.codes.astype(np.float64) - radius


def to_dense(p: Payload) -> np.ndarray:
    """The float64 vector a payload stands for, rebuilt from the payload alone."""
    if p.kind == "dense":
        return values_of(p).astype(np.float64)
    if p.kind == "sparse":
        out = np.zeros(p.dim, dtype=np.float64)
        out[p.indices] = values_of(p)
        return out
    if p.kind == "laq":
        return laq_innovation(p)
    if p.kind == "qsgd":
        return _signed(p.signs, p.codes.astype(np.float64) * (float(np.float32(p.scale)) / p.bits))
    if p.kind == "sign_sparse":
        out = np.zeros(p.dim, dtype=np.float64)
        out[p.indices] = _signed(p.signs, float(np.float32(p.scale)))
        return out
    raise ValueError(f"unknown payload kind {p.kind!r}")


def qsgd_code_width(levels: int) -> int:
    """Bits of one QSGD level code in ``[0, levels]``."""
    return max(1, int(levels).bit_length())


def payload_bits(p: Payload) -> int:
    """Bits by the papers' formulas: dense FPP*d; sparse nnz*(FPP + ceil(log2 d)) (Khirirat et al.,
    arXiv:2003.06377, eq. 5); LAQ 32 + b*d (Sun et al., NeurIPS 2019, text after eq. 6); QSGD
    32 + d*(1 + ceil(log2(s+1))) with fixed-width codes (no Elias coding); S+Q 32 + T*(ceil(log2 d) + 1):
    Khirirat et al.'s eq. 5 counts FPP + T*ceil(log2 d) and omits the sign bit each support entry
    needs, psrv counts it."""
    if p.kind == "dense":
        return VALUE_BITS[p.value_dtype] * p.dim
    if p.kind == "sparse":
        return len(p.indices) * (VALUE_BITS[p.value_dtype] + index_width(p.dim))
    if p.kind == "laq":
        return 32 + p.bits * p.dim
    if p.kind == "qsgd":
        return 32 + p.dim * (1 + qsgd_code_width(p.bits))
    if p.kind == "sign_sparse":
        return 32 + len(p.indices) * (index_width(p.dim) + 1)
    raise ValueError(f"unknown payload kind {p.kind!r}")

"""What a worker uploads, as a self-describing object the server decodes alone.

A :class:`Payload` carries everything needed to rebuild the vector it stands for
(``to_dense``); nothing is "kept locally" by the sender. ``payload_bits`` is the
size the papers charge for it, which the wire is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from psrv.bitpack import index_width

KINDS = ("dense", "sparse", "laq")

#: Bits per value of each float dtype psrv puts on the wire.
VALUE_BITS = {"float32": 32, "float64": 64, "float16": 16, "bfloat16": 16}


@dataclass(frozen=True, eq=False)
class Payload:
    """An encoded vector of length ``dim``.

    kind "dense": ``values`` holds all ``dim`` entries.
    kind "sparse": ``indices`` (sorted, unique int64) and ``values`` of equal length.
    kind "laq": ``codes`` (``dim`` integers in ``[0, 2**bits)``) and ``scale`` = radius R;
    the vector is the LAQ innovation ``2*tau*R*codes - R`` (seed 003 eq. 6).
    """

    kind: str
    dim: int
    values: np.ndarray | None = None
    indices: np.ndarray | None = None
    codes: np.ndarray | None = None
    scale: float = 0.0
    bits: int = 0

    @property
    def value_dtype(self) -> str:
        return "float32" if self.values is None else str(self.values.dtype)


def dense(values: np.ndarray) -> Payload:
    v = np.ascontiguousarray(values).reshape(-1)
    return Payload("dense", v.size, values=v)


def sparse(dim: int, indices: np.ndarray, values: np.ndarray) -> Payload:
    return Payload(
        "sparse", dim, values=np.ascontiguousarray(values), indices=np.ascontiguousarray(indices, dtype=np.int64)
    )


def laq_innovation(p: Payload) -> np.ndarray:
    """``delta Q = 2 tau R q - R 1`` in float64 (seed 003 eq. 6); the one definition both sides use."""
    tau = 1.0 / (2**p.bits - 1)
    radius = float(np.float32(p.scale))
    return (2.0 * tau * radius) * p.codes.astype(np.float64) - radius


def to_dense(p: Payload) -> np.ndarray:
    """The float64 vector a payload stands for, rebuilt from the payload alone."""
    if p.kind == "dense":
        return p.values.astype(np.float64)
    if p.kind == "sparse":
        out = np.zeros(p.dim, dtype=np.float64)
        out[p.indices] = p.values
        return out
    if p.kind == "laq":
        return laq_innovation(p)
    raise ValueError(f"unknown payload kind {p.kind!r}")


def payload_bits(p: Payload) -> int:
    """Bits by the papers' formulas: dense 32d; sparse nnz*(32 + ceil(log2 d)) (seed 004
    eq. 5); LAQ 32 + b*d (seed 003 eq. 6)."""
    if p.kind == "dense":
        return VALUE_BITS[p.value_dtype] * p.dim
    if p.kind == "sparse":
        return len(p.indices) * (VALUE_BITS[p.value_dtype] + index_width(p.dim))
    if p.kind == "laq":
        return 32 + p.bits * p.dim
    raise ValueError(f"unknown payload kind {p.kind!r}")

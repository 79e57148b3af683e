"""Dense float32: the uncompressed baseline (32 bits per coordinate)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from psrv import payload
from psrv.compress import CompressorClass, register


@register("dense", "dense")
@dataclass(frozen=True)
class Dense:
    name: str = "dense"

    def compress(self, x: np.ndarray, rng: np.random.Generator | None = None) -> payload.Payload:
        return payload.dense(np.asarray(x, dtype=np.float32))

    def compressor_class(self, dim: int) -> CompressorClass:
        return CompressorClass("exact", 0.0)

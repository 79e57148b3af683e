"""Top-k sparsification (seed 000, D3): keep the k entries of largest magnitude.

Contractive with delta = k/d: ||top_k(v) - v||^2 <= (1 - k/d) ||v||^2, because the
dropped d-k entries are the smallest and so carry at most a (d-k)/d share of the
energy. Biased, so it is used with error feedback (:mod:`psrv.compress.feedback`).
``k = max(1, ceil(ratio * d))`` unless ``k`` is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from psrv import payload
from psrv.compress import CompressorClass, register


@register("topk")
@dataclass(frozen=True)
class TopK:
    ratio: float = 0.01
    k: int = 0
    name: str = "topk"

    def __post_init__(self) -> None:
        if self.k < 0 or not (0.0 < self.ratio <= 1.0):
            raise ValueError(f"topk needs 0 < ratio <= 1 and k >= 0, got ratio={self.ratio}, k={self.k}")

    def k_for(self, dim: int) -> int:
        return min(dim, int(self.k) if self.k else max(1, math.ceil(self.ratio * dim)))

    def compress(self, x: np.ndarray, rng: np.random.Generator | None = None) -> payload.Payload:
        x = np.asarray(x).reshape(-1)
        k = self.k_for(x.size)
        if k == x.size:
            idx = np.arange(x.size)
        else:
            idx = np.sort(np.argpartition(np.abs(x), x.size - k)[x.size - k :])
        return payload.sparse(x.size, idx, x[idx].astype(np.float32))

    def compressor_class(self, dim: int) -> CompressorClass:
        return CompressorClass("contractive", self.k_for(dim) / dim)

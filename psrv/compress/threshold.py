"""Threshold sparsification and its memory-based form, after Strom, "Scalable distributed DNN
training using commodity GPU cloud computing", Interspeech 2015 (Strom sends the entries of the
accumulated residual whose magnitude exceeds tau, quantized to +-tau, and keeps the rest as the
residual; psrv sends the entries' float32 values instead).

``threshold`` (only transmit coordinates whose magnitudes exceed tau): keep
exactly the entries with ``|x_j| >= threshold`` and send them as a sparse payload of
float32 values. "Exceed" could be read as ``>``; psrv uses ``>=``, the comparison of the
memory-based rule below (``|v~_j| >= gamma``), so a tie at the threshold is kept.
The comparison is made in float64 on the input (a float32 input converts exactly), so
it is exact for any threshold, never one against a threshold rounded to float32.

Compressor class: **biased, no contraction constant** (reported as
``CompressorClass("biased", 0.0)``). The error is bounded in absolute terms,
``||Q(x) - x||^2 = sum_{|x_j| < t} x_j^2 <= d * t^2`` (every dropped entry is below t),
not by a fraction of ``||x||^2``: a vector whose entries are all below t is dropped
entirely (``Q(x) = 0``), so no ``delta > 0`` with ``||Q(x) - x||^2 <= (1 - delta)||x||^2``
holds for all x.

``threshold-mem`` (the memory-based rule) is the *same* compressor, meant to run inside the
existing error-feedback mechanism (:func:`psrv.compress.feedback.ef_step`, switched on with
``ef=1``: ``make_algorithm("gd", {"threshold": t, "ef": 1}, "threshold-mem")``); it
keeps no memory itself. The memory-based rule reads

    v~^(0) = v^(0);  [Q(v^(k))]_j = v~_j^(k) if |v~_j^(k)| >= gamma, else 0;
    v~^(k+1) = v^(k+1) + (v~^(k) - Q(v^(k))),

which is error feedback with memory ``e = v~ - v`` started at 0 (``init_memory``):
``ef_step`` forms ``p = e + x`` (= v~), compresses ``p`` and keeps ``p - Q(p)``. So the
threshold is compared against the *compensated* vector v~, not against the raw
gradient, exactly as the rule says, and nothing else differs, except one detail: the rule sends
``v~_j`` exactly, psrv sends ``float32(v~_j)``; the rounding residual (at most
``2^-24 |v~_j|``) stays in the memory instead of being lost, so "sum of everything sent
+ final memory == sum of inputs" still holds. The threshold is called tau (plain rule) and
gamma (memory-based rule) above; both compressors take it as the option ``threshold``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from psrv import payload
from psrv.compress import CompressorClass, register


@register("threshold", "sparse")
@dataclass(frozen=True)
class Threshold:
    """Keep exactly the entries with ``|x_j| >= threshold`` (Strom 2015); biased, see module doc."""

    threshold: float
    name: str = "threshold"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"{self.name} needs a finite threshold >= 0, got {self.threshold}")

    def compress(self, x: np.ndarray, rng: np.random.Generator | None = None) -> payload.Payload:
        x = np.asarray(x).reshape(-1)
        idx = np.flatnonzero(np.abs(x.astype(np.float64, copy=False)) >= float(self.threshold))
        return payload.sparse(x.size, idx, x[idx].astype(np.float32))

    def compressor_class(self, dim: int) -> CompressorClass:
        return CompressorClass("biased", 0.0)


@register("threshold-mem", "sparse")
@dataclass(frozen=True)
class ThresholdMem(Threshold):
    """The memory-based threshold rule (after Strom 2015): the threshold applied to the compensated vector.

    Use with error feedback (``ef=1``); the memory lives in :func:`psrv.compress.feedback.ef_step`.
    """

    name: str = "threshold-mem"

"""Low-precision dense baselines: IEEE half precision (``fp16``) and bfloat16 (``bf16``).

Both send every coordinate, rounded to nearest (ties to even), as a "dense" payload of
16 bits per coordinate (half the float32 baseline of :mod:`psrv.compress.dense`). They are
deterministic and ignore ``rng``.

``fp16``: values cast to ``numpy.float16`` (11 significant bits). For ``2^-14 <= |x_j| <= 65504``
(the normal range) the relative rounding error is at most ``2^-11``:
``|Q(x)_j - x_j| <= 2^-11 |x_j|``. Below ``2^-14`` values become subnormal and the error is
absolute, at most ``2^-25`` (values under ``2^-25`` become 0). Overflow: a value beyond the float16
range would round to +-inf, which the codec rejects (``CodecError``: "contains NaN or Inf"), so
the input is first clipped to ``+-65504`` (the float16 maximum); only values that would otherwise
have become inf are changed, and their error is unbounded (``|x_j| - 65504``).

``bf16``: values rounded to bfloat16 (8 significant bits, float32's exponent range) by
:func:`psrv.payload.to_bfloat16` and sent as raw bit patterns (``value_format="bfloat16"``).
For normal float32 magnitudes (``|x_j| >= 2^-126``) the relative error is at most ``2^-8``; a
float64 input is rounded to float32 first, and that double rounding adds at most ``2^-24``
relative, which still leaves the total below ``2^-8`` (the worst case, just under a midpoint,
is ``(2^-8 + 2^-24) / (1 + 2^-8) < 2^-8``). Inputs beyond the largest finite bfloat16
(``(2 - 2^-7) 2^127 ~= 3.39e38``) are clipped to it, for the same reason as fp16.

Compressor class: **biased** (deterministic rounding, ``E Q(x) != x``), reported as
``CompressorClass("biased", 0.0)``: the relative bounds above hold only inside the normal
range, so no contraction constant holds for every x (a vector of subnormals may round to 0,
a clipped one can be arbitrarily far off). Inside the normal range ``||Q(x) - x||^2 <= u^2 ||x||^2``
with ``u = 2^-11`` (fp16) or ``2^-8`` (bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from psrv import payload
from psrv.compress import CompressorClass, register

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
BF16_MAX = float(payload.from_bfloat16(np.array([0x7F7F], dtype=np.uint16))[0])  # (2 - 2^-7) 2^127


@register("fp16", "dense")
@dataclass(frozen=True)
class FP16:
    """Dense float16, clipped to +-65504; relative error <= 2^-11 in the normal range."""

    name: str = "fp16"

    def compress(self, x: np.ndarray, rng: np.random.Generator | None = None) -> payload.Payload:
        x = np.asarray(x).reshape(-1)
        return payload.dense(np.clip(x, -FP16_MAX, FP16_MAX).astype(np.float16))

    def compressor_class(self, dim: int) -> CompressorClass:
        return CompressorClass("biased", 0.0)


@register("bf16", "dense")
@dataclass(frozen=True)
class BF16:
    """Dense bfloat16 (raw uint16 bits), clipped to +-BF16_MAX; relative error <= 2^-8 in the normal range."""

    name: str = "bf16"

    def compress(self, x: np.ndarray, rng: np.random.Generator | None = None) -> payload.Payload:
        x = np.asarray(x).reshape(-1)
        raw = payload.to_bfloat16(np.clip(x, -BF16_MAX, BF16_MAX).astype(np.float32))
        return payload.Payload("dense", raw.size, values=raw, value_format="bfloat16")

    def compressor_class(self, dim: int) -> CompressorClass:
        return CompressorClass("biased", 0.0)

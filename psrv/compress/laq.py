"""LAQ innovation quantizer (Sun, Giannakis, Chen, Yang, NeurIPS 2019; seed 003 §2.1).

The gradient innovation ``g - Q_prev`` is quantized on a uniform grid of 2^b points
spanning the hypercube of radius ``R = ||g - Q_prev||_inf`` centred at ``Q_prev``:

    q_i = floor((g_i - Q_prev_i + R) / (2 tau R) + 1/2),   tau = 1 / (2^b - 1)   (eq. 5)
    delta Q = 2 tau R q - R 1                                                      (eq. 6)

so ``Q = Q_prev + delta Q`` and ``||g - Q||_inf <= tau R``. The payload is R (float32)
and the b-bit codes: 32 + b*p bits.

Choice where the seed is silent: R travels as float32, so the worker rounds R *up*
to the next float32 before quantizing; the grid then still covers every
coordinate and both sides rebuild ``delta Q`` from the same float32 R
(:func:`psrv.payload.laq_innovation`), bit for bit.
"""

from __future__ import annotations

import numpy as np

from psrv.payload import Payload

MAX_BITS = 16


def quantize(grad: np.ndarray, q_prev: np.ndarray, bits: int) -> Payload:
    """Quantize the innovation ``grad - q_prev`` with ``bits`` bits per coordinate (eq. 5)."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"LAQ bits must be in [1, {MAX_BITS}], got {bits}")
    diff = np.asarray(grad, dtype=np.float64) - q_prev
    levels = 2**bits - 1
    radius = float(np.max(np.abs(diff))) if diff.size else 0.0
    r32 = np.float32(radius)
    if float(r32) < radius:
        r32 = np.nextafter(r32, np.float32(np.inf))
    dtype = np.uint8 if bits <= 8 else np.uint16
    if r32 == 0:
        codes = np.zeros(diff.size, dtype=dtype)
    else:
        r = float(r32)
        codes = np.floor((diff + r) * (levels / (2.0 * r)) + 0.5)
        codes = np.clip(codes, 0, levels, out=codes).astype(dtype)
    return Payload("laq", diff.size, codes=codes, scale=float(r32), bits=bits)

"""QSGD random quantization with ``s`` levels (Alistarh, Grubic, Li, Tomioka, Vojnovic,
"QSGD: Communication-efficient SGD via gradient quantization and encoding", NeurIPS 2017).

For every coordinate, with ``r_j = s |x_j| / ||x||_2``:

    l_j = floor(r_j) + Bernoulli(r_j - floor(r_j)),     Q(x)_j = ||x||_2 sign(x_j) l_j / s.

This is random (stochastic) quantization: a value between two levels ``Q_- <= x <= Q_+`` goes
to ``Q_+`` with probability ``(x - Q_-)/(Q_+ - Q_-)`` and to ``Q_-`` otherwise, hence
``E[Q(x)] = x``; here the levels of coordinate j are ``||x|| l / s``, ``l = 0..s``.

Compressor class: **unbiased** (``E||C(x) - x||^2 <= omega ||x||^2``) with
``omega = min(d/s^2, sqrt(d)/s)``, Lemma 3.1 (ii) of Alistarh et al. 2017: the exact variance is
``(N/s)^2 sum_j tau_j (1 - tau_j)``, ``tau_j = r_j - floor(r_j)``, and
``tau (1 - tau) <= min(1/4, r_j)`` gives both branches (:func:`variance`).

Wire: payload kind "qsgd" with ``codes = l`` (uint8, or uint16 when s > 255), ``signs``
(True = negative), ``scale = N`` (float32) and ``bits = s``:
``32 + d (1 + ceil(log2(s+1)))`` bits (no Elias coding).

The norm travels as float32, so ``N`` is ``||x||`` rounded *up* to the next float32
(like the LAQ radius in :mod:`psrv.compress.laq`) and the levels are computed with that
same N. Decoding ``N l / s`` is then exactly unbiased, ``E = N r_j / s = |x_j|``; had the
levels used the float64 norm, every coordinate would be biased by the factor
``float32(N) / N``. Rounding up (not to nearest) keeps ``r_j <= s``, so codes never
exceed s. The price is a variance larger by at most the factor ``N/||x|| <= 1 + 2^-23``
in the ``sqrt(d)/s`` branch, which the reported omega ignores. ``x = 0`` gives ``N = 0``
and all codes 0. All randomness comes from the ``rng`` argument (``rng.random(d)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from psrv import payload
from psrv.compress import CompressorClass, register

MAX_LEVELS = 2**16 - 1  # what the codec accepts (uint16 codes)


def float32_norm_up(x: np.ndarray) -> float:
    """``||x||_2`` rounded up to a float32 (never below ``max |x_j|``); raises if it overflows float32."""
    a = np.abs(np.asarray(x, dtype=np.float64).reshape(-1))
    if a.size == 0:
        return 0.0
    norm = max(float(np.linalg.norm(a)), float(a.max()))
    if not math.isfinite(norm):
        raise ValueError("qsgd: input is not finite")
    n32 = np.float32(norm)
    if float(n32) < norm:
        n32 = np.nextafter(n32, np.float32(np.inf))
    if not np.isfinite(n32):
        raise ValueError(f"qsgd: norm {norm:.3e} exceeds the float32 range")
    return float(n32)


def omega(dim: int, levels: int) -> float:
    """QSGD's variance factor ``min(d/s^2, sqrt(d)/s)`` (Alistarh et al. 2017, Lemma 3.1)."""
    return min(dim / levels**2, math.sqrt(dim) / levels)


def variance(x: np.ndarray, levels: int) -> float:
    """Exact ``E||Q(x) - x||^2 = (N/s)^2 sum_j tau_j (1 - tau_j)`` with the float32 norm N."""
    a = np.abs(np.asarray(x, dtype=np.float64).reshape(-1))
    norm = float32_norm_up(a)
    if norm == 0:
        return 0.0
    r = a / norm * levels
    tau = r - np.floor(r)
    return float((norm / levels) ** 2 * np.sum(tau * (1.0 - tau)))


@register("qsgd", "qsgd")
@dataclass(frozen=True)
class QSGD:
    levels: int = 4
    name: str = "qsgd"

    def __post_init__(self) -> None:
        s = self.levels
        if not (float(s) == int(s) and 1 <= int(s) <= MAX_LEVELS):
            raise ValueError(f"qsgd needs an integer number of levels in [1, {MAX_LEVELS}], got {s}")
        object.__setattr__(self, "levels", int(s))  # options arrive as floats

    def compress(self, x: np.ndarray, rng: np.random.Generator) -> payload.Payload:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        d, s = x.size, self.levels
        dtype = np.uint8 if s <= 255 else np.uint16
        norm = float32_norm_up(x)  # rounded to float32 BEFORE the levels are computed
        signs = np.signbit(x) & (x != 0)
        if norm == 0:
            codes = np.zeros(d, dtype=dtype)
        else:
            r = np.abs(x) / norm * s  # in [0, s]: norm >= max |x_j| and division is monotone
            low = np.floor(r)
            codes = (low + (rng.random(d) < (r - low))).astype(dtype)
        return payload.Payload("qsgd", d, codes=codes, signs=signs, scale=norm, bits=s)

    def compressor_class(self, dim: int) -> CompressorClass:
        return CompressorClass("unbiased", omega(dim, self.levels))

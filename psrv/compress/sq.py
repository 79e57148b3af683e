"""Sparsification + quantization, S+Q (Khirirat, Magnússon, Aytekin, Johansson, "A flexible
framework for communication-efficient machine learning", AAAI 2021, §2.1 eq. 3 in arXiv:2003.06377;
the scheme is Alistarh et al.'s, their ref. [1]: QSGD, NeurIPS 2017):

    [Q_T(g)]_j = ||g||_2 sign(g_j)   if j in I_T(g),   0 otherwise,            (3)

where ``I_T(g)`` is the index set of the T entries of g of largest magnitude (eq. 2). Only the
norm and the signed support travel: payload kind "sign_sparse" with sorted int64 ``indices``,
``signs`` (True = negative) and ``scale = float32(||g||)``,
``32 + T (ceil(log2 d) + 1)`` bits (:func:`psrv.payload.payload_bits`; eq. 5 counts
``FPP + T ceil(log2 d)`` and leaves out the sign bit).

Choices where the paper is loose: eq. 3 writes "if i in I_T(g)" for "j in I_T(g)". ``sign(0) = 0``,
so a zero entry that falls in the top T (g has fewer than T nonzeros) contributes 0 and is not
sent: the support is ``I_T(g)`` minus the zero entries, possibly fewer than T. Ties at the T-th
magnitude are broken arbitrarily (``np.argpartition``), as eq. 2 allows. ``T = k`` if given,
else ``max(1, ceil(ratio * d))``, capped at d (as for top-k).

Compressor class: **biased, no contraction constant** (``CompressorClass("biased", 0.0)``).
``Q_T(g)`` is not a contraction of g: ``||Q_T(g)||^2 = T ||g||^2``, so the scaled sign vector is
longer than g for every ``T > 1`` and ``||Q_T(g) - g||^2`` can exceed ``||g||^2`` (g with d
equal-magnitude entries and T = d gives ``||Q_T(g) - g||^2 = (sqrt(d) - 1)^2 ||g||^2``).
Khirirat et al. do not analyse it through a contraction or variance constant but through the
data-dependent descent measure of Lemma 3, ``beta(T) = (1/T) <g, Q_T(g)>^2 / ||g||^4``, with step
size ``sqrt(beta(T)) / (sqrt(T) L)``; :func:`beta` computes it. Unlike alpha(T) of top-T, beta(T)
neither increases in T nor tends to 1 ("Q_T(g) does not converge to g when T increases").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from psrv import payload
from psrv.compress import CompressorClass, register


def top_support(g: np.ndarray, T: int) -> np.ndarray:
    """Sorted int64 indices of the T largest-magnitude entries of g, zeros removed (sign(0) = 0)."""
    a = np.abs(np.asarray(g).reshape(-1))
    d = a.size
    T = min(int(T), d)
    if T <= 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.arange(d) if T == d else np.argpartition(a, d - T)[d - T :]
    idx = np.sort(idx[a[idx] != 0])
    return idx.astype(np.int64, copy=False)


def beta(g: np.ndarray, T: int) -> float:
    """Khirirat et al., Lemma 3: ``beta(T) = (1/T) <g, Q_T(g)>^2 / ||g||_2^4`` with Q_T of eq. 3.

    ``<g, Q_T(g)> = ||g|| sum_{j in I_T} |g_j|``, so ``beta(T) = (sum_{I_T} |g_j|)^2 / (T ||g||^2)``
    (at most 1 by Cauchy-Schwarz). Uses the exact float64 norm. ``g = 0`` has no descent to
    measure; it returns 0. T is capped at d.
    """
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    T = min(int(T), g.size)
    if T < 1:
        raise ValueError(f"beta needs T >= 1, got {T}")
    sq = float(g @ g)
    if sq == 0:
        return 0.0
    inner = math.sqrt(sq) * float(np.abs(g[top_support(g, T)]).sum())
    return inner**2 / (T * sq**2)


@register("sq", "sign_sparse")
@dataclass(frozen=True)
class SQ:
    ratio: float = 0.01
    k: int = 0
    name: str = "sq"

    def __post_init__(self) -> None:
        if self.k < 0 or float(self.k) != int(self.k) or not (0.0 < self.ratio <= 1.0):
            raise ValueError(f"sq needs 0 < ratio <= 1 and an integer k >= 0, got ratio={self.ratio}, k={self.k}")
        object.__setattr__(self, "k", int(self.k))  # options arrive as floats

    def k_for(self, dim: int) -> int:
        return min(dim, self.k if self.k else max(1, math.ceil(self.ratio * dim)))

    def compress(self, x: np.ndarray, rng: np.random.Generator | None = None) -> payload.Payload:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        norm = float(np.linalg.norm(x)) if x.size else 0.0
        scale = np.float32(norm)
        if not np.isfinite(scale):
            raise ValueError(f"sq: norm {norm:.3e} is not finite in float32")
        idx = top_support(x, self.k_for(x.size))
        return payload.Payload("sign_sparse", x.size, indices=idx, signs=x[idx] < 0, scale=float(scale))

    def compressor_class(self, dim: int) -> CompressorClass:
        return CompressorClass("biased", 0.0)

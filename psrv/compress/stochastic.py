"""Unbiased random sparsifiers: rand-k and stochastic (Bernoulli) sparsification.

``stochastic`` implements eq. 4 of Khirirat, Magnússon, Aytekin, Johansson, "A flexible
framework for communication-efficient machine learning: from HPC to IoT" (AAAI 2021; equation
numbers of arXiv:2003.06377):
``[Q_{T,p}(g)]_j = (g_j / p_j) xi_j`` with independent ``xi_j ~ Bernoulli(p_j)`` and budget
``T = sum_j p_j`` = the expected number of entries sent. The probabilities are either
uniform, ``p_j = T/d``, or the variance-optimal ``p*`` of Khirirat et al.'s Appendix F, which
takes it from Wang et al., "ATOMO: Communication-efficient learning via atomic sparsification",
NeurIPS 2018, Algorithm 1 (Wangni, Wang, Liu, Zhang, "Gradient sparsification for
communication-efficient distributed optimization", NeurIPS 2018, derive the same
probabilities): see :func:`optimal_probabilities`.

``randk`` sends exactly ``k`` coordinates drawn uniformly without replacement, scaled by
``d/k`` (the fixed-size counterpart of uniform ``p_j = k/d``).

Both are unbiased (Wang et al., ATOMO, NeurIPS 2018): (i) ``E[Q(g)_j] = (g_j / p_j) p_j = g_j``.
Their exact variance is ``E||Q(g) - g||^2 = sum_j (1 - p_j)/p_j g_j^2`` (:func:`variance_bound`),
(ii) at most ``max_j (1 - p_j)/p_j ||g||^2``. The lemma (i)/(ii) is sometimes stated for ``p`` on
the simplex (``sum p_j = 1``); psrv uses Khirirat et al.'s general budget ``T = sum p_j``, for
which the same proof holds verbatim.

Compressor class: ``unbiased`` with omega = ``d/k - 1`` (rand-k) or ``d/T - 1`` (stochastic).
For uniform ``p`` this is (ii)'s ``max_j (1-p_j)/p_j``. For ``p*`` (ii)'s constant
is data dependent (small entries get small ``p_j``, so ``max_j (1-p_j)/p_j`` can be huge), but
``d/T - 1`` still bounds the variance: ``p*`` minimises ``sum_j g_j^2/p_j`` over
``{sum p = T, 0 <= p <= 1}``, a set uniform ``T/d`` belongs to, so
``E||Q_{p*}(g) - g||^2 <= (d/T - 1)||g||^2`` (Khirirat et al., Lemma 5: ``omega(T) >= T/d``).

Sizes: ``k = max(1, ceil(ratio * d))`` unless ``k`` is given (capped at ``d``); the budget
``T`` of ``stochastic`` is that same number. All randomness comes from the ``rng`` argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from psrv import payload
from psrv.compress import CompressorClass, register


def _size_for(ratio: float, k: float, dim: int) -> int:
    return min(dim, int(k) if k else max(1, math.ceil(ratio * dim)))


def _check_size_options(name: str, ratio: float, k: float) -> None:
    if k < 0 or float(k) != int(k) or not (0.0 < ratio <= 1.0):
        raise ValueError(f"{name} needs 0 < ratio <= 1 and an integer k >= 0, got ratio={ratio}, k={k}")


def uniform_probabilities(d: int, budget: float) -> np.ndarray:
    """``p_j = T/d`` for every coordinate (capped at 1): the worst case of Khirirat et al.'s Lemma 5."""
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    return np.full(int(d), min(1.0, float(budget) / d), dtype=np.float64)


def optimal_probabilities(g: np.ndarray, budget: float) -> np.ndarray:
    """Variance-optimal keep probabilities ``p*`` for budget ``T`` (Khirirat et al., Appendix F).

    ``p*`` solves ``min_p sum_j g_j^2 / p_j`` s.t. ``sum_j p_j = T``, ``0 <= p_j <= 1``; the
    KKT conditions give ``p_j = min(1, |g_j| / lambda)`` ("water-filling"): the ``n_s``
    largest entries saturate at 1 and the rest are proportional to ``|g_j|``. Coordinates
    with ``g_j = 0`` get ``p_j = 0`` (they are never sent, which keeps ``Q`` unbiased).
    If ``T >= nnz(g)`` every nonzero coordinate gets ``p_j = 1``.

    Algorithm (vectorised, no loop over ``d``): let ``s_1 >= ... >= s_n > 0`` be the nonzero
    magnitudes and ``R_m = sum_{i>m} s_i``. With ``n_s = m`` saturated entries,
    ``lambda = R_m / (T - m)``, which is consistent iff ``s_{m+1} (T - m) <= R_m`` (condition
    C(m)). C(m) is monotone (C(m) implies C(m+1) for ``m + 1 < T``) and holds at
    ``m = ceil(T) - 1``, so ``n_s`` is the first ``m`` in ``[0, ceil(T))`` where it holds;
    minimality gives ``s_{n_s} > lambda``, so the saturated set is exactly ``{|g_j| > lambda}``
    and ties are never split. Only the top ``K = ceil(T)`` magnitudes can saturate, so they
    are found with ``np.partition`` and sorted (O(d + K log K)); ``R_m`` is a suffix sum of
    those plus the sum of the rest (no cancellation on heavy-tailed inputs).
    """
    a = np.abs(np.asarray(g, dtype=np.float64).reshape(-1))
    T = float(budget)
    if not T > 0:
        raise ValueError(f"budget must be positive, got {budget}")
    n = int(np.count_nonzero(a))
    if T >= n:
        return (a > 0).astype(np.float64)
    d = a.size
    K = math.ceil(T)  # 1 <= K <= n: candidates n_s = 0 .. K-1, all among the nonzero entries
    part = np.partition(a, d - K)
    top, rest_sum = np.sort(part[d - K :])[::-1], float(part[: d - K].sum())
    tail = np.cumsum(top[::-1])[::-1] + rest_sum  # tail[m] = R_m = sum_{i>m} s_i (1-based s)
    m = np.arange(K)
    ok = top * (T - m) <= tail
    n_s = int(np.argmax(ok))  # ok[K-1] is always True
    lam = tail[n_s] / (T - n_s)
    a /= lam  # ``a`` is our own copy; zeros stay exactly 0
    return np.minimum(a, 1.0, out=a)


def variance_bound(g: np.ndarray, p: np.ndarray) -> float:
    """Exact ``E||Q(g) - g||^2 = sum_j (1 - p_j)/p_j g_j^2`` of eq. (4) with probabilities ``p``.

    A coordinate with ``p_j = 0`` is never sent and contributes ``g_j^2`` (0 when ``g_j = 0``,
    the only case the compressors here produce).
    """
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    g2 = g * g
    sent = p > 0
    return float(np.sum((1.0 - p[sent]) / p[sent] * g2[sent]) + np.sum(g2[~sent]))


def variance_factor(g: np.ndarray, p: np.ndarray) -> float:
    """The variance lemma's (ii) constant ``max_j (1 - p_j)/p_j`` over the support of ``g``."""
    g = np.asarray(g).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    on = g != 0
    if not on.any():
        return 0.0
    q = p[on]
    if np.any(q <= 0):
        return math.inf
    return float(np.max((1.0 - q) / q))


@register("randk", "sparse")
@dataclass(frozen=True)
class RandK:
    """Exactly ``k`` coordinates uniformly without replacement, scaled by ``d/k``; omega = d/k - 1."""

    ratio: float = 0.01
    k: int = 0
    name: str = "randk"

    def __post_init__(self) -> None:
        _check_size_options("randk", self.ratio, self.k)

    def k_for(self, dim: int) -> int:
        return _size_for(self.ratio, self.k, dim)

    def compress(self, x: np.ndarray, rng: np.random.Generator) -> payload.Payload:
        x = np.asarray(x).reshape(-1)
        d = x.size
        k = self.k_for(d)
        if k == d:
            idx = np.arange(d, dtype=np.int64)
        else:
            # numpy's Generator uses Floyd's algorithm (O(k)) when k << d, a partial shuffle otherwise
            idx = np.sort(rng.choice(d, k, replace=False, shuffle=False)).astype(np.int64, copy=False)
        values = x[idx].astype(np.float64) * (d / k)
        return payload.sparse(d, idx, values.astype(np.float32))

    def compressor_class(self, dim: int) -> CompressorClass:
        return CompressorClass("unbiased", dim / self.k_for(dim) - 1.0)


@register("stochastic", "sparse")
@dataclass(frozen=True)
class Stochastic:
    """Bernoulli sparsification (Khirirat et al., eq. 4), budget ``T`` = expected nnz.

    ``optimal=1``: ``p*`` (:func:`optimal_probabilities`); ``optimal=0``: uniform ``T/d``.
    omega reported is ``d/T - 1`` (exact for uniform, a valid bound for ``p*``: see module doc).
    """

    ratio: float = 0.01
    k: int = 0
    optimal: float = 1.0
    name: str = "stochastic"

    def __post_init__(self) -> None:
        _check_size_options("stochastic", self.ratio, self.k)
        if self.optimal not in (0, 1):
            raise ValueError(f"stochastic needs optimal = 1 (p*) or 0 (uniform), got {self.optimal}")

    def budget_for(self, dim: int) -> int:
        return _size_for(self.ratio, self.k, dim)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x).reshape(-1)
        T = self.budget_for(x.size)
        return optimal_probabilities(x, T) if self.optimal else uniform_probabilities(x.size, T)

    def compress(self, x: np.ndarray, rng: np.random.Generator) -> payload.Payload:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        d = x.size
        if self.optimal:
            p = optimal_probabilities(x, self.budget_for(d))
            idx = np.flatnonzero(rng.random(d) < p)  # uniform in [0, 1): p=1 always, p=0 never
            values = x[idx] / p[idx]
        else:
            T = self.budget_for(d)
            if T >= d:
                idx = np.arange(d, dtype=np.int64)
            else:
                # iid Bernoulli(T/d) on d coordinates == Binomial(d, T/d) many, uniformly placed: O(T)
                n = int(rng.binomial(d, T / d))
                idx = np.sort(rng.choice(d, n, replace=False, shuffle=False))
            values = x[idx] * (d / T) if T < d else x[idx]
        return payload.sparse(d, idx.astype(np.int64, copy=False), values.astype(np.float32))

    def compressor_class(self, dim: int) -> CompressorClass:
        return CompressorClass("unbiased", dim / self.budget_for(dim) - 1.0)

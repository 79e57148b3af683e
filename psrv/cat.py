"""CAT: communication-aware adaptive tuning of the compression level (Khirirat, Magnússon, Aytekin,
Johansson, "A Flexible Framework for Communication-Efficient Machine Learning: from HPC to IoT",
AAAI 2021, arXiv:2003.06377; equation numbers of the arXiv version).

Each round, each worker (eq. 10: on its own gradient) picks the sparsity budget T maximising
``Improvement(T) / C(T)`` (eq. 7):

- top-T sparsification (eq. 2): ``alpha(T) = ||top_T(g)||^2 / ||g||^2`` (Lemma 1, eq. 8);
- S+Q (eq. 3): ``beta(T) = (sum_{I_T} |g_j|)^2 / (T ||g||^2)`` (Lemma 3, eq. 9);
- stochastic sparsification (eq. 4) with the variance-optimal ``p*`` (Appendix F):
  ``omega(T) = ||g||^2 / E||Q_{T,p*}(g)||^2`` (Lemma 4, §5).

Cost models C(T) (§2.2): ``payload`` C = P(T) (eq. 5), ``affine`` C = c1 P(T) + c0, ``packet``
C = c1 ceil(P(T) / P_max) + c0 (eq. 6). P(T) is psrv's own size of a T-entry payload in one of two
units: ``payload_bits`` (:func:`psrv.payload.payload_bits`: T (32 + ceil(log2 d)) for sparse values,
32 + T (ceil(log2 d) + 1) for S+Q, which counts the sign bit eq. 5 leaves out) or ``wire_bytes``
(the bytes of the protobuf payload message the codec writes, :func:`payload_size`). For wire bytes
P(T) assumes the fixed-width (bit-packed) index encoding: that is exactly what the codec sends when
it picks bit-packing, and an upper bound when it picks delta-varint (it sends the smaller of the two,
:func:`psrv.codec.encode_indices`, which depends on where the support lies, not only on T).
:func:`encoded_bytes` gives the exact size of a given payload, the codec's choice included.

The search (:func:`tune`) uses the structure the paper proves instead of evaluating every T:

- candidates: C is constant on runs of T (packets, whole bytes of bit-planes); a monotone measure
  (alpha: Lemma 2, omega: Lemma 5) is largest at the right end of each run, so only run ends are
  tried (Proposition 1: under the packet model, multiples of the packet capacity when an entry's
  bits divide P_max);
- stopping: magnitudes are sorted in decreasing order (in growing blocks) and T increases until a
  certificate shows no larger T can beat the best ratio so far. For alpha the certificate is the
  concavity of Lemma 2 (``alpha(T') <= min(1, alpha(T) + (T'-T) g_{T+1}^2/||g||^2)``), against a
  lower affine bound of C; under an affine C this stops right after the peak, as the
  quasi-concavity of Proposition 1 says. For omega: ``E||Q_{T,p*}||^2`` is convex in T (the optimal
  value of a convex program in its right-hand side), so its secant line bounds it from below. For
  S+Q the paper's quasi-concavity claim (§4: "<g, Q_T(g)>^2 is ... concave") does not hold in
  general: g = (10, 1, ..., 1) with 1000 ones has beta(1) = 0.091 > beta(2) = 0.055 but beta(1000)
  = 0.925, so "stop at the first drop" can stop at T = 1 under an affine cost with a large c0 while
  the optimum is T = 1000. psrv therefore uses a valid bound for beta instead: with
  ``S(T) = sum_{I_T} |g_j|`` concave and S(0) = 0, ``S(T')/T' <= S(T)/T``, so
  ``beta(T') <= min(||g||_1, S(T) + (T'-T)|g_{T+1}|) S(T) / (T ||g||^2)``.

Every stopping rule is exact: :func:`tune` returns the same T as :func:`tune_brute` (every T), which
the tests check on random and heavy-tailed vectors.

The baseline (:func:`alistarh_T`): the dynamic rule of Alistarh et al., "The convergence of
sparsified gradient methods", NeurIPS 2018, as Khirirat et al. describe it (§4): the smallest support
whose sum of magnitudes reaches ``||g||_2``.

A cost model can be read from a JSON file (:func:`cost_options_from_file`), e.g. one written by
``psrv``'s fitting command: ``{"model": "affine"|"packet", "c0": .., "c1": .., "p_max_bytes": ..
(packet only), "unit": "s", "size": "wire_bytes"|"payload_bits"}`` (other keys are ignored).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from psrv import payload
from psrv.bitpack import index_width, packed_size

BASES = ("topk", "sq", "stochastic")
COST_MODELS = ("payload", "affine", "packet")
SIZE_UNITS = ("payload_bits", "wire_bytes")

#: Bytes per value of each wire dtype.
_VALUE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}


# --- sizes ------------------------------------------------------------------------------------


def _vlen(v: Any) -> Any:
    """Bytes of the protobuf varint of v (>= 0), elementwise."""
    v = np.asarray(v, dtype=np.int64)
    n = np.ones(v.shape, dtype=np.int64)
    for j in range(1, 10):
        n += v >= (1 << (7 * j))
    return n


def _uint_field(v: Any) -> Any:
    """A uint64 field with a one-byte tag: omitted (0 bytes) when 0, as proto3 does."""
    v = np.asarray(v, dtype=np.int64)
    return np.where(v > 0, 1 + _vlen(v), 0)


def _bytes_field(n: Any) -> Any:
    """A bytes field of n bytes (one-byte tag): omitted when empty."""
    n = np.asarray(n, dtype=np.int64)
    return np.where(n > 0, 1 + _vlen(n) + n, 0)


def _sparse_bytes(dim: int, nnz: Any, index_bytes: Any, value_bytes: int) -> Any:
    """``SparseTensor`` (dim 1, nnz 2, index_encoding 3, indices 4, value_dtype 5, values 6): every
    field but empty ones; index_encoding and value_dtype are nonzero enums (2 bytes each)."""
    nnz = np.asarray(nnz, dtype=np.int64)
    return _uint_field(dim) + _uint_field(nnz) + 2 + _bytes_field(index_bytes) + 2 + _bytes_field(value_bytes * nnz)


def _sign_sparse_bytes(dim: int, nnz: Any, index_bytes: Any, scale_nonzero: bool) -> Any:
    """``SignSparsePayload`` (dim 1, nnz 2, scale 3 float, index_encoding 4, indices 5, signs 6)."""
    nnz = np.asarray(nnz, dtype=np.int64)
    scale = 5 if scale_nonzero else 0
    return _uint_field(dim) + _uint_field(nnz) + scale + 2 + _bytes_field(index_bytes) + _bytes_field((nnz + 7) // 8)


def payload_size(kind: str, dim: int, T: Any, size: str = "payload_bits") -> Any:
    """P(T): the size of a T-entry payload of ``kind`` ("sparse" with float32 values, or "sign_sparse")
    in ``size`` units ("payload_bits": :func:`psrv.payload.payload_bits`; "wire_bytes": the protobuf
    payload message with bit-packed indices, see the module doc). Elementwise over T."""
    T = np.asarray(T, dtype=np.int64)
    w = index_width(dim)
    if kind not in ("sparse", "sign_sparse"):
        raise ValueError(f"CAT sizes sparse or sign_sparse payloads, not {kind!r}")
    if size == "payload_bits":
        return T * (32 + w) if kind == "sparse" else 32 + T * (w + 1)
    if size != "wire_bytes":
        raise ValueError(f"unknown size unit {size!r}; known: {', '.join(SIZE_UNITS)}")
    index_bytes = w * ((T + 7) // 8)
    if kind == "sparse":
        return _sparse_bytes(dim, T, index_bytes, 4)
    return _sign_sparse_bytes(dim, T, index_bytes, True)


def _slope_lo(kind: str, dim: int, size: str) -> float:
    """A slope s with P(T) >= s T for all T >= 0 (the linear part of P)."""
    w = index_width(dim)
    if size == "payload_bits":
        return float(32 + w) if kind == "sparse" else float(w + 1)
    return w / 8 + 4 if kind == "sparse" else (w + 1) / 8


def encoded_bytes(p: payload.Payload) -> int:
    """Exact bytes of ``psrv.codec.payload_to_proto(p)`` for a sparse or sign_sparse payload, computed
    from the payload without encoding it (the index encoding the codec would choose included)."""
    from psrv import varint

    nnz = len(p.indices)
    w = index_width(p.dim)
    packed = packed_size(nnz, w)
    var = varint.encoded_size(p.indices)
    index_bytes = var if var < packed else packed  # psrv.codec.encode_indices's rule
    if p.kind == "sparse":
        return int(_sparse_bytes(p.dim, nnz, index_bytes, _VALUE_BYTES[p.value_dtype]))
    if p.kind == "sign_sparse":
        return int(_sign_sparse_bytes(p.dim, nnz, index_bytes, float(np.float32(p.scale)) != 0.0))
    raise ValueError(f"encoded_bytes handles sparse and sign_sparse payloads, not {p.kind!r}")


# --- cost models ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """C(T) of §2.2. ``p_max_bytes``: payload bytes per packet (packet model), converted to bits
    when ``size`` is payload_bits."""

    model: str = "payload"
    c0: float = 0.0
    c1: float = 1.0
    p_max_bytes: float = 0.0
    size: str = "payload_bits"

    def __post_init__(self) -> None:
        if self.model not in COST_MODELS:
            raise ValueError(f"unknown cost model {self.model!r}; known: {', '.join(COST_MODELS)}")
        if self.size not in SIZE_UNITS:
            raise ValueError(f"unknown size unit {self.size!r}; known: {', '.join(SIZE_UNITS)}")
        if self.model != "payload" and not (self.c1 > 0 and math.isfinite(self.c1) and math.isfinite(self.c0)):
            raise ValueError(f"cost model needs a finite c1 > 0 and a finite c0, got c1={self.c1}, c0={self.c0}")
        if self.model == "packet" and not self.p_max_bytes > 0:
            raise ValueError(f"the packet cost model needs p_max > 0 (payload bytes a packet), got {self.p_max_bytes}")

    @property
    def p_max(self) -> float:
        """P_max in ``size`` units."""
        return self.p_max_bytes * (8 if self.size == "payload_bits" else 1)

    def of_size(self, P: Any) -> Any:
        P = np.asarray(P, dtype=np.float64)
        if self.model == "payload":
            return P
        if self.model == "affine":
            return self.c1 * P + self.c0
        return self.c1 * np.ceil(P / self.p_max) + self.c0

    def cost(self, kind: str, dim: int, T: Any) -> Any:
        """C(T) for a T-entry payload of ``kind`` in dimension ``dim``."""
        return self.of_size(payload_size(kind, dim, T, self.size))

    def cost_lo(self, kind: str, dim: int, T: float) -> float:
        """An affine lower bound of C at T (valid for every real T >= 0)."""
        P = _slope_lo(kind, dim, self.size) * T
        if self.model == "payload":
            return P
        if self.model == "affine":
            return self.c1 * P + self.c0
        return self.c1 * P / self.p_max + self.c0

    def options(self) -> dict[str, float]:
        """As compressor options (numbers, so they travel like every other option)."""
        return {
            "cost": float(COST_MODELS.index(self.model)),
            "c0": float(self.c0),
            "c1": float(self.c1),
            "p_max": float(self.p_max_bytes),
            "size": float(SIZE_UNITS.index(self.size)),
        }


def cost_model_from_dict(d: dict[str, Any]) -> CostModel:
    """A cost model from the fitting command's JSON (keys model, c0, c1, p_max_bytes, size; others ignored)."""
    try:
        model = str(d["model"])
        kw: dict[str, Any] = {"model": model, "c0": float(d.get("c0", 0.0)), "c1": float(d.get("c1", 1.0))}
        kw["size"] = str(d.get("size", "payload_bits"))
        if model == "packet":
            kw["p_max_bytes"] = float(d["p_max_bytes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad cost model {d!r}: {exc}") from None
    return CostModel(**kw)


def cost_options_from_file(path: str | Path) -> dict[str, float]:
    """``-o cost_file=PATH`` expands to these compressor options (psrv.keyvalue)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read cost model file {str(path)!r}: {exc}") from None
    if not isinstance(d, dict):
        raise ValueError(f"cost model file {str(path)!r} does not hold a JSON object")
    return cost_model_from_dict(d).options()


# --- descent measures -------------------------------------------------------------------------


class _Sorted:
    """The magnitudes of g in decreasing order, sorted lazily in growing blocks, with prefix sums."""

    def __init__(self, g: np.ndarray, first: int = 256) -> None:
        self.a = np.abs(np.asarray(g, dtype=np.float64).reshape(-1))
        self.d = self.a.size
        self.l1 = float(self.a.sum())
        self.l2sq = float(self.a @ self.a)
        self.nnz = int(np.count_nonzero(self.a))
        self.K = 0
        self._grow(min(self.d, first))

    def _grow(self, K: int) -> None:
        d = self.d
        if K >= d:
            top, rest = self.a, 0.0
        else:
            part = np.partition(self.a, d - K)
            top, rest = part[d - K :], float(part[: d - K].sum())
        self.s = np.sort(top)[::-1]
        self.psq = np.concatenate(([0.0], np.cumsum(self.s * self.s)))
        self.pl1 = np.concatenate(([0.0], np.cumsum(self.s)))
        # tail[m] = sum_{i >= m} s_i (0-based), summed from the small end: no cancellation
        self.tail = np.concatenate((np.cumsum(self.s[::-1])[::-1] + rest, [rest]))
        self.K = K

    def ensure(self, T: int) -> None:
        """Make s[0..T] (T+1 entries where they exist) available."""
        if T + 1 > self.K and self.K < self.d:
            self._grow(min(self.d, max(T + 1, 4 * self.K)))


def _alpha(S: _Sorted, T: int) -> float:
    return float(S.psq[T]) / S.l2sq


def _beta(S: _Sorted, T: int) -> float:
    return float(S.pl1[T]) ** 2 / (T * S.l2sq)


class _Omega:
    """omega(T) with p* (water-filling, as psrv.compress.stochastic.optimal_probabilities) from the
    sorted magnitudes: with n_s = m saturated entries, E||Q||^2 = sum_{i<=m} s_i^2 + R_m^2 / (T - m)."""

    def __init__(self, S: _Sorted) -> None:
        self.S = S
        self.m = 0  # n_s is nondecreasing in T, so one pointer serves the whole scan

    def second_moment(self, T: int) -> float:
        S = self.S
        if T >= S.nnz:
            return S.l2sq
        m = min(self.m, T - 1)
        while m < T - 1 and not S.s[m] * (T - m) <= S.tail[m]:  # holds at m = T - 1 (exactly)
            m += 1
        self.m = m
        R = float(S.tail[m])
        return float(S.psq[m]) + R * R / (T - m)

    def __call__(self, T: int) -> float:
        return self.S.l2sq / self.second_moment(T)


def omega(g: np.ndarray, T: int) -> float:
    """Khirirat et al., Lemma 4 with p*: ``||g||^2 / E||Q_{T,p*}(g)||^2``."""
    S = _Sorted(g, first=int(T) + 1)
    return _Omega(S)(int(T)) if S.l2sq > 0 else 0.0


def alpha(g: np.ndarray, T: int) -> float:
    """Khirirat et al., Lemma 1: ``||top_T(g)||^2 / ||g||^2``."""
    S = _Sorted(g, first=int(T) + 1)
    return _alpha(S, int(T)) if S.l2sq > 0 else 0.0


def _kind(base: str) -> str:
    return "sign_sparse" if base == "sq" else "sparse"


# --- tuning -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tuned:
    T: int
    improvement: float  # alpha, beta or omega at T
    cost: float  # C(T)
    evaluated: int = 0  # ratios computed (the scan's work)

    @property
    def efficiency(self) -> float:
        return self.improvement / self.cost


def _measures(base: str, S: _Sorted):
    if base == "topk":
        return lambda T: _alpha(S, T)
    if base == "sq":
        return lambda T: _beta(S, T)
    if base == "stochastic":
        return _Omega(S)
    raise ValueError(f"unknown CAT base {base!r}; known: {', '.join(BASES)}")


def _check(g: np.ndarray, cost: CostModel, base: str) -> None:
    if base not in BASES:
        raise ValueError(f"unknown CAT base {base!r}; known: {', '.join(BASES)}")
    c1 = float(cost.cost(_kind(base), max(1, np.asarray(g).size), 1))
    if not c1 > 0:
        raise ValueError(f"cost model gives C(1) = {c1} <= 0: CAT needs a positive cost (check c0, c1)")


def tune_brute(g: np.ndarray, cost: CostModel, base: str = "topk") -> Tuned:
    """The test oracle: argmax over every T in [1, d] (the smallest T among ties)."""
    _check(g, cost, base)
    S = _Sorted(g, first=np.asarray(g).size)
    d = S.d
    if S.l2sq == 0:
        return Tuned(1, 0.0, float(cost.cost(_kind(base), d, 1)), 0)
    measure = _measures(base, S)
    Ts = np.arange(1, d + 1)
    imp = np.array([measure(int(T)) for T in Ts])
    C = np.asarray(cost.cost(_kind(base), d, Ts), dtype=np.float64)
    i = int(np.argmax(imp / C))
    return Tuned(int(Ts[i]), float(imp[i]), float(C[i]), d)


def _bound(base: str, S: _Sorted, cost: CostModel, T: int, imp: float, om: _Omega | None) -> float:
    """An upper bound of Improvement(T')/C(T') over every T' > T (module doc)."""
    d, kind = S.d, _kind(base)
    if T >= d:
        return -math.inf
    S.ensure(T + 1)
    lo = lambda t: cost.cost_lo(kind, d, t)  # noqa: E731
    # the points where a (capped linear) / (affine) bound can peak on [T+1, d]
    if base == "topk":
        slope = float(S.s[T]) ** 2 / S.l2sq
        num = lambda t: min(1.0, imp + (t - T) * slope)  # noqa: E731
        kink = T + (1.0 - imp) / slope if slope > 0 else d
    elif base == "sq":
        st = float(S.pl1[T])
        lin = lambda t: min(S.l1, st + (t - T) * float(S.s[T]))  # noqa: E731
        num = lambda t: lin(t) * st / (T * S.l2sq)  # noqa: E731
        kink = T + (S.l1 - st) / float(S.s[T]) if S.s[T] > 0 else d
    else:
        e0, e1 = om.second_moment(T), om.second_moment(T + 1)
        sigma = e1 - e0  # <= 0; E is convex, so E(t) >= e1 + (t - T - 1) sigma for t >= T + 1
        num = lambda t: S.l2sq / max(S.l2sq, e1 + (t - T - 1) * sigma)  # noqa: E731
        kink = T + 1 + (S.l2sq - e1) / sigma if sigma < 0 else d
    points = [T + 1, d] + ([kink] if T + 1 < kink < d else [])
    best = -math.inf
    for t in points:
        c = lo(t)
        if c <= 0:
            return math.inf
        best = max(best, num(t) / c)
    return best


def tune(g: np.ndarray, cost: CostModel, base: str = "topk") -> Tuned:
    """argmax_T Improvement(T)/C(T) by the certified upward scan of the module doc (same T as
    :func:`tune_brute`)."""
    _check(g, cost, base)
    g = np.asarray(g).reshape(-1)
    S = _Sorted(g)
    d, kind = S.d, _kind(base)
    if S.l2sq == 0 or d == 0:
        return Tuned(1, 0.0, float(cost.cost(kind, max(d, 1), 1)), 0)
    measure = _measures(base, S)
    om = measure if base == "stochastic" else None
    monotone = base != "sq"
    best: Tuned | None = None
    evaluated = 0
    T = 1
    block = 256
    while T <= d:
        # the next candidate: for a monotone measure, the end of C's run of equal values from T
        if monotone:
            hi = min(d, T + block)
            Ts = np.arange(T, hi + 1)
            C = np.asarray(cost.cost(kind, d, Ts), dtype=np.float64)
            ends = np.flatnonzero(C[1:] > C[:-1])
            if ends.size == 0 and hi < d:
                block *= 4
                continue
            T = int(Ts[ends[0]]) if ends.size else d
            c = float(C[T - Ts[0]])
        else:
            c = float(cost.cost(kind, d, T))
        S.ensure(T)
        imp = measure(T)
        evaluated += 1
        if best is None or imp / c > best.efficiency:
            best = Tuned(T, imp, c)
        if _bound(base, S, cost, T, imp, om) <= best.efficiency:
            break
        T += 1
    return Tuned(best.T, best.improvement, best.cost, evaluated)


def alistarh_T(g: np.ndarray) -> int:
    """Alistarh et al. (NeurIPS 2018), as in Khirirat et al. §4: the smallest T with
    ``sum of the T largest |g_j| >= ||g||_2`` (1 for g = 0)."""
    a = np.sort(np.abs(np.asarray(g, dtype=np.float64).reshape(-1)))[::-1]
    if a.size == 0:
        return 1
    norm = math.sqrt(float(a @ a))
    T = int(np.searchsorted(np.cumsum(a), norm * (1 - 1e-12))) + 1
    return max(1, min(T, a.size))

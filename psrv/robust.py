"""Byzantine-robust aggregation (``--aggregate``): the coordinate-wise median and the coordinate-wise
trimmed mean of the workers' contributions (Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", ICML 2018, Definitions 1 and 2).

The server steps along the *sum* of the workers' contributions (each worker's gradient carries the
weight ``n_m / N``, so the sum is the full gradient; :mod:`psrv.engine`). A robust rule replaces that
sum by ``M * rule(c_1, ..., c_k)`` coordinate by coordinate, over the ``k`` contributions the server
holds (a worker that has never uploaded holds none and is left out), ``M`` the run's workers: the
same scale as the sum, so with identical honest contributions every rule gives the sum (to a
rounding) and ``--lr`` means the same thing. Yin et al. analyse equal shards; with unequal ones each
contribution is weighted by its shard, and the rule takes the median of the weighted values.

- ``median``: ``med_m c_m[i]`` (numpy's median: the mean of the two middle values for even ``k``).
  Stays within the honest values' range as long as fewer than half the contributions are hostile.
- ``trimmed-mean:beta=B`` (default 0.1, ``0 <= B < 1/2``): per coordinate, drop the ``floor(B k)``
  largest and smallest values and average the rest. ``beta=0`` is the mean (``M * mean = sum``).

Where it applies: the rule needs one value per worker that estimates the same thing, so it is
offered for the algorithms whose upload *replaces* the worker's stored contribution (gd, sgd,
lag-wk, lasg, lag-ps; for the lazy ones the rule runs over the stored, possibly stale, gradients --
exactly the values LAG's sum would use), and refused for

- accumulating rules (laq, slaq, ef21, riag, ciag): the server keeps only the running sum of the
  workers' innovations, no per-worker value to take a median of;
- error feedback (topk-ef, sasg, ``ef=1``): the worker keeps what the server did not apply of its
  upload, assuming the server adds exactly what it sent; a robust rule breaks that bookkeeping;
- sparse uploads (randk, topk, threshold, stochastic, sq): workers' supports differ, so the
  coordinate-wise median of their uploads is zero almost everywhere.

Workers' replicas stay exact: the aggregate a robust rule produces reaches them as the changed
coordinates' new values (the downlink's ``values``/``aggregate`` update, :mod:`psrv.replica`),
never as payloads to add, which only accumulating rules relay.

Pure: numpy and core types only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from psrv.aggregate import BLOCK, Aggregator, Overflow, compact, decode_block, payload_peak
from psrv.keyvalue import parse_spec
from psrv.payload import Payload

#: the rules ``--aggregate`` takes
RULES = ("mean", "median", "trimmed-mean")
_SPARSE_KINDS = ("sparse", "sign_sparse")


@dataclass(frozen=True)
class AggregateRule:
    """A parsed ``--aggregate`` value."""

    name: str = "mean"
    beta: float = 0.0  # trimmed-mean: the fraction cut from each end

    @property
    def robust(self) -> bool:
        return self.name != "mean"

    def combine(self, rows: np.ndarray) -> np.ndarray:
        """The rule over axis 0 of ``rows`` (k, n), float64: the median or trimmed mean itself
        (the caller scales it by M)."""
        k = rows.shape[0]
        if self.name == "median":
            return np.median(rows, axis=0)
        cut = math.floor(self.beta * k)
        kept = np.sort(rows, axis=0)[cut : k - cut] if cut else rows
        return kept.sum(axis=0) / kept.shape[0]


def parse_aggregate(spec: str) -> AggregateRule:
    """``"mean"``, ``"median"``, ``"trimmed-mean"`` or ``"trimmed-mean:beta=0.2"`` -> the rule
    (``ValueError``, one line, naming what is wrong)."""
    try:
        name, options = parse_spec(spec)
    except ValueError as exc:
        raise ValueError(f"--aggregate: {exc}") from None
    if name not in RULES:
        raise ValueError(f"--aggregate: unknown rule {name!r}; known: {', '.join(RULES)}")
    allowed = {"beta"} if name == "trimmed-mean" else set()
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"--aggregate: {name} takes {'option beta' if allowed else 'no options'}, got {', '.join(unknown)}"
        )
    beta = float(options.get("beta", 0.1 if name == "trimmed-mean" else 0.0))
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"--aggregate: trimmed-mean needs 0 <= beta < 0.5, got {beta:g}")
    return AggregateRule(name, beta)


def refusal(rule: AggregateRule, algorithm: Any) -> str | None:
    """Why ``rule`` cannot run with ``algorithm`` (one line), or None when it can."""
    if not rule.robust:
        return None
    name, what = algorithm.name, f"--aggregate {rule.name}"
    if algorithm.absorb != "replace":
        return (
            f"{what} needs one contribution per worker, but {name} accumulates the workers' innovations into one "
            "running sum (the server keeps no per-worker value to take a median of); use --aggregate mean "
            "(with --clip-norm) or gd, sgd, lag-wk, lasg, lag-ps"
        )
    if algorithm.ef:
        return (
            f"{what} cannot run with error feedback ({name}): the worker keeps what the server did not apply of "
            "its upload, assuming the server adds exactly what it sent; use ef=0 or --aggregate mean"
        )
    sparse = [k for k in algorithm.payload_kinds if k in _SPARSE_KINDS]
    if sparse:
        return (
            f"{what} cannot take {name}'s sparse uploads ({algorithm.compressor_name}): the workers' supports "
            "differ, so the coordinate-wise rule is zero almost everywhere; use a dense compressor or --aggregate mean"
        )
    return None


class RobustAggregator(Aggregator):
    """An ``"replace"`` :class:`~psrv.aggregate.Aggregator` whose ``total`` is ``M * rule`` of the
    stored contributions instead of their sum. :meth:`add` only stores an upload (checking that
    ``M`` times its peak fits ``limit``: the aggregate is at most that); :meth:`settle`, called when
    the round closes, recomputes ``total`` block by block (O(k * BLOCK) memory, O(k d log k) time)."""

    def __init__(self, num_workers: int, dim: int, rule: AggregateRule) -> None:
        super().__init__(num_workers, dim, "replace")
        self.rule = rule
        self.bound = math.inf
        self._dirty = False

    def add(self, worker: int, payload: Payload, limit: float | None = None, peak: float | None = None) -> None:
        if payload.dim != self.dim:
            raise ValueError(f"payload of dimension {payload.dim}, expected {self.dim}")
        if not 0 <= worker < self.num_workers:
            raise IndexError(f"worker {worker} out of range [0, {self.num_workers})")
        new_peak = payload_peak(payload) if peak is None else peak
        if limit is not None and not new_peak * self.num_workers <= limit:
            raise Overflow(f"{self.num_workers} x the upload's {new_peak:.3g} would reach beyond {limit:.3g}")
        self.payloads[worker] = compact(payload)
        self.peaks[worker] = new_peak
        self._dirty = True

    def settle(self) -> None:
        """``total = M * rule(stored contributions)``, coordinate by coordinate."""
        if not self._dirty:
            return
        stored = [p for p in self.payloads if p is not None]
        if not stored:
            self.total[:] = 0.0
        for start in range(0, self.dim if stored else 0, BLOCK):
            stop = min(self.dim, start + BLOCK)
            rows = np.stack([decode_block(p, start, stop) for p in stored])
            self.total[start:stop] = self.rule.combine(rows) * self.num_workers
        self._dirty = False


def make_aggregator(
    rule: AggregateRule, num_workers: int, dim: int, absorb: str, keep_rows: bool = False
) -> Aggregator:
    """The server's aggregator for ``rule``: the running sum for ``mean`` (``keep_rows``: see
    :class:`~psrv.aggregate.Aggregator`), else a :class:`RobustAggregator`."""
    if not rule.robust:
        return Aggregator(num_workers, dim, absorb, keep_rows)
    if absorb != "replace":
        raise ValueError(f"--aggregate {rule.name} needs per-worker contributions (absorb 'replace'), not {absorb!r}")
    return RobustAggregator(num_workers, dim, rule)

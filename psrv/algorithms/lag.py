"""LAG, worker-side rule LAG-WK (Chen, Giannakis, Sun, Yin, "LAG: Lazily Aggregated Gradient for
Communication-efficient Distributed Learning", NeurIPS 2018).

``lag-wk``: every worker computes its local gradient at the broadcast ``theta^k`` and uploads it
iff

    ||grad f_m(theta^k) - grad f_m(theta_hat_m)||^2
        > 1/(alpha^2 M^2) sum_{d=1..D} xi_d ||theta^{k+1-d} - theta^{k-d}||^2

or its staleness reached ``t_bar`` (:func:`psrv.triggers.lazy_skip`; the right-hand side is
:func:`psrv.triggers.lag_threshold`): the LAG paper's rule with D steps of history, as in LAQ's
eq. 7a and in the LAG authors' code (not the one-step form ``1/(alpha^2 M^2) ||x^k - x^{k-1}||^2``).

``grad f_m(theta_hat_m)`` is exactly what the server stores for worker m: the worker keeps
``to_dense`` of its last accepted upload (the float32 wire value, as float64), so worker and
server never disagree about the stale gradient. Before the first upload the server stores 0,
and so does the worker: round 0 compares the gradient against 0 with an empty step history
(threshold 0), so every worker with a nonzero gradient uploads in round 0.

Uploads are dense float32 gradients that replace the stored one (``absorb = "replace"``).
Defaults: D = 10 and xi_d = 1/D (the LAG authors' code for LAG-WK, github.com/chentianyi1991/LAG-code,
nips2018synlinear.m: weight 1/D on each of the last D = 10 steps for LAG-WK, 10/D for LAG-PS);
``xi`` < 0 means that default, ``xi = 0`` uploads whenever the gradient changed at all (plain GD);
``t_bar = 100`` maximum staleness (as LAQ): no worker skips more than ``t_bar`` consecutive rounds.
``lr = 0.02`` as the other psrv algorithms (the LAG authors use 1/L; with a step much below 1/L
the gradients barely move and LAG-WK skips almost everything; measured runs: docs/results.md).
``batch`` > 0 draws a minibatch per round (the naive stochastic extension, eq. 5 of the SASG paper,
Deng et al., arXiv:2112.04088, which that paper calls ineffective; use ``lasg`` for the
same-minibatch rule); 0 = full local gradient, the setting of the paper.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from psrv.algorithms import Decision, LazyHistory, RoundInfo, register, split_options
from psrv.compress import make_compressor
from psrv.payload import to_dense
from psrv.triggers import lag_threshold, lazy_skip


@dataclass(frozen=True)
class LagState:
    last: np.ndarray  # to_dense of the last accepted upload: the server's stored copy (0 before any)
    clock: int  # rounds since the last upload


@dataclass(frozen=True)
class LagWK(LazyHistory):
    lr: float = 0.02
    D: int = 10
    xi: float = -1.0  # per-d weight xi_d; negative means the LAG-WK default 1 / D
    t_bar: int = 100
    batch: int = 0  # minibatch rows per worker and round; 0 = full local gradient
    name: str = "lag-wk"

    absorb = "replace"
    payload_kinds = ("dense",)

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.D >= 0 and self.t_bar >= 0 and self.batch >= 0):
            raise ValueError(
                f"bad {self.name} parameters: lr={self.lr} D={self.D} t_bar={self.t_bar} batch={self.batch}"
            )

    def init(self, dim: int) -> LagState:
        return LagState(np.zeros(dim, dtype=np.float64), 0)

    def step(self, state: LagState, grad: np.ndarray, info: RoundInfo, rng: np.random.Generator) -> Decision:
        grad = np.asarray(grad, dtype=np.float64).reshape(-1)
        change = grad - state.last
        change_sq = float(change @ change)
        threshold = lag_threshold(self.xis, info.recent_step_sq, self.lr, info.num_workers)
        stats = {"lhs": change_sq, "rhs": threshold}
        if lazy_skip(change_sq, threshold, state.clock, self.t_bar):
            return Decision(None, LagState(state.last, state.clock + 1), stats)
        sent = make_compressor("dense").compress(grad, rng)
        return Decision(sent, LagState(to_dense(sent), 0), stats)


def _build(options: Mapping[str, float], compressor: str) -> LagWK:
    if compressor not in ("", "dense"):
        raise ValueError(f"lag-wk uploads dense gradients, not compressor {compressor!r}")
    own, rest = split_options(LagWK, options)
    if rest:
        raise ValueError(f"unknown lag-wk options: {', '.join(sorted(rest))}")
    return LagWK(**own)


register("lag-wk", _build)

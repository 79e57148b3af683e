"""LASG and SASG: lazy uploads of stochastic gradients, decided on the same minibatch.

- ``lasg``: LASG, lazily aggregated stochastic gradients (T. Chen, Y. Sun, W. Yin,
  "Communication-adaptive stochastic gradient methods for distributed learning", IEEE TSP 2021;
  ref. [17] of the SASG paper, which adopts its rule as SASG's eq. 6), dense uploads.
- ``sasg``: SASG (X. Deng, D. Li, T. Sun, X. Lu, "Communication-Efficient Distributed Learning via
  Sparse and Adaptive Stochastic Gradient", arXiv:2112.04088, Algorithm 1, eqs. 6, 8-9): the same
  rule, top-k uploads with error feedback.

The rule (Deng et al., eq. 6): worker m skips round k iff

    ||grad F_m(theta^k; xi_m^k) - grad F_m(theta_hat_m; xi_m^k)||^2
        <= 1/(alpha^2 M^2) sum_{d=1..D} xi_d ||theta^{k+1-d} - theta^{k-d}||^2

and its staleness is below the maximum delay ``t_bar`` (:func:`psrv.triggers.lazy_skip`,
:func:`psrv.triggers.lag_threshold`). Both gradients are on the SAME minibatch xi_m^k ("This
condition is evaluated on the same data at two different iterations"): the second one is
``RoundInfo.grad_at(theta_hat_m)``, so a deciding round costs two gradient evaluations.
``theta_hat_m`` is the broadcast ``theta`` of worker m's last accepted upload, as the paper
states (the authors' multi-process code, github.com/xiaogdeng/SASG, compares against the previous
iterate instead; their single-process notebooks use the last-upload iterate; psrv follows the paper).

Round 0 (more precisely: every round before a worker's first accepted upload): the paper starts
from ``theta_hat_m = theta^0``, but the server then stores nothing for worker m (0, not a
gradient), and eq. 6 would compare ``grad F_m(theta^0)`` with itself (0 <= threshold) and skip.
psrv therefore uploads unconditionally while a worker has never uploaded, without the auxiliary
evaluation (so ``WorkerResult.grad_evals == 2 * rounds - 1`` when round 0 is accepted); from
then on ``theta_hat_m`` is the iterate of the last accepted upload (= theta^0 after round 0).

On upload:
- ``lasg`` sends the fresh stochastic gradient, dense float32; it replaces the stored one.
- ``sasg`` (Algorithm 1): ``p = alpha * g + e; send Top_k(p); e <- p - Top_k(p)``; on a skip
  ``e`` is unchanged. The server stores only the sparse contribution (``absorb = "replace"``,
  eqs. 8-9: ``theta^{k+1} = theta^k - sum_{m uploads} Top_k(p_m) - sum_{m skips} stored_m``).
  How alpha enters: psrv's server always steps ``theta -= lr * total``, so the worker runs the
  error feedback in gradient units, ``e' = e / alpha``, through the one EF mechanism
  (:func:`psrv.compress.feedback.ef_step` with the top-k compressor): ``p' = g + e'``, send
  ``Top_k(p')``, ``e' <- p' - Top_k(p')``. Top-k is positively homogeneous
  (``alpha * Top_k(p') = Top_k(alpha * p') = Top_k(alpha g + e)``: same indices, scaled values),
  so ``lr * Top_k(p')`` is exactly the paper's ``Top_k(p)`` with ``alpha = lr`` and theta follows
  the paper's update; the paper's memory is ``lr * e'`` (the state holds ``e'``). The float32
  rounding of the sent values also goes into ``e'``, so nothing is lost:
  ``sum(sent) + e' == sum(g over uploads)`` (times alpha: the paper's conservation).
  ``compressor=`` may name another compressor (options passed through); the paper's is top-k.

Defaults (the paper's setup, §VI-A: ten workers, ten samples per worker and iteration, top-1%
(k = 0.01 d); D = 10 as in the authors' MNIST notebook, FullConnect_MNIST.ipynb):
``batch = 10``, ``ratio = 0.01``, ``D = 10``. Where psrv had to choose (the paper's values of
xi_d, of the maximum delay and of the MNIST step size could not be checked):
- xi_d: psrv uses xi_d = 1/D, the LAG-WK constant of the LAG authors' code (SASG's eq. 5, which
  eq. 6 refines, is "a direct extension of LAG"); ``xi`` < 0 means that default, ``xi = 0``
  uploads whenever the two gradients differ (plain SGD).
  (The authors' notebook uses ``sum_d ||dtheta_d||^2 / (2 lr M^2)`` with per-worker mean
  losses, a different normalisation of the same rule.)
- maximum delay: ``t_bar = 10`` = D, the authors' notebook
  (``tau[w_id] > D`` forces an upload: at most D consecutive skips).
- ``lr = 0.02`` as the other psrv algorithms (the authors' MNIST notebook uses 0.005).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from psrv.algorithms import Decision, LazyHistory, RoundInfo, register, split_options
from psrv.compress import Compressor, make_compressor
from psrv.compress.feedback import ef_step, init_memory
from psrv.triggers import lag_threshold, lazy_skip


@dataclass(frozen=True)
class LazyState:
    theta_hat: np.ndarray | None  # broadcast theta of the last accepted upload; None before the first
    memory: np.ndarray | None  # sasg: error feedback e' = e / alpha (gradient units); lasg: None
    clock: int  # rounds since the last upload (staleness)


@dataclass(frozen=True)
class LazyStochastic(LazyHistory):
    compressor: Compressor
    ef: bool = False
    lr: float = 0.02
    batch: int = 10  # minibatch rows per worker and round; 0 = full local gradient
    D: int = 10
    xi: float = -1.0  # per-d weight xi_d; negative means 1 / D
    t_bar: int = 10  # maximum delay: at most t_bar consecutive skips
    name: str = "lasg"

    absorb = "replace"

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.D >= 0 and self.t_bar >= 0 and self.batch >= 0):
            raise ValueError(
                f"bad {self.name} parameters: lr={self.lr} D={self.D} t_bar={self.t_bar} batch={self.batch}"
            )

    @property
    def payload_kinds(self) -> tuple[str, ...]:
        return (self.compressor.payload_kind,)

    def init(self, dim: int) -> LazyState:
        return LazyState(None, init_memory(dim) if self.ef else None, 0)

    def step(self, state: LazyState, grad: np.ndarray, info: RoundInfo, rng: np.random.Generator) -> Decision:
        if info.theta is None or info.grad_at is None:
            raise ValueError(f"{self.name} needs RoundInfo.theta and RoundInfo.grad_at (same-minibatch gradient)")
        grad = np.asarray(grad, dtype=np.float64).reshape(-1)
        stats: dict[str, float] = {}
        if state.theta_hat is not None:  # eq. 6 on this round's minibatch
            change = grad - np.asarray(info.grad_at(state.theta_hat), dtype=np.float64).reshape(-1)
            change_sq = float(change @ change)
            threshold = lag_threshold(self.xis, info.recent_step_sq, self.lr, info.num_workers)
            stats = {"lhs": change_sq, "rhs": threshold}
            if lazy_skip(change_sq, threshold, state.clock, self.t_bar):
                return Decision(None, LazyState(state.theta_hat, state.memory, state.clock + 1), stats)
        theta_hat = np.array(info.theta, copy=True)
        if self.ef:
            sent, memory = ef_step(self.compressor, state.memory, grad, rng)
            stats["memory_sq"] = float(memory @ memory)
            return Decision(sent, LazyState(theta_hat, memory, 0), stats)
        return Decision(self.compressor.compress(grad, rng), LazyState(theta_hat, None, 0), stats)


def _factory(name: str, default_compressor: str, ef: bool, any_compressor: bool):
    def build(options: Mapping[str, float], compressor: str) -> LazyStochastic:
        if not any_compressor and compressor not in ("", default_compressor):
            raise ValueError(f"{name} uploads {default_compressor} gradients, not compressor {compressor!r}")
        own, rest = split_options(LazyStochastic, options)
        if "ef" in own:
            raise ValueError(f"{name}: option 'ef' is fixed ({ef})")
        return LazyStochastic(make_compressor(compressor or default_compressor, **rest), ef=ef, name=name, **own)

    return build


register("lasg", _factory("lasg", "dense", ef=False, any_compressor=False))
register("sasg", _factory("sasg", "topk", ef=True, any_compressor=True))

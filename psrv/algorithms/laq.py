"""LAQ: lazily aggregated quantized gradients (Sun, Chen, Giannakis, Yang, NeurIPS 2019).

Worker m at round k (Algorithm 2 of the paper): quantize the innovation against its last
uploaded quantized gradient ``Q_m(theta_hat)`` (eqs. 5-6, :mod:`psrv.compress.laq`),
then skip if (7a) and (7b) hold (:func:`psrv.triggers.laq_skip`), else upload
``(R, q)``. The server adds every received innovation to the running aggregate
``sum_m Q_m`` (eq. 4), which is all it keeps (no per-worker ``Q_m``); a skipping worker keeps
contributing its ``Q_m`` through that sum.

Defaults follow the paper's experiments (§4): D = 10, xi_d = 0.8/D, t_bar = 100,
alpha = 0.02, and b = 4, the authors' code default for logistic regression
(github.com/sunjunaimer/LAQ; the paper's text says 3). Why 4: the 2^b grid of eq. 5 has no
point at the centre, so every coordinate whose innovation is 0 (MNIST's always-blank pixels)
carries the maximal error tau*R; with b = 3 the 3||eps||^2 term of (7a) then exceeds the
innovation almost always and LAQ stalls (measured runs and the command that reproduces them:
docs/results.md). ``Q_m(theta_hat^0) = 0`` and ``eps_hat^0 = 0``.

``slaq``: the stochastic version of LAQ (Sun et al., §4, "Stochastic gradient-based tests"): LAQ
on minibatch gradients, ``batch`` rows per worker and round drawn by the worker
(``worker.client._Gradients``; ``batch = 0`` is the full local gradient, ``laq``'s default).
Defaults from the paper: "The mini-batch size is 500, alpha = 0.008, and the number of bits per
coordinate is set as b = 3 for logistic regression and 8 for neural network" (the authors'
SLAQ code uses the same: minibatch 500, alpha = 0.008, b = 3); D, xi_d and t_bar as
LAQ ("we set D = 10, xi_1 = ... = xi_D = 0.8/D, t_bar = 100" for all experiments). The rule is
LAQ's (7a)/(7b) applied to the stochastic gradient at theta^k alone (no second evaluation).

With ``xi = 0`` LAQ is not GD: the ``3 (||eps^k||^2 + ||eps_hat^{k-1}||^2)`` term of (7a) stays,
so a worker still skips when its quantized innovation is below its quantization error; with
b = 16 that error is ~2^-16 of the innovation's radius, LAQ uploads every round and tracks GD to
within the quantization error (tests/test_algorithms_lazy.py; measured skip counts for b = 3..16 in
docs/results.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from psrv.algorithms import Decision, LazyHistory, RoundInfo, register, split_options
from psrv.compress.laq import quantize
from psrv.payload import laq_innovation
from psrv.triggers import laq_skip


@dataclass(frozen=True)
class LaqState:
    q_prev: np.ndarray  # Q_m(theta_hat_m^{k-1}): the sum of the innovations the server added for m
    eps_hat_sq: float  # ||grad f_m(theta_hat) - Q_m(theta_hat)||^2 at the last upload
    clock: int  # rounds since the last upload (t_m)


@dataclass(frozen=True)
class LAQ(LazyHistory):
    lr: float = 0.02
    bits: int = 4
    D: int = 10
    xi: float = -1.0  # per-d weight xi_d; negative means the paper's 0.8 / D
    t_bar: int = 100
    batch: int = 0  # minibatch rows per worker and round (slaq); 0 = full local gradient
    name: str = "laq"

    absorb = "accumulate"
    xi_default_total = 0.8  # the paper's xi_d = 0.8 / D
    payload_kinds = ("laq",)

    def __post_init__(self) -> None:
        if not (self.lr > 0 and 1 <= self.bits <= 16 and self.D >= 0 and self.t_bar >= 0 and self.batch >= 0):
            raise ValueError(
                f"bad LAQ parameters: lr={self.lr} bits={self.bits} D={self.D} t_bar={self.t_bar} batch={self.batch}"
            )

    def init(self, dim: int) -> LaqState:
        return LaqState(np.zeros(dim, dtype=np.float64), 0.0, 0)

    def rejoin(self, dim: int, contribution: np.ndarray | None) -> LaqState:
        """A rejoining worker: ``Q_m`` is its row of the server's sum (exactly the sum of the
        innovations the server added for it, eq. 4), so the next innovation is taken against what
        the server holds. ``eps_hat`` (its quantization error at the last upload) is lost: 0, and
        the clock is set to ``t_bar`` so the first round back uploads (7b), which measures
        ``eps_hat`` afresh; from then on the worker is exactly an LAQ worker again."""
        if contribution is None or contribution.shape != (dim,):
            raise ValueError(f"{self.name}: a rejoining worker needs its row of the server's sum ({dim} values)")
        return LaqState(np.array(contribution, dtype=np.float64), 0.0, self.t_bar)

    def step(self, state: LaqState, grad: np.ndarray, info: RoundInfo, rng: np.random.Generator) -> Decision:
        sent = quantize(grad, state.q_prev, self.bits)
        innovation = laq_innovation(sent)
        q_new = state.q_prev + innovation
        err = grad - q_new
        eps_sq = float(err @ err)
        test = laq_skip(
            float(innovation @ innovation),
            self.xis,
            info.recent_step_sq,
            self.lr,
            info.num_workers,
            eps_sq,
            state.eps_hat_sq,
            state.clock,
            self.t_bar,
        )
        stats = {"lhs": test.lhs, "rhs": test.rhs, "radius": sent.scale}
        if test.skip:
            return Decision(None, LaqState(state.q_prev, state.eps_hat_sq, state.clock + 1), stats)
        return Decision(sent, LaqState(q_new, eps_sq, 0), stats)


def _factory(name: str, **defaults: float):
    def build(options: Mapping[str, float], compressor: str) -> LAQ:
        if compressor not in ("", "laq"):
            raise ValueError(f"{name} uses its own innovation quantizer, not compressor {compressor!r}")
        own, rest = split_options(LAQ, options)
        if rest:
            raise ValueError(f"unknown {name} options: {', '.join(sorted(rest))}")
        return LAQ(**{**defaults, **own}, name=name)

    return build


register("laq", _factory("laq"))
register("slaq", _factory("slaq", batch=500, bits=3, lr=0.008))

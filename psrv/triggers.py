"""Lazy-upload rules as pure functions, and the one place the step history lives.

Shared by worker and server code: a rule takes a few numbers and returns a
decision; it never touches the network.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass


class StepHistory:
    """The last D squared parameter changes ``||theta^{k+1-d} - theta^{k-d}||^2``,
    most recent first (d = 1..D). Kept by the server and broadcast with the model,
    so every worker compares against the same numbers (Sun et al., NeurIPS 2019, eq. 7a).
    Always the step actually taken: with a server optimizer (``--server-opt``) that is no longer
    ``alpha * nabla``, and the rules' threshold changes scale (:mod:`psrv.server_opt`)."""

    def __init__(self, depth: int) -> None:
        self._steps: deque[float] = deque(maxlen=max(depth, 0))

    def push(self, step_sq: float) -> None:
        if self._steps.maxlen:
            self._steps.appendleft(float(step_sq))

    def recent(self) -> tuple[float, ...]:
        return tuple(self._steps)

    def copy(self) -> StepHistory:
        other = StepHistory(0)
        other._steps = self._steps.copy()
        return other


def weighted_steps(xi: Sequence[float], recent_step_sq: Sequence[float]) -> float:
    """``sum_d xi_d ||theta^{k+1-d} - theta^{k-d}||^2`` over the available history."""
    return sum(x * s for x, s in zip(xi, recent_step_sq, strict=False))  # history may be shorter than D early on


def lag_threshold(xi: Sequence[float], recent_step_sq: Sequence[float], lr: float, num_workers: int) -> float:
    """The right-hand side shared by LAG, LAQ, LASG and SASG:
    ``1/(alpha^2 M^2) sum_d xi_d ||theta^{k+1-d} - theta^{k-d}||^2`` (Chen et al., NeurIPS 2018, LAG;
    Sun et al., NeurIPS 2019, eq. 7a; Deng et al., arXiv:2112.04088, eq. 6)."""
    return weighted_steps(xi, recent_step_sq) / (lr**2 * num_workers**2)


def may_skip(clock: int, t_bar: int) -> bool:
    """Maximum staleness: a worker may skip only while fewer than ``t_bar`` rounds have passed
    since its last upload, so no stored contribution is ever more than ``t_bar`` rounds old."""
    return clock < t_bar


def lazy_skip(change_sq: float, threshold: float, clock: int, t_bar: int) -> bool:
    """Worker-side LAG rule (LAG-WK, Chen et al., NeurIPS 2018) and the stochastic rule of LASG/SASG
    (Deng et al., arXiv:2112.04088, eq. 6): skip iff ``||grad(theta^k) - grad(theta_hat)||^2 <= threshold``
    and staleness allows."""
    return change_sq <= threshold and may_skip(clock, t_bar)


def lag_ps_upload(smoothness: float, drift_sq: float, threshold: float, clock: int, t_bar: int) -> bool:
    """Server-side LAG rule (LAG-PS, Chen et al., NeurIPS 2018): ask worker m for a gradient iff
    ``L_m^2 ||theta^k - theta_hat_m||^2 > threshold``, or its staleness forces it. The server
    can decide this without the worker computing anything."""
    return smoothness**2 * drift_sq > threshold or not may_skip(clock, t_bar)


@dataclass(frozen=True)
class LaqTest:
    """The two sides of LAQ's skip condition (7a) and the decision with (7b)."""

    lhs: float
    rhs: float
    skip: bool


def laq_skip(
    innovation_sq: float,
    xi: Sequence[float],
    recent_step_sq: Sequence[float],
    lr: float,
    num_workers: int,
    eps_sq: float,
    eps_hat_sq: float,
    clock: int,
    t_bar: int,
) -> LaqTest:
    """LAQ's rule (Sun et al., NeurIPS 2019, eqs. 7a/7b): skip iff

        ||Q_m(theta_hat) - Q_m(theta^k)||^2 <= 1/(alpha^2 M^2) sum_d xi_d ||dtheta_d||^2
                                               + 3 (||eps_m^k||^2 + ||eps_hat_m^{k-1}||^2)

    and the clock allows it. Choice where (7b) is loose: the worker may skip only
    while ``clock < t_bar``, so no stored gradient is ever more than ``t_bar``
    rounds old (at most ``t_bar`` consecutive skips).
    """
    rhs = lag_threshold(xi, recent_step_sq, lr, num_workers) + 3.0 * (eps_sq + eps_hat_sq)
    return LaqTest(innovation_sq, rhs, innovation_sq <= rhs and may_skip(clock, t_bar))

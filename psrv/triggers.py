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
    so every worker compares against the same numbers (seed 003 eq. 7a)."""

    def __init__(self, depth: int) -> None:
        self._steps: deque[float] = deque(maxlen=max(depth, 0))

    def push(self, step_sq: float) -> None:
        if self._steps.maxlen:
            self._steps.appendleft(float(step_sq))

    def recent(self) -> tuple[float, ...]:
        return tuple(self._steps)


def weighted_steps(xi: Sequence[float], recent_step_sq: Sequence[float]) -> float:
    """``sum_d xi_d ||theta^{k+1-d} - theta^{k-d}||^2`` over the available history."""
    return sum(x * s for x, s in zip(xi, recent_step_sq, strict=False))  # history may be shorter than D early on


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
    """Seed 003 (7a)/(7b): skip iff

        ||Q_m(theta_hat) - Q_m(theta^k)||^2 <= 1/(alpha^2 M^2) sum_d xi_d ||dtheta_d||^2
                                               + 3 (||eps_m^k||^2 + ||eps_hat_m^{k-1}||^2)

    and the clock allows it. Choice where (7b) is loose: the worker may skip only
    while ``clock < t_bar``, so no stored gradient is ever more than ``t_bar``
    rounds old (at most ``t_bar`` consecutive skips).
    """
    rhs = weighted_steps(xi, recent_step_sq) / (lr**2 * num_workers**2) + 3.0 * (eps_sq + eps_hat_sq)
    return LaqTest(innovation_sq, rhs, innovation_sq <= rhs and clock < t_bar)

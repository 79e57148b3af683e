"""Stopping rules of a run: the first evaluated round at which the training loss, the loss residual
f(θ^k) − f* or the test accuracy reaches a target ends the job (``psrv run --stop-at``).

The LAQ paper counts iterations, uploads and bits until f(θ^k) − f* ≤ 1e-6 (Sun et al., "Communication-
efficient distributed learning via lazily aggregated quantized gradients", NeurIPS 2019, Table 2); the
SASG paper until a target test accuracy (Deng et al., arXiv:2112.04088, Table II). f* of a convex task
is solved here once to high accuracy (L-BFGS, Liu and Nocedal, Math. Programming 45, 1989).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: stop-rule key -> the metrics field it reads
RULES = {"loss": "train_loss", "residual": "train_loss", "accuracy": "accuracy"}
#: metrics fields where higher is better (a target is reached at or above it); the rest are losses
HIGHER_IS_BETTER = frozenset({"accuracy"})


def meets(field: str, value: float, target: float) -> bool:
    """Whether a round's ``value`` of metrics field ``field`` reaches ``target``: an accuracy at or
    above it, a loss at or below it (False for NaN). The one rule of --stop-at and of the cost to
    reach a target (:class:`psrv.report.CostToReach`)."""
    return value >= target if field in HIGHER_IS_BETTER else value <= target


#: names the experiment config uses for the same rules
ALIASES = {"loss_residual": "residual", "train_loss": "loss"}
CONVEX_TASKS = ("logreg", "linreg")


class StopRuleError(ValueError):
    """A stop rule that cannot be used (one line naming the option)."""


def parse_stop(specs: tuple[str, ...] | list[str]) -> dict[str, float]:
    """``["loss=0.3", "accuracy=0.9"]`` -> {"loss": 0.3, "accuracy": 0.9} (keys also as in ALIASES)."""
    out: dict[str, float] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        key = ALIASES.get(key.strip(), key.strip())
        if not sep or key not in RULES:
            raise StopRuleError(f"expected loss=X, residual=X or accuracy=X, got {spec!r}")
        try:
            out[key] = float(value)
        except ValueError:
            raise StopRuleError(f"{key}: {value!r} is not a number") from None
        if not math.isfinite(out[key]):
            raise StopRuleError(f"{key}: {value!r} is not a finite number")
    return out


@dataclass
class StopRule:
    """``targets`` ({"loss"|"residual"|"accuracy": value}) and f* (needed for "residual").
    :meth:`check` returns the first rule a record meets (records without an evaluation meet none)."""

    targets: dict[str, float]
    fstar: float | None = None

    def __post_init__(self) -> None:
        if "residual" in self.targets and self.fstar is None:
            raise StopRuleError("--stop-at residual=... needs --fstar (a number, or auto for logreg/linreg)")

    def check(self, record: dict[str, Any]) -> str | None:
        for key, target in self.targets.items():
            field = RULES[key]
            value = record.get(field)
            if value is None or not math.isfinite(value):
                continue
            if key == "residual":
                value = value - float(self.fstar)  # type: ignore[arg-type]
            if meets(field, value, target):
                return key
        return None


def solve_fstar(
    task_name: str, task_options: dict[str, Any], dc: Any, tol: float = 1e-12, evaluator: Any = None
) -> float:
    """f* = min f(θ) of the full training objective of a convex task (logreg, linreg) on the run's
    own split, by L-BFGS from θ = 0 with the exact gradient (``local_loss_grad`` of one worker holding
    every sample; ``evaluator``: a :class:`psrv.runner.Evaluator` of that task and data already
    loaded). :class:`StopRuleError` for a task that is not convex."""
    if task_name not in CONVEX_TASKS:
        raise StopRuleError(
            f"f* = auto is solved only for the convex tasks ({', '.join(CONVEX_TASKS)}); task {task_name!r} "
            "needs a number (--fstar F, or fstar = F in the experiment's [stop])"
        )
    import numpy as np
    from scipy.optimize import minimize

    from psrv.runner import Evaluator

    ev = evaluator if evaluator is not None else Evaluator(task_name, dict(task_options), dc)
    X, y, n = ev.train.X, ev.train.y, len(ev.train)

    def fg(theta: Any) -> tuple[float, Any]:
        loss, grad = ev.task.local_loss_grad(theta, X, y, n, 1)
        return float(loss), np.asarray(grad, dtype=np.float64)

    theta0 = np.zeros(ev.task.dim)
    res = minimize(fg, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 20000, "gtol": 1e-10, "ftol": tol})
    return float(min(res.fun, ev.task.loss(res.x, X, y)))

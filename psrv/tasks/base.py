"""Pieces shared by the tasks: option and argument checks, the L2 penalty, zero initialisation.

Every task's objective is f_m(θ) = data term + (λ / 2M) ||θ||² (M = number of workers); the
helpers here raise the same ``ValueError`` messages for every task (prefixed with the task's
name where the message names an option).
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

import numpy as np


def set_int_fields(task: Any, fields: Iterable[tuple[str, int]]) -> None:
    """Check that each (field, low) of the frozen dataclass ``task`` is an integer >= low; store it as int."""
    for field, low in fields:
        value = getattr(task, field)
        if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
            raise ValueError(f"{task.name}: {field} must be an integer >= {low}, got {value!r}")
        object.__setattr__(task, field, int(value))


def as_int(task: str, field: str, value: object, low: int) -> int:
    """An integer option that may arrive as a float or string (task options travel as doubles)."""
    if isinstance(value, bool):
        raise ValueError(f"{task}: {field} must be an integer >= {low}, got {value!r}")
    if isinstance(value, Integral):
        out = int(value)
    else:
        try:
            f = float(value) if isinstance(value, Real | str) else float("nan")
        except ValueError:
            f = float("nan")
        if not np.isfinite(f) or f != round(f):
            raise ValueError(f"{task}: {field} must be an integer >= {low}, got {value!r}")
        out = int(f)
    if out < low:
        raise ValueError(f"{task}: {field} must be an integer >= {low}, got {value!r}")
    return out


def set_l2(task: Any) -> None:
    """Check the frozen dataclass ``task``'s ``l2`` option (a finite number >= 0); store it as float."""
    try:
        l2 = float(task.l2)
    except (TypeError, ValueError):
        raise ValueError(f"{task.name}: l2 must be a number, got {task.l2!r}") from None
    if not l2 >= 0 or not np.isfinite(l2):
        raise ValueError(f"{task.name}: l2 must be finite and >= 0, got {task.l2!r}")
    object.__setattr__(task, "l2", l2)


def check_split(X: np.ndarray, total_samples: float, num_workers: int) -> None:
    """The arguments that say how the objective is split: N >= max(1, rows held), M >= 1."""
    if total_samples < max(len(X), 1):
        raise ValueError(f"total_samples ({total_samples}) must be >= max(1, len(X)={len(X)})")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")


def l2_penalty(theta: np.ndarray, l2: float, num_workers: int) -> tuple[float, np.ndarray]:
    """(λ / 2M) ||θ||² and its gradient (a new float64 array) for float64 ``theta``."""
    reg = l2 / num_workers
    grad = reg * theta
    loss = 0.5 * reg * float(theta @ theta)
    return loss, grad


def check_shapes(
    theta: np.ndarray, X: np.ndarray, y: np.ndarray, dim: int, n_features: int, n_classes: int | None = None
) -> None:
    """θ of shape (dim,), X of shape (n, n_features), y of shape (n,); labels in [0, n_classes) if given."""
    if theta.shape != (dim,):
        raise ValueError(f"theta must have shape ({dim},), got {theta.shape}")
    if X.ndim != 2 or X.shape[1] != n_features:
        raise ValueError(f"X must have shape (n, {n_features}), got {X.shape}")
    if y.shape != (len(X),):
        raise ValueError(f"y must have shape ({len(X)},), got {y.shape}")
    if n_classes is not None and len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must be in [0, {n_classes}), got [{y.min()}, {y.max()}]")


class ZeroInit:
    """``init_params`` for the convex tasks (mixin; the class provides ``dim``)."""

    dim: int

    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        """Zeros (the problem is convex; ``rng`` is unused but part of the Task API)."""
        return np.zeros(self.dim, dtype=np.float64)

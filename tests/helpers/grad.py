"""Central finite differences, the reference the tasks' gradients are checked against."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def fd_grad(f: Callable[[np.ndarray], float], theta: np.ndarray, eps: float) -> np.ndarray:
    """The gradient of ``f`` at ``theta`` by central differences with step ``eps``."""
    E = np.eye(len(theta)) * eps
    return np.array([f(theta + e) - f(theta - e) for e in E]) / (2 * eps)

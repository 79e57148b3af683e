"""Learning tasks: objectives split over workers as f(θ) = Σ_m f_m(θ) on a flat θ.

A task is a small frozen object built from the data's shape; workers call
``local_loss_grad`` on their shard, the server evaluates ``loss`` / ``accuracy``.
New tasks register in ``TASKS``:

- ``logreg``: softmax regression (needs n_classes >= 2; default l2 = 0.01);
- ``linreg``: least squares (needs n_classes == 0, i.e. regression data; default l2 = 0;
  ``accuracy`` is R²);
- ``mlp``: one hidden ReLU layer, softmax cross-entropy (options ``hidden`` = 512, the SASG
  MNIST network, ``l2`` = 0, ``precision`` = 32 or 64).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from psrv.tasks.linreg import LinReg
from psrv.tasks.logreg import LogReg
from psrv.tasks.mlp import MLP

__all__ = ["MLP", "TASKS", "LinReg", "LogReg", "Task", "make_task", "task_option_defaults"]


@runtime_checkable
class Task(Protocol):
    name: ClassVar[str]

    @property
    def dim(self) -> int: ...

    def init_params(self, rng: np.random.Generator) -> np.ndarray: ...

    def local_loss_grad(
        self, theta: np.ndarray, X: np.ndarray, y: np.ndarray, total_samples: int, num_workers: int
    ) -> tuple[float, np.ndarray]: ...

    def loss(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float: ...

    def accuracy(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float: ...


TASKS: dict[str, type[Task]] = {"logreg": LogReg, "linreg": LinReg, "mlp": MLP}


def make_task(name: str, n_features: int, n_classes: int, **options: Any) -> Task:
    """Instantiate task ``name``; ValueError for an unknown task, option or option value."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    cls = TASKS[name]
    valid = {f.name for f in fields(cls) if f.init} - {"n_features", "n_classes"}  # type: ignore[arg-type]
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(
            f"unknown option(s) for task {name!r}: {', '.join(unknown)}; valid: {', '.join(sorted(valid)) or 'none'}"
        )
    return cls(n_features=n_features, n_classes=n_classes, **options)  # type: ignore[call-arg]


def task_option_defaults(name: str) -> dict[str, Any]:
    """The options task ``name`` takes and their defaults."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return {
        f.name: f.default
        for f in fields(TASKS[name])  # type: ignore[arg-type]
        if f.init and f.name not in ("n_features", "n_classes")
    }

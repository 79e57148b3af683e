"""Learning tasks: objectives split over workers as f(θ) = Σ_m f_m(θ) on a flat θ.

A task is a small frozen object built from the data's shape; workers call
``local_loss_grad`` on their shard, the server evaluates ``loss`` / ``accuracy``.
New tasks register in ``TASKS``:

- ``logreg``: softmax regression (needs n_classes >= 2; default l2 = 0.01);
- ``linreg``: least squares (needs n_classes == 0, i.e. regression data; default l2 = 0;
  ``accuracy`` is R²);
- ``mlp``: one hidden ReLU layer, softmax cross-entropy (options ``hidden`` = 512, the SASG
  MNIST network, ``l2`` = 0, ``precision`` = 32 or 64);
- torch networks (:mod:`psrv.tasks.torch_nets`, gradients by autograd through
  :mod:`psrv.tasks.torch_task`): ``cnn`` (LeNet-5 style), ``wide`` (an MLP of any width),
  ``charlm`` (a character-level Transformer on Python's standard-library sources; brings its
  own data);
- any user model: a task name ``path/to/file.py:factory`` or ``package.module:factory``
  (:mod:`psrv.tasks.plugin`; options ``l2``, ``precision``).

A task may bring its own data (``charlm``, a factory returning datasets): :func:`own_data` gives
its rows, and ``--data`` defaults to them (:func:`default_data`).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from psrv.tasks.linreg import LinReg
from psrv.tasks.logreg import LogReg
from psrv.tasks.mlp import MLP
from psrv.tasks.plugin import PluginTask, is_plugin_spec
from psrv.tasks.torch_nets import CNN, CharLM, Wide
from psrv.tasks.torch_task import TorchSpec, TorchTask

__all__ = [
    "CNN",
    "MLP",
    "TASKS",
    "CharLM",
    "LinReg",
    "LogReg",
    "Task",
    "TorchSpec",
    "Wide",
    "check_task",
    "default_data",
    "is_plugin_spec",
    "make_task",
    "own_data",
    "task_option_defaults",
]


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


TASKS: dict[str, type[Task]] = {
    "logreg": LogReg,
    "linreg": LinReg,
    "mlp": MLP,
    "cnn": CNN,
    "wide": Wide,
    "charlm": CharLM,
}
_PLUGIN_OPTIONS = {"l2": 0.0, "precision": 32}


def _known(name: str) -> None:
    if name not in TASKS and not is_plugin_spec(name):
        raise ValueError(
            f"unknown task {name!r}; known: {', '.join(TASKS)}, or path/to/file.py:factory, package.module:factory"
        )


def _check_options(name: str, valid: set[str], options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(
            f"unknown option(s) for task {name!r}: {', '.join(unknown)}; valid: {', '.join(sorted(valid)) or 'none'}"
        )


def make_task(name: str, n_features: int, n_classes: int, device: str = "cpu", **options: Any) -> Task:
    """Instantiate task ``name``; ValueError for an unknown task, option or option value. ``device``
    (cpu, cuda, auto: :func:`psrv.tasks.torch_task.resolve_device`) is where a torch task's model
    computes; the numpy tasks (logreg, linreg, mlp) always compute on the CPU and ignore it."""
    _known(name)
    _check_options(name, set(task_option_defaults(name)), options)
    if name not in TASKS:
        return PluginTask(name, n_features, n_classes, device=device, **options)
    cls = TASKS[name]
    if issubclass(cls, TorchTask):
        options = {**options, "device": device}
    return cls(n_features=n_features, n_classes=n_classes, **options)  # type: ignore[call-arg]


def task_option_defaults(name: str) -> dict[str, Any]:
    """The options task ``name`` takes and their defaults."""
    _known(name)
    if name not in TASKS:
        return dict(_PLUGIN_OPTIONS)
    return {
        f.name: f.default
        for f in fields(TASKS[name])  # type: ignore[arg-type]
        if f.init and f.name not in ("n_features", "n_classes", "device")
    }


def check_task(name: str, options: dict[str, Any]) -> None:
    """What can be checked of a task without its data (``ValueError``): the name and the option
    names; for a user factory also that it loads and returns a valid TorchSpec, and, when it
    brings its own data, that its model computes a gradient on two of its samples."""
    _known(name)
    _check_options(name, set(task_option_defaults(name)), options)
    if is_plugin_spec(name):
        rows = own_data(name)
        if rows is not None:
            make_task(name, rows[0].n_features, rows[0].n_classes, **options)


def own_data(name: str) -> tuple[Any, Any] | None:
    """(train, test or None) psrv Datasets of a task that brings its own data, else None."""
    if is_plugin_spec(name):
        from psrv.tasks.plugin import own_data as plugin_data

        return plugin_data(name)
    own = getattr(TASKS.get(name), "own_data", None)
    return own() if own is not None else None


def default_data(task: str | None) -> str:
    """What ``--data`` means when it is not given: the task's own data if it brings any, the data
    set it is made for (``wide``: synthetic), else mnist."""
    if task is None:
        return "mnist"
    if is_plugin_spec(task):
        return task if own_data(task) is not None else "mnist"
    return getattr(TASKS.get(task), "default_data", None) or "mnist"

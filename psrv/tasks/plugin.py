"""The user's own model as a task: ``--task path/to/file.py:factory`` or ``--task package.module:factory``.

The factory takes no arguments and returns a :class:`psrv.tasks.torch_task.TorchSpec` (model, loss,
and optionally train/test datasets). Every process of a run (the server, each worker, the
evaluator) imports the same spec: the server sends it to the workers in the RunConfig's ``task``
field, so a file spec must name a file that exists on every host (relative paths are taken from
the process's working directory) and a module spec a module every host can import.

Loading happens once per process and spec: the module is imported, the factory called (under
``torch.manual_seed(0)``) and its return value checked; each task instance then works on its own
deep copy of the model. Every problem -- no such file or module, no such attribute, not callable,
the factory raising, a wrong return type, a model with non-float or lazy parameters or parameters
that change shape in a forward pass -- is a ``ValueError`` with one line that names the spec.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from psrv.data import Dataset
from psrv.tasks.torch_task import TorchAdapter, TorchSpec, TorchTask, call_factory, index_datasets

_SPEC = re.compile(r"^(?P<source>.+):(?P<attr>[A-Za-z_][A-Za-z0-9_]*)$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_lock = threading.Lock()
_loaded: dict[str, TorchSpec] = {}
_rows: dict[str, tuple[Dataset, Dataset | None] | None] = {}


def is_plugin_spec(spec: str) -> bool:
    """``SOURCE:ATTR`` where SOURCE is a ``.py`` path or a dotted module name."""
    m = _SPEC.match(spec)
    if m is None:
        return False
    source = m["source"]
    return source.endswith(".py") or "/" in source or "\\" in source or bool(_MODULE.match(source))


def load_spec(spec: str) -> TorchSpec:
    """The (cached) TorchSpec of ``spec``; ``ValueError`` with a one-line message on any problem."""
    with _lock:
        if spec not in _loaded:
            _loaded[spec] = call_factory(_factory(spec), spec)
        return _loaded[spec]


def _factory(spec: str) -> Any:
    m = _SPEC.match(spec)
    if m is None or not is_plugin_spec(spec):
        raise ValueError(f"task {spec}: expected path/to/file.py:factory or package.module:factory")
    source, attr = m["source"], m["attr"]
    if source.endswith(".py") or "/" in source or "\\" in source:
        module = _import_file(spec, Path(source))
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise ValueError(f"task {spec}: cannot import module {source!r} ({exc})") from None
        except Exception as exc:
            raise ValueError(f"task {spec}: importing {source} raised {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n]))
        raise ValueError(f"task {spec}: {source} has no attribute {attr!r} (callables: {', '.join(public) or 'none'})")
    if not callable(factory):
        raise ValueError(f"task {spec}: {source}:{attr} is not callable (a {type(factory).__name__})")
    return factory


def _import_file(spec: str, path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"task {spec}: no such file {str(path)!r}")
    resolved = path.resolve()
    name = "psrv_task_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, resolved)
    if loader_spec is None or loader_spec.loader is None:
        raise ValueError(f"task {spec}: cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ValueError(f"task {spec}: importing {path} raised {type(exc).__name__}: {exc}") from None
    return module


def own_data(spec: str) -> tuple[Dataset, Dataset | None] | None:
    """The psrv rows of the spec's own datasets (see :func:`index_datasets`); None when it has none."""
    s = load_spec(spec)
    with _lock:
        if spec not in _rows:  # labels may take a pass over the items: once per process
            _rows[spec] = None if s.train is None else index_datasets(s.train, s.test, spec)
        return _rows[spec]


@dataclass(frozen=True)
class PluginTask(TorchTask):
    """A user's factory as a task (options: ``l2``, ``precision``)."""

    spec_name: str
    n_features: int
    n_classes: int
    l2: float = 0.0
    precision: int = 32
    device: str = field(default="cpu", compare=False)  # not a task option: make_task(device=...)
    _adapter: TorchAdapter = field(init=False, repr=False, compare=False)
    name: ClassVar[str] = "torch"

    def spec(self) -> TorchSpec:
        return load_spec(self.spec_name)

    def _label(self) -> str:
        return self.spec_name

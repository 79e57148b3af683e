"""Any ``torch.nn.Module`` and loss function as a psrv task (the user's own model, and the
built-in torch networks in :mod:`psrv.tasks.torch_nets`).

The objective follows the other tasks' conventions, f(θ) = Σ_m f_m(θ) with

    f_m(θ) = (1/N) Σ_{n ∈ shard m} ℓ(model_θ(x_n), t_n) + (λ / 2M) ||θ||²

N = total training samples (N·B/n_m for a minibatch), M = workers, ℓ the user's loss. The loss
function must return the *mean* over the batch of per-sample losses (the default reduction of
``nn.CrossEntropyLoss``, ``F.cross_entropy``, ``nn.MSELoss``); psrv multiplies it by B/N, so a
batch's share of Σ_m f_m is exactly its share of the mean loss. ``l2`` (default 0) is psrv's
penalty, in float64, on all of θ.

Design choices:

- **θ and the parameters share memory.** The adapter owns one flat tensor; every trainable
  parameter of the model is re-pointed to a view of it (``p.data = flat[o:o+n].view_as(p)``), and
  every ``p.grad`` to a view of one flat gradient tensor, so autograd accumulates straight into it.
  Per gradient call the only copies are θ (numpy, float32 or float64) into the flat buffer, and
  the float32 gradient cast once into the returned float64 array (the Task API's type: the
  algorithms and the server's aggregation work in float64). Parameters with
  ``requires_grad=False`` are not part of θ and keep the factory's values.
- **Precision.** ``precision`` = 32 (default: the model runs in float32) or 64 (``model.double()``,
  for exact checks against the float64 tasks).
- **Buffers** (BatchNorm running statistics and the like) are not part of θ and never travel: each
  process keeps its own. Gradients are computed in train mode (BatchNorm normalises by the batch's
  statistics and updates the worker's local running statistics; dropout is on, drawing from
  torch's global generator). Evaluation (``loss``, ``accuracy``) runs in eval mode *except* for
  modules with running statistics, which stay in train mode and normalise by the evaluated chunk's
  own statistics: the server's copy never trained, so its running statistics mean nothing.
- **Initialisation is seeded.** The factory runs under ``torch.manual_seed(0)`` (inside
  ``torch.random.fork_rng``), so whatever it draws -- parameters, random data -- is the same in every
  process. ``init_params(rng)`` then re-draws, under a torch seed taken from ``rng``, every
  parameter of every module with a ``reset_parameters()`` method (PyTorch's own initialisers);
  parameters of other modules keep the factory's (seeded) values. Same rng seed, same θ, in every
  process.
- **Data.** psrv's ``Dataset`` rows (sharding, minibatches, iid/label/Dirichlet splits) are kept
  unchanged. A task either reads psrv's tabular rows as the model's input ("rows": X as a float
  tensor, y as class labels, or float targets for regression; the model reshapes, e.g. the CNN),
  or brings its own ``torch.utils.data.Dataset`` s ("indices": each psrv row is one number, the
  index of a sample in the train set followed by the test set, and the adapter fetches and collates
  ``dataset[i]`` itself; ``TensorDataset`` s are indexed in one go). Items of an own dataset are
  ``(input, target)`` pairs. Labels for the by-label splits come from ``dataset.targets``, a
  ``TensorDataset``'s second tensor, or the items' scalar targets; without them the data counts as
  unlabelled (``n_classes`` = 0: iid and contiguous splits work, ``dirichlet`` does not).
- **Memory.** Gradients and evaluation go through the data in chunks of ``CHUNK`` samples (autograd
  accumulates over chunks), so a full-batch algorithm never builds one giant graph. The last
  assembled batch is reused while the same array of rows comes back (full-batch algorithms).
- **Accuracy.** A user ``metric(output, target)`` (a batch mean; psrv weights by batch size), else
  for integer targets the fraction of arg-max predictions equal to the target (class dimension last,
  e.g. (B, C) or (B, T, V), or second for (B, C, ...)), else (float targets) R² as in ``linreg``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from psrv.data import Dataset
from psrv.tasks.base import as_int, check_split, set_int_fields, set_l2

CHUNK = 1024  # samples per forward/backward pass


@dataclass(frozen=True)
class TorchSpec:
    """What a task factory returns (``--task path/to/file.py:factory`` or ``package.module:factory``).

    - ``model``: any ``torch.nn.Module`` with a fixed set of floating-point parameters (no lazy
      modules); its trainable parameters, flattened in ``model.parameters()`` order, are θ.
    - ``loss(output, target)``: a scalar tensor, the *mean* over the batch of per-sample losses.
    - ``train``, ``test``: ``torch.utils.data.Dataset`` s of ``(input, target)`` pairs; both None to
      train on psrv's own data (``--data mnist``, a CSV, ...: the input is the row of features as a
      float tensor, the target the label). ``test`` None with a ``train`` set: ``--test-fraction``
      of it is held out.
    - ``metric(output, target)``: optional, a batch mean reported as ``accuracy`` (default: arg-max
      accuracy for integer targets, R² for float targets).

    The factory takes no arguments and must build the same data in every process (psrv calls it
    under ``torch.manual_seed(0)``; a worker loads its data before it learns the run's options).
    """

    model: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train: Any = None
    test: Any = None
    metric: Callable[[torch.Tensor, torch.Tensor], Any] | None = None


def call_factory(factory: Callable[[], Any], where: str) -> TorchSpec:
    """``factory()`` under ``torch.manual_seed(0)`` (the global generator restored afterwards),
    checked; ``ValueError`` with a one-line message naming ``where`` otherwise."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            spec = factory()
        except Exception as exc:  # the user's code: report it in one line
            raise ValueError(f"task {where}: the factory raised {type(exc).__name__}: {exc}") from None
    check_spec(spec, where)
    return spec


def check_spec(spec: Any, where: str) -> None:
    """The types of a factory's return value (``ValueError`` naming ``where``)."""
    if not isinstance(spec, TorchSpec):
        raise ValueError(
            f"task {where}: the factory must return psrv.TorchSpec(model=..., loss=..., train=..., test=...), "
            f"got {type(spec).__name__}"
        )
    if not isinstance(spec.model, nn.Module):
        raise ValueError(f"task {where}: TorchSpec.model must be a torch.nn.Module, got {type(spec.model).__name__}")
    if not callable(spec.loss):
        raise ValueError(f"task {where}: TorchSpec.loss must be callable, got {type(spec.loss).__name__}")
    if spec.metric is not None and not callable(spec.metric):
        raise ValueError(f"task {where}: TorchSpec.metric must be callable, got {type(spec.metric).__name__}")
    for name in ("train", "test"):
        ds = getattr(spec, name)
        if ds is not None and not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            raise ValueError(f"task {where}: TorchSpec.{name} must be a torch Dataset (with __len__ and __getitem__)")
    if spec.test is not None and spec.train is None:
        raise ValueError(f"task {where}: TorchSpec has a test set but no train set")
    if spec.train is not None and len(spec.train) < 1:
        raise ValueError(f"task {where}: TorchSpec.train is empty")


# ---------------------------------------------------------------------------------- devices
DEVICES = ("cpu", "cuda", "auto")


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:N``), or ``auto`` (cuda if available, else cpu) as a torch
    device; ``ValueError`` with one line when CUDA is asked for and there is none."""
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {name}: CUDA is not available ({why}); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    return dev


# ---------------------------------------------------------------------------------- data
def _labels(ds: Any) -> np.ndarray | None:
    """Integer class labels of a torch dataset's items, or None when it has none."""
    targets = getattr(ds, "targets", None)
    if targets is None and isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) >= 2:
        targets = ds.tensors[1]
    if targets is None and len(ds):
        first = ds[0]
        if not (isinstance(first, tuple | list) and len(first) == 2 and _is_int_scalar(first[1])):
            return None
        targets = [int(ds[i][1]) for i in range(len(ds))]  # one pass over the items, once
    arr = np.asarray(targets.numpy() if isinstance(targets, torch.Tensor) else targets)
    if arr.shape != (len(ds),) or arr.dtype.kind not in "iu" or (len(arr) and arr.min() < 0):
        return None
    return arr.astype(np.int64)


def _is_int_scalar(t: Any) -> bool:
    if isinstance(t, torch.Tensor):
        return t.ndim == 0 and not t.is_floating_point() and not t.is_complex()
    return isinstance(t, int | np.integer) and not isinstance(t, bool)


def index_datasets(train: Any, test: Any, name: str) -> tuple[Dataset, Dataset | None]:
    """psrv Datasets whose rows are indices into ``train`` followed by ``test`` (see the module
    docstring), labelled where the torch datasets have integer labels."""
    n_train, n_test = len(train), 0 if test is None else len(test)
    parts = []
    for ds, offset, n in ((train, 0, n_train), (test, n_train, n_test)):
        parts.append((np.arange(offset, offset + n, dtype=np.float64)[:, None], None if ds is None else _labels(ds)))
    labelled = parts[0][1] is not None and (test is None or parts[1][1] is not None)
    n_classes = 0
    if labelled:
        n_classes = int(max(int(p[1].max()) for p in parts if p[1] is not None and len(p[1])) + 1)
        labelled = n_classes >= 2
    out = []
    for (X, y), n in zip(parts, (n_train, n_test), strict=True):
        if labelled:
            out.append(Dataset(X, y, n_classes, name))
        else:
            out.append(Dataset(X, np.zeros(n, dtype=np.float64), 0, name))
    return out[0], (out[1] if test is not None else None)


def _collate(ds: Any, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(ds, torch.utils.data.TensorDataset):
        t = torch.from_numpy(idx)
        items = tuple(x[t] for x in ds.tensors)
    else:
        items = torch.utils.data.default_collate([ds[int(i)] for i in idx])
    if not isinstance(items, tuple | list) or len(items) != 2:
        raise ValueError("dataset items must be (input, target) pairs")
    return items[0], items[1]


# ---------------------------------------------------------------------------------- adapter
class TorchAdapter:
    """θ ↔ a module's parameters, gradients by autograd, evaluation; see the module docstring.

    Not thread-safe: the model is this adapter's own copy; use one adapter per thread (every
    ``make_task`` builds a new one)."""

    def __init__(
        self,
        spec: TorchSpec,
        n_features: int,
        n_classes: int,
        l2: float,
        precision: int,
        where: str,
        device: str | torch.device = "cpu",
    ):
        self.where, self.l2, self.n_classes = where, l2, n_classes
        self.device = resolve_device(device)
        self.source = spec.model  # the factory's module, untouched: init_params draws on a copy of it
        self.loss_fn, self.metric = spec.loss, spec.metric
        self.train, self.test = spec.train, spec.test
        self.own_data = spec.train is not None
        self.n_train = len(spec.train) if self.own_data else 0
        self.n_pool = self.n_train + (len(spec.test) if spec.test is not None else 0)
        if self.own_data and n_features != 1:
            raise ValueError(
                f"task {where} brings its own data (rows are sample indices, 1 column), but the data has "
                f"{n_features} features: start workers with --data {where}"
            )
        self.n_features = n_features
        self.model = copy.deepcopy(spec.model)  # ours alone: threads in one process each get one
        self.dtype = torch.float32 if precision == 32 else torch.float64
        self._check_parameters()
        self.model.to(device=self.device, dtype=self.dtype)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"task {where}: the model has no trainable parameters")
        self.shapes = [tuple(p.shape) for p in self.params]
        self.dim = sum(p.numel() for p in self.params)
        self.flat = torch.empty(self.dim, dtype=self.dtype, device=self.device)
        self.gflat = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        # the host side of the two copies per gradient: θ in, the gradient out (pinned on a GPU)
        pinned = self.device.type == "cuda"
        self.host_theta = torch.empty(self.dim, dtype=self.dtype, pin_memory=pinned) if pinned else self.flat
        self.host_grad = torch.empty(self.dim, dtype=self.dtype, pin_memory=pinned) if pinned else self.gflat
        self._views: list[tuple[torch.Tensor, torch.Tensor]] = []
        o = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                view, gview = self.flat[o : o + n].view_as(p), self.gflat[o : o + n].view_as(p)
                view.copy_(p)
                p.data = view
                p.grad = gview
                self._views.append((view, gview))
                o += n
        self.theta0 = self.flat.to("cpu", torch.float64, copy=True)  # the factory's values
        self._last: tuple[np.ndarray, np.ndarray, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._probe()

    # ------------------------------------------------------------------ checks
    def _check_parameters(self) -> None:
        for name, p in self.model.named_parameters():
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"task {self.where}: parameter {name!r} is uninitialised (a lazy module); "
                    "psrv needs parameters of fixed shape: run one forward pass in the factory"
                )
            if not p.is_floating_point():
                raise ValueError(
                    f"task {self.where}: parameter {name!r} has dtype {p.dtype}; psrv needs floating-point parameters"
                )

    def _probe(self) -> None:
        """One gradient on two samples, so a model that fails, changes its parameters or returns
        a bad loss is refused now, with one line, not in a worker's first round."""
        if self.own_data:
            X = np.arange(min(2, self.n_train), dtype=np.float64)[:, None]
            y = np.zeros(len(X))
        else:
            X = np.zeros((2, self.n_features))
            y = np.zeros(2) if self.n_classes == 0 else np.array([0, min(1, self.n_classes - 1)])
        buffers = {k: v.clone() for k, v in self.model.named_buffers()}
        before = [(id(p), tuple(p.shape)) for p in self.params]
        try:
            loss, _ = self.local_loss_grad(self.theta0.numpy(), X, y, len(X), 1)
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(
                f"task {self.where}: the model or loss failed on two samples: {type(exc).__name__}: {exc}"
            ) from None
        after = [(id(p), tuple(p.shape)) for p in self.model.parameters() if p.requires_grad]
        if after != before:
            shapes = f"{[s for _, s in before]} -> {[s for _, s in after]}"
            raise ValueError(
                f"task {self.where}: the model's parameters changed during a forward pass ({shapes}); "
                "psrv needs a fixed set of parameters"
            )
        if not math.isfinite(loss):
            raise ValueError(f"task {self.where}: the loss on two samples is {loss}")
        with torch.no_grad():
            for k, v in self.model.named_buffers():
                v.copy_(buffers[k])

    # ------------------------------------------------------------------ task API
    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        """PyTorch's initialisers, drawn on the CPU from a fresh copy of the factory's module (so
        θ⁰ is the same whatever ``device`` a process uses and whatever θ it last loaded)."""
        seed = int(rng.integers(2**63 - 1))
        model = copy.deepcopy(self.source).to(device="cpu", dtype=self.dtype)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in model.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
            params = [p for p in model.parameters() if p.requires_grad]
            return torch.cat([p.reshape(-1) for p in params]).to(torch.float64).numpy()

    def local_loss_grad(
        self, theta: np.ndarray, X: np.ndarray, y: np.ndarray, total_samples: float, num_workers: int
    ) -> tuple[float, np.ndarray]:
        check_split(X, total_samples, num_workers)
        self._load(theta)
        loss = self._backward(X, y, total_samples)
        grad = self._grad_out()
        if self.l2:
            theta64 = np.asarray(theta, dtype=np.float64)
            reg = self.l2 / num_workers
            grad += reg * theta64
            loss += 0.5 * reg * float(theta64 @ theta64)
        return loss, grad

    def _backward(self, X: np.ndarray, y: np.ndarray, total_samples: float) -> float:
        """Σ over chunks of (chunk mean loss)·(chunk size / N), its gradient accumulated into
        ``gflat`` (zeroed first); the loss's value is read once, at the end."""
        self.gflat.zero_()
        if not len(X):
            return 0.0
        inputs, targets = self._batch(X, y)
        self.model.train()
        loss = None
        for lo in range(0, len(X), CHUNK):
            hi = min(lo + CHUNK, len(X))
            value = self._loss(self.model(inputs[lo:hi]), targets[lo:hi])
            weight = (hi - lo) / total_samples
            (value * weight).backward()
            part = value.detach().to(torch.float64) * weight
            loss = part if loss is None else loss + part
        self._check_views()
        return float(loss)

    def _grad_out(self) -> np.ndarray:
        """The gradient as the Task API's float64 array: on a GPU one device-to-host copy into the
        pinned float32 (or float64) ``host_grad``, then, on the host, one cast into a new array."""
        if self.host_grad is not self.gflat:
            self.host_grad.copy_(self.gflat)
        return self.host_grad.numpy().astype(np.float64)

    def loss(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        if not len(X):
            return float("nan")
        total = 0.0
        for out, tgt in self._outputs(theta, X, y):
            total += float(self._loss(out, tgt)) * len(out)
        theta64 = np.asarray(theta, dtype=np.float64)
        return total / len(X) + 0.5 * self.l2 * float(theta64 @ theta64)

    def accuracy(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        if not len(X):
            return float("nan")
        hits, n = 0.0, 0
        ss_res = s1 = s2 = 0.0
        for out, tgt in self._outputs(theta, X, y):
            if self.metric is not None:
                hits += float(self.metric(out, tgt)) * len(out)
            elif tgt.is_floating_point():
                t = tgt.to(torch.float64)
                ss_res += float(((out.to(torch.float64).reshape(t.shape) - t) ** 2).sum())
                s1, s2, n = s1 + float(t.sum()), s2 + float((t * t).sum()), n + t.numel()
            else:
                hits += _hits(out, tgt) * len(out)
        if self.metric is None and n:  # R² over every target value
            ss_tot = s2 - s1 * s1 / n
            return (1.0 if ss_res == 0 else 0.0) if ss_tot <= 0 else 1.0 - ss_res / ss_tot
        return hits / len(X)

    # ------------------------------------------------------------------ internals
    def _load(self, theta: np.ndarray) -> None:
        """θ into the parameters: cast on the host (into the pinned ``host_theta`` on a GPU), then
        one host-to-device copy."""
        theta = np.asarray(theta)
        if theta.shape != (self.dim,):
            raise ValueError(f"theta must have shape ({self.dim},), got {theta.shape}")
        np.copyto(self.host_theta.numpy(), theta, casting="same_kind")
        if self.host_theta is not self.flat:
            self.flat.copy_(self.host_theta, non_blocking=True)  # ordered before the forward pass

    def _check_views(self) -> None:
        """Keep every parameter and gradient a view of the flat buffers (a model may rebind .grad,
        e.g. when autograd could not accumulate in place: copy it in and re-point)."""
        for p, (view, gview) in zip(self.params, self._views, strict=True):
            if p.data.data_ptr() != view.data_ptr():
                with torch.no_grad():
                    view.copy_(p.data)
                p.data = view
            if p.grad is None or p.grad.data_ptr() != gview.data_ptr():
                if p.grad is not None:
                    gview.copy_(p.grad)
                p.grad = gview

    def _loss(self, out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        value = self.loss_fn(out, tgt)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"task {self.where}: the loss must return a scalar tensor (the batch mean)")
        return value.reshape(())

    def _batch(self, X: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's (inputs, targets) for psrv rows X, y; reused while the same X comes back."""
        if self._last is not None and self._last[0] is X and self._last[1] is y:
            return self._last[2]
        if self.own_data:
            idx = np.asarray(X).reshape(-1)
            if X.ndim != 2 or X.shape[1] != 1 or not np.all((idx >= 0) & (idx < self.n_pool) & (idx == np.round(idx))):
                raise ValueError(f"rows must be sample indices in [0, {self.n_pool}) in one column")
            idx = idx.astype(np.int64)
            inputs, targets = self._fetch(idx)
            if inputs.is_floating_point():
                inputs = inputs.to(self.dtype)
            if targets.is_floating_point():
                targets = targets.to(self.dtype)
        else:
            X = np.asarray(X)
            if X.ndim != 2 or X.shape[1] != self.n_features:
                raise ValueError(f"X must have shape (n, {self.n_features}), got {X.shape}")
            np_dtype = np.float32 if self.dtype == torch.float32 else np.float64
            inputs = torch.from_numpy(np.ascontiguousarray(X, dtype=np_dtype))
            if self.n_classes:
                targets = torch.from_numpy(np.asarray(y, dtype=np.int64))
            else:
                targets = torch.from_numpy(np.asarray(y, dtype=np.float64)).to(self.dtype)
        if self.device.type != "cpu":
            inputs, targets = inputs.to(self.device), targets.to(self.device)
        self._last = (X, y, (inputs, targets))
        return inputs, targets

    def _fetch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        in_train = idx < self.n_train
        if in_train.all():
            return _collate(self.train, idx)
        if not in_train.any():
            return _collate(self.test, idx - self.n_train)
        order = np.argsort(~in_train, kind="stable")  # train rows first, then test rows
        a, b = _collate(self.train, idx[in_train]), _collate(self.test, idx[~in_train] - self.n_train)
        inv = torch.from_numpy(np.argsort(order, kind="stable"))
        return torch.cat([a[0], b[0]])[inv], torch.cat([a[1], b[1]])[inv]

    def _outputs(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray):  # noqa: ANN202
        """(output, target) per chunk, in evaluation mode (see the module docstring)."""
        self._load(theta)
        inputs, targets = self._batch(X, y)
        self.model.eval()
        for m in self.model.modules():
            if getattr(m, "track_running_stats", False):
                m.train()  # batch statistics: this process's running statistics never trained
        with torch.no_grad():
            for lo in range(0, len(X), CHUNK):
                yield self.model(inputs[lo : lo + CHUNK]), targets[lo : lo + CHUNK]


def _hits(out: torch.Tensor, tgt: torch.Tensor) -> float:
    """Mean arg-max accuracy, class dimension last ((B, C), (B, T, V)) or second ((B, C, ...))."""
    if out.shape[:-1] == tgt.shape:
        pred = out.argmax(dim=-1)
    elif out.ndim >= 2 and out.shape[:1] + out.shape[2:] == tgt.shape:
        pred = out.argmax(dim=1)
    else:
        return float("nan")
    return float((pred == tgt).to(torch.float64).mean())


# ---------------------------------------------------------------------------------- task base
class TorchTask:
    """Base of the torch tasks: a frozen dataclass with fields ``n_features``, ``n_classes``,
    ``l2``, ``precision`` and ``device`` (not a task option: it is each process's own, given to
    ``make_task``) that builds its :class:`TorchSpec` in ``spec()``; the Task API is the adapter's.
    ``default_data``: the data ``--data`` defaults to with this task (a built-in data set, or the
    task's own name when it brings its own data)."""

    name: ClassVar[str]
    default_data: ClassVar[str | None] = None
    n_features: int
    n_classes: int
    l2: float
    precision: int
    device: str  # cpu, cuda[:N] or auto (resolve_device); the model computes there
    _adapter: TorchAdapter

    def spec(self) -> TorchSpec:
        raise NotImplementedError

    def _label(self) -> str:
        return self.name

    def __post_init__(self) -> None:
        set_int_fields(self, (("n_features", 1),))
        if not isinstance(self.n_classes, Integral) or self.n_classes < 0 or self.n_classes == 1:
            raise ValueError(f"{self.name}: n_classes must be 0 (unlabelled) or >= 2, got {self.n_classes!r}")
        set_l2(self)
        precision = as_int(self.name, "precision", self.precision, 1)
        if precision not in (32, 64):
            raise ValueError(f"{self.name}: precision must be 32 or 64, got {self.precision!r}")
        object.__setattr__(self, "precision", precision)
        self._set_options()
        adapter = TorchAdapter(
            self.spec(), self.n_features, self.n_classes, self.l2, precision, self._label(), self.device
        )
        object.__setattr__(self, "_adapter", adapter)

    def _set_options(self) -> None:
        """Check and normalise the task's own options (subclasses)."""

    @property
    def dim(self) -> int:
        return self._adapter.dim

    @property
    def model(self) -> nn.Module:
        """The adapter's module (its parameters are views of the last θ used)."""
        return self._adapter.model

    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        """PyTorch's initialisers under a torch seed drawn from ``rng`` (module docstring)."""
        return self._adapter.init_params(rng)

    def local_loss_grad(
        self, theta: np.ndarray, X: np.ndarray, y: np.ndarray, total_samples: float, num_workers: int
    ) -> tuple[float, np.ndarray]:
        """f_m(θ) and ∇f_m(θ) (float64, shape (dim,)) for this worker's rows X, y (autograd)."""
        return self._adapter.local_loss_grad(theta, X, y, total_samples, num_workers)

    def loss(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        """Full objective on (X, y): mean loss + (λ/2)||θ||²; NaN for empty data."""
        return self._adapter.loss(theta, X, y)

    def accuracy(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        """The metric (default: arg-max accuracy, or R² for float targets) on (X, y); NaN for empty data."""
        return self._adapter.accuracy(theta, X, y)

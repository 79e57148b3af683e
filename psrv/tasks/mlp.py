"""A fully connected network with one hidden ReLU layer and softmax cross-entropy.

The default architecture is the network the SASG paper trains on MNIST (Deng et al., arXiv:2112.04088, §VI-A):
"a two-layer fully connected (FC) neural network model with 512 neurons in the second layer
for 10-category classification on MNIST", i.e. 784 → 512 (ReLU) → 10, 407,050 parameters.
The paper's Table II agrees: 60,400 SGD rounds × 407,050 × 32 bits = 7.87e11 bits, and
top-1% gives 67,400 × 4,071 × 32 = 8.78e9 (its "Sparse" row). The paper does not name the
activation; ReLU is assumed.

Objective in the conventions of ``LogReg``, f(θ) = Σ_m f_m(θ):

    f_m(θ) = (1/N) Σ_{n ∈ shard m} CE(softmax(W2 relu(W1 x_n + b1) + b2), y_n) + (λ / 2M) ||θ||²

N = total training samples (or N·B/n_m for a minibatch), M = number of workers. ``l2``
defaults to 0: the SASG experiments use no weight decay ("we did not employ training
techniques such as warm-up or weight decay").

θ is flat float64: W1 (hidden × n_features, row-major), b1 (hidden), W2 (n_classes × hidden,
row-major), b2 (n_classes). The data term is computed in torch with ``precision`` = 32
(float32, the default: fast) or 64 bits (float64, for exact checks); the backward pass is
written out by hand (three matrix products), not autograd. Gradients and losses are returned
as float64; the L2 term is always float64.

``init_params(rng)``: He-uniform W1 (U(±sqrt(6/n_features)), ReLU follows), Glorot-uniform
W2 (U(±sqrt(6/(hidden + n_classes)))), zero biases, all from the given numpy generator.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from psrv.tasks.base import as_int as _as_int
from psrv.tasks.base import check_shapes, check_split, set_int_fields, set_l2

_CHUNK = 4096  # rows per forward/backward pass in loss/accuracy on large data (bounds memory)
_buffers = threading.local()


def _tensor_copy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A fresh tensor holding ``a`` (never shares memory, so read-only arrays are fine)."""
    t = torch.empty(a.shape, dtype=dtype)
    np.copyto(t.numpy(), a, casting="same_kind")
    return t


def _sq_norm(t: torch.Tensor) -> float:
    """||t||² in torch, not ``theta @ theta``: numpy's OpenBLAS runs a dot of this length on
    its own threads, and waking them after they went idle costs a scheduler tick (4-12 ms
    measured) whenever the cores are busy, i.e. in every worker process of a run."""
    return float(torch.dot(t, t))


def _float32_buffers(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's reusable float32 (θ, gradient) work buffers of length ``dim``.

    Allocating them afresh on every call costs more than the arithmetic of a 10-row
    minibatch: the allocator hands multi-megabyte blocks back to the OS and every call
    then page-faults on ~1,500 new pages (measured: 1,560 faults, several ms per call).
    """
    cache = getattr(_buffers, "by_dim", None)
    if cache is None:
        cache = _buffers.by_dim = {}
    if dim not in cache:
        cache.clear()  # one network size per process in practice; do not hoard memory
        cache[dim] = (torch.empty(dim, dtype=torch.float32), torch.empty(dim, dtype=torch.float32))
    return cache[dim]


@dataclass(frozen=True)
class MLP:
    n_features: int
    n_classes: int
    hidden: int = 512
    l2: float = 0.0
    precision: int = 32
    name: ClassVar[str] = "mlp"

    def __post_init__(self) -> None:
        set_int_fields(self, (("n_features", 1), ("n_classes", 2)))
        object.__setattr__(self, "hidden", _as_int("mlp", "hidden", self.hidden, 1))
        precision = _as_int("mlp", "precision", self.precision, 1)
        if precision not in (32, 64):
            raise ValueError(f"mlp: precision must be 32 or 64, got {self.precision!r}")
        object.__setattr__(self, "precision", precision)
        set_l2(self)

    @property
    def dim(self) -> int:
        return self.hidden * (self.n_features + 1) + self.n_classes * (self.hidden + 1)

    @property
    def _dtype(self) -> torch.dtype:
        return torch.float32 if self.precision == 32 else torch.float64

    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        """He-uniform W1, Glorot-uniform W2, zero biases; float64, drawn from ``rng`` only."""
        d, h, c = self.n_features, self.hidden, self.n_classes
        theta = np.zeros(self.dim, dtype=np.float64)
        a1 = np.sqrt(6.0 / d)
        a2 = np.sqrt(6.0 / (h + c))
        theta[: h * d] = rng.uniform(-a1, a1, size=h * d)
        o = h * (d + 1)
        theta[o : o + c * h] = rng.uniform(-a2, a2, size=c * h)
        return theta

    # ------------------------------------------------------------------ objective

    def local_loss_grad(
        self, theta: np.ndarray, X: np.ndarray, y: np.ndarray, total_samples: float, num_workers: int
    ) -> tuple[float, np.ndarray]:
        """f_m(θ) and ∇f_m(θ) (float64, shape (dim,)) for this worker's rows X, y.

        θ may be float32 (the default broadcast) or float64; it is read, never converted to a
        float64 copy: per call the only dim-sized allocation is the returned gradient.
        """
        check_split(X, total_samples, num_workers)
        theta, X, y = self._checked(theta, X, y, keep_float32=True)
        reg = self.l2 / num_workers
        grad = np.empty(self.dim, dtype=np.float64)
        out = torch.from_numpy(grad)
        loss = 0.0
        if reg:
            np.multiply(theta, reg, out=grad, dtype=np.float64)  # the penalty's gradient, in float64
            loss = 0.5 * float(torch.dot(out, out)) / reg  # = (reg/2)||θ||², no temporary (see _sq_norm)
        else:
            out.zero_()
        if len(X):
            if self.precision == 64:
                t, g = _tensor_copy(theta, torch.float64), out  # accumulate onto the penalty gradient
            else:
                t, g = _float32_buffers(self.dim)
                np.copyto(t.numpy(), theta, casting="same_kind")
                g.zero_()
            for lo in range(0, len(X), _CHUNK):
                loss += self._chunk(t, X[lo : lo + _CHUNK], y[lo : lo + _CHUNK], 1.0 / total_samples, g)
            if g is not out:
                # numpy casts float32 -> float64 in small buffers; torch's mixed-dtype add_ would
                # first make a full float64 copy of g (800 page faults, ~1.5 ms).
                np.add(grad, g.numpy(), out=grad)
        return loss, grad

    def loss(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        """Full objective on (X, y): mean CE + (λ/2)||θ||²; NaN for empty data."""
        theta, X, y = self._checked(theta, X, y)
        if not len(X):
            return float("nan")
        t64 = _tensor_copy(theta, torch.float64)
        t = t64.to(self._dtype)
        ce = sum(self._chunk(t, X[lo : lo + _CHUNK], y[lo : lo + _CHUNK], 1.0, None) for lo in range(0, len(X), _CHUNK))
        return ce / len(X) + 0.5 * self.l2 * _sq_norm(t64)

    def accuracy(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        """Fraction of rows whose arg-max logit (first on ties) equals y; NaN for empty data."""
        theta, X, y = self._checked(theta, X, y, keep_float32=True)
        if not len(X):
            return float("nan")
        W1, b1, W2, b2 = self._views(_tensor_copy(theta, self._dtype))
        hits = 0
        for lo in range(0, len(X), _CHUNK):
            Xt = self._rows(X[lo : lo + _CHUNK])
            logits = torch.addmm(b2, torch.addmm(b1, Xt, W1.T).clamp_min_(0.0), W2.T)
            hits += int((logits.argmax(dim=1) == torch.from_numpy(y[lo : lo + _CHUNK])).sum())
        return hits / len(X)

    # ------------------------------------------------------------------ internals

    def _views(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        d, h, c = self.n_features, self.hidden, self.n_classes
        o1, o2, o3 = h * d, h * (d + 1), h * (d + 1) + c * h
        return t[:o1].view(h, d), t[o1:o2], t[o2:o3].view(c, h), t[o3:]

    def _rows(self, X: np.ndarray) -> torch.Tensor:
        """X as a tensor of the compute dtype: a view when possible, else a copy."""
        if self.precision == 64 and X.flags.writeable:
            return torch.from_numpy(X)
        return _tensor_copy(X, self._dtype)

    def _chunk(self, t: torch.Tensor, X: np.ndarray, y: np.ndarray, scale: float, g: torch.Tensor | None) -> float:
        """scale · Σ CE over the rows; if ``g`` is given, adds scale · ∇(Σ CE) to it in place."""
        W1, b1, W2, b2 = self._views(t)
        Xt = self._rows(X)
        yt = torch.from_numpy(y)
        h = torch.addmm(b1, Xt, W1.T).clamp_min_(0.0)  # relu(W1 x + b1)
        logp = torch.log_softmax(torch.addmm(b2, h, W2.T), dim=1)
        rows = torch.arange(len(yt))
        ce = -float(logp[rows, yt].sum(dtype=torch.float64)) * scale
        if g is not None:
            gW1, gb1, gW2, gb2 = self._views(g)
            r = logp.exp_()  # softmax, reusing the buffer
            r[rows, yt] -= 1.0  # ∂CE/∂logits
            r.mul_(scale)
            gW2.addmm_(r.T, h)
            gb2.add_(r.sum(dim=0))
            dh = torch.mm(r, W2).mul_(h > 0)  # back through the ReLU (subgradient 0 at 0)
            gW1.addmm_(dh.T, Xt)
            gb1.add_(dh.sum(dim=0))
        return ce

    def _checked(
        self, theta: np.ndarray, X: np.ndarray, y: np.ndarray, keep_float32: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        theta = np.asarray(theta)
        if not (keep_float32 and theta.dtype == np.float32):
            theta = np.asarray(theta, dtype=np.float64)
        X = np.ascontiguousarray(X, dtype=np.float64)
        y = np.ascontiguousarray(y, dtype=np.int64)
        check_shapes(theta, X, y, self.dim, self.n_features, self.n_classes)
        return theta, X, y

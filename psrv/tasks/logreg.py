"""L2-regularised multinomial logistic (softmax) regression, split over M workers.

Objective as in LAQ (Sun, Giannakis, Chen, Yang, NeurIPS 2019, eq. 1), f(θ) = Σ_m f_m(θ),
scaled so the sum is the usual mean objective:

    f_m(θ) = (1/N) Σ_{n ∈ shard m} CE(softmax(W x_n + b), y_n) + (λ / 2M) ||θ||²

N = total training samples over all workers, M = number of workers, hence
Σ_m f_m = mean cross-entropy + (λ/2)||θ||². The penalty covers all of θ, bias included.

θ is flat float64 of length (n_features + 1) * n_classes: W (n_classes × n_features,
row-major) then b (n_classes). Computation is torch float64 on views of the numpy
arrays (no copies for float64 C-contiguous input); the gradient is the closed form
(softmax − onehot)ᵀ [X, 1] / N, not autograd, which is several times faster.

Sparse data (at most ``SPARSE_DENSITY`` of X nonzero, e.g. MNIST's pixels: 19%) passed as a
read-only array -- the caller's promise that it does not change, as a worker's view of its shard
-- takes its two products with X and Xᵀ in compressed sparse rows (torch, built from scipy's CSR once
per array while it lives): on a 400-row MNIST shard 0.5 ms instead of 1.2-1.3 ms of CPU per
gradient (scipy's products: 0.6 ms), the same float64 arithmetic in another summation order (equal
to ~1e-17), and torch's products release the GIL.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from psrv.tasks.base import ZeroInit, check_shapes, check_split, l2_penalty, set_int_fields, set_l2

#: the largest fraction of nonzeros at which the products with X go sparse (measured: 2.2x faster at 19%)
SPARSE_DENSITY = 0.3
_SPARSE_MIN_SIZE = 4096  # below this many entries the dense products cost less than the sparse call overhead
_sparse_cache: dict[int, tuple[weakref.ref, Any]] = {}  # id(X) -> (X, its CSR form or None: dense is better)


def sparse_rows(X: np.ndarray) -> Any:
    """X as a scipy CSR matrix if it is read-only, sparse enough and big enough, else None; made once
    per array (dropped with it). Only read-only arrays: the caller's promise that the values do not
    change between calls (writes through another, writeable view of the same memory would go unseen)."""
    if X.flags.writeable or X.size < _SPARSE_MIN_SIZE:
        return None
    key = id(X)
    hit = _sparse_cache.get(key)
    if hit is not None and hit[0]() is X:
        return hit[1]
    csr = products = None
    if np.count_nonzero(X) <= SPARSE_DENSITY * X.size:
        import scipy.sparse

        csr = scipy.sparse.csr_matrix(X)
        products = (_torch_csr(csr), _torch_csr(csr.T.tocsr()))
    _sparse_cache[key] = (weakref.ref(X, lambda _ref, key=key: _sparse_cache.pop(key, None)), csr, products)
    return csr


def _torch_csr(m: Any) -> torch.Tensor:
    """A scipy CSR matrix (sorted indices) as a torch sparse CSR tensor on the same memory."""
    index = np.int32 if m.indices.dtype == np.int32 and m.indptr.dtype == np.int32 else np.int64
    with warnings.catch_warnings():  # torch's sparse CSR is flagged beta; its product with a dense matrix is all we use
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(np.asarray(m.indptr, dtype=index)),
            torch.from_numpy(np.asarray(m.indices, dtype=index)),
            torch.from_numpy(np.asarray(m.data, dtype=np.float64)),
            size=m.shape,
        )


def _sparse_products(X: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
    """X and Xᵀ as torch sparse CSR tensors (X on the memory of its scipy CSR; Xᵀ one more copy of
    the nonzeros), or None: the dense products (see :func:`sparse_rows`). torch's CSR product
    releases the GIL (scipy's does not), so the logical workers of one host (worker.host) compute
    their gradients on every core, and it costs ~0.14 instead of ~0.2 ms per product on a 400-row
    MNIST shard (0.46-0.5 ms per gradient); each output entry sums the same terms in the same order
    as scipy's ``csr_matvecs``/``csc_matvecs`` (row by row, nonzeros in column order): bit for bit."""
    if sparse_rows(X) is None:
        return None
    return _sparse_cache[id(X)][2]


@dataclass(frozen=True)
class LogReg(ZeroInit):
    n_features: int
    n_classes: int
    l2: float = 0.01
    name: ClassVar[str] = "logreg"

    def __post_init__(self) -> None:
        set_int_fields(self, (("n_features", 1), ("n_classes", 2)))
        set_l2(self)

    @property
    def dim(self) -> int:
        return (self.n_features + 1) * self.n_classes

    # ------------------------------------------------------------------ objective

    def local_loss_grad(
        self, theta: np.ndarray, X: np.ndarray, y: np.ndarray, total_samples: int, num_workers: int
    ) -> tuple[float, np.ndarray]:
        """f_m(θ) and ∇f_m(θ) (float64, shape (dim,)) for this worker's rows X, y."""
        check_split(X, total_samples, num_workers)
        theta, X, y = self._checked(theta, X, y)
        loss, grad = l2_penalty(theta, self.l2, num_workers)
        if len(X):
            loss += self._data_term(theta, X, y, 1.0 / total_samples, grad)
        return loss, grad

    def loss(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        """Full objective on (X, y): mean CE + (λ/2)||θ||²; NaN for empty data."""
        theta, X, y = self._checked(theta, X, y)
        if not len(X):
            return float("nan")
        return self._data_term(theta, X, y, 1.0 / len(X), None) + 0.5 * self.l2 * float(theta @ theta)

    def accuracy(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        """Fraction of rows whose arg-max logit (first on ties) equals y; NaN for empty data."""
        theta, X, y = self._checked(theta, X, y)
        if not len(X):
            return float("nan")
        W, b = self._unflatten(theta)
        return float(np.mean(np.argmax(X @ W.T + b, axis=1) == y))

    def smoothness(self, X: np.ndarray) -> float:
        """Upper bound L on the Lipschitz constant of ∇(mean CE + (λ/2)||θ||²).

        Per sample the Hessian is (diag(p) − ppᵀ) ⊗ x̃x̃ᵀ with x̃ = [x, 1]; by Gershgorin
        λ_max(diag(p) − ppᵀ) ≤ max_i 2 p_i (1 − p_i) ≤ 1/2, so the Hessian of the mean is
        ≼ ½ I ⊗ (1/N) X̃ᵀX̃ and L = ½ λ_max((1/N) X̃ᵀX̃) + λ.
        """
        X = np.asarray(X, dtype=np.float64)
        n, d = X.shape
        if n == 0:
            return self.l2
        gram = np.empty((d + 1, d + 1))
        gram[:d, :d] = X.T @ X
        gram[:d, d] = gram[d, :d] = X.sum(axis=0)
        gram[d, d] = n
        return 0.5 * float(np.linalg.eigvalsh(gram)[-1]) / n + self.l2

    # ------------------------------------------------------------------ internals

    def _unflatten(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = self.n_classes * self.n_features
        return theta[:k].reshape(self.n_classes, self.n_features), theta[k:]

    def _checked(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        theta = np.ascontiguousarray(theta, dtype=np.float64)  # copies only if not float64
        X = np.ascontiguousarray(X, dtype=np.float64)
        y = np.ascontiguousarray(y, dtype=np.int64)
        check_shapes(theta, X, y, self.dim, self.n_features, self.n_classes)
        return theta, X, y

    def _data_term(
        self, theta: np.ndarray, X: np.ndarray, y: np.ndarray, scale: float, grad: np.ndarray | None
    ) -> float:
        """scale · Σ CE; if ``grad`` is given, adds scale · ∇(Σ CE) to it in place."""
        k = self.n_classes * self.n_features
        t, yt = torch.from_numpy(theta), torch.from_numpy(y)
        W, b = t[:k].view(self.n_classes, self.n_features), t[k:]
        csr = _sparse_products(X)
        if csr is None:
            if X.flags.writeable:
                Xt = torch.from_numpy(X)
            else:
                with warnings.catch_warnings():  # torch warns that it cannot protect a read-only X; it is only read
                    warnings.simplefilter("ignore", UserWarning)
                    Xt = torch.from_numpy(X)
            logits = torch.addmm(b, Xt, W.T)
        else:
            logits = torch.mm(csr[0], W.T.contiguous()).add_(b)
        logp = torch.log_softmax(logits, dim=1)
        ce = float(F.nll_loss(logp, yt, reduction="sum")) * scale
        if grad is not None:
            r = logp.exp_()  # softmax, reusing the buffer
            r[torch.arange(len(yt)), yt] -= 1.0  # softmax − onehot
            g = torch.from_numpy(grad)
            if csr is None:
                g[:k].view(self.n_classes, self.n_features).addmm_(r.T, Xt, alpha=scale)
            else:  # (Xᵀ r)ᵀ, with Xᵀ kept in CSR too
                g[:k].view(self.n_classes, self.n_features).add_(torch.mm(csr[1], r).T, alpha=scale)
            g[k:].add_(r.sum(dim=0), alpha=scale)
        return ce

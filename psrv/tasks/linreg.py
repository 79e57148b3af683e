"""L2-regularised least-squares linear regression, split over M workers.

The LAG experiments' linear regression (Chen et al., NeurIPS 2018), in the same
conventions as ``LogReg``: f(θ) = Σ_m f_m(θ) with

    f_m(θ) = (1/N) Σ_{n ∈ shard m} ½ (wᵀx_n + b − y_n)² + (λ / 2M) ||θ||²

N = total training samples over all workers, M = number of workers, so Σ_m f_m = mean of
½ squared residuals + (λ/2)||θ||². The penalty covers all of θ, bias included.

θ is flat float64 of length n_features + 1: w, then b. Targets are real numbers
(``Dataset.n_classes == 0``), so the task insists on ``n_classes == 0``. Computation is
numpy float64 (two matrix-vector products per gradient). ``accuracy`` is the coefficient
of determination R² = 1 − Σ(y − ŷ)² / Σ(y − ȳ)² (scikit-learn's ``r2_score`` convention for
constant targets: 1.0 if predicted exactly, else 0.0), so "higher is better" still holds.
``l2`` defaults to 0 as in the LAG authors' script (``lambda=0.000``).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import ClassVar

import numpy as np

from psrv.tasks.base import ZeroInit, check_shapes, check_split, l2_penalty, set_int_fields, set_l2


@dataclass(frozen=True)
class LinReg(ZeroInit):
    n_features: int
    n_classes: int = 0
    l2: float = 0.0
    name: ClassVar[str] = "linreg"

    def __post_init__(self) -> None:
        set_int_fields(self, (("n_features", 1),))
        if not isinstance(self.n_classes, Integral) or isinstance(self.n_classes, bool) or self.n_classes != 0:
            raise ValueError(
                f"linreg: n_classes must be 0 (real-valued regression targets), got {self.n_classes!r}; "
                "load the data as regression (a regression built-in, or a file with regression=True)"
            )
        object.__setattr__(self, "n_classes", 0)
        set_l2(self)

    @property
    def dim(self) -> int:
        return self.n_features + 1

    # ------------------------------------------------------------------ objective

    def local_loss_grad(
        self, theta: np.ndarray, X: np.ndarray, y: np.ndarray, total_samples: float, num_workers: int
    ) -> tuple[float, np.ndarray]:
        """f_m(θ) and ∇f_m(θ) (float64, shape (dim,)) for this worker's rows X, y."""
        check_split(X, total_samples, num_workers)
        theta, X, y = self._checked(theta, X, y)
        loss, grad = l2_penalty(theta, self.l2, num_workers)
        if len(X):
            r = self._residuals(theta, X, y)
            scale = 1.0 / total_samples
            loss += 0.5 * scale * float(r @ r)
            grad[:-1] += scale * (r @ X)
            grad[-1] += scale * float(r.sum())
        return loss, grad

    def loss(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        """Full objective on (X, y): mean ½ squared residual + (λ/2)||θ||²; NaN for empty data."""
        theta, X, y = self._checked(theta, X, y)
        if not len(X):
            return float("nan")
        r = self._residuals(theta, X, y)
        return 0.5 * float(r @ r) / len(X) + 0.5 * self.l2 * float(theta @ theta)

    def accuracy(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        """The coefficient of determination R² of the predictions on (X, y); NaN for empty data."""
        theta, X, y = self._checked(theta, X, y)
        if not len(X):
            return float("nan")
        r = self._residuals(theta, X, y)
        ss_res = float(r @ r)
        dev = y - y.mean()
        ss_tot = float(dev @ dev)
        if ss_tot == 0.0:
            return 1.0 if ss_res == 0.0 else 0.0
        return 1.0 - ss_res / ss_tot

    def smoothness(self, X: np.ndarray) -> float:
        """The Lipschitz constant of ∇(mean ½ squared residual + (λ/2)||θ||²) on X, exactly.

        The Hessian is constant, (1/n) X̃ᵀX̃ + λI with x̃ = [x, 1], so L = λ_max((1/n) X̃ᵀX̃) + λ
        (a worker's f_m has Hessian (n_m/N) times that of its own mean objective).
        """
        X = np.asarray(X, dtype=np.float64)
        n, d = X.shape
        if n == 0:
            return self.l2
        gram = np.empty((d + 1, d + 1))
        gram[:d, :d] = X.T @ X
        gram[:d, d] = gram[d, :d] = X.sum(axis=0)
        gram[d, d] = n
        return float(np.linalg.eigvalsh(gram)[-1]) / n + self.l2

    def local_smoothness(self, X: np.ndarray, total_samples: float, num_workers: int) -> float:
        """The exact Lipschitz constant of ∇f_m for a worker holding rows X (the L_m that LAG's
        server-side rule and the server's secant estimate refer to):
        λ_max(X̃ᵀX̃) / N + λ / M = (n_m / N) (``smoothness(X)`` − λ) + λ / M."""
        check_split(X, total_samples, num_workers)
        return len(X) / total_samples * (self.smoothness(X) - self.l2) + self.l2 / num_workers

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _residuals(theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = X @ theta[:-1]
        r += theta[-1] - y
        return r

    def _checked(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        theta = np.ascontiguousarray(theta, dtype=np.float64)
        X = np.ascontiguousarray(X, dtype=np.float64)
        y = np.ascontiguousarray(y, dtype=np.float64)
        check_shapes(theta, X, y, self.dim, self.n_features)
        return theta, X, y

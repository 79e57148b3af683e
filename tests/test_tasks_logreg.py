"""psrv.tasks.logreg: the logreg task (softmax regression with an L2 term), gradients and steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psrv.data import load_builtin, shard_indices
from psrv.tasks import TASKS, LogReg, Task, make_task


def _problem(n: int = 40, d: int = 5, c: int = 4, seed: int = 0) -> tuple[LogReg, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    task = LogReg(n_features=d, n_classes=c, l2=0.1)
    X = rng.normal(size=(n, d))
    y = rng.integers(0, c, size=n)
    theta = rng.normal(size=task.dim)
    return task, X, y, theta


def test_shapes_and_init() -> None:
    task = LogReg(n_features=784, n_classes=10)
    assert task.dim == 7850 and task.name == "logreg"
    theta = task.init_params(np.random.default_rng(0))
    assert theta.shape == (7850,) and theta.dtype == np.float64 and not theta.any()
    assert isinstance(task, Task)


def test_gradient_matches_finite_differences() -> None:
    task, X, y, theta = _problem()
    _, grad = task.local_loss_grad(theta, X, y, total_samples=len(X), num_workers=1)
    eps = 1e-6
    E = np.eye(task.dim) * eps
    fd = np.array([task.loss(theta + e, X, y) - task.loss(theta - e, X, y) for e in E]) / (2 * eps)
    assert np.linalg.norm(grad - fd) / np.linalg.norm(fd) < 1e-6


def test_gradient_matches_autograd() -> None:
    task, X, y, theta = _problem(seed=1)
    loss, grad = task.local_loss_grad(theta, X, y, total_samples=len(X), num_workers=1)
    t = torch.tensor(theta, requires_grad=True)
    W, b = t[: 5 * 4].view(4, 5), t[5 * 4 :]
    logits = torch.from_numpy(X) @ W.T + b
    ref = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)) + 0.5 * task.l2 * (t @ t)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-13)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-12, atol=1e-14)


def test_worker_terms_sum_to_full_objective() -> None:
    task, X, y, theta = _problem(n=60, seed=2)
    parts = shard_indices(len(X), y, 3, "dirichlet", seed=0)
    terms = [task.local_loss_grad(theta, X[p], y[p], total_samples=len(X), num_workers=3) for p in parts]
    full_loss, full_grad = task.local_loss_grad(theta, X, y, total_samples=len(X), num_workers=1)
    assert sum(t[0] for t in terms) == pytest.approx(full_loss, rel=1e-13)
    assert task.loss(theta, X, y) == pytest.approx(full_loss, rel=1e-13)
    np.testing.assert_allclose(sum(t[1] for t in terms), full_grad, rtol=1e-12, atol=1e-14)


def test_float32_theta_and_empty_shard() -> None:
    task, X, y, theta = _problem(seed=3)
    l32, g32 = task.local_loss_grad(theta.astype(np.float32), X, y, len(X), 2)
    l64, g64 = task.local_loss_grad(theta.astype(np.float32).astype(np.float64), X, y, len(X), 2)
    assert g32.dtype == np.float64 and l32 == l64
    np.testing.assert_array_equal(g32, g64)
    loss, grad = task.local_loss_grad(theta, X[:0], y[:0], total_samples=len(X), num_workers=4)
    assert loss == pytest.approx(0.5 * task.l2 / 4 * theta @ theta, rel=1e-14)
    np.testing.assert_allclose(grad, task.l2 / 4 * theta, rtol=1e-15)


def test_inputs_not_modified() -> None:
    task, X, y, theta = _problem(seed=4)
    copies = theta.copy(), X.copy(), y.copy()
    task.local_loss_grad(theta, X, y, len(X), 1)
    for a, b in zip((theta, X, y), copies, strict=True):
        np.testing.assert_array_equal(a, b)


def test_zero_model_accuracy_and_loss() -> None:
    task, X, _, _ = _problem(n=50)
    y = np.array([0] * 20 + [1, 2, 3] * 10)
    zero = task.init_params(np.random.default_rng(0))
    assert task.accuracy(zero, X, y) == 0.4  # all logits tie -> class 0
    assert task.loss(zero, X, y) == pytest.approx(np.log(4), rel=1e-14)
    assert np.isnan(task.accuracy(zero, X[:0], y[:0]))


def test_gd_with_inverse_smoothness_step_decreases_loss() -> None:
    ds = load_builtin("digits")
    task = LogReg(ds.n_features, ds.n_classes, l2=0.01)
    step = 1.0 / task.smoothness(ds.X)
    theta = task.init_params(np.random.default_rng(0))
    losses = []
    for _ in range(50):
        loss, grad = task.local_loss_grad(theta, ds.X, ds.y, len(ds), 1)
        losses.append(loss)
        theta = theta - step * grad
    assert np.all(np.diff(losses) < 0)
    assert losses[-1] < 0.75 * losses[0]


def test_smoothness_bounds_gradient_lipschitz_ratio() -> None:
    task, X, y, _ = _problem(n=200, d=6, c=5, seed=5)
    L = task.smoothness(X)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.normal(size=(2, task.dim)) * rng.uniform(0.01, 3)
        ga = task.local_loss_grad(a, X, y, len(X), 1)[1]
        gb = task.local_loss_grad(b, X, y, len(X), 1)[1]
        assert np.linalg.norm(ga - gb) <= L * np.linalg.norm(a - b)


def test_bad_inputs() -> None:
    task, X, y, theta = _problem()
    with pytest.raises(ValueError, match="theta must have shape"):
        task.local_loss_grad(theta[:-1], X, y, len(X), 1)
    with pytest.raises(ValueError, match="X must have shape"):
        task.loss(theta, X[:, :-1], y)
    with pytest.raises(ValueError, match="labels must be in"):
        task.loss(theta, X, y + 4)
    with pytest.raises(ValueError, match="total_samples"):
        task.local_loss_grad(theta, X, y, len(X) - 1, 1)


def test_make_task() -> None:
    assert TASKS["logreg"] is LogReg
    task = make_task("logreg", 3, 2, l2="0.5")
    assert task == LogReg(3, 2, 0.5)
    with pytest.raises(ValueError, match="known: logreg, linreg, mlp"):
        make_task("svm", 3, 2)
    with pytest.raises(ValueError, match="unknown option.*lr; valid: l2"):
        make_task("logreg", 3, 2, lr=0.1)
    with pytest.raises(ValueError, match="l2 must be"):
        make_task("logreg", 3, 2, l2=-1)
    with pytest.raises(ValueError, match="n_classes must be"):
        make_task("logreg", 3, 1)


def test_sparse_read_only_data_gives_the_dense_gradient() -> None:
    """A read-only X with few nonzeros takes the CSR products (kept while X lives); loss and gradient
    equal the dense path's to rounding, and a writeable or dense X stays on the dense path."""
    from psrv.tasks import logreg

    rng = np.random.default_rng(3)
    task = LogReg(n_features=200, n_classes=10, l2=0.1)
    X = rng.normal(size=(120, 200)) * (rng.random((120, 200)) < 0.15)  # 15% nonzero, like MNIST's 19%
    y = rng.integers(0, 10, size=120)
    theta = rng.normal(size=task.dim) * 0.1
    dense = task.local_loss_grad(theta, X, y, total_samples=500, num_workers=4)
    assert logreg.sparse_rows(X) is None  # writeable: could change between calls
    frozen = X.copy()
    frozen.setflags(write=False)
    csr = logreg.sparse_rows(frozen)
    assert csr is not None and csr.nnz == np.count_nonzero(X) and logreg.sparse_rows(frozen) is csr
    loss, grad = task.local_loss_grad(theta, frozen, y, total_samples=500, num_workers=4)
    assert loss == pytest.approx(dense[0], rel=1e-14)
    np.testing.assert_allclose(grad, dense[1], rtol=1e-13, atol=1e-17)
    assert task.loss(theta, frozen, y) == pytest.approx(task.loss(theta, X, y), rel=1e-14)
    full = rng.normal(size=(120, 200))
    full.setflags(write=False)
    assert logreg.sparse_rows(full) is None  # dense data: the dense products are faster
    key = id(frozen)
    del frozen
    assert key not in logreg._sparse_cache  # dropped with its array


def test_sparse_products_equal_scipys_bit_for_bit() -> None:
    """The torch CSR products of the sparse path give exactly scipy's CSR/CSC products (the same
    terms summed in the same order), so the gradient did not change when they replaced scipy's."""
    import torch

    from psrv.tasks import logreg

    rng = np.random.default_rng(5)
    X = rng.normal(size=(300, 400)) * (rng.random((300, 400)) < 0.2)
    X.setflags(write=False)
    csr = logreg.sparse_rows(X)
    fwd, bwd = logreg._sparse_products(X)
    W = rng.normal(size=(400, 10)) * 10.0 ** rng.uniform(-6, 2, size=(400, 10))
    r = rng.normal(size=(300, 10)) * 10.0 ** rng.uniform(-6, 2, size=(300, 10))
    assert np.array_equal(torch.mm(fwd, torch.from_numpy(W)).numpy(), csr @ W)
    assert np.array_equal(torch.mm(bwd, torch.from_numpy(r)).numpy(), csr.T @ r)

"""psrv.tasks.mlp: the mlp task (the SASG MNIST net), float64 and float32 paths."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from psrv.data import load_builtin, shard_indices
from psrv.tasks import MLP, TASKS, Task, make_task
from tests.helpers.grad import fd_grad


def _mlp_problem(n: int = 12, d: int = 5, h: int = 4, c: int = 3, seed: int = 0, l2: float = 0.1, precision=64):
    rng = np.random.default_rng(seed)
    task = make_task("mlp", d, c, hidden=h, l2=l2, precision=precision)
    X = rng.normal(size=(n, d))
    y = rng.integers(0, c, size=n)
    theta = task.init_params(rng) + 0.1 * rng.normal(size=task.dim)
    return task, X, y, theta


def test_mlp_registered_shapes_and_options() -> None:
    assert TASKS["mlp"] is MLP
    task = make_task("mlp", 784, 10)
    assert (task.hidden, task.l2, task.precision) == (512, 0.0, 32)
    assert task.dim == 784 * 512 + 512 + 512 * 10 + 10 == 407_050 and isinstance(task, Task)
    # Options arrive as doubles (or strings) from the wire and the CLI.
    assert make_task("mlp", 784, 10, hidden=200.0, l2=0.01) == MLP(784, 10, 200, 0.01)
    assert make_task("mlp", 4, 2, hidden="8", precision=64.0).hidden == 8
    for bad, match in [
        ({"hidden": 2.5}, "hidden must be an integer"),
        ({"hidden": 0}, "hidden must be an integer >= 1"),
        ({"hidden": "x"}, "hidden must be an integer"),
        ({"precision": 16}, "precision must be 32 or 64"),
        ({"l2": -0.1}, "l2 must be"),
        ({"lr": 0.1}, "unknown option.*lr; valid: hidden, l2, precision"),
    ]:
        with pytest.raises(ValueError, match=match):
            make_task("mlp", 4, 2, **bad)
    with pytest.raises(ValueError, match="n_classes must be an integer >= 2"):
        make_task("mlp", 4, 0)


def test_mlp_gradient_matches_finite_differences_and_autograd() -> None:
    task, X, y, theta = _mlp_problem()
    loss, grad = task.local_loss_grad(theta, X, y, total_samples=len(X), num_workers=1)
    fd = fd_grad(lambda t: task.loss(t, X, y), theta, 1e-6)
    assert np.linalg.norm(grad - fd) / np.linalg.norm(fd) < 1e-7
    t = torch.tensor(theta, requires_grad=True)
    W1, b1 = t[:20].view(4, 5), t[20:24]
    W2, b2 = t[24:36].view(3, 4), t[36:]
    logits = torch.relu(torch.from_numpy(X) @ W1.T + b1) @ W2.T + b2
    ref = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)) + 0.5 * task.l2 * (t @ t)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-13)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-11, atol=1e-14)


def test_mlp_float32_path_agrees_with_float64() -> None:
    t64, X, y, theta = _mlp_problem(n=40, d=30, h=16, c=5, seed=1)
    t32 = make_task("mlp", 30, 5, hidden=16, l2=0.1)
    l64, g64 = t64.local_loss_grad(theta, X, y, 100, 3)
    l32, g32 = t32.local_loss_grad(theta, X, y, 100, 3)
    assert g32.dtype == np.float64 and g32.shape == (t32.dim,)
    assert l32 == pytest.approx(l64, rel=1e-5)
    assert np.linalg.norm(g32 - g64) / np.linalg.norm(g64) < 1e-5
    assert t32.accuracy(theta, X, y) == t64.accuracy(theta, X, y)
    # A read-only float32 θ, as a worker decodes the broadcast: used as is, no warnings.
    ro = theta.astype(np.float32)
    ro.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gr = t32.local_loss_grad(ro, X, y, 100, 3)[1]
        up = ro.astype(np.float64)
        assert t32.loss(ro, X, y) == t32.loss(up, X, y) and t32.accuracy(ro, X, y) == t32.accuracy(up, X, y)
    ref = t64.local_loss_grad(up, X, y, 100, 3)[1]
    assert np.linalg.norm(gr - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.parametrize("precision", [64, 32])
def test_mlp_worker_terms_sum_to_full_objective(precision: int) -> None:
    task, X, y, theta = _mlp_problem(n=60, d=8, h=6, c=4, seed=2, precision=precision)
    parts = shard_indices(len(X), y, 3, "dirichlet", seed=0)
    terms = [task.local_loss_grad(theta, X[p], y[p], total_samples=len(X), num_workers=3) for p in parts]
    full_loss, full_grad = task.local_loss_grad(theta, X, y, total_samples=len(X), num_workers=1)
    rtol = 1e-12 if precision == 64 else 1e-5
    assert sum(t[0] for t in terms) == pytest.approx(full_loss, rel=rtol)
    assert task.loss(theta, X, y) == pytest.approx(full_loss, rel=rtol)
    np.testing.assert_allclose(sum(t[1] for t in terms), full_grad, rtol=rtol, atol=rtol * 1e-2)


def test_mlp_init_is_seeded_by_the_numpy_rng_only() -> None:
    task = make_task("mlp", 784, 10)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = task.init_params(np.random.default_rng(5))
    assert torch.equal(torch.get_rng_state(), state)  # torch's global RNG is neither used nor advanced
    torch.manual_seed(1)
    np.testing.assert_array_equal(a, task.init_params(np.random.default_rng(5)))
    assert not np.array_equal(a, task.init_params(np.random.default_rng(6)))
    assert a.dtype == np.float64 and a.shape == (task.dim,)
    W1, b1, W2, b2 = (v.numpy() for v in task._views(torch.from_numpy(a)))
    assert not b1.any() and not b2.any()
    assert 0.9 * np.sqrt(6 / 784) < np.abs(W1).max() <= np.sqrt(6 / 784)  # He uniform
    assert 0.9 * np.sqrt(6 / 522) < np.abs(W2).max() <= np.sqrt(6 / 522)  # Glorot uniform


def test_mlp_empty_shard_float32_theta_and_inputs_untouched() -> None:
    task, X, y, theta = _mlp_problem(seed=4)
    loss, grad = task.local_loss_grad(theta, X[:0], y[:0], total_samples=len(X), num_workers=4)
    assert loss == pytest.approx(0.5 * task.l2 / 4 * theta @ theta, rel=1e-14)
    np.testing.assert_allclose(grad, task.l2 / 4 * theta, rtol=1e-15)
    copies = theta.copy(), X.copy(), y.copy()
    task.local_loss_grad(theta, X, y, len(X), 1)
    for a, b in zip((theta, X, y), copies, strict=True):
        np.testing.assert_array_equal(a, b)
    g32 = task.local_loss_grad(theta.astype(np.float32), X, y, len(X), 2)[1]
    g64 = task.local_loss_grad(theta.astype(np.float32).astype(np.float64), X, y, len(X), 2)[1]
    np.testing.assert_array_equal(g32, g64)
    with pytest.raises(ValueError, match="labels must be in"):
        task.loss(theta, X, y + 3)
    with pytest.raises(ValueError, match="theta must have shape"):
        task.local_loss_grad(theta[:-1], X, y, len(X), 1)
    assert np.isnan(task.accuracy(theta, X[:0], y[:0]))


def test_mlp_sgd_on_digits_reduces_loss() -> None:
    ds = load_builtin("digits")
    task = make_task("mlp", ds.n_features, ds.n_classes, hidden=64)
    theta = task.init_params(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    start, acc0 = task.loss(theta, ds.X, ds.y), task.accuracy(theta, ds.X, ds.y)
    M, B = 10, 10
    for _ in range(300):  # minibatch SGD as a worker runs it: total N*B/n with n = N here
        rows = rng.choice(len(ds), B, replace=False)
        _, grad = task.local_loss_grad(theta, ds.X[rows], ds.y[rows], B, M)
        theta = theta - 0.2 * grad
    end, acc = task.loss(theta, ds.X, ds.y), task.accuracy(theta, ds.X, ds.y)
    assert end < 0.3 * start and acc > 0.85 > acc0


def test_mlp_minibatch_gradient_on_the_sasg_net() -> None:
    """The SASG MNIST net on a batch of 10, as a worker computes it every round. Its time (about
    0.5 ms on an idle core) is a benchmark's business: on 2 shared cores a test saw 1.6 ms."""
    task = make_task("mlp", 784, 10, l2=0.01)
    rng = np.random.default_rng(0)
    theta = task.init_params(rng)
    X, y = rng.uniform(size=(10, 784)), rng.integers(0, 10, size=10)
    loss, grad = task.local_loss_grad(theta, X, y, 4000 * 10 / 400, 10)
    assert grad.shape == (task.dim,) and grad.dtype == np.float64
    assert np.isfinite(grad).all() and grad.any() and np.isfinite(loss) and loss > 0

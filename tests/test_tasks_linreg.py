"""The linreg and mlp tasks, and the linreg-hetero data they were built for."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch

from psrv.data import linreg_hetero_smoothness, load, load_builtin, shard, shard_indices
from psrv.tasks import MLP, TASKS, LinReg, Task, make_task
from worker.client import WorkerConfig, load_worker_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def hetero():
    return load("linreg-hetero")


def _fd_grad(f, theta: np.ndarray, eps: float) -> np.ndarray:
    E = np.eye(len(theta)) * eps
    return np.array([f(theta + e) - f(theta - e) for e in E]) / (2 * eps)


# ----------------------------------------------------------------------------- linreg


def _linreg_problem(n: int = 30, d: int = 4, seed: int = 0, l2: float = 0.1):
    rng = np.random.default_rng(seed)
    task = make_task("linreg", d, 0, l2=l2)
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + 1.0
    y = X @ rng.normal(size=d) + rng.normal(size=n)
    return task, X, y, rng.normal(size=task.dim)


def test_linreg_registered_and_validated() -> None:
    assert TASKS["linreg"] is LinReg
    task = make_task("linreg", 7, 0, l2="0.5")
    assert task == LinReg(7, 0, 0.5) and task.dim == 8 and task.name == "linreg" and isinstance(task, Task)
    theta = task.init_params(np.random.default_rng(0))
    assert theta.shape == (8,) and theta.dtype == np.float64 and not theta.any()
    assert make_task("linreg", 3, 0).l2 == 0.0
    with pytest.raises(ValueError, match="n_classes must be 0"):
        make_task("linreg", 3, 10)
    with pytest.raises(ValueError, match="l2 must be"):
        make_task("linreg", 3, 0, l2=-1)
    with pytest.raises(ValueError, match="unknown option.*hidden; valid: l2"):
        make_task("linreg", 3, 0, hidden=3)


def test_linreg_gradient_matches_finite_differences_and_closed_form() -> None:
    task, X, y, theta = _linreg_problem()
    loss, grad = task.local_loss_grad(theta, X, y, total_samples=len(X), num_workers=1)
    fd = _fd_grad(lambda t: task.loss(t, X, y), theta, 1e-5)
    assert np.linalg.norm(grad - fd) / np.linalg.norm(fd) < 1e-8
    Xt = np.column_stack([X, np.ones(len(X))])
    r = Xt @ theta - y
    assert loss == pytest.approx(0.5 * r @ r / len(X) + 0.05 * theta @ theta, rel=1e-13)
    np.testing.assert_allclose(grad, Xt.T @ r / len(X) + 0.1 * theta, rtol=1e-12)


def test_linreg_worker_terms_sum_to_full_objective(hetero) -> None:
    task = make_task("linreg", hetero.n_features, hetero.n_classes, l2=0.01)
    theta = np.random.default_rng(1).normal(size=task.dim)
    M = 10
    terms = [
        task.local_loss_grad(theta, part.X, part.y, len(hetero), M)
        for part in (shard(hetero, m, M, "contiguous") for m in range(M))
    ]
    full_loss, full_grad = task.local_loss_grad(theta, hetero.X, hetero.y, len(hetero), 1)
    assert sum(t[0] for t in terms) == pytest.approx(full_loss, rel=1e-12)
    assert task.loss(theta, hetero.X, hetero.y) == pytest.approx(full_loss, rel=1e-12)
    np.testing.assert_allclose(sum(t[1] for t in terms), full_grad, rtol=1e-10, atol=1e-12)


def test_linreg_smoothness_is_exact_and_step_one_over_L_descends() -> None:
    task, X, y, _ = _linreg_problem(n=80, d=6, seed=3, l2=0.05)
    L = task.smoothness(X)
    zero = np.zeros(task.dim)
    g0 = task.local_loss_grad(zero, X, y, len(X), 1)[1]
    # The objective is quadratic: column i of the Hessian is grad(e_i) - grad(0).
    H = np.column_stack([task.local_loss_grad(e, X, y, len(X), 1)[1] - g0 for e in np.eye(task.dim)])
    assert L == pytest.approx(np.linalg.eigvalsh((H + H.T) / 2)[-1], rel=1e-10)

    def run(step: float, iters: int = 60) -> list[float]:
        theta, losses = zero.copy(), []
        for _ in range(iters):
            loss, grad = task.local_loss_grad(theta, X, y, len(X), 1)
            losses.append(loss)
            theta = theta - step * grad
        return losses

    losses = run(1.0 / L)
    assert np.all(np.diff(losses) < 0) and losses[-1] < 0.5 * losses[0]
    assert run(2.2 / L)[-1] > losses[0]  # L is tight: a step beyond 2/L diverges


def test_linreg_r2_accuracy() -> None:
    task, X, y, theta = _linreg_problem(l2=0.0)
    Xt = np.column_stack([X, np.ones(len(X))])
    best = np.linalg.lstsq(Xt, y, rcond=None)[0]
    r = Xt @ best - y
    r2 = task.accuracy(best, X, y)
    assert r2 == pytest.approx(1 - r @ r / np.sum((y - y.mean()) ** 2), rel=1e-12) and 0.5 < r2 < 1
    assert task.accuracy(np.r_[np.zeros(4), y.mean()], X, y) == pytest.approx(0.0, abs=1e-12)
    assert task.accuracy(theta, X, y) < r2
    np.testing.assert_allclose(task.local_loss_grad(best, X, y, len(X), 1)[1], 0, atol=1e-12)
    assert task.accuracy(np.r_[np.zeros(4), 2.0], X, np.full(len(X), 2.0)) == 1.0  # constant target, exact
    assert np.isnan(task.accuracy(theta, X[:0], y[:0])) and np.isnan(task.loss(theta, X[:0], y[:0]))
    loss, grad = task.local_loss_grad(theta, X[:0], y[:0], len(X), 4)  # empty shard: the penalty only
    assert loss == 0.0 and not grad.any()


def test_linreg_hetero_blocks_and_smoothness(hetero) -> None:
    task = make_task("linreg", hetero.n_features, hetero.n_classes)
    blocks = [hetero.subset(np.arange(50 * m, 50 * m + 50)) for m in range(10)]
    L = np.array([task.smoothness(b.X) for b in blocks])
    np.testing.assert_allclose(L, [linreg_hetero_smoothness(m) for m in range(10)], rtol=1e-12)
    np.testing.assert_allclose(L, 1.69 ** np.arange(10), rtol=1e-12)
    assert L.max() / L.min() > 10 and np.all(np.diff(L) > 0)
    # Worker m's f_m (1/N scaling, N = 500) has constant L_m/10: check against its Hessian.
    reg = make_task("linreg", 50, 0, l2=0.3)
    for m in (0, 9):
        b = blocks[m]
        g0 = reg.local_loss_grad(np.zeros(51), b.X, b.y, 500, 10)[1]
        H = np.column_stack([reg.local_loss_grad(e, b.X, b.y, 500, 10)[1] - g0 for e in np.eye(51)])
        lm = reg.local_smoothness(b.X, 500, 10)
        assert lm == pytest.approx(np.linalg.eigvalsh((H + H.T) / 2)[-1], rel=1e-10)
        assert lm == pytest.approx(L[m] / 10 + 0.03, rel=1e-12)
    # The worker's own data path: --data linreg-hetero --split contiguous --test-fraction 0.
    for m in (0, 4, 9):
        cfg = WorkerConfig("localhost:1", f"w{m}", data="linreg-hetero", shard=m, num_shards=10,
                           split="contiguous", test_fraction=0.0, seed=m + 7)  # fmt: skip
        part = load_worker_data(cfg)
        np.testing.assert_array_equal(part.X, blocks[m].X)
        np.testing.assert_array_equal(part.y, blocks[m].y)
    # Fitting it: least squares explains the targets (noise 0.1) almost entirely.
    Xt = np.column_stack([hetero.X, np.ones(len(hetero))])
    best = np.linalg.lstsq(Xt, hetero.y, rcond=None)[0]
    assert task.accuracy(best, hetero.X, hetero.y) > 0.999
    assert abs(best[-1] - 1.0) < 0.05  # the intercept b* = 1


def test_linreg_hetero_deterministic() -> None:
    a, b = load_builtin("linreg-hetero"), load_builtin("linreg-hetero")
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)
    assert np.isfinite(a.y).all() and a.y.std() > 1


# ----------------------------------------------------------------------------- mlp


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
    fd = _fd_grad(lambda t: task.loss(t, X, y), theta, 1e-6)
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


def test_mlp_minibatch_gradient_is_fast() -> None:
    task = make_task("mlp", 784, 10, l2=0.01)  # the SASG MNIST net, batch 10
    rng = np.random.default_rng(0)
    theta = task.init_params(rng)
    X, y = rng.uniform(size=(10, 784)), rng.integers(0, 10, size=10)
    times = []
    for _ in range(100):
        t0 = time.perf_counter()
        task.local_loss_grad(theta, X, y, 4000 * 10 / 400, 10)
        times.append(time.perf_counter() - t0)
    # About 0.5 ms on an idle core. A low quantile, not the median, so that other processes
    # competing for the 2 cores (time slices of several ms) do not fail the test; the thread
    # CPU clock is no way out here: it advances in 4 ms ticks on this VM.
    assert np.quantile(times[10:], 0.1) < 1e-3

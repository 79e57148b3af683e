"""psrv.tasks.linreg: the linreg task, and the linreg-hetero data it was built for."""

from __future__ import annotations

import numpy as np
import pytest

from psrv.data import linreg_hetero_smoothness, load, load_builtin, shard
from psrv.tasks import TASKS, LinReg, Task, make_task
from tests.helpers.grad import fd_grad
from worker.client import WorkerConfig, load_worker_data


@pytest.fixture(scope="module")
def hetero():
    return load("linreg-hetero")


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
    fd = fd_grad(lambda t: task.loss(t, X, y), theta, 1e-5)
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

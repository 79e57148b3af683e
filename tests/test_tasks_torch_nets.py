"""psrv.tasks.torch_nets: the built-in torch networks (cnn, wide, charlm): shapes and sizes, the
data they default to, that they learn, and charlm's own data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from psrv import data
from psrv.server import ParameterServer, ServerConfig
from psrv.tasks import TASKS, default_data, make_task, own_data
from psrv.tasks.torch_nets import MAX_CONTEXT, STRIDE, VOCAB, encode, stdlib_text
from tests.helpers.threaded import run_in_threads
from tests.helpers.timeouts import PATIENT
from worker.client import load_training_data


def test_registered_with_their_default_data() -> None:
    assert {"cnn", "wide", "charlm"} <= set(TASKS)
    assert (default_data("cnn"), default_data("wide"), default_data("charlm")) == ("mnist", "synthetic", "charlm")


def test_cnn_is_lenet5_on_28x28_and_fits_8x8() -> None:
    cnn = make_task("cnn", 784, 10)
    # conv 1->6 5x5 (156), conv 6->16 5x5 (2,416), 400->120 (48,120), 120->84 (10,164), 84->10 (850)
    assert cnn.dim == 156 + 2416 + 48120 + 10164 + 850 == 61_706
    small = make_task("cnn", 64, 10)  # scikit-learn's 8x8 digits: 3x3 kernels
    assert small.dim == 60 + 880 + (64 * 120 + 120) + 10164 + 850
    with pytest.raises(ValueError, match="square images"):
        make_task("cnn", 30, 10)


def test_cnn_learns_the_digits_by_local_sgd() -> None:
    train, test = load_training_data("digits", 0.2, 0)
    task = make_task("cnn", train.n_features, train.n_classes)
    theta = task.init_params(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for _ in range(300):
        rows = rng.choice(len(train), 32, replace=False)
        theta -= 0.3 * task.local_loss_grad(theta.astype(np.float32), train.X[rows], train.y[rows], 32, 1)[1]
    assert task.accuracy(theta, test.X, test.y) > 0.9  # 0.953 measured


def test_wide_reaches_1e7_parameters_on_synthetic_data() -> None:
    train, _ = load_training_data("synthetic", 0.2, 0)
    assert (train.n_features, train.n_classes) == (256, 10)
    task = make_task("wide", train.n_features, train.n_classes, width=3072)
    assert task.dim == 256 * 3072 + 3072 + 3072 * 3072 + 3072 + 3072 * 10 + 10 == 10_260_490
    assert make_task("wide", 256, 10, width=8, depth=3).dim == 256 * 8 + 8 + 2 * (8 * 8 + 8) + 8 * 10 + 10


def test_charlm_data_come_from_the_standard_library_and_do_not_depend_on_options() -> None:
    text = stdlib_text()
    assert "def " in text and len(text) == 100_000
    codes = encode("ab\n\t~")
    assert codes.tolist() == [ord("a") - 32, ord("b") - 32, 95, 96, ord("~") - 32] and int(codes.max()) < VOCAB
    train, test = own_data("charlm")
    assert train.X.shape[1] == 1 and train.n_classes == 0
    assert len(train) + len(test) == len(range(0, len(text) - MAX_CONTEXT - 1, STRIDE))
    a, b = make_task("charlm", 1, 0, context=16), make_task("charlm", 1, 0, context=64)
    assert a.dim == b.dim - 48 * 64  # only the position table grows with the context


def test_charlm_starts_at_chance_and_its_gradient_is_autograds() -> None:
    train, test = load_training_data("charlm", 0.2, 0)
    task = make_task("charlm", 1, 0, context=16, d_model=32, layers=1, heads=2, precision=64)
    theta = task.init_params(np.random.default_rng(0))
    rows = train.X[:8]
    loss, grad = task.local_loss_grad(theta, rows, train.y[:8], 8, 1)
    assert abs(loss - math.log(VOCAB)) < 0.5  # near chance (ln 97) at initialisation
    # a direct step along -grad decreases the loss (first-order check of the autograd gradient)
    step = 1e-3 * grad / np.linalg.norm(grad)
    assert task.local_loss_grad(theta - step, rows, train.y[:8], 8, 1)[0] < loss
    fd = (task.loss(theta + step, rows, train.y[:8]) - task.loss(theta - step, rows, train.y[:8])) / 2
    assert fd == pytest.approx(float(grad @ step), rel=1e-4)
    assert 0.0 <= task.accuracy(theta, test.X[:4], test.y[:4]) <= 1.0


def test_charlm_trains_through_grpc_with_sgd() -> None:
    M, rounds = 2, 30
    train, test = load_training_data("charlm", 0.2, 0)
    shards = [data.shard(train, i, M, "iid", 0) for i in range(M)]
    opts = {"context": 16.0, "d_model": 32.0, "layers": 1.0, "heads": 2.0}
    cfg = ServerConfig(
        algorithm="sgd", options={"lr": 1.0, "batch": 16.0}, task="charlm", task_options=opts,
        num_workers=M, rounds=rounds, **PATIENT,
    )  # fmt: skip
    ps = ParameterServer(cfg)
    summary, _ = run_in_threads(ps, shards)
    task = make_task("charlm", 1, 0, **opts)
    theta0 = task.init_params(np.random.default_rng(0))
    assert task.loss(ps.theta, test.X, test.y) < task.loss(theta0, test.X, test.y) - 0.5

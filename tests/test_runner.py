"""End to end: a real server and worker *processes* on loopback, through ``psrv.runner``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from psrv import data
from psrv.runner import DataConfig, run_local
from psrv.server import ServerConfig
from psrv.tasks import make_task
from tests.helpers.timeouts import PATIENT
from worker.client import load_training_data

pytestmark = [pytest.mark.slow, pytest.mark.process]

DIGITS = DataConfig(data="digits", test_fraction=0.2, seed=3)


def _run(tmp_path: Path, algorithm: str, rounds: int = 15, workers: int = 3, **kw) -> dict:
    extra = kw.pop("worker_extra", None)
    kw = {**PATIENT, **kw}
    cfg = ServerConfig(
        algorithm=algorithm, options=kw.pop("options", {"lr": 0.05}), num_workers=workers, rounds=rounds, seed=3, **kw
    )
    return run_local(cfg, DIGITS, tmp_path / algorithm, worker_extra=extra)


def _check_three_worker_run(s: dict, metrics: Path) -> None:
    assert s["rounds"] == 15 and s["worker_exit_codes"] == [0, 0, 0]
    assert s["uploads"] + s["skips"] == 45 and s["deadline_misses"] == 0
    assert s["bytes_up"] > s["upload_bytes"] > 0 and s["bytes_down"] > 0
    assert s["final_loss"] < np.log(10)  # started at log(10) with theta = 0, and learned
    assert len(metrics.read_text().splitlines()) == 15


@pytest.mark.parametrize("algorithm", ["topk-ef", "laq"])  # gd's run: the next test
def test_three_worker_processes(tmp_path: Path, algorithm: str) -> None:
    _check_three_worker_run(_run(tmp_path, algorithm), tmp_path / algorithm / "metrics.jsonl")


def test_gd_through_the_stack_equals_centralized_gd(tmp_path: Path) -> None:
    """Also test_three_worker_processes' checks for gd (one run of worker processes for both)."""
    lr, rounds, M = 0.05, 15, 3
    s = _run(tmp_path, "gd", rounds=rounds, workers=M, options={"lr": lr})
    _check_three_worker_run(s, tmp_path / "gd" / "metrics.jsonl")
    train, _ = load_training_data(DIGITS.data, DIGITS.test_fraction, DIGITS.seed)
    shards = [data.shard(train, i, M, "iid", DIGITS.seed) for i in range(M)]
    task = make_task("logreg", train.n_features, train.n_classes, l2=0.01)
    theta = np.zeros(task.dim)
    for _ in range(rounds):  # the same arithmetic: float32 broadcast, float32 uploads
        th = theta.astype(np.float32)
        total = sum(
            task.local_loss_grad(th, sh.X, sh.y, len(train), M)[1].astype(np.float32).astype(np.float64)
            for sh in shards
        )
        theta = theta - lr * total
    served = np.load(tmp_path / "gd" / "model.npy")
    np.testing.assert_allclose(served, theta, rtol=1e-6, atol=1e-9)
    assert s["final_loss"] == pytest.approx(task.loss(theta, train.X, train.y), rel=1e-9)


def test_dead_worker_does_not_stop_training(tmp_path: Path) -> None:
    timeout = 3.0  # far more than a live worker's round takes, also on a loaded machine (1 s was not)
    crash = {1: ("--crash-after", "3")}
    s = _run(tmp_path, "laq", rounds=12, round_timeout=timeout, max_misses=2, worker_extra=crash)
    assert s["rounds"] == 12
    assert s["worker_exit_codes"][1] == 17 and s["worker_exit_codes"][0] == 0 == s["worker_exit_codes"][2]
    assert s["deadline_misses"] == 12 - 3  # every round after the crash
    assert s["wall_time"] < 6 * timeout  # waited out max_misses = 2 deadlines (6 s), not all 9 (27 s)

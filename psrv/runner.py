"""``psrv run``: one server (in this process) and M worker *processes* on loopback,
talking real gRPC. Worker processes are started with the same ``psrv start-worker``
command a user runs on a real host, and are always stopped, also on error or Ctrl-C.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from psrv.server import ParameterServer, ServerConfig, create_server
from psrv.tasks import make_task


@dataclass(frozen=True)
class DataConfig:
    data: str = "mnist"
    split: str = "iid"
    test_fraction: float = 0.2
    seed: int = 0
    regression: bool = False


def worker_command(
    address: str, index: int, num_workers: int, dc: DataConfig, extra: tuple[str, ...] = ()
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "psrv",
        "start-worker",
        "--server",
        address,
        "--worker-id",
        f"w{index}",
        "--data",
        dc.data,
        "--shard",
        f"{index}/{num_workers}",
        "--split",
        dc.split,
        "--test-fraction",
        str(dc.test_fraction),
        "--seed",
        str(dc.seed),
        *(["--regression"] if dc.regression else []),
        *extra,
    ]


def evaluate(task_name: str, task_options: dict[str, float], theta: np.ndarray, dc: DataConfig) -> dict[str, Any]:
    """Final loss (the full training objective f) and accuracies of a model."""
    from worker.client import load_training_data  # the one definition of the split

    train, test = load_training_data(dc.data, dc.test_fraction, dc.seed, dc.regression)
    task = make_task(task_name, train.n_features, train.n_classes, **task_options)
    return {
        "final_loss": task.loss(theta, train.X, train.y),
        "train_accuracy": task.accuracy(theta, train.X, train.y),
        "accuracy": task.accuracy(theta, test.X, test.y) if len(test) else task.accuracy(theta, train.X, train.y),
        "test_samples": len(test),
    }


def run_local(
    config: ServerConfig,
    dc: DataConfig,
    out_dir: str | Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    worker_extra: dict[int, tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    """Run one job end to end; returns the summary (also the model is in ``out_dir``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ps = ParameterServer(config, metrics_path=out / "metrics.jsonl", on_round=on_round)
    server, port = create_server(ps, "127.0.0.1:0")
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for i in range(config.num_workers):
            log_file = open(out / f"worker{i}.log", "w")
            logs.append(log_file)
            cmd = worker_command(f"127.0.0.1:{port}", i, config.num_workers, dc, (worker_extra or {}).get(i, ()))
            procs.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT))
        watcher = threading.Thread(target=_fail_if_all_die, args=(ps, procs), daemon=True)
        watcher.start()
        summary = ps.run()
        np.save(out / "model.npy", ps.theta)
        summary.update(evaluate(config.task, dict(config.task_options), ps.theta, dc))
        summary["worker_exit_codes"] = [p.wait(timeout=30) for p in procs]
        return summary
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
        server.stop(grace=None)
        ps.close()


def _fail_if_all_die(ps: ParameterServer, procs: list[subprocess.Popen]) -> None:
    """Registration cannot complete if workers die before registering: fail fast then."""
    while ps.phase == "registering":
        if all(p.poll() is not None for p in procs):
            ps.fail("every worker process exited before registration completed (see worker*.log)")
            return
        threading.Event().wait(0.2)

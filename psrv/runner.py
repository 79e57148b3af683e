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

from psrv import report
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


class Evaluator:
    """The full training objective f and the accuracies of a model, on the run's own split
    (loaded once). Used every few rounds by embedded runs and for the final summary."""

    def __init__(self, task_name: str, task_options: dict[str, float], dc: DataConfig) -> None:
        from worker.client import load_training_data  # the one definition of the split

        self.train, self.test = load_training_data(dc.data, dc.test_fraction, dc.seed, dc.regression)
        self.task = make_task(task_name, self.train.n_features, self.train.n_classes, **task_options)

    def __call__(self, theta: np.ndarray) -> dict[str, float]:
        held_out = self.test if len(self.test) else self.train
        return {
            "train_loss": self.task.loss(theta, self.train.X, self.train.y),
            "accuracy": self.task.accuracy(theta, held_out.X, held_out.y),
        }

    def final(self, theta: np.ndarray) -> dict[str, Any]:
        now = self(theta)
        return {
            "final_loss": now["train_loss"],
            "train_accuracy": self.task.accuracy(theta, self.train.X, self.train.y),
            "accuracy": now["accuracy"],
            "test_samples": len(self.test),
        }


def evaluate(task_name: str, task_options: dict[str, float], theta: np.ndarray, dc: DataConfig) -> dict[str, Any]:
    """Final loss (the full training objective f) and accuracies of a model."""
    return Evaluator(task_name, task_options, dc).final(theta)


def run_local(
    config: ServerConfig,
    dc: DataConfig,
    out_dir: str | Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    worker_extra: dict[int, tuple[str, ...]] | None = None,
    eval_every: int = 0,
    targets: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Run one job end to end; returns the summary (also the model is in ``out_dir``).

    ``eval_every`` > 0 records ``train_loss`` (the full objective f) and ``accuracy`` every that
    many rounds; ``targets`` ({"accuracy": a} and/or {"train_loss": l}) then add the rounds,
    uploads, bits and bytes it took to first reach each (Deng et al., arXiv:2112.04088, Table II;
    Sun et al., NeurIPS 2019, Table 2)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(config.task, dict(config.task_options), dc)
    ps = ParameterServer(
        config,
        metrics_path=out / "metrics.jsonl",
        on_round=on_round,
        evaluator=evaluator if eval_every > 0 else None,
        eval_every=eval_every,
    )
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
        summary.update(evaluator.final(ps.theta))
        for key, target in (targets or {}).items():
            summary[f"to_{key}"] = report.cost_to_reach(ps.records, key, target)
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

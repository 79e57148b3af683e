"""``psrv run``: one server (in this process) and M worker *processes* on loopback,
talking real gRPC. Worker processes are started with the same ``psrv start-worker``
command a user runs on a real host, and are always stopped, also on error or Ctrl-C.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from psrv import __version__, certs, report
from psrv.files import atomic_save_npy, atomic_write_json
from psrv.metrics import MetricsSink
from psrv.options import DataConfig, worker_argv, worker_ids
from psrv.server import ParameterServer, ServerConfig, create_server
from psrv.tasks import make_task


def config_manifest(config: ServerConfig, dc: DataConfig | None) -> dict[str, Any]:
    """How one job was made, whole: the server's configuration, every algorithm and task option
    with the value actually used (defaults included), the data, and the psrv version."""
    from psrv.algorithms import make_algorithm, resolved_options
    from psrv.tasks import task_option_defaults

    algo = make_algorithm(config.algorithm, config.options, config.compressor)
    return {
        "psrv_version": __version__,
        "server": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},  # as JSON has it
        "algorithm_options": resolved_options(algo),
        "compressor": algo.compressor_name,
        "task_options": {**task_option_defaults(config.task), **config.task_options},
        "data": None if dc is None else asdict(dc),
    }


def write_manifest(out_dir: str | Path, configs: list[ServerConfig], dc: DataConfig, device: str = "cpu") -> Path:
    """``<out>/manifest.json``: the runs this invocation makes (folder per algorithm) and their
    whole configuration. Plots and tables of the folder are made from it, so a reused ``--out``
    never mixes in an earlier run's algorithms."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "psrv_version": __version__,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "data": asdict(dc),
        "device": device,
        "runs": [{"algorithm": c.algorithm, "dir": c.algorithm, **config_manifest(c, dc)} for c in configs],
    }
    return atomic_write_json(out / "manifest.json", manifest)  # never a half-written manifest


class Evaluator:
    """The full training objective f and the accuracies of a model, on the run's own split
    (loaded once). Used every few rounds by embedded runs and for the final summary."""

    def __init__(self, task_name: str, task_options: dict[str, float], dc: DataConfig, device: str = "cpu") -> None:
        from worker.client import load_training_data  # the one definition of the split

        self.train, self.test = load_training_data(dc.data, dc.test_fraction, dc.seed, dc.regression)
        self.task = make_task(task_name, self.train.n_features, self.train.n_classes, device=device, **task_options)

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
    device: str = "cpu",
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 10,
    tls: bool = False,
) -> dict[str, Any]:
    """Run one job end to end; returns the summary (also the model is in ``out_dir``).

    ``eval_every`` > 0 records ``train_loss`` (the full objective f) and ``accuracy`` every that
    many rounds; ``targets`` ({"accuracy": a} and/or {"train_loss": l}) then add the rounds,
    uploads, bits and bytes it took to first reach each (Deng et al., arXiv:2112.04088, Table II;
    Sun et al., NeurIPS 2019, Table 2). ``device`` (cpu, cuda, auto): where the workers' torch model
    computes (``start-worker --device``) and where this process evaluates. ``checkpoint_dir``: the
    server's state is saved there every ``checkpoint_every`` rounds and after the last
    (:mod:`psrv.checkpoint`; ``start-server --resume`` continues it). ``tls``: make a test
    CA, certificates and tokens in ``out_dir/tls`` (:mod:`psrv.certs`) and run over mutual TLS with
    per-worker tokens, the workers started with the ``--tls-*`` and ``--token-file`` options."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(config.task, dict(config.task_options), dc, device)
    # the server owns the job: the shape of the data it loaded, and the ids of the workers it starts
    config = replace(
        config,
        task_shape=config.task_shape or (evaluator.train.n_features, evaluator.train.n_classes),
        worker_ids=config.worker_ids or tuple(worker_ids(config.num_workers)),
    )
    costs = [report.CostToReach(key, target) for key, target in (targets or {}).items()]

    def round_closed(record: dict[str, Any]) -> None:
        for cost in costs:  # worked out as rounds close: the server keeps only the last few records
            cost.add(record)
        if on_round is not None:
            on_round(record)

    sink = MetricsSink(
        out / "metrics.jsonl",
        evaluator=evaluator if eval_every > 0 else None,
        eval_every=eval_every,
        on_round=round_closed,
        overwrite=True,  # the run folder is this command's: a reused --out is replaced (see README)
    )
    checkpointer = None
    if checkpoint_dir is not None:
        from psrv.checkpoint import Checkpointer

        checkpointer = Checkpointer(checkpoint_dir, checkpoint_every, sink)
    ps = ParameterServer(config, checkpointer or sink, keep_rows=checkpointer is not None)
    if checkpointer is not None:
        checkpointer.attach(ps.engine, ps.counter)
    pki = certs.make_test_pki(out / "tls", [f"w{i}" for i in range(config.num_workers)]) if tls else None
    server, port = create_server(ps, "127.0.0.1:0", security=None if pki is None else pki.server_security())
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for i in range(config.num_workers):
            log_file = open(out / f"worker{i}.log", "w")
            logs.append(log_file)
            extra = (*(worker_extra or {}).get(i, ()), *(pki.worker_argv(f"w{i}") if pki else ()))
            cmd = worker_argv(f"127.0.0.1:{port}", i, config.num_workers, dc, extra, device=device)
            procs.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT))
        watcher = threading.Thread(target=_fail_if_all_die, args=(ps, procs), daemon=True)
        watcher.start()
        summary = ps.run()
        atomic_save_npy(out / "model.npy", ps.theta)
        summary.update(evaluator.final(ps.theta))
        for cost in costs:
            summary[f"to_{cost.key}"] = cost.reached
        summary["config"] = config_manifest(config, dc)
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
        sink.close()


def _fail_if_all_die(ps: ParameterServer, procs: list[subprocess.Popen]) -> None:
    """Registration cannot complete if workers die before registering: fail fast then."""
    while ps.phase == "registering":
        if all(p.poll() is not None for p in procs):
            ps.fail("every worker process exited before registration completed (see worker*.log)")
            return
        threading.Event().wait(0.2)

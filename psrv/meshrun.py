"""``psrv run --algorithm dsgd``: the coordinator (:mod:`psrv.mesh`) in this process and the workers
as ``psrv start-worker --gossip-listen 127.0.0.1:0`` processes on loopback; what
:func:`psrv.runner.run_local` does for the parameter-server algorithms."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from psrv import lifeline, report
from psrv import runner as rn
from psrv.engine import ServerConfig, raise_hidden_interrupt
from psrv.files import atomic_save_npy
from psrv.mesh import MeshCoordinator, create_mesh_server
from psrv.metrics import MetricsSink
from psrv.options import DataConfig, worker_argv, worker_ids


def run_mesh_local(
    config: ServerConfig,
    dc: DataConfig,
    out_dir: str | Path,
    on_round: Any = None,
    targets: dict[str, float] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """:func:`psrv.runner.run_local` for dsgd: the coordinator in this process, the workers as
    ``psrv start-worker --gossip-listen 127.0.0.1:0`` processes on loopback. The average model
    is evaluated after the last round (no model reaches the coordinator before)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in rn.JOB_OUTPUTS:
        (out / name).unlink(missing_ok=True)
    procs: list[subprocess.Popen] = []
    logs: list[Any] = []
    sink = server = None
    coord: MeshCoordinator | None = None
    try:
        evaluator = rn.Evaluator(config.task, dict(config.task_options), dc, device)
        config = replace(
            config,
            task_shape=config.task_shape or (evaluator.train.n_features, evaluator.train.n_classes),
            worker_ids=config.worker_ids or tuple(worker_ids(config.num_workers)),
        )
        costs = [report.CostToReach(key, target) for key, target in (targets or {}).items()]

        def round_closed(record: dict[str, Any]) -> None:
            for cost in costs:
                cost.add(record)
            if on_round is not None:
                on_round(record)

        # x_bar exists only after the last round: that is the one evaluated
        sink = MetricsSink(
            out / "metrics.jsonl",
            evaluator=evaluator,
            eval_every=max(1, config.rounds),
            on_round=round_closed,
            overwrite=True,
        )
        coord = MeshCoordinator(config, sink)
        server, port = create_mesh_server(coord)
        env = lifeline.child_env()
        for i in range(config.num_workers):
            log_file = open(out / f"worker{i}.log", "w")
            logs.append(log_file)
            cmd = worker_argv(
                f"127.0.0.1:{port}", i, config.num_workers, dc, ("--gossip-listen", "127.0.0.1:0"), device=device
            )
            procs.append(
                subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env, process_group=0
                )
            )
        watch = threading.Thread(target=_watch, args=(coord, procs, out), daemon=True)
        watch.start()
        try:
            summary = coord.run()
        except RuntimeError as exc:  # Ctrl-C inside a wait, where CPython raises this over it
            raise_hidden_interrupt(exc)
            raise
        assert coord.theta is not None
        atomic_save_npy(out / "model.npy", coord.theta)
        summary.update(evaluator.final(coord.theta))
        for cost in costs:
            summary[f"to_{cost.key}"] = cost.reached
        summary["config"] = rn.config_manifest(config, dc)
        summary["worker_exit_codes"] = rn._wait_all(procs, max(30.0, 2 * config.done_grace))
        summary["status"] = "done"
        return summary
    except KeyboardInterrupt:
        if coord is not None:
            coord.fail("interrupted")
        raise rn.RunInterrupted(_unfinished(coord, config, dc, "interrupted", "interrupted")) from None
    except (RuntimeError, OSError, ValueError) as exc:
        if coord is not None:
            coord.fail(str(exc))
        reason = str(exc) or type(exc).__name__
        raise rn.RunFailed(reason, _unfinished(coord, config, dc, "failed", reason)) from None
    finally:
        rn._kill_all(procs)
        for f in logs:
            f.close()
        if server is not None:
            server.stop(grace=None)
        if sink is not None:
            sink.close()


def _watch(coord: MeshCoordinator, procs: list[subprocess.Popen], out: Path, poll: float = 0.2) -> None:
    """Fail the run as soon as a worker process exits with an error before the run is done (dsgd
    cannot go on without one of its nodes)."""
    while coord.phase in ("registering", "training"):
        for i, p in enumerate(procs):
            code = p.poll()
            if code not in (None, 0):
                said = rn._last_line(out / f"worker{i}.log")
                coord.fail(
                    f"worker w{i} exited with code {code}"
                    + (f": {said}" if said else "")
                    + f" (see {out}/worker{i}.log)"
                )
                return
        time.sleep(poll)


def _unfinished(
    coord: MeshCoordinator | None, config: ServerConfig, dc: DataConfig, status: str, error: str
) -> dict[str, Any]:
    summary: dict[str, Any] = {"algorithm": config.algorithm, "workers": config.num_workers, "rounds": 0}
    if coord is not None:
        with contextlib.suppress(Exception):
            summary.update(coord.summary())
    summary.update(status=status, error=error, config=rn.config_manifest(config, dc))
    return summary

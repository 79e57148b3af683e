"""Test helper: a real gRPC server on port 0 and worker loops in threads — the whole stack but
process start-up (tests/test_runner.py and tests/test_cli.py cover worker processes)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from psrv.data import Dataset
from psrv.server import ParameterServer, create_server
from worker.client import WorkerConfig, WorkerResult, run_worker


def run_in_threads(
    ps: ParameterServer,
    shards: Sequence[Dataset],
    per_worker: dict[int, dict[str, Any]] | None = None,
    **worker_options: Any,
) -> tuple[dict[str, Any], list[WorkerResult]]:
    """Train ``ps`` with one worker thread per shard; returns the summary and the workers'
    results. Workers start one at a time, so worker ``i`` gets server index ``i`` (and with it
    shard ``i``, whose rng stream is ``[seed, i]``: runs are comparable across algorithms.
    ``per_worker[i]`` adds WorkerConfig options for worker ``i`` only (fault injection)."""
    server, port = create_server(ps)
    results: list[Any] = [None] * len(shards)

    def work(i: int) -> None:
        cfg = WorkerConfig(
            server=f"127.0.0.1:{port}",
            worker_id=f"w{i}",
            data="digits",
            shard=i,
            num_shards=len(shards),
            **{**worker_options, **(per_worker or {}).get(i, {})},
        )
        results[i] = run_worker(cfg, shards[i])

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(shards))]
    try:
        for i, t in enumerate(threads):
            t.start()
            assert ps.wait_registered(i + 1, timeout=30), f"worker {i} did not register"
        summary = ps.run()
    finally:
        for t in threads:
            t.join(timeout=60)
        server.stop(grace=None)
    assert all(r is not None for r in results), "a worker thread failed"
    assert [r.index for r in results] == list(range(len(shards)))
    return summary, results

"""How a host's logical workers' gradients cost with the threading designs worker.host could use
(docs/idle-round.md): the 10 MNIST-shard logistic-regression gradients of one round of
``psrv run --workers 10``, computed ``--rounds`` times

- ``one``: in one thread, in turn;
- ``lanes``: in one thread per core, each computing a fixed share of the workers in turn (what
  worker.host does);
- ``per-worker``: in a thread per worker, at most one per core computing at once (a semaphore: what
  worker.host did before), each woken by the round's start as by a broadcast.

Prints wall and CPU time per round (medians of ``--repeat`` runs). No network, no server.

    python scripts/bench_host_threads.py [--rounds 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

M = 10


def _setup() -> tuple:
    from psrv.tasks import make_task
    from worker.client import WorkerConfig, _limit_threads
    from worker.host import host_configs, load_host_data

    _limit_threads(1)  # as a worker process does
    base = WorkerConfig(server="127.0.0.1:1", worker_id="", data="mnist", seed=0)
    shards = load_host_data(host_configs(base, range(M), M, [f"w{i}" for i in range(M)]))
    for ds in shards:
        ds.X.setflags(write=False)  # as a worker holds them (logreg keeps them sparse)
    task = make_task("logreg", shards[0].n_features, shards[0].n_classes)
    theta = np.random.default_rng(0).normal(size=task.dim) * 0.01
    total = sum(len(ds) for ds in shards)

    def grad(i: int) -> None:
        task.local_loss_grad(theta, shards[i].X, shards[i].y, total, M)

    for i in range(M):
        grad(i)  # warm: the sparse products are built on first use
    return grad


def _one(grad, rounds: int) -> None:
    for _ in range(rounds):
        for i in range(M):
            grad(i)


def _threaded(grad, rounds: int, groups: list[range], at_once: int) -> None:
    """A thread per group of workers, woken at each round's start, computing its workers' gradients
    in turn, at most ``at_once`` threads computing at a time."""
    starts = [queue.SimpleQueue() for _ in groups]
    done: queue.SimpleQueue = queue.SimpleQueue()
    compute = threading.BoundedSemaphore(at_once)

    def thread(j: int) -> None:
        while starts[j].get():
            for i in groups[j]:
                with compute:
                    grad(i)
            done.put(j)

    threads = [threading.Thread(target=thread, args=(j,)) for j in range(len(groups))]
    for t in threads:
        t.start()
    for _ in range(rounds):
        for q in starts:
            q.put(True)
        for _ in groups:
            done.get()
    for q in starts:
        q.put(False)
    for t in threads:
        t.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cores = max(1, len(os.sched_getaffinity(0)))
    grad = _setup()
    designs = {
        "one": lambda: _one(grad, args.rounds),
        "lanes": lambda: _threaded(grad, args.rounds, [range(j, M, cores) for j in range(cores)], cores),
        "per-worker": lambda: _threaded(grad, args.rounds, [range(i, i + 1) for i in range(M)], cores),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in designs}
    for _ in range(args.repeat):
        for name, run in designs.items():  # interleaved
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    print(
        f"{M} logreg gradients (MNIST shards) a round, {cores} cores; medians of {args.repeat} x {args.rounds} rounds"
    )
    for name, got in times.items():
        wall = 1e3 * statistics.median(w for w, _ in got) / args.rounds
        cpu = 1e3 * statistics.median(c for _, c in got) / args.rounds
        print(f"{name:>10}: wall {wall:6.2f} ms/round   CPU {cpu:6.2f} ms/round")


if __name__ == "__main__":
    main()

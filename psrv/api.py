"""The Python API: run a job from a script or a notebook and get its results back.

    import psrv

    result = psrv.run(task="examples/my_model.py:make", algorithm="laq", workers=4, rounds=50, lr=0.5)
    print(result.summary["accuracy"], len(result.records))

:func:`run` does what ``psrv run`` does for one algorithm -- one server in this process and
``workers`` worker *processes* (``python -m psrv start-worker``) talking real gRPC on loopback --
with the same options, defaults and checks, and returns the summary (the dict ``psrv run`` writes
to ``summary.json``) and the per-round records (the lines of ``metrics.jsonl``). The same
arguments and seed give the same summary as the command line. For separate hosts, start
``psrv start-server`` / ``psrv start-worker`` (or :class:`psrv.server.ParameterServer` and
:func:`worker.client.run_worker`) as the README shows.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psrv.options import DataConfig, jobs, validate_job_data

__all__ = ["RunResult", "run"]


@dataclass(frozen=True)
class RunResult:
    """What :func:`run` returns: ``summary`` (``algorithm``, ``rounds``, ``uploads``, ``skips``,
    ``payload_bits``, ``bytes_up``, ``bytes_down``, ``final_loss``, ``accuracy``, ``config``, ...),
    ``records`` (one dict per round, as in ``metrics.jsonl``; ``train_loss``/``accuracy`` in every
    ``eval_every``-th and the last), and the final ``model`` θ (float64)."""

    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(repr=False)
    model: np.ndarray = field(repr=False)


def run(
    task: str | None = None,
    algorithm: str = "gd",
    data: str | None = None,
    *,
    workers: int = 10,
    rounds: int = 500,
    lr: float = 0.02,
    compressor: str = "",
    options: Mapping[str, float] | None = None,
    task_options: Mapping[str, float] | None = None,
    l2: float | None = None,
    split: str = "iid",
    test_fraction: float = 0.2,
    regression: bool = False,
    seed: int = 0,
    round_timeout: float = 10.0,
    zstd: bool = False,
    downlink: str = "auto",
    down_compressor: str = "",
    device: str = "cpu",
    server_opt: str = "sgd",
    clip_norm: float = 0.0,
    min_workers: int = 1,
    quorum_wait: float | None = None,
    aggregate: str = "mean",
    eval_every: int = 0,
    target_accuracy: float | None = None,
    target_loss: float | None = None,
    out: str | Path | None = None,
) -> RunResult:
    """Run one job (``psrv run --algorithm ALGORITHM ...``) and return its results.

    ``task``: a task name (``logreg``, ``mlp``, ``cnn``, ``wide``, ``charlm``, ...) or your own
    model, ``"path/to/file.py:factory"`` / ``"package.module:factory"`` (a factory returning
    :class:`psrv.TorchSpec`); default: the task ``data`` is made for, else logreg. ``data``: as
    ``--data`` (default: the task's own data, else the data set it is made for, else mnist).
    ``options``: algorithm/compressor options (``-o``), ``task_options``: ``-t``; ``server_opt``:
    ``--server-opt`` (e.g. ``"adam:beta2=0.99"``; the step size is ``lr``); ``min_workers`` and
    ``quorum_wait``: ``--min-workers``, ``--quorum-wait`` (a run short of live workers fails with
    ``RuntimeError``); ``aggregate``: ``--aggregate`` (``"median"``, ``"trimmed-mean:beta=0.2"``).
    ``device``: cpu, cuda or auto, where the workers' torch model computes and this process
    evaluates. ``out``: a folder for ``metrics.jsonl``, ``model.npy`` and the worker logs
    (default: a temporary one, removed).
    Every bad argument raises ``ValueError`` before any worker starts.
    """
    from psrv.algorithms import ALGORITHMS
    from psrv.options import default_task
    from psrv.tasks import default_data

    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: {', '.join(sorted(ALGORITHMS))}")
    if data is None:
        data = default_data(task)
    if task is None:
        task = default_task(data)
    (job,) = jobs(
        [algorithm],
        data,
        compressor=compressor,
        lr=lr,
        options=dict(options or {}),
        task=task,
        l2=l2,
        task_options=dict(task_options or {}),
        rounds=rounds,
        workers=workers,
        round_timeout=round_timeout,
        seed=seed,
        zstd=zstd,
        downlink=downlink,
        down_compressor=down_compressor,
        server_opt=server_opt,
        clip_norm=clip_norm,
        min_workers=min_workers,
        quorum_wait=quorum_wait,
        aggregate=aggregate,
    )
    dc = DataConfig(data=data, split=split, test_fraction=test_fraction, seed=seed, regression=regression)
    train, test, dim = validate_job_data(job, dc, device)
    from psrv import runner

    nbytes = runner.data_bytes(train, test)
    runner.check_capacity(workers, len(train), runner.worker_memory(nbytes, dim), None)  # ValueError: too many
    register_timeout, start_timeout = runner.startup_timeouts(workers, nbytes, dim)
    config = job.server_config(register_timeout=register_timeout, start_timeout=start_timeout)
    targets = {k: v for k, v in (("accuracy", target_accuracy), ("train_loss", target_loss)) if v is not None}
    if out is not None:
        return _run(config, dc, Path(out), eval_every, targets, device)
    with tempfile.TemporaryDirectory(prefix="psrv-") as tmp:
        return _run(config, dc, Path(tmp), eval_every, targets, device)


def _run(config: Any, dc: DataConfig, out: Path, eval_every: int, targets: dict[str, float], device: str) -> RunResult:
    from psrv.runner import run_local

    records: list[dict[str, Any]] = []
    summary = run_local(config, dc, out, on_round=records.append, eval_every=eval_every, targets=targets, device=device)
    return RunResult(summary, records, np.load(out / "model.npy"))

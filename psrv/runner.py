"""``psrv run``: one server (in this process) and M worker *processes* on loopback,
talking real gRPC. Worker processes are started with the same ``psrv start-worker``
command a user runs on a real host, and are always stopped, also on error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from psrv import __version__, certs, report
from psrv.algorithms import make_algorithm
from psrv.checkpoint import checkpointed_server
from psrv.files import atomic_save_npy, atomic_write_json
from psrv.launch import Launcher, LocalLauncher, Workers
from psrv.metrics import MetricsSink
from psrv.options import DataConfig, host_argv, host_blocks, worker_id, worker_ids
from psrv.server import ParameterServer, ServerConfig, create_server
from psrv.tasks import make_task

log = logging.getLogger(__name__)


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


def write_manifest(
    out_dir: str | Path,
    configs: list[ServerConfig],
    dc: DataConfig,
    device: str = "cpu",
    unfinished: list[dict[str, Any]] | None = None,
) -> Path:
    """``<out>/manifest.json``: the runs of this invocation that finished (folder per algorithm)
    and their whole configuration, and the ``unfinished`` ones (algorithm, dir, status, error,
    rounds). Plots and tables of the folder are made from ``runs``, so a reused ``--out`` never
    mixes in an earlier run's algorithms, nor a run that failed or was interrupted."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "psrv_version": __version__,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "data": asdict(dc),
        "device": device,
        "runs": [{"algorithm": c.algorithm, "dir": c.algorithm, **config_manifest(c, dc)} for c in configs],
        "unfinished": list(unfinished or []),
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


# ---------------------------------------------------------------------------------- capacity
#: private memory of one worker process before its data: Python with torch, gRPC, numpy and psrv
#: imported and a small model built (measured: 230 MiB RssAnon per worker on ``digits``, 2026)
WORKER_FOOTPRINT = 256 * 2**20


class CapacityError(ValueError):
    """A job this machine cannot run (one line, naming the flag to change)."""


def data_bytes(*datasets: Any) -> int:
    """Bytes of the arrays a worker loads (it loads the whole split, then keeps its shard)."""
    return sum(int(getattr(a, "nbytes", 0)) for ds in datasets for a in (ds.X, ds.y))


def worker_memory(nbytes: int, dim: int) -> int:
    """Estimated peak private memory of one worker process: :data:`WORKER_FOOTPRINT`, the data it
    loads, and a few model-sized vectors (parameters, gradient, error-feedback memory, uploads),
    plus the server's own per-worker vectors in the launcher."""
    return WORKER_FOOTPRINT + nbytes + 16 * 8 * dim


#: private memory each further logical worker of a host adds besides its model-sized vectors (its thread,
#: torch model, algorithm state and queues; measured: ~0.6 MiB each for logreg on mnist, docs/scale.md)
LOGICAL_WORKER_FOOTPRINT = 2 * 2**20


def host_memory(nbytes: int, dim: int, logical: int) -> int:
    """Estimated peak private memory of one process hosting ``logical`` virtual workers: one worker
    process (:func:`worker_memory`: the data loaded once), the shards it cuts from the data (at
    most the data again), and per further logical worker :data:`LOGICAL_WORKER_FOOTPRINT` and its
    model-sized vectors."""
    if logical <= 1:
        return worker_memory(nbytes, dim)
    return worker_memory(nbytes, dim) + nbytes + (logical - 1) * (LOGICAL_WORKER_FOOTPRINT + 16 * 8 * dim)


def default_processes(workers: int, cores: int | None = None) -> int:
    """Worker processes ``psrv run`` starts for ``workers`` workers: one per worker up to the cores
    this process may use (as before virtual workers); more workers than cores share ``cores - 1``
    processes (at least one) as virtual workers, leaving a core to the server, whose one process
    takes every worker's reports. A process costs ~230 MiB and torch's and the data's start-up;
    measured on 2 cores (docs/scale.md), 100 workers start in 51 s / 0.87 GiB in one process, 93 s /
    1.34 GiB in two, 150 s / 2.23 GiB in four."""
    import os

    cores = cores or len(os.sched_getaffinity(0))
    return workers if workers <= cores else max(1, cores - 1)


def mem_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_capacity(
    workers: int,
    n_train: int,
    per_worker: int,
    available: int | None,
    processes: int | None = None,
    per_host: int = 0,
) -> None:
    """:class:`CapacityError` unless ``workers`` worker processes fit: each needs at least one
    training sample, and together about ``workers * per_worker`` bytes of the ``available``
    (None: not checked). With ``processes`` < ``workers`` (virtual workers): ``processes *
    per_host`` bytes (:func:`host_memory`)."""
    if processes is not None and processes < workers:
        check_capacity(workers, n_train, 0, None)
        need = processes * per_host
        if available is not None and need > available:
            raise CapacityError(
                f"--workers {workers} in {processes} processes would need about {need / 2**30:.1f} GiB "
                f"({per_host / 2**20:.0f} MiB per process) but {available / 2**30:.1f} GiB is available; "
                "pass fewer --workers or --processes (or --no-memory-check)"
            )
        return
    if workers > n_train:
        raise CapacityError(
            f"--workers {workers} is more than the {n_train} training samples (each worker needs one at least); "
            f"pass --workers {n_train} or fewer"
        )
    if available is not None and workers * per_worker > available:
        fit = max(1, available // per_worker)
        raise CapacityError(
            f"--workers {workers} would need about {workers * per_worker / 2**30:.1f} GiB "
            f"({per_worker / 2**20:.0f} MiB per worker process) but {available / 2**30:.1f} GiB is available; "
            f"pass --workers {fit} or fewer (or --no-memory-check)"
        )


def startup_timeouts(workers: int, nbytes: int, dim: int) -> tuple[float, float]:
    """Default (register, start) timeouts in seconds, scaled to the job: every worker process starts
    Python and torch and loads the data (seconds of CPU each, longer on a shared machine and for
    big data), then builds its model. They only bound how long a run waits for a worker that
    never comes: a worker that exits ends the wait at once."""
    size = 1.0 + (nbytes + 8 * dim) / 2**28  # +1 per 256 MiB of data and model
    return 60.0 + 10.0 * workers * size, 30.0 + 2.0 * workers * size


# ---------------------------------------------------------------------------------- one job
class RunFailed(RuntimeError):
    """A job that did not finish; ``summary`` holds what it did (``status``: "failed")."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, see ``psrv run``) during a job: every worker is stopped; ``summary``
    holds the rounds done so far (``status``: "interrupted")."""

    def __init__(self, summary: dict[str, Any]) -> None:
        super().__init__("interrupted")
        self.summary = summary


#: files of a job folder that a job writes; a reused folder's old ones are removed when it starts
JOB_OUTPUTS = ("metrics.jsonl", "model.npy")


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
    resume: Any = None,
    stop: Any = None,
    launcher: Launcher | None = None,
    processes: int | None = None,
) -> dict[str, Any]:
    """Run one job end to end; returns the summary (``status`` "done"; the model is in ``out_dir``).

    ``eval_every`` > 0 records ``train_loss`` (the full objective f) and ``accuracy`` every that
    many rounds; ``targets`` ({"accuracy": a} and/or {"train_loss": l}) then add the rounds,
    uploads, bits and bytes it took to first reach each (Deng et al., arXiv:2112.04088, Table II;
    Sun et al., NeurIPS 2019, Table 2). ``device`` (cpu, cuda, auto): where the workers' torch model
    computes (``start-worker --device``) and where this process evaluates. ``checkpoint_dir``: the
    server's state is saved there every ``checkpoint_every`` rounds and after the last
    (:mod:`psrv.checkpoint`; ``start-server --resume`` continues it). ``tls``: make a test
    CA, certificates and tokens in ``out_dir/tls`` (:mod:`psrv.certs`) and run over mutual TLS with
    per-worker tokens, the workers started with the ``--tls-*`` and ``--token-file`` options.
    ``resume`` (a :class:`psrv.checkpoint.Checkpoint` of this job, :func:`resume_plan`): the server
    goes on from it, its workers (started afresh) rejoin, and ``out_dir/metrics.jsonl`` is continued
    after the checkpoint's lines (their records count towards ``targets`` and reach ``on_round``).
    ``stop`` (a :class:`psrv.stopping.StopRule`; needs ``eval_every`` > 0): the job ends cleanly after
    the first evaluated round that meets it; the summary says ``stopped_by`` (the rule, or "rounds")
    and ``stop_round`` (None when it ran every round).
    ``launcher`` (:mod:`psrv.launch`; default :class:`~psrv.launch.LocalLauncher`): where the server
    binds, the address its workers dial and how their processes start (``psrv run --launcher``).
    ``processes``: the workers run as virtual workers in that many processes (consecutive blocks,
    :func:`psrv.options.host_blocks`; each logs to ``workers<A>-<B>.log``); None: one process per
    worker (``worker<i>.log``), as also with ``worker_extra`` (fault injection is per process).

    A job that cannot finish raises :class:`RunFailed` (a worker that exits before registration
    ends the wait at once; ``config.register_timeout`` bounds it otherwise), Ctrl-C raises
    :class:`RunInterrupted`; both carry the partial summary, and ``out_dir`` then holds only this
    job's metrics (whole lines, the rounds done) and no model. Every worker process is gone when
    this returns or raises, and each dies with this process (:mod:`psrv.lifeline`)."""
    if getattr(make_algorithm(config.algorithm, config.options, config.compressor), "decentralized", False):
        from psrv.meshrun import run_mesh_local  # dsgd: a coordinator and gossiping workers (no checkpoint, no TLS yet)

        if tls or checkpoint_dir is not None:
            why = f"{config.algorithm} runs without --tls and --checkpoint-dir (not supported yet)"
            raise RunFailed(why, {"algorithm": config.algorithm, "rounds": 0, "status": "failed", "error": why})
        return run_mesh_local(config, dc, out_dir, on_round=on_round, targets=targets, device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in JOB_OUTPUTS:  # a reused folder never mixes an earlier job's files with this one's
        if resume is None or name != "metrics.jsonl":  # a resumed job continues its metrics
            (out / name).unlink(missing_ok=True)
    launcher = launcher or LocalLauncher()
    procs: list[Any] = []
    workers: Workers | None = None
    sink = server = watcher = None
    ps: ParameterServer | None = None
    try:
        evaluator = Evaluator(config.task, dict(config.task_options), dc, device)
        # the server owns the job: the shape of the data it loaded, and the ids of the workers it starts
        config = owned_config(config, evaluator.train.n_features, evaluator.train.n_classes)
        costs = [report.CostToReach(key, target) for key, target in (targets or {}).items()]

        stop_round: list[int] = []

        def round_closed(record: dict[str, Any]) -> None:
            if stop is not None and not stop_round and ps is not None and (why := stop.check(record)):
                ps.engine.stop_after_round(why)  # the engine ends the job after this round
                stop_round.append(record["round"])
            for cost in costs:  # worked out as rounds close: the server keeps only the last few records
                cost.add(record)
            if on_round is not None:
                on_round(record)

        keep = None if resume is None else resume.metrics_lines
        for record in _kept_records(out / "metrics.jsonl", keep):  # the rounds before the checkpoint
            round_closed(record)
        sink = MetricsSink(
            out / "metrics.jsonl",
            evaluator=evaluator if eval_every > 0 else None,
            eval_every=eval_every,
            on_round=round_closed,
            overwrite=True,  # the run folder is this command's: a reused --out is replaced (see README)
            keep_lines=keep,  # resumed: continued after the checkpoint's lines
        )
        ps, _ = checkpointed_server(config, sink, checkpoint_dir, checkpoint_every, resume)
        blocks = host_blocks(config.num_workers, None if worker_extra else processes)  # the workers of each process
        launcher.connect(len(blocks))  # a Ray launcher: its cluster, and the address it binds
        hosts = () if launcher.advertise_host == "127.0.0.1" else (launcher.advertise_host,)
        pki = certs.make_test_pki(out / "tls", worker_ids(config.num_workers), hosts) if tls else None
        server, port = create_server(
            ps, f"{launcher.bind_host}:0", security=None if pki is None else pki.server_security()
        )
        argvs = []
        names: list[tuple[str, Path]] = []  # per process: who it runs, its log
        for block in blocks:
            i = block[0]
            one = len(block) == 1
            name = worker_id(i) if one else f"{worker_id(i)}..{worker_id(block[-1])}"
            names.append((name, out / (f"worker{i}.log" if one else f"workers{i}-{block[-1]}.log")))
            ids = worker_id(i) if one else "{id}"  # a host's workers: their own credentials, by id
            extra = (*(worker_extra or {}).get(i, ()), *(pki.worker_argv(ids) if pki else ()))
            argvs.append(host_argv(launcher.address(port), block, config.num_workers, dc, extra, device=device))
        workers = launcher.start(argvs, [log for _, log in names])
        procs = workers.procs
        watcher = _WorkerWatch(ps, procs, out, names)
        summary = ps.run()
        atomic_save_npy(out / "model.npy", ps.theta)
        summary.update(evaluator.final(ps.theta))
        for cost in costs:
            summary[f"to_{cost.key}"] = cost.reached
        summary["stopped_by"] = ps.engine.stopped_by or "rounds"
        summary["stop_round"] = stop_round[0] if stop_round else None
        summary["config"] = config_manifest(config, dc)
        summary["worker_exit_codes"] = _wait_all(procs, max(30.0, 2 * config.done_grace))
        summary["status"] = "done"
        return summary
    except KeyboardInterrupt:
        if ps is not None:
            ps.fail("interrupted")
        raise RunInterrupted(_unfinished(ps, config, dc, "interrupted", "interrupted")) from None
    except (RuntimeError, OSError) as exc:  # the run failed (see ParameterServer.run), or could not start
        if ps is not None:
            ps.fail(str(exc))
        reason = (watcher.reason if watcher else None) or _explain(exc, ps, config, out)
        raise RunFailed(reason, _unfinished(ps, config, dc, "failed", reason)) from None
    finally:
        if watcher is not None:
            watcher.stop()
        _kill_all(procs)
        if workers is not None:
            workers.close()
        if server is not None:
            server.stop(grace=None)
        if sink is not None:
            sink.close()


def owned_config(config: ServerConfig, n_features: int, n_classes: int) -> ServerConfig:
    """The job as this launcher's server runs it: it owns the task's shape (of the data it loaded)
    and the ids of the workers it starts."""
    return replace(
        config,
        task_shape=config.task_shape or (n_features, n_classes),
        worker_ids=config.worker_ids or tuple(worker_ids(config.num_workers)),
    )


def _kept_records(path: Path, keep: int | None) -> list[dict[str, Any]]:
    """The first ``keep`` records of a metrics file a resumed job continues (none when ``keep`` is
    None; the file's own check, :class:`psrv.files.LineLog`, refuses one that is too short)."""
    if not keep:
        return []
    records = []
    with contextlib.suppress(OSError), open(path, encoding="utf-8") as f:
        for line, _ in zip(f, range(keep), strict=False):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


class ResumeError(ValueError):
    """``psrv run --resume`` cannot go on (one line)."""


def resume_plan(
    directory: str | Path, configs: list[ServerConfig], dc: DataConfig, summary_path: str | Path, shape: tuple[int, int]
) -> list[tuple[dict[str, Any] | None, Any]]:
    """For each job of a ``psrv run --resume DIR``: (its summary, None) when it finished before --
    a "done" summary of the same job in the previous ``summary_path`` --, else (None, its checkpoint
    ``DIR/<algorithm>/checkpoint.npz``), or (None, None) when it has none (it starts over).
    :class:`ResumeError` for a checkpoint that cannot be read or was made by another job."""
    from psrv.checkpoint import FILE, CheckpointError, load

    previous: Any = None
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads(Path(summary_path).read_text())
    previous = [previous] if isinstance(previous, dict) else previous if isinstance(previous, list) else []
    plan: list[tuple[dict[str, Any] | None, Any]] = []
    for config in configs:
        full = owned_config(config, *shape)
        want = _job_identity(config_manifest(full, dc))
        done = [
            s for s in previous
            if isinstance(s, dict) and s.get("status") == "done" and s.get("algorithm") == config.algorithm
            and isinstance(s.get("config"), dict) and _job_identity(s["config"]) == want
        ]  # fmt: skip
        if done:
            plan.append((done[0], None))
            continue
        ck = Path(directory) / config.algorithm
        if not (ck / FILE).exists():
            plan.append((None, None))
            continue
        try:
            plan.append((None, load(ck, full)))
        except CheckpointError as exc:
            raise ResumeError(f"{config.algorithm}: {exc}") from None
    if all(kept is None and ckpt is None for kept, ckpt in plan):  # a wrong DIR would start everything over
        names = ",".join(c.algorithm for c in configs)
        raise ResumeError(
            f"nothing to resume: no {Path(directory)}/<algorithm>/{FILE} for {names} and no finished run of this job "
            f"in {summary_path}; run without --resume to start over"
        )
    return plan


def _job_identity(manifest: dict[str, Any]) -> Any:
    """What makes two runs the same job: the server's configuration less what a resume may change
    (:data:`psrv.checkpoint.MAY_CHANGE`), and the data."""
    from psrv.checkpoint import MAY_CHANGE

    server = {k: v for k, v in (manifest.get("server") or {}).items() if k not in MAY_CHANGE}
    return json.dumps([server, manifest.get("data")], sort_keys=True)


def _unfinished(
    ps: ParameterServer | None, config: ServerConfig, dc: DataConfig, status: str, error: str
) -> dict[str, Any]:
    """The summary of a job that did not finish: its totals over the rounds it closed."""
    summary: dict[str, Any] = {"algorithm": config.algorithm, "workers": config.num_workers, "rounds": 0}
    if ps is not None:
        with contextlib.suppress(Exception):  # a summary of what there is; never a second error
            summary.update(ps.summary())
    summary.update(status=status, error=error, config=config_manifest(config, dc))
    return summary


def _explain(exc: BaseException, ps: ParameterServer | None, config: ServerConfig, out: Path) -> str:
    """One line for a failed job: the server's reason and, for an unfinished registration, who is
    missing and which flag waits longer."""
    msg = str(exc) or type(exc).__name__
    ids = list(config.worker_ids or worker_ids(config.num_workers))
    if ps is None or ps.engine.state.workers.keys() >= set(ids):
        return msg
    missing = [i for i in ids if i not in ps.engine.state.workers]
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    return f"{msg}; missing {shown} (see {out}/worker*.log; --register-timeout {config.register_timeout:g})"


def _last_line(path: Path) -> str:
    """The last non-blank line of a worker's log (its error message), shortened."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = [x.strip() for x in f.read().decode("utf-8", "replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


class _WorkerWatch:
    """Fails the run as soon as it cannot go on because of the worker processes: one exits before
    registration completes (registration needs every one), or every one exits with an error while
    training. ``reason`` is the one line it gave (None if it did not)."""

    def __init__(
        self,
        ps: ParameterServer,
        procs: list[subprocess.Popen],
        out: Path,
        names: list[tuple[str, Path]] | None = None,
        poll: float = 0.2,
    ) -> None:
        self.ps, self.procs, self.out, self.poll = ps, procs, out, poll
        #: per process: the worker(s) it runs and its log
        self.names = names or [(worker_id(i), out / f"worker{i}.log") for i in range(len(procs))]
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="psrv-worker-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _fail(self, reason: str) -> None:
        self.reason = reason
        self.ps.fail(reason)

    def _watch(self) -> None:
        while not self._stop.is_set():
            phase = self.ps.phase
            codes = [p.poll() for p in self.procs]
            if phase == "registering":
                # a worker exits 0 only after the run is done: any other exit now is a failed start
                dead = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
                if dead:
                    i, code = dead[0]
                    who, log = self.names[i]
                    said = _last_line(log)
                    self._fail(
                        f"worker {who} exited with code {code} before registration completed"
                        + (f": {said}" if said else "")
                        + f" (see {log})"
                    )
                    return
            elif phase == "training":
                if codes and all(c not in (None, 0) for c in codes):
                    self._fail(f"every worker process exited (codes {codes}); see {self.out}/worker*.log")
                    return
            else:
                return
            self._stop.wait(self.poll)


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes of workers that were told the run is done; one still running after ``timeout``
    seconds (all together) is killed (its code is then -9)."""
    deadline = time.monotonic() + timeout
    codes = []
    for i, p in enumerate(procs):
        try:
            codes.append(p.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            log.warning("worker w%d did not exit %g s after the run; killed", i, timeout)
            p.kill()
            codes.append(p.wait())
    return codes


def _kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every worker still running and reap it (a worker has nothing to save)."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)

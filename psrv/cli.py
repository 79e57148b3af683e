"""Command line: ``psrv run``, ``psrv start-server``, ``psrv start-worker``, ``psrv plot``, and the
``cluster`` and ``inspect`` groups (loaded only when named).

Job and data options are declared once in :mod:`psrv.options`. Heavy modules (torch, grpc,
matplotlib, scikit-learn, mlxtend) are imported inside the commands that use them, so
``psrv --help`` and the subcommands that need none of them start fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from psrv.launch_options import launcher_options, pop_launcher
from psrv.options import (
    check_job_data,
    checkpoint_options,
    data_options,
    job_and_data_options,
    job_options,
    jobs_from_cli,
    pop_checkpoint,
    pop_data,
    pop_device,
    pop_server_options,
    server_options,
)
from psrv.stopping import StopRule
from psrv.tls_options import (
    check_worker_security,
    pop_client_security,
    pop_server_security,
    server_tls_options,
    worker_tls_options,
)


class LazyGroup(click.Group):
    """A group whose listed subcommands are imported only when they are run or asked for help."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attr = self.lazy[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List every command without importing the lazy ones (their one-line help is given here)."""
        rows = [(name, self.commands[name].get_short_help_str(60)) for name in super().list_commands(ctx)]
        rows += [(name, LAZY_HELP[name]) for name in self.lazy]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(sorted(rows))


class OutputPathError(click.ClickException):
    """An output path that cannot be written or would overwrite a file: ``Error: ...``, exit 2."""

    exit_code = 2


def check_outputs(
    dirs: dict[str, str | None] | None = None,
    files: dict[str, str | None] | None = None,
    metrics: str | None = None,
    overwrite_metrics: bool = False,
) -> None:
    """Every output path can be written, before anything trains: ``{option: path}`` (None skipped);
    the ``--metrics`` file must also be new or empty unless ``overwrite_metrics``."""
    from psrv import files as f

    try:
        for what, path in (dirs or {}).items():
            if path is not None:
                f.check_writable_dir(path, what)
        for what, path in (files or {}).items():
            if path is not None:
                f.check_writable_file(path, what)
        if metrics is not None:
            f.check_new_log(metrics, "--metrics", overwrite_metrics)
    except f.OutputError as exc:
        raise OutputPathError(str(exc)) from None


LAZY_HELP = {
    "cluster": "Shaped multi-host runs on one machine: one network namespace per host (needs root).",
    "inspect": "Look at psrv's traffic on the wire: HTTP/2 frames, gRPC messages, bytes per field.",
    "fit-cost": "Measure the link to a server and fit a cost model (affine, packet) to transmission times.",
    "experiment": "Run a grid of methods x seeds x links x settings from a TOML config into one results folder.",
    "report": "Re-render an experiment folder's tables, plots and report.md from its saved runs.",
}


@click.group(
    cls=LazyGroup,
    lazy={
        "cluster": ("psrv.cluster.cli", "cluster"),
        "inspect": ("psrv.inspect.cli", "inspect"),
        "fit-cost": ("psrv.costfit_cli", "fit_cost"),
        "experiment": ("psrv.experiment_cli", "experiment"),
        "report": ("psrv.experiment_cli", "report"),
    },
)
@click.version_option(package_name="psrv")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """psrv: a communication-efficient parameter server over gRPC."""
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


@main.command()
@job_and_data_options
@checkpoint_options
@click.option(
    "--eval-every",
    type=click.IntRange(min=0),
    default=None,
    help="Record the full training loss and test accuracy every N rounds (default: about 100 times a run; 0: never).",
)
@click.option(
    "--target-accuracy",
    type=float,
    default=None,
    help="Report rounds/uploads/bits/bytes until the test accuracy first reaches this (SASG paper, Table II).",
)
@click.option(
    "--target-loss",
    type=float,
    default=None,
    help="Report rounds/uploads/bits/bytes until the training loss first reaches this (LAQ paper, Table 2).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="psrv-out",
    show_default=True,
    help="Folder for the manifest, metrics (<out>/<algorithm>/metrics.jsonl), models and worker logs.",
)
@click.option(
    "--summary-json",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the summary here (default <out>/summary.json): one object, or a list when comparing.",
)
@click.option(
    "--tls",
    is_flag=True,
    default=False,
    help="Make a throwaway CA, certificates and tokens in <out>/<algorithm>/tls and run over mutual TLS with "
    "per-worker tokens (see `psrv certs`).",
)
@click.option(
    "--register-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="How long a job waits for all its workers to register [default: 60 s + 10 s per worker, more for big "
    "data]. A worker that exits before registering fails the job at once.",
)
@click.option(
    "--start-timeout",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="How long round 0 waits for every registered worker to be ready before its deadline starts "
    "[default: 30 s + 2 s per worker, more for big data].",
)
@click.option(
    "--no-memory-check",
    is_flag=True,
    default=False,
    help="Start the workers even if they do not seem to fit the available memory (MemAvailable).",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes; with fewer than --workers each hosts its share as virtual workers (one thread, "
    "state and stream each; one connection per process) [default: one per worker up to the CPU cores, "
    "else cores - 1, at least 1].",
)
@click.option(
    "--resume",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="Continue a run made with --checkpoint-dir DIR that stopped (same options and --out): an algorithm "
    "that finished keeps its summary, one with DIR/<algorithm>/checkpoint.npz goes on from it (new workers "
    "rejoin; its metrics.jsonl is continued), one without starts over.",
)
@click.option(
    "--stop-at",
    multiple=True,
    metavar="loss=X|residual=X|accuracy=X",
    help="End each job at the first evaluated round (--eval-every) where the training loss <= X, the loss "
    "residual f - f* <= X (needs --fstar) or the test accuracy >= X (repeatable: the first one met).",
)
@click.option(
    "--fstar",
    default=None,
    metavar="F|auto",
    help="f* for --stop-at residual=X: a number, or auto (solved by L-BFGS; logreg and linreg).",
)
@click.option(
    "--tensorboard",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="Also write per-round scalars to DIR/<algorithm> for TensorBoard (needs the tensorboard extra).",
)
@launcher_options
def run(
    eval_every: int | None,
    target_accuracy: float | None,
    target_loss: float | None,
    out: str,
    summary_json: str | None,
    tls: bool,
    register_timeout: float | None,
    start_timeout: float | None,
    no_memory_check: bool,
    processes: int | None,
    resume: str | None,
    stop_at: tuple[str, ...],
    fstar: str | None,
    tensorboard: str | None,
    **kw: Any,
) -> None:
    """Train on this machine: one server and M worker processes over loopback gRPC.

    Algorithms run one after another; one that fails is reported (stderr, and its summary with
    "status": "failed") and the others still run (exit code 1). Ctrl-C stops every worker at once,
    keeps what finished and exits 130 (SIGTERM: 143)."""
    from psrv import memory

    memory.tune_malloc()  # before any thread starts (see psrv.memory)
    from psrv import runner as rn

    if kw["rounds"] < 1:
        raise click.BadParameter("nothing to train; pass --rounds 1 or more", param_hint="--rounds")
    dc = pop_data(kw)
    device = pop_device(kw)
    launcher = pop_launcher(kw, device)  # --launcher ray without Ray installed: a usage error here
    checkpoint_dir, checkpoint_every = pop_checkpoint(kw)
    jobs = jobs_from_cli(kw, dc.data)
    train, test, dim = check_job_data(jobs[0], dc, device)  # a bad --data, or a task that fails on it, fails here
    nbytes, workers = rn.data_bytes(train, test), jobs[0].workers
    processes, logical = _worker_processes(jobs, processes, launcher, no_memory_check, len(train), nbytes, dim)
    register_default, start_default = rn.startup_timeouts(workers, nbytes, dim)
    timeouts = {
        "register_timeout": register_default if register_timeout is None else register_timeout,
        "start_timeout": start_default if start_timeout is None else start_timeout,
    }
    try:
        configs = [job.server_config(**timeouts) for job in jobs]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    stops, fstar_value = _stop_options(stop_at, fstar, eval_every, jobs[0], dc, tensorboard)
    path = summary_json or str(Path(out) / "summary.json")
    plan: list[tuple[Any, Any]] = [(None, None)] * len(jobs)  # per job: (kept summary, checkpoint)
    if resume is not None:  # read before anything is cleared
        checkpoint_dir = resume if checkpoint_dir is None else checkpoint_dir  # go on checkpointing there
        try:
            plan = rn.resume_plan(resume, configs, dc, path, (train.n_features, train.n_classes))
        except rn.ResumeError as exc:
            raise click.UsageError(f"--resume: {exc}") from None
    # after the checks that make nothing
    check_outputs(dirs={"--out": out, "--checkpoint-dir": checkpoint_dir}, files={"--summary-json": summary_json})
    try:  # a Ray launcher connects (or starts its cluster) once for all the jobs (before --out is cleared)
        launcher.connect(processes)  # what the workers' processes ask Ray for
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{workers} worker(s) in {processes} process(es), up to {logical} each (--processes to change)",
               err=True)  # fmt: skip
    fresh = [job.algorithm for job, (kept, ckpt) in zip(jobs, plan, strict=True) if kept is None and ckpt is None]
    _clear_run_dir(Path(out), fresh, path)
    manifest = rn.write_manifest(out, [], dc, device)  # lists each run once it has finished
    summaries: list[dict[str, Any]] = []
    finished: list[Any] = []
    unfinished: list[dict[str, Any]] = []

    def keep(summary: dict[str, Any], config: Any) -> None:
        summaries.append(summary)
        if summary.get("status") == "done":
            finished.append(config)
        else:
            unfinished.append({k: summary.get(k) for k in ("algorithm", "status", "error", "rounds")})
            unfinished[-1]["dir"] = config.algorithm
        rn.write_manifest(out, finished, dc, device, unfinished)

    run = _JobRun(
        out=Path(out), dc=dc, device=device, tls=tls, launcher=launcher, processes=processes,
        eval_every=eval_every, tensorboard=tensorboard, checkpoint_every=checkpoint_every,
        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
        stop=None if not stops else StopRule(stops, fstar_value),
        targets={k: v for k, v in (("accuracy", target_accuracy), ("train_loss", target_loss)) if v is not None},
    )  # fmt: skip
    received: list[int] = []
    interrupted = False
    with launcher, _stop_signals(received):
        try:
            for job, config, (kept, ckpt) in zip(jobs, configs, plan, strict=True):
                if kept is not None:  # --resume: finished before
                    click.echo(f"{job.algorithm:>8}  finished before (--resume): summary kept", err=True)
                    keep(kept, config)
                    continue
                try:
                    summary = run.job(job.algorithm, config, ckpt)
                except rn.RunInterrupted as exc:
                    keep(exc.summary, config)
                    raise
                if stops:
                    summary.update(stop=stops, fstar=fstar_value)
                if summary["status"] != "done":
                    click.echo(f"Error: {job.algorithm} failed: {summary['error']}", err=True)
                keep(summary, config)
        except KeyboardInterrupt:  # in a job (its partial summary is kept) or between two
            interrupted = True
    with _ignore_stop_signals() if interrupted else contextlib.nullcontext():
        _report(out, path, manifest, summaries, finished, len(jobs), received if interrupted else None)
    if unfinished:
        sys.exit(1)


def _worker_processes(
    jobs: list[Any], processes: int | None, launcher: Any, no_memory_check: bool, samples: int, nbytes: int, dim: int
) -> tuple[int, int]:
    """``psrv run``'s worker processes and logical workers per process (``--processes``, else
    :func:`psrv.runner.default_processes`; dsgd: one per worker); a usage error when the machine
    cannot hold them (more workers than samples, or than memory holds), before anything starts."""
    from psrv import runner as rn

    workers = jobs[0].workers
    processes = min(processes or rn.default_processes(workers), workers)
    if any(j.algorithm == "dsgd" for j in jobs):  # decentralized: a process per worker (psrv.meshrun)
        processes = workers
    logical = -(-workers // processes)
    try:
        available = None if no_memory_check or getattr(launcher, "address_", None) else rn.mem_available()
        per_host = rn.host_memory(nbytes, dim, logical)
        rn.check_capacity(workers, samples, rn.worker_memory(nbytes, dim), available, processes, per_host)
    except rn.CapacityError as exc:
        raise click.UsageError(str(exc)) from None
    return processes, logical


@dataclasses.dataclass
class _JobRun:
    """What every job of one ``psrv run`` is run with (:meth:`job`)."""

    out: Path
    dc: Any
    device: Any
    tls: bool
    launcher: Any
    processes: int
    eval_every: int | None
    tensorboard: str | None
    checkpoint_dir: Path | None
    checkpoint_every: int | None
    stop: Any
    targets: dict[str, float]

    def job(self, algorithm: str, config: Any, ckpt: Any) -> dict[str, Any]:
        """Run one job (``ckpt``: the checkpoint it resumes from, or None) with a progress bar on
        stderr; its summary, also when it failed. ``RunInterrupted`` passes through."""
        from psrv import runner as rn

        every = self.checkpoint_every if self.checkpoint_every is not None else ckpt.every if ckpt else 10
        with click.progressbar(
            length=config.rounds,
            label=f"{algorithm:>8}",
            file=sys.stderr,
            item_show_func=lambda r: f"loss {r['loss']:.5f}" if r and r.get("loss") is not None else "",
        ) as bar:
            tb = None if self.tensorboard is None else _tensorboard_writer(Path(self.tensorboard) / algorithm)

            def on_round(record: dict[str, Any]) -> None:
                bar.update(1, record)
                if tb is not None:
                    tb(record)

            try:
                return rn.run_local(
                    config,
                    self.dc,
                    self.out / algorithm,
                    on_round=on_round,
                    eval_every=max(1, config.rounds // 100) if self.eval_every is None else self.eval_every,
                    targets=self.targets,
                    device=self.device,
                    checkpoint_dir=None if self.checkpoint_dir is None else self.checkpoint_dir / algorithm,
                    checkpoint_every=every,
                    tls=self.tls,
                    resume=ckpt,
                    stop=self.stop,
                    launcher=self.launcher,
                    processes=self.processes,
                )
            except rn.RunFailed as exc:
                return exc.summary
            finally:
                if tb is not None:
                    tb.close()


def _report(
    out: str,
    path: str,
    manifest: Any,
    summaries: list[dict[str, Any]],
    finished: list[Any],
    jobs: int,
    received: list[int] | None,
) -> None:
    """The table, the summary file and where things are; ``received``: the stop signals of an
    interrupted run (None: it was not), which exits 128 + the signal after saying what finished."""
    from psrv import plots, report

    if summaries:
        click.echo(report.table(summaries))
        report.write_json(path, summaries[0] if jobs == 1 else summaries)
    if received is not None:
        stopped = signal.Signals(received[0]).name if received else "SIGINT"
        done = ", ".join(c.algorithm for c in finished) or "none"
        click.echo(
            f"Interrupted ({stopped}): workers stopped; finished: {done}; summary: {path if summaries else '-'}; "
            f"`psrv plot {out}` draws what finished",
            err=True,
        )
        sys.exit(128 + (received[0] if received else signal.SIGINT))
    click.echo(f"summary: {path}; manifest: {manifest}; per-round metrics: {Path(out)}/<algorithm>/metrics.jsonl")
    if finished:
        click.echo(f"plot: {plots.plot_run_dir(out)}")


def _stop_options(
    stop_at: tuple[str, ...], fstar: str | None, eval_every: int | None, job: Any, dc: Any, tensorboard: str | None
) -> tuple[dict[str, float], float | None]:
    """The checked ``--stop-at`` targets and f* (``--fstar auto`` solved here), and ``--tensorboard``'s
    package, before anything runs."""
    from psrv import stopping

    if tensorboard is not None:
        from psrv.tboard import TensorBoardMissing, check_available

        try:
            check_available()
        except TensorBoardMissing as exc:
            raise click.UsageError(str(exc)) from None
    try:
        stops = stopping.parse_stop(stop_at)
    except stopping.StopRuleError as exc:
        raise click.BadParameter(str(exc), param_hint="--stop-at") from None
    if stops and eval_every == 0:
        raise click.BadParameter("--stop-at needs evaluations; pass --eval-every 1 or more", param_hint="--eval-every")
    value: float | None = None
    if fstar is not None and fstar != "auto":
        try:
            value = float(fstar)
        except ValueError:
            raise click.BadParameter(f"{fstar!r} is neither a number nor auto", param_hint="--fstar") from None
    if "residual" in stops:
        if fstar is None:
            raise click.BadParameter("--stop-at residual=X needs --fstar F (or --fstar auto)", param_hint="--fstar")
        if fstar == "auto":
            config = job.server_config()
            try:
                value = stopping.solve_fstar(config.task, dict(config.task_options), dc)
            except stopping.StopRuleError as exc:
                raise click.BadParameter(str(exc), param_hint="--fstar") from None
            click.echo(f"f* = {value:.12g} (L-BFGS on the full training objective)", err=True)
    return stops, value


def _tensorboard_writer(log_dir: Path) -> Any:
    from psrv.tboard import RoundWriter

    return RoundWriter(log_dir)


def _clear_run_dir(out: Path, algorithms: list[str], summary: str) -> None:
    """A reused ``--out`` is this run's: the files an earlier run left that this one writes go first,
    so a run that fails or is interrupted never leaves them next to its own (the manifest, written
    next, lists no run until one finishes)."""
    from psrv.runner import JOB_OUTPUTS

    for name in algorithms:
        for file in JOB_OUTPUTS:
            (out / name / file).unlink(missing_ok=True)
    for file in (out / "loss.png", Path(summary)):
        file.unlink(missing_ok=True)


@contextlib.contextmanager
def _stop_signals(received: list[int]) -> Iterator[None]:
    """In the block, SIGINT and SIGTERM raise KeyboardInterrupt in the main thread (the signal is
    appended to ``received``); one ignored when this process started (nohup, a background job)
    stays ignored. Restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            old[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _ignore_stop_signals() -> Iterator[None]:
    """After an interrupt: a second Ctrl-C does not cut the writing of what finished (a second or two)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--out", "out_path", type=click.Path(dir_okay=False), default=None, help="PNG path (default RUN_DIR/loss.png)."
)
def plot(run_dir: str, out_path: str | None) -> None:
    """Plot loss vs rounds, uplink bytes and wall time for every algorithm of a run folder's manifest."""
    from psrv import plots

    try:
        click.echo(plots.plot_run_dir(run_dir, out_path))
    except (FileNotFoundError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None


@main.command("start-server")
@job_options
@server_options
@checkpoint_options
@click.option(
    "--resume",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="Continue the run checkpointed in DIR (same job options; --rounds may grow): workers re-register "
    "under their ids and rejoin; --metrics is continued after the checkpoint's lines.",
)
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=50051, show_default=True)
@click.option("--register-timeout", type=float, default=300.0, show_default=True)
@click.option(
    "--metrics",
    type=click.Path(dir_okay=False),
    default=None,
    help="Per-round metrics JSONL (whole lines only). An existing non-empty file is refused.",
)
@click.option(
    "--overwrite-metrics", is_flag=True, default=False, help="Replace an existing --metrics file instead of refusing."
)
@click.option(
    "--summary-json", type=click.Path(dir_okay=False), default=None, help="Write the summary here (atomically)."
)
@click.option(
    "--model-out", type=click.Path(dir_okay=False), default=None, help="Save the final model (.npy, atomically)."
)
@server_tls_options
def start_server(
    host: str,
    port: int,
    register_timeout: float,
    metrics: str | None,
    overwrite_metrics: bool,
    summary_json: str | None,
    model_out: str | None,
    resume: str | None,
    **kw: Any,
) -> None:
    """Run the parameter server for one algorithm until the configured rounds are done."""
    from psrv import memory

    memory.tune_malloc()  # before any thread starts (see psrv.memory)
    from psrv import files, report
    from psrv.metrics import MetricsSink
    from psrv.runner import config_manifest
    from psrv.server import create_server
    from psrv.tls import is_loopback

    security = pop_server_security(kw)
    if len(kw["algorithms"]) != 1:
        raise click.UsageError(f"a server runs one algorithm; got {','.join(kw['algorithms'])} (pass --algorithm NAME)")
    checkpoint_dir, checkpoint_every = pop_checkpoint(kw)
    (job,) = jobs_from_cli(kw)
    owned, limits = pop_server_options(kw, job.task, job.seed)
    try:
        config = job.server_config(register_timeout=register_timeout, **owned)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        check_port_free(host, port)  # before gRPC, whose own failure to bind is a log line and a vague error
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    ckpt = None
    if resume is not None:
        from psrv.checkpoint import CheckpointError, load

        try:
            ckpt = load(resume, config)
        except CheckpointError as exc:
            raise click.ClickException(f"--resume: {exc}") from None
        checkpoint_dir = resume if checkpoint_dir is None else checkpoint_dir  # go on checkpointing there
        checkpoint_every = ckpt.every if checkpoint_every is None else checkpoint_every
    model_path = None if model_out is None else str(files.npy_path(model_out))
    # a resumed run continues the metrics file it wrote (cut back to the checkpoint's lines); else a new one
    keep = None if ckpt is None or metrics is None or ckpt.metrics_lines is None else ckpt.metrics_lines
    check_outputs(dirs={"--checkpoint-dir": checkpoint_dir},
                  files={"--summary-json": summary_json, "--model-out": model_path},
                  metrics=metrics if keep is None else None, overwrite_metrics=overwrite_metrics)  # fmt: skip
    try:
        sink = MetricsSink(metrics, overwrite=overwrite_metrics, keep_lines=keep)  # resumed: continued, not replaced
    except files.OutputError as exc:
        raise OutputPathError(str(exc)) from None
    if config.algorithm == "dsgd":  # decentralized: a coordinator, no parameter server (psrv.mesh)
        from psrv.mesh import serve_mesh

        if checkpoint_dir is not None or security.tls:
            sink.close()
            raise click.UsageError("dsgd runs without --checkpoint-dir/--resume and TLS (not supported yet)")
        try:
            summary, theta = serve_mesh(config, sink, f"{host}:{port}")
        except (ValueError, RuntimeError) as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            sink.close()
        summary["config"] = config_manifest(config, None)
        if model_out:
            files.atomic_save_npy(model_out, theta)
        if summary_json:
            report.write_json(summary_json, summary)
        click.echo(json.dumps(summary))
        return
    from psrv.checkpoint import checkpointed_server

    try:
        every = 10 if checkpoint_every is None else checkpoint_every
        ps, checkpointer = checkpointed_server(config, sink, checkpoint_dir, every, ckpt, limits)
        server, bound = create_server(ps, f"{host}:{port}", security=security)
    except (ValueError, RuntimeError) as exc:
        sink.close()
        raise click.ClickException(str(exc)) from None
    if not security.tls and not is_loopback(host):
        warning = f"warning: listening on {host} without TLS: anyone who reaches the port can register, upload"
        click.echo(f"{warning} and read the model (see --tls-cert, --tls-client-ca, --worker-tokens)", err=True)
    shape = "the first registration's" if config.task_shape is None else "{},{}".format(*config.task_shape)
    what = " to rejoin" if ckpt is not None else ""
    click.echo(f"psrv server listening on {host}:{bound}; waiting for {config.num_workers} workers{what}; "
               f"shape {shape}", err=True)  # fmt: skip
    if ckpt is not None:
        click.echo(f"resumed from {str(ckpt.path)!r} after round {ckpt.state.round}", err=True)

    def stop(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if checkpointer is None:
            ps.fail(f"terminated by {name}")
        else:  # checkpoint at the next round's close, then stop (a second signal stops at once)
            checkpointer.request_stop(name)

    signal.signal(signal.SIGTERM, stop)
    if checkpointer is not None:
        signal.signal(signal.SIGINT, stop)
    try:
        summary = ps.run()
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        server.stop(grace=1.0)
        sink.close()
    summary["config"] = config_manifest(config, None)
    if model_out:
        files.atomic_save_npy(model_out, ps.theta)
    if summary_json:
        report.write_json(summary_json, summary)
    click.echo(json.dumps(summary))


def check_port_free(host: str, port: int) -> None:
    """``RuntimeError`` (one line) when ``host:port`` cannot be bound, e.g. another server listens
    there (the server binds without SO_REUSEPORT, so two servers never share a port)."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
        try:
            sock.bind(address)
        except OSError as exc:
            reason = "port in use (another server?)" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise RuntimeError(f"cannot listen on {host}:{port}: {reason}") from None


@main.command("start-worker")
@click.option("--server", "server_address", required=True, help="HOST:PORT of the parameter server.")
@click.option(
    "--worker-id",
    default=None,
    help="The worker's id (required for one worker); with --shard A-B/M, optionally the hosted workers' ids as a "
    "comma list [default: w<A>..w<B>, the ids `psrv run` gives].",
)
@data_options
@click.option(
    "--shard",
    default=None,
    metavar="I/M",
    help="Use shard I of M of the data (omit when the file is this worker's own). A-B/M: host the logical "
    "workers of shards A..B (virtual workers: one process, each worker its own id, state and report; "
    "credential paths may contain {id}).",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds the first registration keeps trying while the server is not up yet.",
)
@click.option(
    "--retry-for",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="A worker that loses the server retries (exponential backoff, full jitter) for this long, then "
    "registers again under its id and goes on; past it, it exits 1 naming the address and the cause.",
)
@click.option("--crash-after", type=int, default=None, hidden=True, help="Fault injection for tests.")
@worker_tls_options
@click.option(
    "--byzantine", type=float, default=0.0, hidden=True, metavar="SCALE", help="Fault injection: upload -SCALE x grad."
)
@click.option(
    "--gossip-listen",
    default=None,
    metavar="HOST:PORT",
    help="Decentralized runs (--algorithm dsgd): serve the neighbours' gossip here (port 0: any free one); "
    "--server is then the run's coordinator.",
)
def start_worker(
    server_address: str,
    worker_id: str | None,
    shard: str | None,
    connect_timeout: float,
    retry_for: float,
    crash_after: int | None,
    byzantine: float,
    gossip_listen: str | None,
    **kw: Any,
) -> None:
    """Run one worker: register with the server and train until it says done."""
    from psrv import lifeline, memory

    lifeline.from_env()  # started by `psrv run`: die with it (PSRV_PARENT_PID)
    memory.tune_malloc()  # before any thread starts (see psrv.memory)
    from psrv.data import DataError
    from worker.client import WorkerConfig, check_address, run_worker

    try:
        check_address(server_address)  # before the data loads
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--server") from None
    security = pop_client_security(kw)
    dc = pop_data(kw)
    device = pop_device(kw)
    cfg = WorkerConfig(
        server=server_address,
        worker_id=worker_id or "",
        data=dc.data,
        split=dc.split,
        seed=dc.seed,
        test_fraction=dc.test_fraction,
        connect_timeout=connect_timeout,
        retry_for=retry_for,
        crash_after=crash_after,
        byzantine=byzantine,
        regression=dc.regression,
        device=device,
        security=security,
    )
    if shard is not None:
        from worker.host import parse_shard_range

        try:
            shards, num = parse_shard_range(shard)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--shard") from None
        if "-" in shard.split("/")[0]:  # virtual workers: a host of logical workers
            if gossip_listen is not None:
                raise click.UsageError("--gossip-listen runs one worker: pass --shard I/M, not a range")
            return _start_host(cfg, worker_id, shards, num)
        cfg = dataclasses.replace(cfg, shard=shards[0], num_shards=num)
    if worker_id is None:
        raise click.UsageError("Missing option '--worker-id' (or --shard A-B/M to host several workers).")
    if security.templated:  # --tls-cert pki/workers/{id}.crt: this worker's own files
        cfg = dataclasses.replace(cfg, security=security.for_worker(worker_id))
        check_worker_security(cfg.security)
    try:
        if gossip_listen is not None:
            from worker.gossip import run_gossip_worker

            result = run_gossip_worker(cfg, gossip_listen)
        else:
            result = run_worker(cfg)
    except DataError as exc:
        raise click.UsageError(str(exc)) from None
    except Exception as exc:  # grpc.RpcError and friends: say what the server said
        details = getattr(exc, "details", None)
        from psrv.tls import explain

        text = details() if callable(details) else str(exc)
        hint = explain(text or "", security) if callable(details) else ""
        raise click.ClickException(f"worker {worker_id}: {text}{hint}") from None
    click.echo(json.dumps({k: v for k, v in vars(result).items() if k != "final_params"}))


def _start_host(base: Any, ids_spec: str | None, shards: range, num: int) -> None:
    """``start-worker --shard A-B/M``: the logical workers of shards A..B in this process
    (:mod:`worker.host`), each ``base`` with its own id and shard; one JSON line per worker; exit 1
    naming those that failed."""
    from psrv.data import DataError
    from psrv.options import worker_id as default_id
    from worker.host import host_configs, run_host

    ids = [default_id(i) for i in shards] if ids_spec is None else [w.strip() for w in ids_spec.split(",")]
    if len(ids) != len(shards) or len(set(ids)) != len(ids) or not all(ids):
        raise click.BadParameter(f"{len(shards)} distinct ids for --shard's {len(shards)} workers, comma-separated",
                                 param_hint="--worker-id")  # fmt: skip
    cfgs = host_configs(base, shards, num, ids)
    if base.security.templated:  # each worker's own credential files, read and checked before any starts
        for cfg in cfgs:
            check_worker_security(cfg.security)
    try:
        out = run_host(cfgs)
    except DataError as exc:
        raise click.UsageError(str(exc)) from None
    for result in out.results:
        if result is not None:
            click.echo(json.dumps({k: v for k, v in vars(result).items() if k != "final_params"}))
    if out.errors:
        first = next(iter(out.errors.items()))
        more = f" (and {len(out.errors) - 1} more)" if len(out.errors) > 1 else ""
        raise click.ClickException(f"worker {first[0]}: {first[1]}{more}")


@main.command("certs")
@click.argument("out_dir", metavar="DIR", type=click.Path(file_okay=False))
@click.option(
    "--workers",
    "workers_spec",
    required=True,
    help="Worker ids: a count N (w0..wN-1, the ids `psrv run` and `psrv cluster run` give) or a list w0,w1,...",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="Another name or IP address of the server for its certificate (repeatable; localhost and 127.0.0.1 "
    "are always in).",
)
@click.option("--days", type=click.IntRange(min=1), default=30, show_default=True, help="Certificates' validity.")
def certs(out_dir: str, workers_spec: str, hosts: tuple[str, ...], days: int) -> None:
    """Make test certificates: a CA, a server certificate, a certificate and a token per worker.

    \b
    psrv certs pki --workers 2 --host server.example
    psrv start-server --tls-cert pki/server.crt --tls-key pki/server.key \\
        --tls-client-ca pki/ca.crt --worker-tokens pki/worker-tokens.txt ...
    psrv start-worker --worker-id w0 --tls-ca pki/ca.crt --tls-cert pki/workers/w0.crt \\
        --tls-key pki/workers/w0.key --token-file pki/workers/w0.token ...
    """
    from psrv.certs import make_test_pki, worker_ids

    try:
        ids = worker_ids(workers_spec)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--workers") from None
    check_outputs(dirs={"DIR": out_dir})
    pki = make_test_pki(out_dir, ids, hosts, days)
    click.echo(f"{pki.root}: ca.crt, server.crt/.key, worker-tokens.txt, workers/<id>.crt/.key/.token for {len(ids)} "
               f"worker(s): {', '.join(ids)}")  # fmt: skip

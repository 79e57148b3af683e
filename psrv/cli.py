"""Command line: ``psrv run``, ``psrv start-server``, ``psrv start-worker``."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from psrv import plots, report
from psrv.algorithms import ALGORITHMS
from psrv.cliutil import algorithm_list
from psrv.compress import COMPRESSORS
from psrv.data import SPLITS, DataError, builtin_task_hint
from psrv.runner import DataConfig, run_local
from psrv.server import ParameterServer, ServerConfig, create_server


def _parse_options(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in values:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key:
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"expected KEY=NUMBER, got {item!r}") from None
    return out


def algorithm_options(fn):
    """Options shared by ``run`` and ``start-server``: they define the job."""
    decorators = [
        click.option(
            "--compressor",
            default="",
            help=f"Uplink compressor (default: the algorithm's own). Known: {', '.join(sorted(COMPRESSORS))}.",
        ),
        click.option("--lr", type=float, default=0.02, show_default=True, help="Step size alpha."),
        click.option(
            "-o",
            "--option",
            "options",
            multiple=True,
            callback=_parse_options,
            metavar="KEY=VALUE",
            help="Algorithm/compressor option, e.g. -o bits=3 -o D=10 -o t_bar=100 -o ratio=0.01.",
        ),
        click.option(
            "--task",
            default=None,
            help="Model/objective: logreg, linreg, mlp (default: logreg, or the task a built-in data set is made for).",
        ),
        click.option(
            "--l2",
            type=float,
            default=None,
            help="L2 regularisation weight (default: the task's own: logreg 0.01, linreg 0, mlp 0).",
        ),
        click.option(
            "-t",
            "--task-option",
            "task_options",
            multiple=True,
            callback=_parse_options,
            metavar="KEY=VALUE",
            help="Task option, e.g. -t hidden=200 for mlp.",
        ),
        click.option("--rounds", type=click.IntRange(min=0), default=500, show_default=True),
        click.option("--workers", type=click.IntRange(min=1), default=10, show_default=True),
        click.option(
            "--round-timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=10.0,
            show_default=True,
            help="Seconds a round waits for reports; a worker that misses it counts as skipping.",
        ),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--zstd", is_flag=True, help="Workers zstd-compress each payload when that makes it smaller."),
    ]
    for d in reversed(decorators):
        fn = d(fn)
    return fn


def _server_config(
    algorithm: str,
    compressor: str,
    lr: float,
    options: dict[str, float],
    task: str | None,
    l2: float | None,
    task_options: dict[str, float],
    rounds: int,
    workers: int,
    round_timeout: float,
    seed: int,
    zstd: bool,
    **extra: Any,
) -> ServerConfig:
    try:
        return ServerConfig(
            algorithm=algorithm,
            compressor=compressor,
            options={"lr": lr, **options},
            task=task or "logreg",
            task_options={**({} if l2 is None else {"l2": l2}), **task_options},
            num_workers=workers,
            rounds=rounds,
            round_timeout=round_timeout,
            seed=seed,
            zstd=zstd,
            **extra,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """psrv: a communication-efficient parameter server over gRPC."""
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


@main.command()
@click.option(
    "--algorithm",
    "algorithms",
    default="gd,topk-ef,laq",
    show_default=True,
    callback=algorithm_list,
    help="One algorithm, or a comma-separated list to compare (e.g. gd,topk-ef,laq).",
)
@algorithm_options
@click.option(
    "--data",
    default="mnist",
    show_default=True,
    help="Built-in data set (mnist, digits, breast_cancer) or a .csv/.npz file.",
)
@click.option("--split", type=click.Choice(list(SPLITS)), default="iid", show_default=True)
@click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True)
@click.option("--regression", is_flag=True, help="The data file's label column is a real-valued target.")
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
    help="Folder for metrics (<out>/<algorithm>/metrics.jsonl), models and worker logs.",
)
@click.option(
    "--summary-json",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the summary here (default <out>/summary.json): one object, or a list when comparing.",
)
def run(
    algorithms: list[str],
    data: str,
    split: str,
    test_fraction: float,
    regression: bool,
    eval_every: int | None,
    target_accuracy: float | None,
    target_loss: float | None,
    out: str,
    summary_json: str | None,
    **kw: Any,
) -> None:
    """Train on this machine: one server and M worker processes over loopback gRPC."""
    dc = DataConfig(data=data, split=split, test_fraction=test_fraction, seed=kw["seed"], regression=regression)
    kw["task"] = kw["task"] or builtin_task_hint(data)
    try:
        from worker.client import load_training_data

        load_training_data(data, test_fraction, kw["seed"], regression)  # a bad --data fails here, clearly, once
    except DataError as exc:
        raise click.UsageError(str(exc)) from None
    summaries = []
    for name in algorithms:
        config = _server_config(name, **kw)
        with click.progressbar(
            length=config.rounds,
            label=f"{name:>8}",
            file=sys.stderr,
            item_show_func=lambda r: r and f"loss {r['loss']:.5f}" if r and r.get("loss") is not None else "",
        ) as bar:

            def on_round(record: dict[str, Any], bar=bar) -> None:
                bar.update(1, record)

            every = max(1, config.rounds // 100) if eval_every is None else eval_every
            targets = {k: v for k, v in (("accuracy", target_accuracy), ("train_loss", target_loss)) if v is not None}
            summary = run_local(config, dc, Path(out) / name, on_round=on_round, eval_every=every, targets=targets)
        summaries.append(summary)
    click.echo(report.table(summaries))
    path = summary_json or str(Path(out) / "summary.json")
    report.write_json(path, summaries[0] if len(summaries) == 1 else summaries)
    plot = plots.plot_run_dir(out)
    click.echo(f"summary: {path}; per-round metrics: {Path(out)}/<algorithm>/metrics.jsonl; plot: {plot}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--out", "out_path", type=click.Path(dir_okay=False), default=None, help="PNG path (default RUN_DIR/loss.png)."
)
def plot(run_dir: str, out_path: str | None) -> None:
    """Plot loss vs rounds, uplink bytes and wall time for every algorithm of a run folder."""
    try:
        click.echo(plots.plot_run_dir(run_dir, out_path))
    except FileNotFoundError as exc:
        raise click.UsageError(str(exc)) from None


@main.command("start-server")
@click.option("--algorithm", default="laq", show_default=True, type=click.Choice(sorted(ALGORITHMS)))
@algorithm_options
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=50051, show_default=True)
@click.option("--register-timeout", type=float, default=300.0, show_default=True)
@click.option("--metrics", type=click.Path(dir_okay=False), default=None, help="Per-round metrics JSONL.")
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None)
@click.option("--model-out", type=click.Path(dir_okay=False), default=None, help="Save the final model (.npy).")
def start_server(
    host: str,
    port: int,
    register_timeout: float,
    metrics: str | None,
    summary_json: str | None,
    model_out: str | None,
    **kw: Any,
) -> None:
    """Run the parameter server until the configured rounds are done."""
    config = _server_config(register_timeout=register_timeout, **kw)
    ps = ParameterServer(config, metrics_path=metrics)
    server, bound = create_server(ps, f"{host}:{port}")
    click.echo(f"psrv server listening on {host}:{bound}; waiting for {config.num_workers} workers", err=True)
    signal.signal(signal.SIGTERM, lambda *_: ps.fail("terminated"))
    try:
        summary = ps.run()
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        server.stop(grace=1.0)
        ps.close()
    if model_out:
        import numpy as np

        np.save(model_out, ps.theta)
    if summary_json:
        report.write_json(summary_json, summary)
    click.echo(json.dumps(summary))


def _attach_subcommands() -> None:
    from psrv.cluster.cli import cluster
    from psrv.inspect.cli import inspect

    main.add_command(inspect)
    main.add_command(cluster)


_attach_subcommands()


@main.command("start-worker")
@click.option("--server", "server_address", required=True, help="HOST:PORT of the parameter server.")
@click.option("--worker-id", required=True)
@click.option("--data", default="mnist", show_default=True, help="Built-in data set name or a .csv/.npz file.")
@click.option(
    "--shard",
    default=None,
    metavar="I/M",
    help="Use shard I of M of the data (omit when the file is this worker's own).",
)
@click.option("--split", type=click.Choice(list(SPLITS)), default="iid", show_default=True)
@click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--regression", is_flag=True, help="The data file's label column is a real-valued target.")
@click.option("--connect-timeout", type=float, default=60.0, show_default=True)
@click.option("--crash-after", type=int, default=None, hidden=True, help="Fault injection for tests.")
def start_worker(
    server_address: str,
    worker_id: str,
    data: str,
    shard: str | None,
    split: str,
    test_fraction: float,
    seed: int,
    regression: bool,
    connect_timeout: float,
    crash_after: int | None,
) -> None:
    """Run one worker: register with the server and train until it says done."""
    from worker.client import WorkerConfig, run_worker

    index = num = None
    if shard is not None:
        try:
            index, num = (int(x) for x in shard.split("/"))
            if not 0 <= index < num:
                raise ValueError
        except ValueError:
            raise click.BadParameter(f"expected I/M with 0 <= I < M, got {shard!r}", param_hint="--shard") from None
    cfg = WorkerConfig(
        server=server_address,
        worker_id=worker_id,
        data=data,
        shard=index,
        num_shards=num,
        split=split,
        seed=seed,
        test_fraction=test_fraction,
        connect_timeout=connect_timeout,
        crash_after=crash_after,
        regression=regression,
    )
    try:
        result = run_worker(cfg)
    except DataError as exc:
        raise click.UsageError(str(exc)) from None
    except Exception as exc:  # grpc.RpcError and friends: say what the server said
        details = getattr(exc, "details", None)
        raise click.ClickException(f"worker {worker_id}: {details() if callable(details) else exc}") from None
    click.echo(json.dumps({k: v for k, v in vars(result).items() if k != "final_params"}))

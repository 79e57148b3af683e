"""``psrv cluster``: a shaped multi-host run on one machine (network namespaces; needs root).

psrv cluster run --workers 4 --rate 10mbit --algorithm gd --rounds 100
psrv cluster run --workers 4 --rate 100mbit --worker-rate 0=1mbit --worker-rate 1=1mbit/10mbit
psrv cluster clean          # remove namespaces left by a run that was killed with SIGKILL
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import click

from psrv.cluster.config import SHAPE_AT, ClusterConfig, with_job
from psrv.cluster.netns import ClusterError, Interrupted, remove_namespaces, require_root, stale_namespaces
from psrv.cluster.shaping import QDISCS, LinkRates, parse_link
from psrv.files import atomic_write_json
from psrv.options import check_job_data, job_and_data_options, jobs_from_cli, pop_data, pop_device


def _link(ctx: click.Context, param: click.Parameter, value: str) -> LinkRates:
    try:
        return parse_link(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _indexed(kind: str, parse: Any) -> Any:
    def callback(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[int, Any]:
        out = {}
        for item in values:
            index, sep, value = item.partition("=")
            try:
                if not sep or not index.strip().isdigit():
                    raise ValueError(f"expected I={kind}, got {item!r}")
                out[int(index)] = parse(value)
            except ValueError as exc:
                raise click.BadParameter(str(exc)) from None
        return out

    return callback


@click.group("cluster")
def cluster() -> None:
    """Shaped multi-host runs on one machine: one network namespace per host (needs root)."""


@cluster.command("run")
@job_and_data_options
@click.option(
    "--rate",
    callback=_link,
    default="100mbit",
    show_default=True,
    metavar="RATE[/DOWN]",
    help="Every worker's link, both directions (UP/DOWN for different ones; none: unshaped).",
)
@click.option(
    "--worker-rate",
    "worker_rates",
    multiple=True,
    callback=_indexed("RATE", parse_link),
    metavar="I=RATE[/DOWN]",
    help="Worker I's link instead of --rate (repeatable), e.g. 0=1mbit.",
)
@click.option(
    "--server-rate",
    callback=_link,
    default="none",
    show_default=True,
    metavar="RATE[/DOWN]",
    help="The server's link (default unshaped, so the workers' links are the bottleneck).",
)
@click.option("--qdisc", type=click.Choice(QDISCS), default="tbf", show_default=True)
@click.option(
    "--shape-at",
    type=click.Choice(SHAPE_AT),
    default="bridge",
    show_default=True,
    help="bridge: shape both ends' egress from outside; host: each host shapes itself "
    "(egress + ifb ingress) through the container entrypoint.",
)
@click.option(
    "--offload/--no-offload",
    default=True,
    show_default=True,
    help="Segmentation offload on the veths (off: interface counters count real frames too).",
)
@click.option("--capture", is_flag=True, help="Record every frame (AF_PACKET) to time each upload on the wire.")
@click.option("--port", type=click.IntRange(1, 65535), default=50051, show_default=True)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=900.0,
    show_default=True,
    help="Give up (and clean up) after this many seconds per algorithm.",
)
@click.option(
    "--crash-worker",
    "crash_after",
    multiple=True,
    callback=_indexed("ROUNDS", int),
    hidden=True,
    metavar="I=N",
    help="Fault injection: worker I exits after N rounds.",
)
@click.option(
    "--tls",
    is_flag=True,
    default=False,
    help="Mutual TLS and worker tokens, with certificates made for the run in <out>/tls (psrv certs).",
)
@click.option("--out", type=click.Path(file_okay=False), default="psrv-out/cluster", show_default=True)
def run(out: str, **kw: Any) -> None:
    """Run a server and M workers in network namespaces with shaped links; report message vs wire bytes.

    Takes the job and data options of `psrv run`, with the same defaults. Needs root. Runs
    `psrv start-server` / `psrv start-worker` inside the namespaces. Every namespace, link and process
    it makes is removed when the run ends, fails or is interrupted (Ctrl-C, SIGTERM); `psrv cluster
    clean` removes what a run killed with SIGKILL left behind."""
    from psrv.cluster.run import run_cluster  # numpy, grpc and the capture: only when running
    from psrv.report import format_report

    dc = pop_data(kw)
    device = pop_device(kw)
    jobs = jobs_from_cli(kw, dc.data)
    try:
        require_root()
        check_job_data(jobs[0], dc, device)
        base = ClusterConfig(job=jobs[0], data=dc, device=device, **kw)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    results = []
    for job in jobs:
        cfg = with_job(base, job)
        name = job.algorithm
        algorithms = [j.algorithm for j in jobs]
        folder = Path(out) / name if len(algorithms) > 1 else Path(out)
        try:
            result = run_cluster(cfg, folder, echo=lambda s: click.echo(s, err=True))
        except ClusterError as exc:
            raise click.ClickException(str(exc)) from None
        except (KeyboardInterrupt, Interrupted) as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            click.echo(f"interrupted ({signal.Signals(signum).name}); the cluster's namespaces were removed", err=True)
            sys.exit(128 + signum)
        click.echo(format_report(result))
        click.echo(f"summary: {folder / 'summary.json'}; per-round metrics: {folder / 'metrics.jsonl'}")
        results.append(result)
    if len(results) > 1:
        atomic_write_json(Path(out) / "summary.json", results)


@cluster.command("clean")
def clean() -> None:
    """Remove namespaces left behind by runs whose process no longer exists (e.g. killed with SIGKILL)."""
    try:
        require_root()
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    removed = remove_namespaces(stale_namespaces())
    click.echo(f"removed {len(removed)} namespace(s)" + (": " + ", ".join(removed) if removed else ""))

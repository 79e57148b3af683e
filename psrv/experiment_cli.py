"""``psrv experiment CONFIG.toml`` and ``psrv report EXP`` (see :mod:`psrv.experiment`)."""

from __future__ import annotations

import sys

import click


@click.command("experiment")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out", default=None, type=click.Path(file_okay=False), help="Experiment folder (default: the config's out)."
)
@click.option(
    "--rounds", type=click.IntRange(min=1), default=None, help="Every run's --rounds (the cap of the stop rules)."
)
@click.option("--seeds", default=None, metavar="S,S,...", help="Seeds to run instead of [grid] seeds.")
@click.option("--methods", default=None, metavar="LABEL,...", help="Only these [[method]] labels.")
@click.option("--links", default=None, metavar="LINK,...", help='Links instead of [grid] links ("loopback", "10mbit").')
@click.option("--dry-run", is_flag=True, help="Print the runs and their argv; run nothing.")
@click.option(
    "--tensorboard",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="Per-round scalars of every run to DIR/<run_id>/<algorithm> (needs the tensorboard extra).",
)
def experiment(
    config: str,
    out: str | None,
    rounds: int | None,
    seeds: str | None,
    methods: str | None,
    links: str | None,
    dry_run: bool,
    tensorboard: str | None,
) -> None:
    """Run methods x grid (seeds x links x listed settings) as separate psrv runs into one folder.

    Results: EXP/runs/<run_id>/ (spec.json, summary.json, metrics), results.csv, results.sqlite
    (table runs), plots/, tables/ and report.md. Ctrl-C keeps the finished runs; running the same
    command again skips them (resume) and redoes an unfinished one."""
    import os

    from psrv import experiment as ex

    try:
        exp = ex.load(config, out=out, rounds=rounds, seeds=seeds, methods=methods, links=links)
    except ex.ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    cluster = [r for r in exp.runs if r.link != ex.LOOPBACK]
    if dry_run:
        for r in exp.runs:
            state = "finished" if ex.finished(exp.out / "runs" / r.run_id) else "to run"
            click.echo(f"{r.run_id}  [{state}]\n    {' '.join(r.argv)}")
        click.echo(f"{len(exp.runs)} run(s) into {exp.out}")
        return
    if cluster and os.geteuid() != 0:
        raise click.UsageError(
            f"links {sorted({r.link for r in cluster})} run psrv cluster run, which needs root; "
            'run as root or use links = ["loopback"] (--links loopback)'
        )
    if tensorboard is not None:
        from psrv.tboard import TensorBoardMissing, check_available

        try:
            check_available()
        except TensorBoardMissing as exc:
            raise click.UsageError(str(exc)) from None
    from psrv.cli import check_outputs

    check_outputs(dirs={"--out": str(exp.out)})
    try:
        status = ex.execute(exp, tensorboard=tensorboard, echo=lambda s: click.echo(s, err=True))
    except ex.ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    except KeyboardInterrupt:
        done = len([r for r in exp.runs if ex.finished(exp.out / "runs" / r.run_id)])
        click.echo(
            f"Interrupted: {done} of {len(exp.runs)} run(s) finished and kept in {exp.out}; "
            "run the same command again to resume",
            err=True,
        )
        sys.exit(130)
    report = ex.render_report(exp.out, echo=lambda s: click.echo(s, err=True))
    click.echo(
        f"{len(status['done'])} run(s) done, {len(status['skipped'])} finished before (skipped), "
        f"{len(status['failed'])} failed; results: {exp.out / 'results.csv'}, {exp.out / 'results.sqlite'}; "
        f"report: {report}"
    )
    if status["failed"]:
        sys.exit(1)


@click.command("report")
@click.argument("exp_dir", type=click.Path(exists=True, file_okay=False))
def report(exp_dir: str) -> None:
    """Re-render an experiment folder's tables, plots, results.csv/sqlite and report.md from its
    saved runs (nothing reruns)."""
    from psrv import experiment as ex

    try:
        path = ex.render_report(exp_dir, echo=lambda s: click.echo(s, err=True))
    except ex.ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"report: {path}")

"""``psrv run``'s options for where its worker processes run (:mod:`psrv.launch`): ``--launcher``,
``--ray-address``, ``--ray-cpus-per-worker``, ``--ray-gpus-per-worker``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from psrv.launch import LAUNCHERS, Launcher, LauncherError, make_launcher


def launcher_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options of :func:`pop_launcher`."""
    options = [
        click.option(
            "--launcher",
            type=click.Choice(LAUNCHERS),
            default="local",
            show_default=True,
            help="How the worker processes start: local (subprocesses of this command) or ray (under Ray actors "
            "on a Ray cluster; pip install 'psrv[ray]'). The server runs in this command either way.",
        ),
        click.option(
            "--ray-address",
            default=None,
            metavar="ADDR",
            help="--launcher ray: the Ray cluster to use (e.g. 10.0.0.5:6379, or auto) [default: a local one started "
            "for the run, shut down after].",
        ),
        click.option(
            "--ray-cpus-per-worker",
            type=click.FloatRange(min=0, min_open=True),
            default=1.0,
            show_default=True,
            help="--launcher ray: the CPUs each worker process asks Ray for (fractions share a CPU).",
        ),
        click.option(
            "--ray-gpus-per-worker",
            type=click.FloatRange(min=0),
            default=None,
            help="--launcher ray: the GPUs each worker process asks Ray for [default: with --device cuda the "
            "cluster's GPUs shared evenly, at most 1 each; else 0].",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def pop_launcher(kw: dict[str, Any], device: str) -> Launcher:
    """Take the launcher options out of a command's keyword arguments; the launcher they name.
    ``--launcher ray`` without Ray installed, or a Ray option without it, is a usage error (one line)."""
    name = kw.pop("launcher")
    address, cpus, gpus = kw.pop("ray_address"), kw.pop("ray_cpus_per_worker"), kw.pop("ray_gpus_per_worker")
    if name != "ray":
        given = [flag for flag, value in (("--ray-address", address), ("--ray-gpus-per-worker", gpus)) if value]
        if given or cpus != 1.0:
            flag = given[0] if given else "--ray-cpus-per-worker"
            raise click.UsageError(f"{flag} is for --launcher ray (pass --launcher ray, or drop {flag})")
    try:
        return make_launcher(name, address, cpus, gpus, device)
    except LauncherError as exc:
        raise click.UsageError(str(exc)) from None

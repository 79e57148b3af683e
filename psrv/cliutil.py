"""Click callbacks shared by ``psrv.cli`` and ``psrv.cluster.cli``.

A module of its own because ``psrv.cli`` imports ``psrv.cluster.cli`` while it is being imported
(to attach the ``cluster`` subcommand), so the cluster CLI cannot import from ``psrv.cli``.
"""

from __future__ import annotations

import click


def algorithm_list(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    """A comma-separated list of registered algorithm names (at least one)."""
    from psrv.algorithms import ALGORITHMS  # imported when used: the cluster CLI loads without numpy work

    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown or not names:
        raise click.BadParameter(
            f"unknown algorithm {', '.join(unknown) or value!r}; known: {', '.join(sorted(ALGORITHMS))}"
        )
    return names

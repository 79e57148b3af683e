"""The credential options of ``start-server`` and ``start-worker`` (see :mod:`psrv.tls`), declared
once, and how they become a :class:`psrv.tls.ServerSecurity` / :class:`psrv.tls.ClientSecurity`.
Kept apart from :mod:`psrv.tls` so the command line does not import grpc to show ``--help``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

_FILE = click.Path(exists=True, dir_okay=False)


class _WorkerFile(click.Path):
    """A worker's credential file; a path holding ``{id}`` (one file per logical worker of a host,
    ``--tls-cert pki/workers/{id}.crt``) is checked once the id is filled in."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, str) and "{id}" in value:
            return value
        return super().convert(value, param, ctx)


_WORKER_FILE = _WorkerFile(exists=True, dir_okay=False)

SERVER_OPTIONS = (
    click.option("--tls-cert", type=_FILE, default=None, help="Serve TLS with this certificate chain (PEM)."),
    click.option("--tls-key", type=_FILE, default=None, help="The private key of --tls-cert (PEM)."),
    click.option(
        "--tls-client-ca",
        type=_FILE,
        default=None,
        help="Mutual TLS: require a client certificate signed by this CA; its CN (or SAN) is the only worker id "
        "the connection may act as.",
    ),
    click.option(
        "--worker-tokens",
        type=_FILE,
        default=None,
        help="Require each worker's token (`authorization: Bearer`) on every call: lines `ID sha256:HEX` "
        "(`psrv certs` writes one). A token acts only as its own worker id.",
    ),
)

WORKER_OPTIONS = (
    click.option("--tls-ca", type=_WORKER_FILE, default=None, help="Connect with TLS, trusting this CA (PEM)."),
    click.option(
        "--tls-cert", type=_WORKER_FILE, default=None, help="Mutual TLS: this worker's certificate (CN = its id)."
    ),
    click.option("--tls-key", type=_WORKER_FILE, default=None, help="The private key of --tls-cert."),
    click.option(
        "--tls-server-name",
        default=None,
        help="The name to check the server's certificate against (default: the host of --server).",
    ),
    click.option(
        "--token-file", type=_WORKER_FILE, default=None, help="A file holding this worker's token (`psrv certs`)."
    ),
)


def _apply(options: tuple[Callable[[Any], Any], ...]) -> Callable[[Any], Any]:
    def decorate(fn: Any) -> Any:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


server_tls_options = _apply(SERVER_OPTIONS)
worker_tls_options = _apply(WORKER_OPTIONS)


def pop_server_security(kw: dict[str, Any]) -> Any:
    """The server's :class:`psrv.tls.ServerSecurity` from (and out of) a command's keywords, checked."""
    from psrv.tls import SecurityError, ServerSecurity

    sec = ServerSecurity(kw.pop("tls_cert"), kw.pop("tls_key"), kw.pop("tls_client_ca"), kw.pop("worker_tokens"))
    try:
        sec.check()
    except SecurityError as exc:
        raise click.UsageError(str(exc)) from None
    return sec


def pop_client_security(kw: dict[str, Any]) -> Any:
    """The worker's :class:`psrv.tls.ClientSecurity` from (and out of) a command's keywords, checked
    (paths holding ``{id}``: by :func:`check_worker_security` for each worker)."""
    from psrv.tls import ClientSecurity

    sec = ClientSecurity(
        kw.pop("tls_ca"), kw.pop("tls_cert"), kw.pop("tls_key"), kw.pop("tls_server_name"), kw.pop("token_file")
    )
    if not sec.templated:  # else checked per worker, once its id fills in the paths
        check_worker_security(sec)
    return sec


def check_worker_security(sec: Any) -> None:
    """Read and check a worker's credential files: a one-line usage error naming the option."""
    from psrv.tls import SecurityError

    try:
        sec.check()
    except SecurityError as exc:
        raise click.UsageError(str(exc)) from None

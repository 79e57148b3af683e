"""``psrv fit-cost``: measure the link to a running psrv server and fit a cost model (:mod:`psrv.costfit`)."""

from __future__ import annotations

import json
from typing import Any

import click

from psrv.tls_options import pop_client_security, worker_tls_options


def _sizes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        sizes = sorted({int(float(x)) for x in text.split(",") if x.strip()})
    except ValueError:
        raise click.BadParameter(f"expected comma-separated byte counts, got {text!r}", param_hint="--sizes") from None
    if not sizes or sizes[0] < 0:
        raise click.BadParameter("need at least one size, all >= 0", param_hint="--sizes")
    return sizes


@click.command("fit-cost")
@click.option("--server", "server_address", required=True, help="HOST:PORT of a running psrv server.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Write the fit here (JSON).")
@click.option(
    "--max-bytes",
    type=click.IntRange(min=64),
    default=4 << 20,
    show_default=True,
    help="Largest probe payload (capped to the server's message limit).",
)
@click.option("--min-bytes", type=click.IntRange(min=0), default=64, show_default=True, help="Smallest probe payload.")
@click.option("--points", type=click.IntRange(min=2), default=14, show_default=True, help="Log-spaced sizes.")
@click.option("--sizes", "sizes_text", default=None, help="Probe these payload sizes instead (comma-separated bytes).")
@click.option("--repeat", type=click.IntRange(min=1), default=5, show_default=True, help="Calls per size (median).")
@click.option(
    "--p-max",
    "p_max",
    type=click.IntRange(min=1),
    multiple=True,
    help="Packet capacity in bytes for the packet model (repeatable: the best fitting one is kept). "
    "Default: 1448, 1460, 16384, 65483 (TCP MSS, HTTP/2 frame, loopback MSS).",
)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Measured vs fitted (PNG).")
@click.option(
    "--iface", default=None, help="Also count this network interface's tx bytes/packets per call (this host)."
)
@click.option("--link", default="", help="A description of the link, kept in the file (e.g. '10mbit tbf').")
@click.option("--worker-id", default="", help="Probe as this worker (needed when the server checks credentials).")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds one probe may take.")
@click.option(
    "--stat",
    type=click.Choice(["median", "min"]),
    default="median",
    show_default=True,
    help="Each size's time from its repeats (min: for a loaded machine, where interference only adds time).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Order of the sizes in each repeat.")
@worker_tls_options
def fit_cost(
    server_address: str,
    out_path: str,
    max_bytes: int,
    min_bytes: int,
    points: int,
    sizes_text: str | None,
    repeat: int,
    p_max: tuple[int, ...],
    plot_path: str | None,
    iface: str | None,
    link: str,
    worker_id: str,
    timeout: float,
    stat: str,
    seed: int,
    **kw: Any,
) -> None:
    """Measure transmission time per message size against a psrv server and fit cost models.

    Sends Probe calls of increasing size (log-spaced, plus sizes around 1..4 TCP packets), REPEAT
    times each, times every call here, and fits the affine model c1*P + c0 and the packet model
    c1*ceil(P/P_max) + c0 (Khirirat et al., AAAI 2021, eq. 6 and Appendix H) to the medians, P
    being the message's wire bytes. The better fit is the file's top-level model.

    \b
    psrv start-server --port 50051 ...           # any server, in any phase
    psrv fit-cost --server 127.0.0.1:50051 --out fit.json --plot fit.png
    """
    import grpc

    from psrv import costfit, report
    from psrv.cli import check_outputs
    from worker.client import check_address

    try:
        check_address(server_address)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--server") from None
    security = pop_client_security(kw)
    sizes = _sizes(sizes_text)
    if sizes is None and min_bytes > max_bytes:
        raise click.BadParameter(f"--min-bytes {min_bytes} is above --max-bytes {max_bytes}", param_hint="--min-bytes")
    check_outputs(files={"--out": out_path, "--plot": plot_path})
    counter = None
    if iface is not None:
        from psrv.cluster.counters import CounterError

        try:
            counter = costfit.iface_counter(iface)
        except (CounterError, OSError, KeyError, ValueError) as exc:
            raise click.BadParameter(f"cannot read the counters of {iface!r}: {exc}", param_hint="--iface") from None
    try:
        prober = costfit.Prober(server_address, security, worker_id, timeout)
    except grpc.RpcError as exc:
        raise click.ClickException(f"{server_address}: Probe failed: {exc.details()} ({exc.code().name})") from None
    try:
        limit = prober.max_message_bytes - costfit.PROBE_OVERHEAD - len(worker_id.encode())
        if sizes is None:
            top = min(max_bytes, limit)
            if top < max_bytes:
                click.echo(f"the server takes messages up to {prober.max_message_bytes} bytes: probing up to {top}",
                           err=True)  # fmt: skip
            sizes = costfit.default_sizes(top, min(min_bytes, top), points)
        elif sizes[-1] > limit:
            raise click.BadParameter(
                f"{sizes[-1]} bytes is above the server's message limit ({prober.max_message_bytes} bytes)",
                param_hint="--sizes",
            )
        click.echo(f"probing {server_address}: {len(sizes)} sizes {sizes[0]}..{sizes[-1]} bytes x {repeat}", err=True)
        rows = costfit.measure(prober, sizes, repeat, seed=seed, counter=counter)
    except grpc.RpcError as exc:
        raise click.ClickException(f"{server_address}: Probe failed: {exc.details()} ({exc.code().name})") from None
    finally:
        prober.close()
    try:
        best, fits = costfit.fit_rows(rows, list(p_max) or costfit.P_MAX_CANDIDATES, stat)
    except costfit.FitError as exc:
        raise click.ClickException(f"cannot fit: {exc}") from None
    click.echo(costfit.residual_table(rows, fits, stat))
    for f in fits.values():
        click.echo(("* " if f is best else "  ") + costfit.describe(f))
    out = costfit.fit_json(best, fits, rows, server=server_address, repeat=repeat, stat=stat, link=link, iface=iface)
    report.write_json(out_path, out)
    if plot_path:
        costfit.plot(rows, fits, plot_path, title=f"{server_address} {link}".strip(), stat=stat)
    click.echo(json.dumps({k: out[k] for k in ("model", "c0", "c1", "p_max_bytes") if k in out}))

"""``psrv inspect``: the tap, the pcap decoder, live capture, and the summary of their records."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from psrv.inspect.grpcmsg import BYTE_KEYS, PROTO_KEYS
from psrv.inspect.http2 import CONNECTION_KEYS, H2_KEYS

#: summary columns: name -> record byte keys it adds up
COLUMNS: dict[str, tuple[str, ...]] = {
    "framing": H2_KEYS,
    "grpc_prefix": ("grpc_prefix",),
    **{k: (k,) for k in PROTO_KEYS},
}
_STATUS = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}


_FILE = click.Path(exists=True, dir_okay=False)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def kind_label(r: dict[str, Any]) -> str:
    """``Push up PushRequest/sparse``, ``GetModel down (no message) DEADLINE_EXCEEDED``."""
    what = r["message"] or "(no message)"
    if r.get("kind"):
        what += f"/{r['kind']}"
    label = f"{r['method'] or '?'} {r['dir']} {what}"
    if r.get("status"):
        label += f" {_STATUS.get(r['status'], r['status'])}"
    return label


def _row() -> dict[str, int]:
    return {"count": 0, "bytes": 0, **dict.fromkeys(COLUMNS, 0), "connection": 0}


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per message kind and per worker: count, wire bytes and their split.

    Bytes that belong to no stream (preface, SETTINGS/PING/GOAWAY, late and partial frames)
    appear in ``connection`` rows; per direction the totals equal the bytes relayed."""
    kinds: dict[str, dict[str, int]] = defaultdict(_row)
    workers: dict[str, dict[str, int]] = defaultdict(_row)
    totals: dict[str, dict[str, int]] = defaultdict(_row)
    relayed: dict[str, int] = defaultdict(int)
    errors: list[str] = []
    for r in records:
        if r["type"] in ("message", "frames"):
            wkey = f"{r['worker'] or '(unknown)'} {r['dir']}"
            for row in (kinds[kind_label(r)], workers[wkey], totals[r["dir"]]):
                row["count"] += r["type"] == "message"
                row["bytes"] += r["wire_bytes"]
                for col, keys in COLUMNS.items():
                    row[col] += sum(r["bytes"][k] for k in keys)
            if r.get("error"):
                errors.append(f"{r['conn']} stream {r['stream']}: {r['error']}")
        elif r["type"] == "connection":
            extra = sum(r[k] for k in CONNECTION_KEYS)
            wkey = f"{r['worker'] or '(shared connection)'} {r['dir']}"
            for row in (kinds[f"(connection) {r['dir']}"], workers[wkey], totals[r["dir"]]):
                row["bytes"] += extra
                row["connection"] += extra
            relayed[r["dir"]] += r["relayed"]
            if r.get("error") or not r.get("balanced", True):
                errors.append(f"{r['conn']} {r['dir']}: {r.get('error') or 'bytes do not balance'}")
        elif r["type"] == "error":
            errors.append(f"{r.get('conn')}: {r['error']}")
    return {
        "kinds": dict(sorted(kinds.items())),
        "workers": dict(sorted(workers.items())),
        "totals": dict(sorted(totals.items())),
        "relayed": dict(relayed),
        "errors": errors,
    }


def format_summary(summary: dict[str, Any]) -> str:
    cols = ["count", "bytes", *COLUMNS, "connection"]

    def table(title: str, rows: dict[str, dict[str, int]]) -> list[str]:
        width = max([len(title), *(len(k) for k in rows)])
        head = f"{title:<{width}}  " + "  ".join(f"{c:>11}" for c in cols)
        lines = [head, "-" * len(head)]
        lines += [f"{k:<{width}}  " + "  ".join(f"{v[c]:>11,}" for c in cols) for k, v in rows.items()]
        return lines

    out = table("message kind", summary["kinds"])
    out += [""] + table("worker", summary["workers"])
    out += [""] + table("direction", summary["totals"])
    if summary["relayed"]:
        out.append("relayed: " + ", ".join(f"{d} {n:,} bytes" for d, n in sorted(summary["relayed"].items())))
    for e in summary["errors"]:
        out.append(f"error: {e}")
    return "\n".join(out)


def _print_summary(records: list[dict[str, Any]], as_json: bool) -> None:
    s = summarize(records)
    click.echo(json.dumps(s, indent=2) if as_json else format_summary(s))


@click.group("inspect")
def inspect() -> None:
    """Wire-level traffic inspection: every gRPC message that crossed the wire and what each part cost.

    \b
    psrv inspect tap --listen 127.0.0.1:50052 --upstream 127.0.0.1:50051 --log tap.jsonl
    psrv start-worker --server 127.0.0.1:50052 ...      # workers talk through the tap
    psrv inspect summary tap.jsonl
    psrv inspect pcap capture.pcap --port 50051 --summary
    """


@inspect.command("tap")
@click.option("--listen", default="127.0.0.1:50052", show_default=True, help="Address workers connect to.")
@click.option("--upstream", default="127.0.0.1:50051", show_default=True, help="The psrv server.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), default="psrv-tap.jsonl", show_default=True)
@click.option("--pcap", "pcap_path", type=click.Path(dir_okay=False), default=None, help="Also write a pcap.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds (default: Ctrl-C).")
@click.option("--summary/--no-summary", default=True, show_default=True, help="Print the summary at the end.")
@click.option("--tls-cert", type=_FILE, default=None, help="Serve workers TLS with this certificate (the server's).")
@click.option("--tls-key", type=_FILE, default=None, help="The private key of --tls-cert.")
@click.option("--tls-client-ca", type=_FILE, default=None, help="Require worker certificates signed by this CA.")
@click.option("--upstream-ca", type=_FILE, default=None, help="Connect to the server with TLS, trusting this CA.")
@click.option(
    "--upstream-client-certs",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Folder of ID.crt/ID.key (psrv certs: DIR/workers): present the server the certificate of the "
    "worker whose certificate the tap received (mutual TLS).",
)
@click.option("--upstream-server-name", default=None, help="Check the server's certificate for this name.")
def tap_cmd(
    listen: str,
    upstream: str,
    log_path: str,
    pcap_path: str | None,
    duration: float | None,
    summary: bool,
    **tls_options: str | None,
):
    """Relay workers <-> server unchanged and log every gRPC message (JSON lines).

    On TLS runs the tap terminates TLS: it serves --tls-cert/--tls-key to the workers and opens its
    own TLS connection to the server (--upstream-ca), and decodes the plaintext in between."""
    import ssl

    from psrv.inspect.tap import JsonlSink, TapTls, parse_address, run_tap

    o = tls_options
    tls = TapTls(o["tls_cert"], o["tls_key"], o["tls_client_ca"], o["upstream_ca"], o["upstream_client_certs"],
                 o["upstream_server_name"])  # fmt: skip
    if (tls.cert is None) != (tls.key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    try:
        tls.listen_context()
    except (OSError, ssl.SSLError) as exc:
        raise click.UsageError(f"--tls-cert/--tls-key/--tls-client-ca: {exc}") from None

    try:
        listen_addr, upstream_addr = parse_address(listen), parse_address(upstream)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    sink = JsonlSink(log_path)
    kept: list[dict[str, Any]] = []

    def record(r: dict[str, Any]) -> None:
        sink(r)
        if summary:
            kept.append(r)

    def ready(tap: Any) -> None:
        click.echo(f"tap listening on {listen_addr[0]}:{tap.port} -> {upstream_addr[0]}:{upstream_addr[1]}", err=True)

    try:
        tap = asyncio.run(run_tap(listen_addr, upstream_addr, record, pcap_path, duration, ready, tls))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {listen}: {exc}") from None
    finally:
        sink.close()
    click.echo(
        f"{tap.connections} connection(s), relayed up {tap.relayed['up']:,} / down {tap.relayed['down']:,} bytes, "
        f"{sink.count} records in {log_path}",
        err=True,
    )
    if summary:
        _print_summary(kept, False)


@inspect.command("pcap")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--port", type=int, default=None, help="The server's TCP port (default: any HTTP/2 connection).")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), default=None, help="Write records here.")
@click.option("--summary", is_flag=True, help="Print the summary (records go to --log, or nowhere).")
@click.option("--json", "as_json", is_flag=True, help="Summary as JSON.")
def pcap_cmd(file: str, port: int | None, log_path: str | None, summary: bool, as_json: bool) -> None:
    """Decode a packet capture (pcap or pcapng, as tcpdump writes) into the tap's records."""
    from psrv.inspect.pcap import decode_pcap
    from psrv.inspect.pcapfile import PcapError
    from psrv.inspect.tap import JsonlSink

    sink = JsonlSink(log_path) if log_path else None if summary else JsonlSink(sys.stdout)
    kept: list[dict[str, Any]] = []

    def record(r: dict[str, Any]) -> None:
        if sink is not None:
            sink(r)
        if summary:
            kept.append(r)

    try:
        dec = decode_pcap(file, port, record)
    except PcapError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if sink is not None:
            sink.close()
    stats = ", ".join(f"{k} {v}" for k, v in dec.stats.items())
    click.echo(f"{file}: {stats}", err=True)
    if summary:
        _print_summary(kept, as_json)


@inspect.command("summary")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="As JSON.")
def summary_cmd(file: str, as_json: bool) -> None:
    """Per message kind and per worker: count, bytes, and the split (framing, gRPC prefix, fields)."""
    _print_summary(read_records(file), as_json)


@inspect.command("capture")
@click.option("-w", "--write", "path", type=click.Path(dir_okay=False), required=True, help="pcap file to write.")
@click.option("--port", "ports", type=int, multiple=True, help="Keep only TCP packets of this port (repeatable).")
@click.option("--iface", default="lo", show_default=True)
@click.option("--duration", type=float, default=None, help="Stop after this many seconds (default: Ctrl-C).")
def capture_cmd(path: str, ports: tuple[int, ...], iface: str, duration: float | None) -> None:
    """Capture TCP traffic into a pcap without tcpdump (Linux, root).

    The same as ``tcpdump -i IFACE -w FILE tcp port N``; stop with Ctrl-C or --duration."""
    import signal
    import threading

    from psrv.inspect.live import LiveCapture

    try:
        cap = LiveCapture(path, set(ports) or None, iface).start()
    except (OSError, AttributeError) as exc:
        raise click.ClickException(f"cannot capture on {iface}: {exc} (needs Linux and root)") from None
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        stop.wait(duration)
    finally:
        signal.signal(signal.SIGINT, previous)
        stats = cap.stop()
    click.echo(f"{path}: {stats['packets']} packets, {stats['drops']} dropped by the kernel", err=True)


__all__ = ["inspect", "summarize", "format_summary", "read_records", "BYTE_KEYS"]

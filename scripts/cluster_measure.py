"""Measure algorithms on a shaped namespace cluster (root): wire vs message bytes, time per round,
upload time on the wire, and time to reach GD's final loss.

    python scripts/cluster_measure.py --rate 10mbit --workers 4 --rounds 100 --algorithms gd,laq,topk-ef

Steps:

1. Counter calibration (``--calibrate``, on by default): a TCP bulk transfer of a known size over
   one link, with segmentation offload on and off, under a counting pfifo and under the shaping
   tbf. Prints what the qdisc counters, the interface counters and a frame capture saw, next to
   the frames TCP must have sent (ceil(N / MSS) data frames of MSS + 66 header bytes, plus the
   handshake), and the goodput of the shaped link.
2. Each algorithm on a fresh cluster of ``--workers`` workers whose links are shaped to ``--rate``
   (``--down-rate`` for the downlink, default the same; ``none`` leaves it unshaped), with a frame
   capture. GD runs ``--rounds`` rounds; the others ``--rounds-factor`` times as many, so they can
   reach GD's final loss.
3. The table: per algorithm, wire/message bytes, median time per round, median upload time on the
   wire (GD: compared with the upload's message size / rate), the round and wall time at which the
   loss first reached GD's final loss.

Any registered algorithm can be named (``--algorithms gd,laq,sasg``); per-algorithm options as
``-o laq:bits=4``.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's psrv, not an installed one

import click  # noqa: E402

from psrv.cluster import counters, shaping  # noqa: E402
from psrv.cluster.analysis import capture_totals  # noqa: E402
from psrv.cluster.capture import load_capture  # noqa: E402
from psrv.cluster.config import ClusterConfig  # noqa: E402
from psrv.cluster.netns import (  # noqa: E402
    ClusterError,
    Topology,
    in_netns,
    interrupt_guard,
    require_root,
    set_offload,
)
from psrv.cluster.run import child_env, run_cluster  # noqa: E402
from psrv.cluster.shaping import LinkRates, format_rate, parse_rate  # noqa: E402
from psrv.report import format_report  # noqa: E402

TCP_HEADERS = 14 + 20 + 32  # Ethernet + IPv4 + TCP with timestamps
MSS = 1500 - 20 - 32


# ---------------------------------------------------------------------------------------- calibration
def _send(address: tuple[str, int], nbytes: int) -> float:
    import socket

    with socket.create_connection(address, timeout=30) as s:
        t0 = time.monotonic()
        s.sendall(b"\0" * nbytes)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the receiver closes after reading everything
        return time.monotonic() - t0


_RECEIVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0
while True:
    d = c.recv(1 << 20)
    if not d: break
    n += len(d)
c.close(); print(n, flush=True)
"""


def calibrate_counters(
    rate: int | None,
    nbytes: int = 1_000_000,
    settings: Sequence[tuple[bool, bool]] | None = None,
    capture: bool = True,
) -> list[dict[str, Any]]:
    """One TCP transfer of ``nbytes`` from host a to host b per (offload, shaped) setting; every counter.

    Default settings: offload on and off, each with a counting pfifo and with a tbf at ``rate``."""
    if settings is None:
        settings = [(o, sh) for o in (True, False) for sh in (False, True) if not (sh and rate is None)]
    rows = []
    for offload, shaped in settings:
        with Topology(["a", "b"]) as topo:
            a, b = topo.hosts["a"], topo.hosts["b"]
            for h in (a, b):
                set_offload(h.iface, offload, h.netns)
                set_offload(h.peer, offload, topo.hub)
            shaping.shape_egress(a.iface, rate if shaped else None, a.netns)
            shaping.shape_egress(a.peer, None, topo.hub)
            probe = counters.Probe((a.iface, a.netns), (a.iface, a.netns), (a.peer, topo.hub))
            cap_file = Path(f"/tmp/{topo.prefix}-cap.npz")
            cap = None
            if capture:
                argv = [sys.executable, "-m", "psrv.cluster.capture", "--out", str(cap_file), a.peer]
                cap = topo.hub_popen(argv, stdout=subprocess.PIPE, text=True, env=child_env())
                assert cap.stdout is not None and "ready" in cap.stdout.readline()
            recv = topo.popen("b", [sys.executable, "-c", _RECEIVER, b.ip, "5201"], stdout=subprocess.PIPE, text=True)
            assert recv.stdout is not None and "ready" in recv.stdout.readline()
            before = probe.read()
            seconds = in_netns(a.netns, _send, (b.ip, 5201), nbytes)
            received = int(recv.stdout.readline())
            time.sleep(0.3)  # the last ACK / FIN
            d = counters.delta(probe.read(), before)
            totals: dict[str, int] = {}
            if cap is not None:
                cap.terminate()
                cap.wait(timeout=30)
                totals = capture_totals(load_capture(str(cap_file)), a.peer)
                cap_file.unlink(missing_ok=True)
        segs = math.ceil(nbytes / MSS)
        rows.append(
            {
                "offload": offload,
                "qdisc": f"tbf {format_rate(rate)}" if shaped else "pfifo",
                "bytes": received,
                "expected_tx_bytes": nbytes + segs * TCP_HEADERS,
                "expected_tx_packets": segs,
                "qdisc_tx_bytes": d["wire_tx"]["bytes"],
                "qdisc_tx_packets": d["wire_tx"]["packets"],
                "iface_tx_bytes": d["iface_tx"]["bytes"],
                "iface_tx_packets": d["iface_tx"]["packets"],
                "capture_tx_bytes": totals.get("tx_bytes"),
                "capture_tx_packets": totals.get("tx_packets"),
                "goodput": nbytes * 8 / seconds / rate if shaped and rate else None,
            }
        )
    return rows


def format_calibration(rows: Sequence[Mapping[str, Any]]) -> str:
    head = ["offload", "qdisc", "expected B", "qdisc B", "iface B", "capture B", "exp pkts", "qdisc pkts",
            "iface pkts", "goodput"]  # fmt: skip
    out = [head]
    for r in rows:
        out.append(
            [
                "on" if r["offload"] else "off",
                r["qdisc"],
                f"{r['expected_tx_bytes']:,}",
                f"{r['qdisc_tx_bytes']:,} ({r['qdisc_tx_bytes'] / r['expected_tx_bytes'] - 1:+.2%})",
                f"{r['iface_tx_bytes']:,} ({r['iface_tx_bytes'] / r['expected_tx_bytes'] - 1:+.2%})",
                f"{r['capture_tx_bytes']:,}" if r["capture_tx_bytes"] is not None else "-",
                f"{r['expected_tx_packets']:,}",
                f"{r['qdisc_tx_packets']:,}",
                f"{r['iface_tx_packets']:,}",
                f"{r['goodput']:.1%}" if r["goodput"] else "-",
            ]
        )
    return _table(out)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- algorithms
def _metrics(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]


def time_to_loss(records: Sequence[Mapping[str, Any]], target: float) -> tuple[int | None, float | None]:
    """(round, seconds) at the end of the first round whose loss <= target. Seconds count from the end
    of round 0: round 0 holds every worker's warm-up (process start, first gradient), which on a
    shared machine varies by seconds and says nothing about the algorithm or the link."""
    for r in records:
        if r.get("loss") is not None and r["loss"] <= target:
            return r["round"], r["elapsed"] - records[0]["elapsed"]
    return None, None


def analyse(results: Mapping[str, Mapping[str, Any]], folders: Mapping[str, Path], rate: int) -> dict[str, Any]:
    gd_records = _metrics(folders["gd"]) if "gd" in results else None
    target = next((r["loss"] for r in reversed(gd_records) if r.get("loss") is not None), None) if gd_records else None
    rows = {}
    for name, res in results.items():
        records = _metrics(folders[name])
        t, tm = res["totals"], res["timing"]
        uploads = tm.get("uploads", [])
        ratios = []
        for u in uploads:
            # only uploads of 10+ frames: for a few frames the shaper's burst allowance (2 frames) dominates
            if u["upload_seconds_median"] and (u["upload_wire_bytes_median"] or 0) >= 10 * 1514:
                ratios.append(u["upload_seconds_median"] / (u["upload_message_bytes_median"] * 8 / rate))
        rnd, secs = time_to_loss(records, target) if target is not None else (None, None)
        rows[name] = {
            "rounds": len(records),
            "final_loss": res["server"].get("final_loss"),
            "last_round_loss": records[-1]["loss"] if records else None,
            "message_bytes": t["message_bytes"],
            "message_bytes_up": t["message_bytes_up"],
            "wire_bytes": t["wire_bytes"],
            "wire_over_message": t["wire_over_message"],
            "wire_over_message_up": (t["wire_bytes_up"] / t["message_bytes_up"]) if t["message_bytes_up"] else None,
            "round_time_median": tm["round_time_median"],
            "round_time_mean": tm["round_time_mean"],
            "upload_seconds_median": statistics.median(
                [u["upload_seconds_median"] for u in uploads if u["upload_seconds_median"]]
            )
            if any(u["upload_seconds_median"] for u in uploads)
            else None,
            "upload_message_bytes_median": statistics.median(
                [u["upload_message_bytes_median"] for u in uploads if u["upload_message_bytes_median"]]
            )
            if any(u["upload_message_bytes_median"] for u in uploads)
            else None,
            "upload_time_over_size_per_rate": [round(x, 4) for x in ratios],
            "uploads": res["server"].get("uploads"),
            "target_round": rnd,
            "time_to_target": secs,
        }
    gd = rows.get("gd")
    if gd:
        for row in rows.values():
            row["round_time_vs_gd"] = row["round_time_median"] / gd["round_time_median"]
            tt = row["time_to_target"]
            row["time_to_target_vs_gd"] = tt / gd["time_to_target"] if tt and gd["time_to_target"] else None
    return {"target_loss": target, "rate": rate, "algorithms": rows}


def format_analysis(a: Mapping[str, Any]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.1f}"

    head = ["algorithm", "rounds", "uploads", "msg bytes", "wire bytes", "wire/msg", "round ms (median)", "vs GD",
            "upload ms", "upload/(size/rate)", "reached GD loss", "time to it", "vs GD"]  # fmt: skip
    rows = [head]
    for name, r in a["algorithms"].items():
        ratios = r["upload_time_over_size_per_rate"]
        rows.append(
            [
                name,
                str(r["rounds"]),
                str(r["uploads"]),
                f"{r['message_bytes']:,}",
                f"{r['wire_bytes']:,}" if r["wire_bytes"] is not None else "-",
                f"{r['wire_over_message']:.4f}" if r["wire_over_message"] else "-",
                ms(r["round_time_median"]),
                f"{r.get('round_time_vs_gd', 0):.3f}" if r.get("round_time_vs_gd") else "-",
                ms(r["upload_seconds_median"]) if ratios else "-",
                f"{min(ratios):.3f}..{max(ratios):.3f}" if ratios else "-",
                f"round {r['target_round']}" if r["target_round"] is not None else "no",
                f"{r['time_to_target']:.2f} s" if r["time_to_target"] is not None else "-",
                f"{r['time_to_target_vs_gd']:.3f}" if r.get("time_to_target_vs_gd") else "-",
            ]
        )
    target = a["target_loss"]
    note = f"GD's final loss (the target): {target:.6f}" if target is not None else "no GD run: no target loss"
    legend = (
        "upload ms: median time an upload of 10+ frames kept the uplink busy (capture: first frame out of the "
        "shaper to the end of the last at the rate); size = the upload's message bytes; round ms: server round "
        "time, rounds 1..; time to it: from the end of round 0 (warm-up) to the first round at GD's final loss"
    )
    return _table(rows) + "\n" + note + "\n" + legend


def _per_algorithm_options(values: Sequence[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for item in values:
        alg, sep, kv = item.partition(":")
        key, sep2, value = kv.partition("=")
        if not sep or not sep2:
            raise click.BadParameter(f"expected ALGORITHM:KEY=NUMBER, got {item!r}")
        out.setdefault(alg, {})[key] = float(value)
    return out


@click.command()
@click.option("--rate", default="10mbit", show_default=True, help="Every worker's link rate.")
@click.option("--down-rate", default=None, help="Downlink rate if different (none: unshaped).")
@click.option("--server-rate", default="none", show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=100, show_default=True, help="GD's rounds.")
@click.option("--rounds-factor", type=click.FloatRange(1), default=2.0, show_default=True)
@click.option("--algorithms", default="gd,laq,topk-ef", show_default=True)
@click.option("-o", "--option", "options", multiple=True, metavar="ALG:KEY=VALUE")
@click.option("--lr", type=float, default=0.02, show_default=True)
@click.option("--data", default="mnist", show_default=True)
@click.option("--qdisc", type=click.Choice(shaping.QDISCS), default="tbf", show_default=True)
@click.option("--calibrate/--no-calibrate", default=True, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="psrv-out/measure", show_default=True)
def main(
    rate: str,
    down_rate: str | None,
    server_rate: str,
    workers: int,
    rounds: int,
    rounds_factor: float,
    algorithms: str,
    options: tuple[str, ...],
    lr: float,
    data: str,
    qdisc: str,
    calibrate: bool,
    out: str,
) -> None:
    """Measure algorithms on a shaped namespace cluster; print the figures (needs root)."""
    from psrv.algorithms import ALGORITHMS

    try:
        require_root()
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    up = parse_rate(rate)
    if up is None:
        raise click.BadParameter("the measurement needs a shaped rate", param_hint="--rate")
    down = up if down_rate is None else parse_rate(down_rate)
    names = [n.strip() for n in algorithms.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; known: {', '.join(sorted(ALGORITHMS))}")
    per_alg = _per_algorithm_options(options)
    root = Path(out)
    report: dict[str, Any] = {"command": " ".join(["python scripts/cluster_measure.py", *sys.argv[1:]])}
    with interrupt_guard():
        if calibrate:
            click.echo(f"counter calibration: 1,000,000 bytes over TCP, one link (MSS {MSS})")
            report["calibration"] = calibrate_rows = calibrate_counters(up)
            click.echo(format_calibration(calibrate_rows) + "\n")
        results, folders = {}, {}
        for name in names:
            cfg = ClusterConfig(
                workers=workers,
                rounds=rounds if name == "gd" else int(round(rounds * rounds_factor)),
                algorithm=name,
                lr=lr,
                options=per_alg.get(name, {}),
                data=data,
                rate=LinkRates(up, down),
                server_rate=shaping.parse_link(server_rate),
                qdisc=qdisc,
                capture=True,
                round_timeout=120.0,  # round 0 (warm-up) can take seconds on a loaded machine: no deadline misses
                timeout=900,
            )
            folders[name] = root / name
            click.echo(f"== {name}: {cfg.rounds} rounds, {workers} workers at {cfg.rate.describe()}", err=True)
            try:
                results[name] = run_cluster(cfg, folders[name], echo=lambda s: click.echo(s, err=True))
            except ClusterError as exc:
                raise click.ClickException(f"{name}: {exc}") from None
            click.echo(format_report(results[name]) + "\n")
    analysis = analyse(results, folders, up)
    report.update(analysis)
    click.echo(f"{workers} workers, links {LinkRates(up, down).describe()}, server {server_rate}, qdisc {qdisc}")
    click.echo(format_analysis(analysis))
    (root / "measure.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    click.echo(f"written: {root / 'measure.json'}")


if __name__ == "__main__":
    main()

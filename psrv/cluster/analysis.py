"""The figures of a cluster run, computed from what was recorded: per-host rows, message vs wire
byte totals, per-round timing from the server's metrics, and each upload's time on the wire
from the frame capture. Pure functions: no namespaces, processes or files (the run folder is
:mod:`psrv.cluster.outputs`)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from psrv.cluster.config import SERVER
from psrv.cluster.shaping import LinkRates

MTU_FRAME_BITS = 1514 * 8

Capture = Mapping[str, np.ndarray]  # psrv.cluster.capture.load_capture: one array per field, one row per frame


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _sum(rows: Sequence[Mapping[str, Any]], key: str) -> int | None:
    values = [r.get(key) for r in rows]
    return None if any(v is None for v in values) else int(sum(values))


# ------------------------------------------------------------------------------------------ bytes
def capture_totals(cap: Capture, iface: str) -> dict[str, int]:
    """Per-host totals from a capture on the bridge side of the host's veth: tx = frames from the host."""
    names = list(cap["ifaces"])
    if iface not in names:
        return {}
    sel = cap["iface"] == names.index(iface)
    tx, rx = sel & (cap["outgoing"] == 0), sel & (cap["outgoing"] == 1)
    return {
        "tx_bytes": int(cap["length"][tx].sum()),
        "tx_packets": int(cap["frames"][tx].sum()),
        "rx_bytes": int(cap["length"][rx].sum()),
        "rx_packets": int(cap["frames"][rx].sum()),
    }


def host_row(
    host: str,
    ip: str,
    rates: LinkRates,
    exit_code: int | None,
    sent: int | None,
    received: int | None,
    counts: Mapping[str, Mapping[str, int]],
    capture: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """One host's row of the summary: its link, exit code, message bytes sent and received (psrv's
    own count), the counter deltas (``counts``: ``{"wire_tx": {"bytes": ..}, ..}`` -> ``wire_tx_bytes``)
    and, with a capture, its totals (``capture_tx_bytes``, ..)."""
    row: dict[str, Any] = {
        "host": host,
        "ip": ip,
        "rate_up": rates.up,
        "rate_down": rates.down,
        "exit_code": exit_code,
        "message_bytes_sent": sent,
        "message_bytes_received": received,
    }
    for key, count in counts.items():
        for field_, value in count.items():
            row[f"{key}_{field_}"] = value
    if capture is not None:
        row.update({f"capture_{k}": v for k, v in capture.items()})
    return row


def totals(summary: Mapping[str, Any], hosts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Message bytes (psrv's serialized protobuf, every RPC) next to wire bytes (frames that left a host,
    each counted once: on the host it left)."""
    workers = [h for h in hosts if h["host"] != SERVER]
    server = next(h for h in hosts if h["host"] == SERVER)
    msg_up, msg_down = int(summary["bytes_up"]), int(summary["bytes_down"])
    if "coordinator_bytes_down" in summary:  # dsgd: every byte once, at its sender (workers: gossip too)
        msg_down = int(summary["coordinator_bytes_down"])
    wire_up, wire_down = _sum(workers, "wire_tx_bytes"), server.get("wire_tx_bytes")
    out: dict[str, Any] = {
        "message_bytes": msg_up + msg_down,
        "message_bytes_up": msg_up,
        "message_bytes_down": msg_down,
        "wire_bytes_up": wire_up,
        "wire_bytes_down": wire_down,
        "wire_packets": _sum(hosts, "wire_tx_packets"),
        "iface_bytes": _sum(hosts, "iface_tx_bytes"),
        "iface_packets": _sum(hosts, "iface_tx_packets"),
        "capture_bytes": _sum(hosts, "capture_tx_bytes") if "capture_tx_bytes" in server else None,
    }
    out["wire_bytes"] = None if wire_up is None or wire_down is None else wire_up + wire_down
    out["wire_over_message"] = out["wire_bytes"] / out["message_bytes"] if out["wire_bytes"] else None
    return out


# ------------------------------------------------------------------------------------------ timing
def round_timing(records: Sequence[Mapping[str, Any]], workers: int) -> dict[str, Any]:
    """Per-round timing from the server's metrics (one record per round).

    Round 0 includes every worker's warm-up (first gradient, lazy imports) and is reported apart;
    the means and medians are over rounds 1.. ("steady"). ``slowest_wait`` is the server's: the
    latency of the last report of the round. ``straggler_wait`` is how much longer the round waited
    for its slowest report than for its fastest one."""
    steady = list(records[1:]) or list(records)
    rt = [r["round_time"] for r in steady]
    slow = [r["slowest_wait"] for r in steady if r.get("slowest_wait") is not None]
    spread = []
    for r in steady:
        lat = [w["latency"] for w in r["workers"] if w.get("latency") is not None]
        if lat:
            spread.append(max(lat) - min(lat))
    out: dict[str, Any] = {
        "first_round_time": records[0]["round_time"] if records else None,
        "round_time_mean": statistics.fmean(rt) if rt else None,
        "round_time_median": _median(rt),
        "slowest_wait_mean": statistics.fmean(slow) if slow else None,
        "straggler_wait_mean": statistics.fmean(spread) if spread else None,
        "worker_latency_median": [],
    }
    for i in range(workers):
        lat = [r["workers"][i]["latency"] for r in steady if r["workers"][i].get("latency") is not None]
        out["worker_latency_median"].append(_median(lat))
    return out


def upload_timing(
    records: Sequence[Mapping[str, Any]], cap: Capture, uplinks: Sequence[tuple[str, int | None]]
) -> tuple[list[dict[str, Any]], list[list[dict[str, float]]]]:
    """Each worker's uploads as the capture saw them: ``(figures per worker, bursts per worker)``.

    ``uplinks[i]``: worker i's interface in the capture (the bridge side of its veth, where its
    frames are incoming) and its uplink rate. Only bursts of at least half the median upload's
    message bytes count (a model request is not an upload)."""
    names = list(cap["ifaces"])
    figures, bursts_of = [], []
    for i, (iface, rate) in enumerate(uplinks):
        sel = (cap["iface"] == names.index(iface)) & (cap["outgoing"] == 0)
        up_msgs = [w["bytes"] for r in records for w in r["workers"][i : i + 1] if w["status"] == "upload"]
        big = int(0.5 * _median(up_msgs)) if up_msgs else 1 << 62
        bursts = upload_bursts(cap["t"][sel], cap["payload"][sel], cap["length"][sel], rate, min_bytes=big)
        bursts_of.append(bursts)
        figures.append(
            {
                "uploads_seen": len(bursts),
                "upload_seconds_median": _median([b["seconds"] for b in bursts]),
                "upload_wire_bytes_median": _median([b["wire_bytes"] for b in bursts]),
                "upload_message_bytes_median": _median(up_msgs),
            }
        )
    return figures, bursts_of


def upload_bursts(
    t: np.ndarray, payload: np.ndarray, wire: np.ndarray, rate: int | None, min_bytes: int = 0
) -> list[dict[str, float]]:
    """Uploads seen on a host's uplink: bursts of data-carrying frames (TCP payload > 0; pure ACKs
    are ignored), split where the line falls silent for longer than max(2 ms, 2.5 frame times).

    A short request that follows the upload after a pause (the next round's model request, sent
    once the server acknowledged) is cut off the end. ``seconds`` runs from the first frame's
    release by the shaper to the end of the last frame at ``rate``: the time the link was busy."""
    order = np.argsort(t)
    t, payload, wire = t[order], payload[order], wire[order]
    keep = payload > 0
    t, payload, wire = t[keep], payload[keep], wire[keep]
    if t.size == 0:
        return []
    frame_s = MTU_FRAME_BITS / rate if rate else 0.0
    gap = max(0.002, 2.5 * frame_s)
    cuts = np.flatnonzero(np.diff(t) > gap) + 1
    out = []
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, t.size], strict=True):
        lo, hi = int(lo), int(hi)
        while hi - lo > 1 and payload[hi - 1] < 300:
            own = wire[hi - 1] * 8 / rate if rate else 0.0
            if t[hi - 1] - t[hi - 2] <= own + 0.0005:
                break
            hi -= 1
        nbytes = int(wire[lo:hi].sum())
        if nbytes < min_bytes:
            continue
        last = wire[hi - 1] * 8 / rate if rate else 0.0
        out.append(
            {
                "start": float(t[lo]),
                "seconds": float(t[hi - 1] - t[lo] + last),
                "wire_bytes": nbytes,
                "payload_bytes": int(payload[lo:hi].sum()),
                "frames": hi - lo,
            }
        )
    return out

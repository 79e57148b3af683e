"""Summaries a person reads: the table printed after a run (in the spirit of Table 2 of Sun et
al., NeurIPS 2019) and the JSON summary written next to the per-round metrics."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from psrv.cluster.shaping import format_rate
from psrv.files import atomic_write_json
from psrv.stopping import meets

COLUMNS = (
    ("algorithm", "algorithm", "{}"),
    ("rounds", "iterations", "{:d}"),
    ("uploads", "uploads", "{:d}"),
    ("skips", "skips", "{:d}"),
    ("payload_bits", "payload bits", "{:.3g}"),
    ("bytes_up", "bytes up", "{:,d}"),
    ("bytes_down", "bytes down", "{:,d}"),
    ("final_loss", "final loss", "{:.6f}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("wall_time", "wall s", "{:.1f}"),
)


def _cell(fmt: str, value: Any) -> str:
    return "-" if value is None else fmt.format(value)


def _target_columns(summaries: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    cols = []
    for key in sorted({k for s in summaries for k in s if k.startswith("to_")}):
        reached = [s[key] for s in summaries if s.get(key)]
        label = f"{key[3:]} {reached[0]['target']:g}" if reached else key[3:]
        cols += [
            (f"{key}.rounds", f"rounds to {label}", "{:d}"),
            (f"{key}.uploads", "uploads", "{:d}"),
            (f"{key}.payload_bits", "bits", "{:.3g}"),
        ]
    return cols


def _get(s: dict[str, Any], key: str) -> Any:
    head, _, rest = key.partition(".")
    value = s.get(head)
    return value.get(rest) if rest and isinstance(value, dict) else (None if rest else value)


def table(summaries: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table, one row per run (plus cost-to-target columns when asked for, and a
    status column when a run failed or was interrupted)."""
    columns = [*COLUMNS, *_target_columns(summaries)]
    if any(s.get("status", "done") != "done" for s in summaries):
        columns.append(("status", "status", "{}"))
    head = [title for _, title, _ in columns]
    rows = [[_cell(fmt, _get(s, key)) for key, _, fmt in columns] for s in summaries]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as JSON at ``path``, written atomically (:func:`psrv.files.atomic_write_json`)."""
    atomic_write_json(path, obj)


def cost_to_reach(records: Iterable[dict[str, Any]], key: str, target: float) -> dict[str, Any] | None:
    """Rounds, uploads, payload bits and uplink bytes spent until the first evaluated round
    whose ``key`` reaches ``target`` (``accuracy`` >= target; a loss <= target), or None."""
    cost = CostToReach(key, target)
    for r in records:
        if cost.add(r) is not None:
            break
    return cost.reached


class CostToReach:
    """:func:`cost_to_reach`, worked out as the rounds close (:meth:`add` each record in order), so
    a run need not keep its records."""

    def __init__(self, key: str, target: float) -> None:
        self.key, self.target = key, target
        self.uploads = self.bits = self.nbytes = 0
        self.reached: dict[str, Any] | None = None

    def add(self, r: dict[str, Any]) -> dict[str, Any] | None:
        """Count round ``r``; the cost once the target is reached (then later rounds change nothing)."""
        if self.reached is None:
            self.uploads += r["uploads"]
            self.bits += r["payload_bits"]
            self.nbytes += r["bytes_up"]
            if r.get(self.key) is not None and meets(self.key, r[self.key], self.target):
                self.reached = {
                    "target": self.target,
                    "rounds": r["round"] + 1,
                    "uploads": self.uploads,
                    "payload_bits": self.bits,
                    "bytes_up": self.nbytes,
                    "elapsed": r["elapsed"],
                }
        return self.reached


# ------------------------------------------------------------------------------ cluster runs
def _fmt(v: Any, spec: str = ",") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def format_report(result: Mapping[str, Any]) -> str:
    """The table printed after ``psrv cluster run`` (``result``: its summary, :func:`psrv.cluster.run.run_cluster`):
    per host message vs wire bytes, then totals and timing."""
    head = ["host", "ip", "up", "down", "exit", "msg sent", "wire tx", "pkts tx", "iface tx", "msg recv", "wire rx",
            "pkts rx"]  # fmt: skip
    rows = [head]
    for h in result["hosts"]:
        rows.append(
            [
                h["host"],
                h["ip"],
                format_rate(h["rate_up"]),
                format_rate(h["rate_down"]),
                _fmt(h.get("exit_code")),
                _fmt(h.get("message_bytes_sent")),
                _fmt(h.get("wire_tx_bytes")),
                _fmt(h.get("wire_tx_packets")),
                _fmt(h.get("iface_tx_bytes")),
                _fmt(h.get("message_bytes_received")),
                _fmt(h.get("wire_rx_bytes")),
                _fmt(h.get("wire_rx_packets")),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t, tm, s = result["totals"], result["timing"], result["server"]
    ratio = t.get("wire_over_message")
    lines.append("")
    lines.append(
        f"{result['algorithm']}: {s['rounds']} rounds in {result['wall_time']:.1f} s; final loss "
        f"{_fmt(s.get('final_loss'), '.6f')}, accuracy {_fmt(s.get('accuracy'), '.4f')}"
    )
    lines.append(
        f"message bytes {t['message_bytes']:,} (up {t['message_bytes_up']:,}, down {t['message_bytes_down']:,}); "
        f"wire bytes {_fmt(t['wire_bytes'])} (up {_fmt(t['wire_bytes_up'])}, down {_fmt(t['wire_bytes_down'])}); "
        f"wire/message {_fmt(ratio, '.4f')}"
    )
    if tm.get("round_time_mean") is not None:
        ms = lambda x: _fmt(None if x is None else x * 1e3, ".1f")  # noqa: E731
        lat = ", ".join(ms(x) for x in tm["worker_latency_median"])
        lines.append(
            f"per round (after round 0, which took {ms(tm['first_round_time'])} ms): wall {ms(tm['round_time_mean'])} "
            f"ms mean, {ms(tm['round_time_median'])} median; slowest report {ms(tm['slowest_wait_mean'])} ms mean, "
            f"{ms(tm['straggler_wait_mean'])} ms after the fastest; worker latency medians (ms): {lat}"
        )
    for i, u in enumerate(tm.get("uploads", [])):
        sec = u["upload_seconds_median"]
        lines.append(
            f"w{i} uploads on the wire: {u['uploads_seen']} seen, median {_fmt(sec and sec * 1e3, '.2f')} ms for "
            f"{_fmt(u['upload_wire_bytes_median'])} wire bytes ({_fmt(u['upload_message_bytes_median'])} message bytes)"
        )
    return "\n".join(lines)

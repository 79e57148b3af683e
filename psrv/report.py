"""Summaries a person reads: the table printed after a run (in the spirit of Table 2 of Sun et
al., NeurIPS 2019) and the JSON summary written next to the per-round metrics."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    """A fixed-width table, one row per run (plus cost-to-target columns when asked for)."""
    columns = [*COLUMNS, *_target_columns(summaries)]
    head = [title for _, title, _ in columns]
    rows = [[_cell(fmt, _get(s, key)) for key, _, fmt in columns] for s in summaries]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | Path, obj: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def cost_to_reach(records: Sequence[dict[str, Any]], key: str, target: float) -> dict[str, Any] | None:
    """Rounds, uploads, payload bits and uplink bytes spent until the first evaluated round
    whose ``key`` reaches ``target`` (``accuracy`` >= target; a loss <= target), or None."""
    better = (lambda v: v >= target) if key == "accuracy" else (lambda v: v <= target)
    uploads = bits = nbytes = 0
    for r in records:
        uploads += r["uploads"]
        bits += r["payload_bits"]
        nbytes += r["bytes_up"]
        if r.get(key) is not None and better(r[key]):
            return {
                "target": target,
                "rounds": r["round"] + 1,
                "uploads": uploads,
                "payload_bits": bits,
                "bytes_up": nbytes,
                "elapsed": r["elapsed"],
            }
    return None

"""Summaries a person reads: the table printed after a run (in the spirit of seed
003 Table 2) and the JSON summary written next to the per-round metrics."""

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


def table(summaries: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table, one row per run."""
    head = [title for _, title, _ in COLUMNS]
    rows = [[_cell(fmt, s.get(key)) for key, _, fmt in COLUMNS] for s in summaries]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | Path, obj: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

"""Plots a person looks at: loss against rounds, uplink bytes and wall time, one line
per algorithm, from the per-round metrics (``<run>/<algorithm>/metrics.jsonl``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def load_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curves(records: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-round series: round, loss, cumulative uplink message bytes, elapsed seconds.
    Rounds without a complete loss (a worker missed the deadline or was not asked) are left out."""
    out: dict[str, list[float]] = {"round": [], "loss": [], "bytes_up": [], "elapsed": []}
    total = 0
    for r in records:
        total += r["bytes_up"]
        if r.get("loss") is None:
            continue
        out["round"].append(r["round"])
        out["loss"].append(r["loss"])
        out["bytes_up"].append(total)
        out["elapsed"].append(r["elapsed"])
    return out


def plot_runs(runs: dict[str, Sequence[dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """Write a PNG with three panels (loss vs rounds / uplink bytes / wall time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (
        ("round", "round", "linear"),
        ("bytes_up", "uplink message bytes", "log"),
        ("elapsed", "wall time (s)", "linear"),
    )
    for name, records in runs.items():
        c = curves(records)
        for ax, (key, label, scale) in zip(axes, panels, strict=True):
            ax.plot(c[key], c["loss"], label=name)
            ax.set_xlabel(label)
            ax.set_xscale(scale)
    for ax in axes:
        ax.set_ylabel("training loss (sum of workers' f_m)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run_dir(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Plot every ``<run_dir>/<algorithm>/metrics.jsonl``; default output ``<run_dir>/loss.png``."""
    root = Path(run_dir)
    runs = {p.parent.name: load_metrics(p) for p in sorted(root.glob("*/metrics.jsonl"))}
    if not runs:
        raise FileNotFoundError(f"no */metrics.jsonl under {root}")
    return plot_runs(runs, path or root / "loss.png", title=str(root))

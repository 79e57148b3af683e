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
    A round without a complete loss (a worker missed the deadline or was not asked: selection and
    client sampling) takes the evaluated training loss where there is one, else it is left out."""
    out: dict[str, list[float]] = {"round": [], "loss": [], "bytes_up": [], "elapsed": []}
    total = 0
    for r in records:
        total += r["bytes_up"]
        loss = r["loss"] if r.get("loss") is not None else r.get("train_loss")
        if loss is None:
            continue
        out["round"].append(r["round"])
        out["loss"].append(loss)
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


def run_metrics(run_dir: str | Path) -> dict[str, Path]:
    """The metrics file of every algorithm of a run folder: those its ``manifest.json`` lists (so a
    reused folder never mixes in an earlier run's algorithms), else every ``*/metrics.jsonl``."""
    root = Path(run_dir)
    manifest = root / "manifest.json"
    if manifest.exists():
        try:
            runs = json.loads(manifest.read_text())["runs"]
            listed = {r["algorithm"]: root / r["dir"] / "metrics.jsonl" for r in runs}
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{manifest}: not a psrv run manifest ({exc})") from None
        return {name: p for name, p in listed.items() if p.exists()}
    return {p.parent.name: p for p in sorted(root.glob("*/metrics.jsonl"))}


def plot_run_dir(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Plot every algorithm of a run folder (see :func:`run_metrics`); default output ``<run_dir>/loss.png``."""
    root = Path(run_dir)
    runs = {name: load_metrics(p) for name, p in run_metrics(root).items()}
    if not runs:
        raise FileNotFoundError(f"no metrics under {root} (expected <algorithm>/metrics.jsonl)")
    return plot_runs(runs, path or root / "loss.png", title=str(root))

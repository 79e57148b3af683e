"""Paper-style plots and tables of an experiment folder (written by ``psrv experiment``:
runs/<run_id>/spec.json, summary.json, <algorithm>/metrics.jsonl): one line per method label, mean
and spread over seeds, one figure per grid point and link.

The figures follow Sun et al., "Communication-Efficient Distributed Learning via Lazily Aggregated
Quantized Gradients" (NeurIPS 2019): the objective (or the residual f(θ^k) − f*, log axis) against
iterations, communication rounds and bits (their Figures 4 and 7), the gradient norm of the
nonconvex runs (Figure 5), the test accuracy (Figure 6), and the number of uploads of each worker
(Proposition 1: a worker with a smaller smoothness constant L_m uploads less often). We add the
cost axes psrv measures: bytes on the wire (both directions) and wall time.

The tables follow their Tables 2–3 (iterations, communications, bits, accuracy) and Table II of
Deng et al., "Communication-Efficient Distributed Learning via Sparse and Adaptive Stochastic
Gradient" (arXiv:2112.04088): rounds and bits to a target, here with measured bytes both ways, the
final loss, and the ratio of each cost to the baseline method.

Which metrics field is which (``<algorithm>/metrics.jsonl``, one record per round k):

- ``train_loss``: the full training objective f(θ^{k+1}) after round k's step (the Evaluator, every
  ``eval_every`` rounds and the last). It is what the stopping rules and f* refer to, so the loss
  curves use it whenever a run has it.
- ``loss``: the workers' reported loss at the model θ^k they computed on (before the step); for a
  deterministic run that is f(θ^k) exactly, for a stochastic one the minibatch loss. Used only for a
  run without ``train_loss``.
- ``accuracy``: test accuracy of θ^{k+1}, with ``train_loss``.
- ``aggregate_norm``: ‖the aggregate the server stepped along in round k‖. For GD that is
  ‖∇f(θ^k)‖ (the mean of the workers' gradients); for the lazy methods it is the lazily aggregated
  gradient of LAQ eq. (4), the direction actually used. The gradient-norm figure draws its square.
- ``uploads``, ``payload_bits`` (the compressor's formula), ``bytes_up``/``bytes_down`` (measured
  message bytes), ``elapsed`` (seconds since the first round): per round, summed here.
- ``workers``: per-worker status of the round ("upload" or a skip reason), for the upload counts.

Seeds: at each iteration the line is the mean over seeds of the value and of the cost on the x axis;
the shaded band spans min–max of the value over the seeds. Lines are drawn over the iterations that
every seed reached (runs stopped early by a rule end at different rounds). Tables give the mean ±
sample standard deviation over seeds; a ratio is mean(method) / mean(baseline).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psrv.files import atomic_write_bytes, atomic_write_text
from psrv.plots import load_metrics

#: x axes of the loss and accuracy figures: key -> (axis label, log scale)
X_AXES = {
    "iteration": ("iteration k (rounds)", False),
    "uploads": ("communication rounds (cumulative uploads)", False),
    "payload_bits": ("bits (cumulative formula payload bits)", True),
    "bytes": ("measured bytes, up + down (cumulative)", True),
    "elapsed": ("wall time (s)", False),
}


# ------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One finished run of an experiment: its spec, summary and per-round records (cut at the
    round a stopping rule ended it)."""

    run_id: str
    spec: dict[str, Any]
    summary: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def label(self) -> str:
        return str(self.spec.get("label") or self.summary.get("algorithm") or self.run_id)

    @property
    def fstar(self) -> float | None:
        """f* of the run: the summary's (a solved "auto") or the spec's; None when neither is a number."""
        for f in (self.summary.get("fstar"), self.spec.get("fstar")):
            if isinstance(f, int | float) and not isinstance(f, bool) and math.isfinite(f):
                return float(f)
        return None

    @property
    def group(self) -> tuple[tuple[str, str], ...]:
        """The grid point and link: what one figure holds (seeds and methods vary inside it)."""
        grid = self.spec.get("grid") or {}
        items = [(str(k), _fmt_value(v)) for k, v in sorted(grid.items()) if k not in ("seed", "seeds", "link")]
        return (("link", str(self.spec.get("link", "loopback"))), *items)

    @property
    def deterministic(self) -> bool:
        """Full-gradient run (batch 0 or no batch option): the gradient-norm figure applies."""
        opts = (self.summary.get("config") or {}).get("algorithm_options") or {}
        return not opts.get("batch")


def _fmt_value(v: Any) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else str(v)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_runs(exp_dir: str | Path) -> list[Run]:
    """Every finished run under ``EXP/runs`` (``summary.json`` with status "done"); unfinished or
    unreadable run folders are skipped. A run whose metrics file is missing keeps its summary
    (it appears in the tables, not in the plots)."""
    runs = []
    for d in sorted(Path(exp_dir, "runs").glob("*/")):
        summary = _read_json(d / "summary.json")
        if isinstance(summary, list):  # a psrv run summary of one algorithm, written as a list
            summary = summary[0] if len(summary) == 1 else None
        if not isinstance(summary, dict) or summary.get("status", "done") != "done":
            continue
        spec = _read_json(d / "spec.json")
        spec = spec if isinstance(spec, dict) else {}
        algorithm = spec.get("algorithm") or summary.get("algorithm") or ""
        path = d / str(algorithm) / "metrics.jsonl"
        if not path.exists():
            found = sorted(d.glob("*/metrics.jsonl"))
            path = found[0] if len(found) == 1 else path
        try:
            records = load_metrics(path) if path.exists() else []
        except (OSError, ValueError):
            records = []
        stop = summary.get("stop_round")
        if isinstance(stop, int):
            records = [r for r in records if r.get("round", 0) <= stop]
        runs.append(Run(str(spec.get("run_id") or d.name), spec, summary, records))
    return runs


def experiment_config(exp_dir: str | Path) -> dict[str, Any]:
    """``EXP/experiment.toml`` (the resolved config), or {} when absent or unreadable."""
    try:
        with open(Path(exp_dir, "experiment.toml"), "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def method_order(runs: Sequence[Run], config: dict[str, Any]) -> list[str]:
    """Labels in the config's [[method]] order, then any other label in the order first seen."""
    labels = [str(m.get("label")) for m in config.get("method", []) if isinstance(m, dict) and m.get("label")]
    order = [lb for lb in labels if any(r.label == lb for r in runs)]
    for r in runs:
        if r.label not in order:
            order.append(r.label)
    return order


def baseline_label(order: Sequence[str], config: dict[str, Any]) -> str | None:
    base = config.get("baseline")
    return str(base) if base in order else (order[0] if order else None)


def _groups(runs: Sequence[Run]) -> dict[tuple[tuple[str, str], ...], list[Run]]:
    out: dict[tuple[tuple[str, str], ...], list[Run]] = {}
    for r in runs:
        out.setdefault(r.group, []).append(r)
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0] != ("link", "loopback"), kv[0])))  # loopback first


def _slug(group: tuple[tuple[str, str], ...], several: bool) -> str:
    """File-name prefix of a group's plots ("" when the experiment has one group): the link, then
    the grid's k=v."""
    if not several:
        return ""
    text = "__".join(v if k == "link" else f"{k}={v}" for k, v in group)
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-") + "__"


def _title(group: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"{k} {v}" for k, v in group)


# ----------------------------------------------------------------------------------------- series
def series(run: Run, what: str) -> list[tuple[int, dict[str, float], float]]:
    """Points (iteration, costs, value) of one run for ``what`` in "loss", "residual", "accuracy",
    "gradnorm". ``costs`` holds the cumulative uploads, payload_bits, bytes (up + down) and elapsed
    spent to reach the model the value was measured at (see the module docstring for which field)."""
    cum: list[dict[str, float]] = []
    total = {"uploads": 0.0, "payload_bits": 0.0, "bytes": 0.0}
    for r in run.records:
        total["uploads"] += r.get("uploads") or 0
        total["payload_bits"] += r.get("payload_bits") or 0
        total["bytes"] += (r.get("bytes_up") or 0) + (r.get("bytes_down") or 0)
        cum.append({**total, "elapsed": float(r.get("elapsed") or 0.0)})
    zero = {"uploads": 0.0, "payload_bits": 0.0, "bytes": 0.0, "elapsed": 0.0}
    out: list[tuple[int, dict[str, float], float]] = []
    evaluated = any(r.get("train_loss") is not None for r in run.records)
    for i, r in enumerate(run.records):
        k = int(r.get("round", i))
        value: Any
        if what in ("loss", "residual"):
            if evaluated:  # f(θ^{k+1}) after round k: k+1 iterations and round k's costs
                value, at, costs = r.get("train_loss"), k + 1, cum[i]
            else:  # f(θ^k) as the workers reported it: the costs of the rounds before
                value, at, costs = r.get("loss"), k, cum[i - 1] if i else zero
            if value is not None and what == "residual":
                value = value - run.fstar if run.fstar is not None else None
        elif what == "accuracy":
            value, at, costs = r.get("accuracy"), k + 1, cum[i]
        elif what == "gradnorm":
            norm = r.get("aggregate_norm")
            value, at, costs = (None if norm is None else norm * norm), k, cum[i - 1] if i else zero
        else:
            raise ValueError(f"unknown series {what!r}")
        if isinstance(value, int | float) and math.isfinite(value):
            out.append((at, costs, float(value)))
    return out


@dataclass
class Band:
    """Mean line and min–max band over seeds, at the iterations every seed reached."""

    x: dict[str, list[float]] = field(default_factory=dict)
    mean: list[float] = field(default_factory=list)
    lo: list[float] = field(default_factory=list)
    hi: list[float] = field(default_factory=list)
    seeds: int = 0


def combine(per_seed: Sequence[Sequence[tuple[int, dict[str, float], float]]]) -> Band:
    """Mean over seeds at equal iteration (of the value and of every cost axis), band = min–max of
    the value. Iterations not reached by every seed are left out, unless that leaves fewer than two
    points (then each iteration averages the seeds that have it)."""
    per_seed = [s for s in per_seed if s]
    band = Band(x={k: [] for k in X_AXES}, seeds=len(per_seed))
    if not per_seed:
        return band
    maps = [{at: (costs, v) for at, costs, v in s} for s in per_seed]
    common = sorted(set.intersection(*(set(m) for m in maps)))
    if len(common) < 2:
        common = sorted(set.union(*(set(m) for m in maps)))
    for at in common:
        have = [m[at] for m in maps if at in m]
        values = [v for _, v in have]
        band.x["iteration"].append(at)
        for key in ("uploads", "payload_bits", "bytes", "elapsed"):
            band.x[key].append(statistics.fmean(c[key] for c, _ in have))
        band.mean.append(statistics.fmean(values))
        band.lo.append(min(values))
        band.hi.append(max(values))
    return band


# ------------------------------------------------------------------------------------------ plots
def _save(fig: Any, path: Path) -> Path:
    """PNG written atomically (a reader never sees half a picture)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(order: Sequence[str]) -> dict[str, Any]:
    plt = _plt()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {label: cycle[i % len(cycle)] for i, label in enumerate(order)}


def _draw(ax: Any, band: Band, xkey: str, color: Any, label: str, positive: bool) -> bool:
    xs, mean, lo, hi = band.x[xkey], band.mean, band.lo, band.hi
    if positive:  # a log axis: drop points at or below zero (a residual below the solved f*)
        keep = [i for i, v in enumerate(mean) if v > 0]
        xs, mean = [xs[i] for i in keep], [mean[i] for i in keep]
        lo, hi = [max(lo[i], mean[i] * 1e-3) for i in keep], [hi[i] for i in keep]
    if xkey in ("payload_bits", "bytes"):
        keep = [i for i, x in enumerate(xs) if x > 0]
        xs, mean, lo, hi = ([v[i] for i in keep] for v in (xs, mean, lo, hi))
    if not xs:
        return False
    few = len(xs) <= 12  # markers on every point, else on the last (where the run ended)
    ax.plot(xs, mean, color=color, label=label, lw=1.8, marker="o", ms=3 if few else 4, markevery=None if few else [-1])
    if band.seeds > 1:
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)
    return True


def _band_note(bands: Iterable[Band]) -> str:
    n = max((b.seeds for b in bands), default=0)
    return f"line: mean over {n} seeds; band: min–max over seeds" if n > 1 else "one seed per method"


def _curve_figure(
    path: Path,
    by_label: dict[str, list[Run]],
    colors: dict[str, Any],
    what: str,
    ylabel: str,
    log_y: bool,
    title: str,
) -> Path | None:
    bands = {lb: combine([series(r, what) for r in runs]) for lb, runs in by_label.items()}
    bands = {lb: b for lb, b in bands.items() if b.mean}
    if not bands:
        return None
    plt = _plt()
    positive = log_y  # a residual drops its points at or below zero either way
    if log_y:  # a loss that moves less than a decade reads better on a linear axis
        values = [v for b in bands.values() for v in b.mean if v > 0]
        log_y = bool(values) and max(values) > 10 * min(values)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4), layout="constrained")
    flat = list(axes.flat)
    for ax, (xkey, (xlabel, log_x)) in zip(flat, X_AXES.items(), strict=False):
        drew = False
        for lb, band in bands.items():
            drew |= _draw(ax, band, xkey, colors[lb], lb, positive)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if drew:
            if log_y:
                ax.set_yscale("log")
            if log_x:
                ax.set_xscale("log")
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
    legend_ax = flat[-1]
    legend_ax.axis("off")
    handles, labels = flat[0].get_legend_handles_labels()
    legend_ax.legend(handles, labels, loc="center", fontsize=12, title=_band_note(bands.values()), frameon=False)
    fig.suptitle(title, fontsize=13)
    return _save(fig, path)


def _gradnorm_figure(path: Path, by_label: dict[str, list[Run]], colors: dict[str, Any], title: str) -> Path | None:
    bands = {lb: combine([series(r, "gradnorm") for r in runs]) for lb, runs in by_label.items()}
    bands = {lb: b for lb, b in bands.items() if b.mean}
    if not bands:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
    for ax, xkey in zip(axes, ("iteration", "uploads", "payload_bits"), strict=True):
        for lb, band in bands.items():
            _draw(ax, band, xkey, colors[lb], lb, True)
        ax.set_xlabel(X_AXES[xkey][0])
        ax.set_ylabel("‖aggregate‖² (= ‖∇f(θᵏ)‖² for GD)")
        ax.set_yscale("log")
        if X_AXES[xkey][1]:
            ax.set_xscale("log")
        ax.grid(True, which="major", alpha=0.35)
    axes[0].legend(title=_band_note(bands.values()), fontsize=9, title_fontsize=8)
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def worker_uploads(run: Run) -> dict[str, int]:
    """Uploads of each worker over the run (from the records' per-worker statuses)."""
    counts: dict[str, int] = {}
    for r in run.records:
        for w in r.get("workers") or ():
            wid = str(w.get("id"))
            counts[wid] = counts.get(wid, 0) + (w.get("status") == "upload")
    return counts


def _worker_key(wid: str) -> tuple[int, Any]:
    m = re.search(r"(\d+)$", wid)
    return (0, int(m.group(1)), wid) if m else (1, 0, wid)  # type: ignore[return-value]


def _uploads_figure(path: Path, by_label: dict[str, list[Run]], colors: dict[str, Any], title: str) -> Path | None:
    """LAQ paper Proposition 1 picture: bars of uploads per worker, one colour per method (mean
    over seeds; the error bar spans min–max). Over 40 workers: each method's counts sorted, as a
    step line."""
    per_label: dict[str, dict[str, list[int]]] = {}
    for lb, runs in by_label.items():
        counts = [worker_uploads(r) for r in runs]
        counts = [c for c in counts if c]
        if counts:
            ids = sorted({w for c in counts for w in c}, key=_worker_key)
            per_label[lb] = {w: [c.get(w, 0) for c in counts] for w in ids}
    if not per_label:
        return None
    ids = sorted({w for d in per_label.values() for w in d}, key=_worker_key)
    plt = _plt()
    fig, ax = plt.subplots(
        figsize=(max(7.0, min(16.0, 0.35 * len(ids) * len(per_label) + 3)), 4.6), layout="constrained"
    )
    seeds = max(len(v) for d in per_label.values() for v in d.values())
    if len(ids) <= 40:
        width = 0.8 / len(per_label)
        for j, (lb, d) in enumerate(per_label.items()):
            xs = [i + (j - (len(per_label) - 1) / 2) * width for i in range(len(ids))]
            vals = [d.get(w, [0]) for w in ids]
            mean = [statistics.fmean(v) for v in vals]
            pairs = list(zip(mean, vals, strict=True))
            err = [[m - min(v) for m, v in pairs], [max(v) - m for m, v in pairs]]
            ax.bar(xs, mean, width, color=colors[lb], label=lb, yerr=err if seeds > 1 else None, capsize=2)
        ax.set_xticks(range(len(ids)), ids, rotation=90 if len(ids) > 12 else 0)
        ax.set_xlabel("worker")
    else:
        for lb, d in per_label.items():
            mean = sorted((statistics.fmean(d.get(w, [0])) for w in ids), reverse=True)
            ax.step(range(len(mean)), mean, where="mid", color=colors[lb], label=lb, lw=1.8)
        ax.set_xlabel("workers, sorted by uploads")
    ax.set_ylabel("uploads over the run")
    spread = "; error bar: min–max" if len(ids) <= 40 else ""
    note = f"mean over {seeds} seeds{spread}" if seeds > 1 else "one seed"
    ax.legend(title=note, fontsize=9, title_fontsize=8)
    ax.grid(True, axis="y", alpha=0.35)
    ax.set_title(title + " — uploads per worker (LAQ Proposition 1)", fontsize=11)
    return _save(fig, path)


def render(exp_dir: str | Path) -> list[Path]:
    """Write ``EXP/plots/*.png`` and ``EXP/tables/*.md|csv`` from the finished runs; return the
    paths written. Per (grid point, link): ``[<group>__]loss.png`` (or ``residual.png`` when the
    runs have f*), ``accuracy.png``, ``gradnorm.png`` (deterministic runs), ``uploads_per_worker.png``.
    Does not write report.md."""
    root = Path(exp_dir)
    runs = load_runs(root)
    config = experiment_config(root)
    order = method_order(runs, config)
    colors = _colors(order)
    written: list[Path] = []
    groups = _groups(runs)
    if groups:
        (root / "plots").mkdir(parents=True, exist_ok=True)
    name = config.get("name") or root.name
    for group, members in groups.items():
        prefix = _slug(group, len(groups) > 1)
        by_label = {lb: [r for r in members if r.label == lb] for lb in order}
        by_label = {lb: rs for lb, rs in by_label.items() if rs}
        title = f"{name}: {_title(group)}"
        plots = root / "plots"
        if any(r.fstar is not None for r in members):
            what, ylabel = "residual", "loss residual f(θ) − f*"
        else:
            what, ylabel = "loss", "training loss f(θ)"
        out = _curve_figure(plots / f"{prefix}{what}.png", by_label, colors, what, ylabel, True, title)
        acc = plots / f"{prefix}accuracy.png"
        out2 = _curve_figure(acc, by_label, colors, "accuracy", "test accuracy", False, title)
        det = {lb: rs for lb, rs in by_label.items() if all(r.deterministic for r in rs)}
        out3 = _gradnorm_figure(plots / f"{prefix}gradnorm.png", det, colors, title) if det else None
        out4 = _uploads_figure(plots / f"{prefix}uploads_per_worker.png", by_label, colors, title)
        written += [p for p in (out, out2, out3, out4) if p is not None]
    written += write_tables(root, runs)
    _remove_stale(root, written)
    return written


def _remove_stale(root: Path, written: Sequence[Path]) -> None:
    """Remove the plots and tables an earlier render wrote that this one did not (a grid that
    grew from one group to several names its files by group: the old ``loss.png`` would stay)."""
    keep = {Path(p).resolve() for p in written}
    for folder, pattern in (("plots", "*.png"), ("tables", "*.md"), ("tables", "*.csv")):
        for path in (root / folder).glob(pattern):
            if path.resolve() not in keep:
                path.unlink(missing_ok=True)


def write_tables(exp_dir: str | Path, runs: Sequence[Run] | None = None) -> list[Path]:
    """Write ``EXP/tables/<name>.md`` and ``.csv`` (see :func:`tables`); return the paths."""
    root = Path(exp_dir)
    runs = load_runs(root) if runs is None else runs
    config = experiment_config(root)
    order = method_order(runs, config)
    written = []
    for tname, text in _all_tables(runs, order, baseline_label(order, config)).items():
        (root / "tables").mkdir(parents=True, exist_ok=True)
        written.append(atomic_write_text(root / "tables" / f"{tname}.md", text["md"]))
        written.append(atomic_write_text(root / "tables" / f"{tname}.csv", text["csv"]))
    return written


# ----------------------------------------------------------------------------------------- tables
#: table columns: key -> (title, format of a mean)
COLUMNS = {
    "iterations": ("iterations", "{:.0f}"),
    "uploads": ("uploads", "{:.0f}"),
    "payload_bits": ("bits (formula)", "{:.3g}"),
    "bytes_up": ("bytes up", "{:.3g}"),
    "bytes_down": ("bytes down", "{:.3g}"),
    "accuracy": ("accuracy", "{:.4f}"),
    "loss": ("loss", "{:.6g}"),
    "residual": ("f − f*", "{:.3g}"),
    "wall_time": ("wall s", "{:.1f}"),
}
#: ratio columns: cost -> title
RATIOS = {
    "iterations": "iterations ×",
    "uploads": "uploads ×",
    "payload_bits": "bits ×",
    "bytes_total": "bytes up+down ×",
}


def run_numbers(run: Run) -> dict[str, float | None]:
    """The table numbers of one run, at the round its stopping rule ended it (else the last):
    counts summed from the metrics records (the summary's when there are none); accuracy and loss
    of the last evaluation (the summary's final ones when none was recorded)."""
    s, recs = run.summary, run.records
    out: dict[str, float | None] = {}
    if recs:
        out["iterations"] = float(int(recs[-1].get("round", len(recs) - 1)) + 1)
        for key in ("uploads", "payload_bits", "bytes_up", "bytes_down"):
            out[key] = float(sum(r.get(key) or 0 for r in recs))
        out["wall_time"] = _num(recs[-1].get("elapsed"))
    else:
        stop = s.get("stop_round")
        out["iterations"] = float(stop + 1) if isinstance(stop, int) else _num(s.get("rounds"))
        for key in ("uploads", "payload_bits", "bytes_up", "bytes_down"):
            out[key] = _num(s.get(key))
        out["wall_time"] = _num(s.get("wall_time"))
    acc = [r["accuracy"] for r in recs if r.get("accuracy") is not None]
    loss = [r["train_loss"] for r in recs if r.get("train_loss") is not None]
    out["accuracy"] = _num(acc[-1]) if acc else _num(s.get("accuracy"))
    out["loss"] = _num(loss[-1]) if loss else _num(s.get("final_loss"))
    out["residual"] = out["loss"] - run.fstar if out["loss"] is not None and run.fstar is not None else None
    up, down = out.get("bytes_up"), out.get("bytes_down")
    out["bytes_total"] = up + down if up is not None and down is not None else None
    return out


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _stats(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    vs = [v for v in values if v is not None]
    if not vs:
        return None, None, 0
    return statistics.fmean(vs), (statistics.stdev(vs) if len(vs) > 1 else None), len(vs)


def table_rows(runs: Sequence[Run], order: Sequence[str], baseline: str | None) -> list[dict[str, Any]]:
    """One row per method label: mean, std and count over seeds of every column, the stopping rules
    that ended its runs, and the ratio of its mean costs to the baseline's."""
    rows: list[dict[str, Any]] = []
    numbers = {lb: [run_numbers(r) for r in runs if r.label == lb] for lb in order}
    means = {lb: {k: _stats([n.get(k) for n in ns])[0] for k in (*COLUMNS, *RATIOS)} for lb, ns in numbers.items()}
    for lb in order:
        ns = numbers[lb]
        if not ns:
            continue
        row: dict[str, Any] = {"method": lb, "seeds": len(ns)}
        for key in COLUMNS:
            mean, std, _ = _stats([n.get(key) for n in ns])
            row[key], row[f"{key}_std"] = mean, std
        stops = sorted({str(r.summary.get("stopped_by") or "rounds") for r in runs if r.label == lb})
        row["stopped_by"] = ",".join(stops)
        for key in RATIOS:
            b = means.get(baseline or "", {}).get(key)
            m = means[lb].get(key)
            row[f"{key}_ratio"] = m / b if m is not None and b not in (None, 0) else None
        rows.append(row)
    return rows


def _cell(fmt: str, mean: Any, std: Any) -> str:
    if mean is None:
        return "–"
    return fmt.format(mean) + (f" ± {std:.2g}" if std is not None else "")


def _markdown(rows: Sequence[dict[str, Any]], baseline: str | None, title: str) -> str:
    keys = [k for k in COLUMNS if any(r.get(k) is not None for r in rows)]
    head = ["method", "seeds", *(COLUMNS[k][0] for k in keys), *(RATIOS[k] for k in RATIOS), "ended by"]
    lines = [f"**{title}**" if title else "", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["seeds"]), *(_cell(COLUMNS[k][1], r[k], r[f"{k}_std"]) for k in keys)]
        cells += [_cell("{:.3g}", r[f"{k}_ratio"], None) for k in RATIOS]
        cells.append(r["stopped_by"])
        lines.append("| " + " | ".join(cells) + " |")
    seeds = max((r["seeds"] for r in rows), default=0)
    note = "mean ± sample std over seeds; " if seeds > 1 else ""
    lines += ["", f"{note}× = ratio of the mean to the mean of {baseline}; bytes are measured message bytes."]
    return "\n".join(lines).lstrip("\n") + "\n"


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    fields = ["method", "seeds", *(f for k in COLUMNS for f in (k, f"{k}_std")), *(f"{k}_ratio" for k in RATIOS)]
    fields.append("stopped_by")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({f: ("" if r.get(f) is None else r[f]) for f in fields})
    return buf.getvalue()


def _all_tables(runs: Sequence[Run], order: Sequence[str], baseline: str | None) -> dict[str, dict[str, str]]:
    groups = _groups(runs)
    out = {}
    for group, members in groups.items():
        name = "summary" if len(groups) == 1 else _slug(group, True).rstrip("_")
        rows = table_rows(members, order, baseline)
        out[name] = {"md": _markdown(rows, baseline, _title(group)), "csv": _csv(rows)}
    return out


def tables(exp_dir: str | Path) -> dict[str, str]:
    """Markdown tables by name ("summary", or one per grid point and link), as
    :func:`render` writes them to ``tables/<name>.md``."""
    root = Path(exp_dir)
    runs = load_runs(root)
    config = experiment_config(root)
    order = method_order(runs, config)
    return {name: t["md"] for name, t in _all_tables(runs, order, baseline_label(order, config)).items()}

"""Communication cost to the stopping rule of every run of a ``psrv experiment`` folder, under a CAT
cost model: the quantity of Figure 2 of Khirirat, Magnússon, Aytekin, Johansson, "A Flexible Framework
for Communication-Efficient Machine Learning: from HPC to IoT", AAAI 2021 (arXiv:2003.06377).

The cost of a run is the sum, over the rounds up to and including the round at which its stopping rule
held (``summary.json``'s ``stop_round``; every round when it ran out of rounds), and over the workers
that uploaded in that round, of C(P) for the upload's size P: ``bits`` of the per-worker record in
``<algorithm>/metrics.jsonl`` (psrv's payload bits) or its measured message ``bytes``, as the model's
``size`` says. Models: ``exp2`` = the packet model of the paper's Experiment 2 (c1 = 576 bytes a packet,
c0 = 64 bytes, P_max = 512 bytes; cost in bits of payload_bits), ``10mbit`` = a 10 Mbit/s Ethernet link
(1514-byte frames carrying 1448 payload bytes, 1 ms a message; seconds on the message bytes), or
``--cost-file FIT.json`` (``psrv fit-cost``'s output).

    python scripts/experiment_cost.py psrv-exp/cat-figure2                # Markdown table on stdout
    python scripts/experiment_cost.py psrv-exp/cat-figure2 --cost 10mbit --json cost.json --plot cost.png
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psrv.cat import CostModel, cost_model_from_dict  # noqa: E402

COSTS = {
    "exp2": CostModel("packet", c0=64 * 8.0, c1=576 * 8.0, p_max_bytes=512, size="payload_bits"),
    "10mbit": CostModel("packet", c0=1e-3, c1=1514 * 8 / 1e7, p_max_bytes=1448, size="wire_bytes"),
}


def run_cost(run_dir: Path, model: CostModel) -> dict[str, Any]:
    """Cost, rounds and uploads of one finished run folder (``runs/<run_id>``) until its stop round."""
    spec = json.loads((run_dir / "spec.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    stop = summary.get("stop_round")
    field = "bits" if model.size == "payload_bits" else "bytes"
    cost, uploads, rounds, curve = 0.0, 0, 0, []
    with open(run_dir / spec["algorithm"] / "metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if stop is not None and r["round"] > stop:
                break
            rounds = r["round"] + 1
            for w in r.get("workers", []):
                if w.get("status") == "upload":
                    cost += float(model.of_size(w[field]))
                    uploads += 1
            if r.get("train_loss") is not None:  # f(theta^{k+1}), after round k's uploads
                curve.append((cost, float(r["train_loss"])))
    return {
        "label": spec["label"],
        "seed": spec["seed"],
        "stopped_by": summary.get("stopped_by"),
        "rounds": rounds,
        "uploads": uploads,
        "cost": cost,
        "curve": curve,
    }


def table(exp: Path, model: CostModel) -> tuple[str, list[dict[str, Any]], list[str]]:
    runs = sorted(p.parent for p in (exp / "runs").glob("*/summary.json"))
    if not runs:
        raise SystemExit(f"{exp}: no finished runs (runs/*/summary.json)")
    rows = [run_cost(r, model) for r in runs]
    config = {}
    if (exp / "experiment.toml").exists():
        config = tomllib.loads((exp / "experiment.toml").read_text())
    order = [m["label"] for m in config.get("method", [])] or list(dict.fromkeys(r["label"] for r in rows))
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    mean = {k: sum(r["cost"] for r in v) / len(v) for k, v in by_label.items()}
    base = config.get("baseline") or order[0]
    unit = "bits" if model.size == "payload_bits" and model.model != "affine" else "units"
    out = [
        f"| method | stopped by | rounds | uploads | cost ({unit}) | cost / {base} |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for label in order:
        for r in by_label.get(label, []):
            ratio = r["cost"] / mean[base] if mean.get(base) else float("nan")
            seed = f" (seed {r['seed']})" if len(by_label[label]) > 1 else ""
            cells = [f"{label}{seed}", r["stopped_by"], r["rounds"], r["uploads"], f"{r['cost']:.4g}", f"{ratio:.3f}"]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out), rows, order


def plot(rows: list[dict[str, Any]], order: list[str], path: Path, xlabel: str) -> None:
    """Training loss against the cumulative cost, one line per run (the axes of the paper's Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for label in order:
        for r in (r for r in rows if r["label"] == label and r["curve"]):
            xs, ys = zip(*r["curve"], strict=True)
            ax.plot(xs, ys, label=label)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss f(theta)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("exp", type=Path, help="a psrv experiment folder")
    ap.add_argument("--cost", default="exp2", choices=sorted(COSTS))
    ap.add_argument("--cost-file", type=Path, help="a fitted cost model (JSON) instead of --cost")
    ap.add_argument("--json", type=Path, help="also write the per-run rows here")
    ap.add_argument("--plot", type=Path, help="also draw training loss against the cumulative cost (PNG)")
    args = ap.parse_args(argv)
    model = cost_model_from_dict(json.loads(args.cost_file.read_text())) if args.cost_file else COSTS[args.cost]
    text, rows, order = table(args.exp, model)
    print(text)
    if args.plot:
        unit = "bits" if model.size == "payload_bits" else "cost units"
        plot(rows, order, args.plot, f"communication cost ({model.model} model, {unit}), cumulative")
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "curve"} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""CAT vs fixed-T top-k vs the Alistarh et al. heuristic: total communication cost to reach a target loss.

Khirirat, Magnússon, Aytekin, Johansson, "A Flexible Framework for Communication-Efficient Machine
Learning: from HPC to IoT", AAAI 2021, arXiv:2003.06377, Experiment 2 / Figure 2: multi-node
compressed gradient descent (eq. 10 with full local gradients) on logistic regression, each worker
compressing its own gradient with psrv's compressors (the same objects ``--compressor`` builds), the
server averaging the decoded payloads and stepping ``theta -= (1/L) mean``; no error feedback (as in
the paper). The cost of a round is the sum over the workers of C(size of the payload actually sent).

Tasks: ``digits`` (sklearn's shipped 8x8 digits, psrv's default data: d = 65 x 10 = 650) and
``digits-onehot``: every pixel's 17 grey levels one-hot encoded (64 x 17 = 1088 binary features, 64
ones per row: 6% dense), d = 1089 x 10 = 10890 -- a sparse, higher-dimensional problem built from
shipped data.

Cost models: ``exp2`` = the packet model of the paper's Experiment 2 (c1 = 576 bytes a packet,
c0 = 64 bytes, P_max = 512 bytes; units: bits, P = psrv's payload_bits); ``10mbit`` = a 10 Mbit/s
Ethernet link as a packet model in seconds on psrv's wire bytes (P_max = 1448 payload bytes = one TCP
segment, c1 = 1514 * 8 / 1e7 s per frame, c0 = 1 ms per message); or ``--cost-file FIT.json``.

Target: the loss full gradient descent reaches after ``--target-rounds`` rounds.

    python scripts/cat_measure.py --task digits --cost exp2
    python scripts/cat_measure.py --task digits-onehot --cost 10mbit --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psrv import data, payload  # noqa: E402
from psrv.cat import CostModel, cost_model_from_dict, encoded_bytes  # noqa: E402
from psrv.compress import make_compressor  # noqa: E402
from psrv.tasks.logreg import LogReg  # noqa: E402

COSTS = {
    "exp2": CostModel("packet", c0=64 * 8.0, c1=576 * 8.0, p_max_bytes=512, size="payload_bits"),
    "10mbit": CostModel("packet", c0=1e-3, c1=1514 * 8 / 1e7, p_max_bytes=1448, size="wire_bytes"),
}


def load_task(name: str) -> tuple[np.ndarray, np.ndarray]:
    ds = data.load("digits")
    X, y = np.asarray(ds.X, dtype=np.float64), np.asarray(ds.y)
    if name == "digits":
        return X, y
    if name == "digits-onehot":
        levels = np.rint(X * 16 / max(1.0, X.max())).astype(np.int64) if X.max() <= 1.0 else X.astype(np.int64)
        onehot = np.zeros((X.shape[0], X.shape[1] * 17))
        rows = np.repeat(np.arange(X.shape[0]), X.shape[1])
        onehot[rows, (np.arange(X.shape[1]) * 17)[None, :].repeat(X.shape[0], 0).ravel() + levels.ravel()] = 1.0
        return onehot, y
    raise SystemExit(f"unknown task {name!r}: digits or digits-onehot")


def size_of(p: payload.Payload, cost: CostModel) -> int:
    if p.kind == "dense":
        return payload.payload_bits(p) if cost.size == "payload_bits" else 4 * p.dim + 8
    return payload.payload_bits(p) if cost.size == "payload_bits" else encoded_bytes(p)


def run(method: dict, X, y, M: int, cost: CostModel, target: float, max_rounds: int, seed: int) -> dict:
    task = LogReg(X.shape[1], int(y.max()) + 1, l2=0.01)
    L = task.smoothness(X)
    shards = np.array_split(np.random.default_rng(seed).permutation(len(X)), M)
    comps = [make_compressor(method["compressor"], **method.get("options", {})) for _ in range(M)]
    rng = np.random.default_rng(seed)
    theta = task.init_params(rng)
    total, Ts, t0 = 0.0, [], time.perf_counter()
    for k in range(max_rounds + 1):
        loss = task.loss(theta, X, y)
        if loss <= target:
            break
        if k == max_rounds:
            return {"reached": False, "rounds": k, "cost": total, "final_loss": loss, "mean_T": float(np.mean(Ts))}
        acc = np.zeros(task.dim)
        for m in range(M):
            _, g = task.local_loss_grad(theta, X[shards[m]], y[shards[m]], len(X), M)
            p = comps[m].compress(g, rng)
            total += float(cost.of_size(size_of(p, cost)))
            Ts.append(p.dim if p.kind == "dense" else len(p.indices))
            acc += payload.to_dense(p)
        theta = theta - acc / L  # F = sum_m f_m: the sum of the workers' gradients
    return {
        "reached": True,
        "rounds": k,
        "cost": total,
        "final_loss": loss,
        "mean_T": float(np.mean(Ts)) if Ts else 0.0,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="digits", choices=["digits", "digits-onehot"])
    ap.add_argument("--cost", default="exp2", choices=sorted(COSTS))
    ap.add_argument("--cost-file", help="a fitted cost model (JSON) instead of --cost")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--target-rounds", type=int, default=100, help="target: gd's loss after this many rounds")
    ap.add_argument("--max-rounds", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--only", default="", help="run only the methods whose name contains one of these (comma-separated)"
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    cost = cost_model_from_dict(json.loads(Path(args.cost_file).read_text())) if args.cost_file else COSTS[args.cost]
    X, y = load_task(args.task)
    d = (X.shape[1] + 1) * (int(y.max()) + 1)
    copts = {k: v for k, v in cost.options().items()}
    methods = [{"name": "gd (dense)", "compressor": "dense"}]
    for share in (0.005, 0.02, 0.1):
        k = max(1, math.ceil(share * d))
        methods.append({"name": f"top-k fixed k={k} ({share:.1%})", "compressor": "topk", "options": {"k": k}})
    methods += [
        {"name": "top-k Alistarh", "compressor": "alistarh", "options": {"base": 0.0, **copts}},
        {"name": "top-k CAT", "compressor": "cat", "options": {"base": 0.0, **copts}},
        {"name": "top-k CAT hybrid every=20", "compressor": "cat", "options": {"base": 0.0, "every": 20.0, **copts}},
        {"name": "S+Q Alistarh", "compressor": "alistarh", "options": {"base": 1.0, **copts}},
        {"name": "S+Q CAT", "compressor": "cat", "options": {"base": 1.0, **copts}},
        {"name": "stochastic CAT", "compressor": "cat", "options": {"base": 2.0, **copts}},
    ]
    gd = run(methods[0], X, y, args.workers, cost, -math.inf, args.target_rounds, args.seed)
    target = gd["final_loss"]
    print(
        f"task {args.task} d={d} workers={args.workers} cost={cost}",
        f"target loss {target:.5f} (gd, {args.target_rounds} rounds)",
    )
    rows = []
    wanted = [w for w in args.only.split(",") if w]
    for m in methods:
        if wanted and not any(w in m["name"] for w in wanted):
            continue
        r = run(m, X, y, args.workers, cost, target, args.max_rounds, args.seed)
        rows.append({"method": m["name"], **r})
        mark = "" if r["reached"] else f"  NOT reached (loss {r['final_loss']:.5f})"
        print(f"{m['name']:32s} cost {r['cost']:14.6g}  rounds {r['rounds']:5d}  mean T {r['mean_T']:9.1f}{mark}")
    if args.json:
        out = {
            "task": args.task,
            "d": d,
            "cost_model": vars(cost) if hasattr(cost, "__dict__") else str(cost),
            "target": target,
            "target_rounds": args.target_rounds,
            "results": rows,
        }
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

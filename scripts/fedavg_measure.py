"""Rounds and bytes to a target test accuracy for the local-update methods (psrv.algorithms.local).

FedAvg (``local-sgd``), SCAFFOLD and FedAvg-M, against minibatch SGD, on MNIST (the 5,000-digit
set, 20% held out) with M workers, at an IID split and a Dirichlet(alpha) label split (Hsu, Qi,
Brown, arXiv:1909.06335), with every worker per round and with client sampling (s = M/2). Every
run is the whole stack (a gRPC server on loopback and one worker thread per shard, as in
tests/helpers/threaded.py), so the bytes are what crossed the wire: up (uploads and skip notices)
and down (broadcasts: for FedAvg-M and SCAFFOLD the exact replica updates, which carry the
aggregate the workers need). Per link: the mean over the M workers' links.

    python scripts/fedavg_measure.py --rounds 200 --target 0.85

Prints one table row per run and writes the rows as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psrv import data  # noqa: E402
from psrv.metrics import MetricsSink  # noqa: E402
from psrv.server import ParameterServer, ServerConfig  # noqa: E402
from psrv.tasks import make_task  # noqa: E402
from tests.helpers.threaded import run_in_threads  # noqa: E402
from worker.client import load_training_data  # noqa: E402


def run_one(algorithm: str, options: dict, split: str, alpha: float, args: argparse.Namespace) -> dict:
    train, test = load_training_data(args.data, 0.2, args.seed)
    M = args.workers
    shards = [data.shard(train, i, M, split, args.seed, alpha) for i in range(M)]
    task = make_task(args.task, train.n_features, train.n_classes)
    cfg = ServerConfig(
        algorithm=algorithm,
        task=args.task,
        options=options,
        num_workers=M,
        rounds=args.rounds,
        round_timeout=60.0,
        seed=args.seed,
        downlink="auto" if algorithm in ("scaffold", "fedavg-m") else args.downlink,  # they need the replicas
    )
    accuracy: list[float] = []
    traffic: list[tuple[int, int]] = []  # (bytes up, bytes down) of every round (ps.records keeps a tail)
    forms: list[str] = []  # the downlink form of every round (dense / update)

    def on_round(rec: dict) -> None:
        accuracy.append(float(task.accuracy(ps.theta, test.X, test.y)))
        traffic.append((rec["bytes_up"], rec["bytes_down"]))
        forms.append(rec.get("downlink", ""))

    ps = ParameterServer(cfg, MetricsSink(on_round=on_round))
    started = time.monotonic()
    summary, results = run_in_threads(ps, shards)
    wall = time.monotonic() - started
    hit = next((k for k, a in enumerate(accuracy) if a >= args.target), None)
    upto = len(accuracy) if hit is None else hit + 1
    up = sum(u for u, _ in traffic[:upto])
    down = sum(d for _, d in traffic[:upto])
    return {
        "algorithm": algorithm,
        "options": options,
        "split": split if split != "dirichlet" else f"dirichlet({alpha:g})",
        "sample": options.get("sample", 0) or M,
        "rounds_to_target": None if hit is None else hit + 1,
        "bytes_up": up,
        "bytes_down": down,
        "up_per_link": up / M,
        "down_per_link": down / M,
        "final_accuracy": accuracy[-1],
        "best_accuracy": max(accuracy),
        "grad_evals": sum(r.grad_evals for r in results),
        "wall_s": wall,
        "accuracy": accuracy,  # held-out accuracy after every round
        "downlink": forms,
        "traffic": traffic,  # (bytes up, bytes down) of every round: rounds and bytes to any other target
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="mnist")
    p.add_argument("--task", default="logreg", help="logreg (softmax regression) or mlp (784-512-10 ReLU)")
    p.add_argument("--workers", type=int, default=10)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--target", type=float, default=0.85, help="test accuracy to reach")
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--local-lr", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=0.25, help="global step (model averaging: local_lr * local_steps)")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--beta", type=float, default=0.5, help="fedavg-m's beta")
    p.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration of the non-IID split")
    p.add_argument("--algorithms", default="sgd,local-sgd,scaffold,fedavg-m")
    p.add_argument("--splits", default="iid,dirichlet")
    p.add_argument("--samples", default="0,half", help="workers sampled per round: 0 (all), half (M/2) or a number")
    p.add_argument(
        "--downlink",
        default="auto",
        choices=("auto", "dense", "replica"),
        help="broadcast form for sgd/local-sgd (scaffold, fedavg-m always take replica updates)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    common = {"batch": args.batch}
    local = {**common, "local_steps": args.local_steps, "local_lr": args.local_lr, "lr": args.lr}
    per_algo = {
        "sgd": {**common, "lr": args.local_lr},  # one step of the local step size per round
        "local-sgd": local,
        "scaffold": local,
        "fedavg-m": {**local, "beta": args.beta},
    }
    rows = []
    head = f"{'algorithm':10} {'split':16} {'s':>3} {'rounds':>7} {'MB up':>8} {'MB down':>8} {'kB up/link':>10} "
    head += f"{'kB down/link':>12} {'final acc':>9} {'wall s':>7}"
    print(head)
    samples = [args.workers // 2 if v == "half" else int(v) for v in args.samples.split(",")]
    for split in args.splits.split(","):
        for sample in samples:
            for name in args.algorithms.split(","):
                opts = dict(per_algo[name])
                if sample:
                    if name == "sgd":
                        continue  # sgd has no client sampling (riag/ciag are its sampled relatives)
                    opts["sample"] = sample
                row = run_one(name, opts, split, args.alpha, args)
                rows.append(row)
                r = row["rounds_to_target"]
                print(
                    f"{name:10} {row['split']:16} {row['sample']:>3} {('>' + str(args.rounds)) if r is None else r:>7} "
                    f"{row['bytes_up'] / 1e6:8.2f} {row['bytes_down'] / 1e6:8.2f} {row['up_per_link'] / 1e3:10.1f} "
                    f"{row['down_per_link'] / 1e3:12.1f} {row['final_accuracy']:9.3f} {row['wall_s']:7.1f}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

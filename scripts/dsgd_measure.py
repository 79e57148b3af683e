"""Rounds and bytes to a target test accuracy for DSGD (ring, torus, exponential) against parallel
gradient descent (PSGD, ``gd``: the ``full`` topology, which is the same iteration).

In a DSGD run the average model x̄ exists only after the last round (README, "Decentralized SGD"),
so ``psrv run --target-accuracy`` cannot say when a run first reached the target. This script runs
the same iteration in numpy (psrv.decentralized.simulate: the adapt-then-combine step, Lopes & Sayed,
ICASSP 2007, with Metropolis-Hastings weights; tests/test_mesh.py checks that the networked run is
this math to 1e-12 with float64 on the wire), evaluates x̄ on the held-out rows after every round and
reports the first round at which it reaches ``--target``. Bytes are those of the networked run: one
``ExchangeRequest`` (a float32 model, serialized) per directed link per round for DSGD, and for PSGD
one dense float32 upload and one broadcast per worker per round (what ``psrv run --algorithm gd``
sends after round 0). Check a row with the command it prints (``psrv run ... --rounds R``).

    python scripts/dsgd_measure.py --task mlp --workers 8 --lr 1.0 --rounds 300 --target 0.90 [--split dirichlet:0.1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psrv import codec, data, decentralized  # noqa: E402
from psrv.tasks import make_task  # noqa: E402
from psrv.v1 import mesh_pb2 as mpb  # noqa: E402
from worker.client import load_training_data  # noqa: E402


def exchange_bytes(dim: int) -> int:
    """The serialized size of one round's gossip message (a float32 model of ``dim`` entries)."""
    half = np.zeros(dim, dtype=np.float32)
    return len(mpb.ExchangeRequest(sender="w0", round=1, values=codec.tensor_to_proto(half)).SerializeToString())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="mnist")
    p.add_argument("--task", default="mlp")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--target", type=float, default=0.88)
    p.add_argument("--split", default="iid")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--topologies", default="full,ring,exponential")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    train, test = load_training_data(args.data, 0.2, args.seed)
    n = args.workers
    shards = [data.shard(train, i, n, args.split, args.seed, args.alpha) for i in range(n)]
    total = sum(len(s) for s in shards)
    task = make_task(args.task, train.n_features, train.n_classes)
    x0 = task.init_params(np.random.default_rng(args.seed)).astype(np.float64)
    msg = exchange_bytes(task.dim)
    rows = []
    print(f"{'method':16} {'gap':>5} {'rounds':>7} {'MB all':>8} {'MB up/link':>10} {'MB server link':>14} {'acc':>6}")
    for topo in args.topologies.split(","):
        W = decentralized.mixing_matrix(topo, n)
        degree = [int(np.count_nonzero(W[i])) - 1 for i in range(n)]
        acc: list[float] = []
        started = time.monotonic()

        def grad(i: int, x: np.ndarray, _rng: np.random.Generator) -> np.ndarray:
            x32 = x.astype(np.float32)  # workers compute at their model as float32, as on the wire
            return n * np.asarray(task.local_loss_grad(x32, shards[i].X, shards[i].y, total, n)[1], dtype=np.float64)

        X = np.repeat(x0[None, :], n, axis=0)
        for _ in range(args.rounds):
            G = np.stack([grad(i, X[i], None) for i in range(n)])
            X = decentralized.dsgd_step(W, X, G, args.lr)
            acc.append(float(task.accuracy(X.mean(axis=0), test.X, test.y)))
            if acc[-1] >= args.target:
                break
        hit = len(acc) if acc[-1] >= args.target else None
        R = hit or args.rounds
        if topo == "full":  # PSGD through a server: each worker uploads one model and receives one
            name, link, server_link = "gd (PSGD)", msg, 2 * n * msg
            total_round = 2 * n * msg
        else:  # each worker sends its half-step to each neighbour and receives theirs
            name, link, server_link = f"dsgd {topo}", msg * max(degree), 0
            total_round = msg * sum(degree)
        row = {
            "method": name,
            "topology": topo,
            "spectral_gap": decentralized.spectral_gap(W),
            "rounds_to_target": hit,
            "accuracy": acc,
            "message_bytes": msg,
            "bytes_per_round_all_links": total_round,
            "bytes_up_per_worker_link_to_target": link * R,  # = down: every link carries as much each way
            "bytes_server_link_to_target": server_link * R,
            "bytes_all_to_target": total_round * R,
            "consensus_distance": decentralized.consensus_distance(X),
            "wall_s": time.monotonic() - started,
        }
        rows.append(row)
        print(
            f"{name:16} {row['spectral_gap']:5.3f} {hit if hit else '>' + str(args.rounds):>7} "
            f"{total_round * R / 1e6:8.1f} {link * R / 1e6:10.1f} {server_link * R / 1e6:14.1f} {acc[-1]:6.3f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

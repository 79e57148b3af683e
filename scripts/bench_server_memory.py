"""Peak RSS of the server's round engine at a large model, by algorithm and number of workers.

    python3 scripts/bench_server_memory.py --code before=/tmp/psrv-before --code after=.

Drives ``psrv.engine.RoundEngine`` in-process (no sockets, no worker processes): registers M fake
workers whose data shape gives the model dimension (logreg: ``(n_features + 1) * n_classes``;
the default 999_999 features x 10 classes is d = 1e7), and runs ``--rounds`` rounds in which a
thread fetches every worker's model (the broadcast serialized as ``psrv.server`` does; each fake
worker says it holds the replica of the round before, as a worker that keeps one does) and pushes
one realistic upload per worker while ``engine.run()`` runs:

- LAQ: a random innovation (float32 normal) quantized by psrv's LAQ quantizer (``bits`` = 4);
- SASG: psrv's top-k compressor (ratio 1%) on a random float32 vector (k = d / 100).

Each upload is made just before its push and dropped after it, so the bench holds at most one.
Uploads are pushed in slot order (``slot``: worker 0 first) or reversed (``reverse``: the upload of
worker 0, which every other one waits for to be absorbed, arrives last).

One subprocess per (code, algorithm, M, order), so peaks do not mix; each reports its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), the peak it had reached before the engine was
made (interpreter, numpy, the generator's buffers and one upload made and dropped: the bench's own
share) and the difference (the engine's share, approximately). ``--code LABEL=PATH`` names a
checkout whose ``psrv`` the subprocesses import (repeatable; default: this checkout as "after").
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
_ALGORITHMS = {"laq": {"bits": 4}, "sasg": {}}


def _one(algorithm: str, workers: int, order: str, rounds: int, n_features: int, n_classes: int, downlink: str) -> dict:
    """Run in the subprocess: the engine and a pushing thread; returns the measurements."""
    import resource
    import threading

    import numpy as np

    import psrv
    from psrv import codec
    from psrv.compress import make_compressor
    from psrv.compress.laq import quantize
    from psrv.engine import RoundEngine, ServerConfig

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    dim = (n_features + 1) * n_classes
    rng = np.random.default_rng(0)
    zeros = np.zeros(dim, dtype=np.float32)  # LAQ's previous quantization (the bench's, not the server's)
    topk = make_compressor("topk", ratio=0.01)

    def upload():
        x = rng.standard_normal(dim, dtype=np.float32)
        if algorithm == "laq":
            return quantize(x, zeros, _ALGORITHMS["laq"]["bits"])
        return topk.compress(x, rng)

    upload()  # the generator's own peak, before the engine exists
    baseline = peak_mb()
    cfg = ServerConfig(
        algorithm=algorithm,
        options=_ALGORITHMS[algorithm],
        num_workers=workers,
        rounds=rounds,
        round_timeout=600.0,
        register_timeout=60.0,
        start_timeout=0.0,
        done_grace=60.0,
        downlink=downlink,
    )
    engine = RoundEngine(cfg, encode=lambda b: codec.broadcast_to_proto(b).SerializeToString())
    ids = [f"w{m:03d}" for m in range(workers)]  # slot order = id order
    for w in ids:
        engine.register(w, 100, n_features, n_classes)
    assert engine.dim == dim
    errors: list[BaseException] = []

    def push_all() -> None:
        try:
            for k in range(rounds):
                for w in ids:  # as workers that keep a replica: round 0 a snapshot, then the updates
                    engine.wait_model(w, k, timeout=600.0, replica_round=k - 1 if k else None)
                for w in ids if order == "slot" else ids[::-1]:
                    engine.push(w, k, upload())
            for w in ids:
                engine.wait_model(w, rounds, timeout=600.0, replica_round=rounds - 1)
        except BaseException as exc:  # noqa: BLE001 - reported by the parent
            errors.append(exc)
            engine.fail(repr(exc))

    t0 = time.monotonic()
    pusher = threading.Thread(target=push_all)
    pusher.start()
    summary = engine.run()
    pusher.join()
    if errors:
        raise errors[0]
    peak = peak_mb()
    return {
        "psrv": str(Path(psrv.__file__).resolve().parents[1]),
        "dim": dim,
        "rounds": summary["rounds"],
        "uploads": summary["uploads"],
        "peak_mb": peak,
        "baseline_mb": baseline,
        "engine_mb": peak - baseline,
        "seconds": time.monotonic() - t0,
    }


def _measure(path: Path, args: argparse.Namespace, algorithm: str, workers: int, order: str, downlink: str) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        f"{algorithm},{workers},{order}",
        "--rounds",
        str(args.rounds),
        "--n-features",
        str(args.n_features),
        "--n-classes",
        str(args.n_classes),
        "--downlinks",
        downlink,
    ]
    env = {**os.environ, "PYTHONPATH": str(path)}
    out = subprocess.run(cmd, env=env, cwd=path, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} (PYTHONPATH={path}) failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if Path(result["psrv"]) != path.resolve():
        raise SystemExit(f"imported psrv from {result['psrv']}, not {path}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--code", action="append", default=[], metavar="LABEL=PATH", help="checkout to measure")
    ap.add_argument("--algorithms", nargs="+", default=["laq", "sasg"], choices=sorted(_ALGORITHMS))
    ap.add_argument("--workers", nargs="+", type=int, default=[4, 16, 32])
    ap.add_argument("--orders", nargs="+", default=["slot", "reverse"], choices=["slot", "reverse"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-features", type=int, default=999_999)
    ap.add_argument("--n-classes", type=int, default=10)
    ap.add_argument(
        "--downlinks", nargs="+", default=["auto"], choices=["auto", "dense", "replica"],
        help="the server's --downlink: auto and replica also keep what the round's exact update needs",
    )  # fmt: skip
    ap.add_argument("--json", type=Path, help="also write every measurement here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        algorithm, workers, order = args.one.split(",")
        one = _one(algorithm, int(workers), order, args.rounds, args.n_features, args.n_classes, args.downlinks[0])
        print(json.dumps(one))
        return
    codes = [c.partition("=")[::2] for c in args.code] or [("after", str(HERE))]
    header = f"{'code':<8} {'algorithm':<9} {'downlink':<8} {'M':>3} {'order':<8} {'peak RSS MB':>11} {'bench MB':>9} "
    header += f"{'engine MB':>9} {'s':>6}"
    print(f"d = {(args.n_features + 1) * args.n_classes:,}, {args.rounds} rounds, every worker uploads every round")
    print(header)
    rows = []
    for label, path in codes:
        for algorithm, downlink, order, workers in itertools.product(
            args.algorithms, args.downlinks, args.orders, args.workers
        ):
            r = _measure(Path(path), args, algorithm, workers, order, downlink)
            rows.append(
                {"code": label, "algorithm": algorithm, "downlink": downlink, "workers": workers, "order": order, **r}
            )
            print(
                f"{label:<8} {algorithm:<9} {downlink:<8} {workers:>3} {order:<8} {r['peak_mb']:>11.0f} "
                f"{r['baseline_mb']:>9.0f} {r['engine_mb']:>9.0f} {r['seconds']:>6.1f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

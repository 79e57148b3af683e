"""Peak memory of one worker process hosting M logical workers, against M.

    python scripts/bench_host_memory.py --dim 1e6 --workers 1,4,16 --rounds 12
    python scripts/bench_host_memory.py ... --root /tmp/before     # another checkout's psrv

Per M: ``psrv start-server`` (LAQ, replica downlink: every worker keeps a replica of the server's
state, theta and the aggregate, float64) and one ``psrv start-worker --shard 0-(M-1)/M`` process on
loopback, logistic regression with ``n_classes = 10`` and ``dim / 10 - 1`` features on 2 random rows
per worker (one ``.npz``; ``scripts/bench_transport.py``'s data). The peak RSS of the host and the
server come from ``wait4``; ``per extra worker`` is ``(peak(M) - peak(M0)) / (M - M0)`` against the
smallest M. What a logical worker must keep of its own at this size is its algorithm state (LAQ: the
last quantized gradient, d float64) and a float32 copy of theta while it computes; the replica
(``16 d`` bytes) is the host's, once (``psrv.replica.ReplicaShare``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402
from bench_transport import N_CLASSES, _dim, _env, _port_from_log, _stop, _wait, n_features, start_worker  # noqa: E402


def write_rows(path: Path, dim: int, rows: int) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, n_features(dim)), dtype=np.float32)
    y = np.arange(rows) % N_CLASSES
    np.savez(path, X=X, y=y)


def run(root: Path, dim: int, workers: int, rounds: int, folder: Path, timeout: float) -> dict:
    data = folder / f"rows-{workers}.npz"
    write_rows(data, dim, 2 * workers)
    metrics = folder / f"metrics-{workers}.jsonl"
    metrics.unlink(missing_ok=True)
    env = _env("tuned")
    env["PYTHONPATH"] = str(root)
    server_cmd = [
        sys.executable, "-m", "psrv", "start-server", "--host", "127.0.0.1", "--port", "0",
        "--algorithm", "laq", "--downlink", "replica", "--workers", str(workers), "--rounds", str(rounds),
        "--round-timeout", "600", "--metrics", str(metrics),
    ]  # fmt: skip
    err = open(folder / f"server-{workers}.log", "w+")
    procs = [subprocess.Popen(server_cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=root)]
    try:
        port = _port_from_log(err, procs[0], timeout)
        host = ["--shard", f"0-{workers - 1}/{workers}", "--data", str(data)]
        procs.append(start_worker(port, host, env, folder / f"host-{workers}.log", root))
        server_rss, host_rss = (_wait(p, timeout) for p in procs)
    finally:
        _stop(procs)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {
        "host_rss": host_rss,
        "server_rss": server_rss,
        "round": statistics.median(r["round_time"] for r in records[2:]) if len(records) > 2 else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=_dim, default=1_000_000)
    ap.add_argument("--workers", default="1,4,16", help="comma list of M")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose psrv runs (default: this one)")
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    ms = sorted({int(m) for m in args.workers.split(",")})
    if not ms or ms[0] < 1:
        ap.error("--workers: a comma list of counts >= 1")
    with tempfile.TemporaryDirectory(prefix="psrv-host-mem-") as tmp:
        rows = {m: run(args.root.resolve(), args.dim, m, args.rounds, Path(tmp), args.timeout) for m in ms}
    mib = 1 << 20
    print(f"# dim {args.dim:,}, LAQ, replica downlink, {args.rounds} rounds, psrv of {args.root.resolve()}")
    print("| M | host peak RSS | per extra worker | server peak RSS | median round |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    base = ms[0]
    for m, r in rows.items():
        extra = (r["host_rss"] - rows[base]["host_rss"]) / (m - base) / mib if m > base else float("nan")
        print(
            f"| {m} | {r['host_rss'] / mib:.0f} MiB | {extra:.1f} MiB | {r['server_rss'] / mib:.0f} MiB "
            f"| {r['round'] * 1e3:.1f} ms |"
        )
    print(f"(16 d bytes, one replica: {16 * args.dim / mib:.1f} MiB; d float64: {8 * args.dim / mib:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

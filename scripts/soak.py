"""Soak benchmark: does a long run leak? (issue 11, "Show": server RSS after warm-up grows <= 10%,
open file descriptors flat.)

    python scripts/soak.py                        # 32 workers x 1,000 rounds on loopback
    python scripts/soak.py --workers 4 --rounds 50 --json out.json

Starts ``psrv start-server`` as its own process (the process measured) on a free loopback port, with
the shape derived from ``--data`` and the workers' ids, and runs ``--workers`` real workers
(:func:`worker.client.run_worker`, the code ``psrv start-worker`` runs) as threads of this process
(one process: 32 torch interpreters would measure the machine, not the server). A sampler reads the
server's resident set (``VmRSS`` of ``/proc/PID/status``) and its open descriptors (``/proc/PID/fd``)
every ``--every`` seconds, with the rounds closed so far (lines of its metrics file). Reported,
over the samples taken while it trains (``--warmup`` rounds closed, default a tenth of the run, and
the last round not yet): the first (after warm-up) and the last, the peak, and the growth between.

The whole run is bounded by ``--timeout`` (server and workers are stopped when it passes: exit 2).
Exit 1 when a target is missed (``--max-growth`` percent of RSS, descriptors not flat).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def soak(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from worker.client import WorkerConfig, run_worker

    port = _free_port()
    metrics = out / "metrics.jsonl"
    ids = [f"w{i}" for i in range(args.workers)]
    server_cmd = [
        sys.executable, "-m", "psrv", "start-server", "--host", "127.0.0.1", "--port", str(port),
        "--algorithm", args.algorithm, "--workers", str(args.workers), "--rounds", str(args.rounds),
        "--round-timeout", "30", "--register-timeout", "120", "--data", args.data, "--worker-ids", ",".join(ids),
        "--metrics", str(metrics), "--summary-json", str(out / "summary.json"),
    ]  # fmt: skip
    server = subprocess.Popen(server_cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(out / "server.log", "w"))
    samples: list[dict[str, Any]] = []
    errors: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.is_set() and server.poll() is None:
            rss, fds = _rss_kib(server.pid), _fds(server.pid)
            if rss is not None and fds is not None:
                samples.append({"t": time.monotonic() - t0, "rounds": _lines(metrics), "rss_kib": rss, "fds": fds})
            stop.wait(args.every)

    def work(i: int) -> None:
        cfg = WorkerConfig(server=f"127.0.0.1:{port}", worker_id=ids[i], data=args.data, shard=i,
                           num_shards=args.workers, connect_timeout=120.0)  # fmt: skip
        try:
            run_worker(cfg)
        except Exception as exc:  # noqa: BLE001 - reported in the result
            errors.append(f"{ids[i]}: {exc}")

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(args.workers)]
    started = time.monotonic()
    for t in workers:
        t.start()
    timed_out = False
    try:
        server.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        stop.set()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    for t in workers:
        t.join(timeout=15)
    sampler.join(timeout=5)
    wall = time.monotonic() - started
    warmup = args.warmup if args.warmup is not None else max(1, args.rounds // 10)
    # while it trains: from warm-up to before the last round closes (then the server shuts down)
    training = [s for s in samples if warmup <= s["rounds"] < args.rounds]
    warm, end = (training[0], training[-1]) if len(training) >= 2 else (None, None)
    result: dict[str, Any] = {
        "workers": args.workers,
        "rounds": args.rounds,
        "rounds_closed": _lines(metrics),
        "algorithm": args.algorithm,
        "data": args.data,
        "wall_s": round(wall, 1),
        "server_exit": server.returncode,
        "timed_out": timed_out,
        "worker_errors": errors,
        "samples": len(samples),
        "warmup_rounds": warmup,
        "series": samples,
    }
    if warm is not None and end is not None:
        growth = 100.0 * (end["rss_kib"] - warm["rss_kib"]) / warm["rss_kib"]
        result.update(
            warm_round=warm["rounds"],
            end_round=end["rounds"],
            rss_warm_mb=round(warm["rss_kib"] / 1024, 1),
            rss_end_mb=round(end["rss_kib"] / 1024, 1),
            rss_peak_mb=round(max(s["rss_kib"] for s in training) / 1024, 1),
            rss_growth_pct=round(growth, 2),
            fds_warm=warm["fds"],
            fds_end=end["fds"],
            fds_max=max(s["fds"] for s in training),
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--algorithm", default="gd")
    parser.add_argument("--data", default="digits", help="small, so rounds are fast")
    parser.add_argument("--warmup", type=int, default=None, help="rounds before the first sample counted")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds the whole run may take")
    parser.add_argument("--max-growth", type=float, default=10.0, help="percent of RSS from warm-up to the end")
    parser.add_argument("--json", type=Path, default=None, help="write the result here too")
    parser.add_argument("--out", type=Path, default=None, help="keep the server's metrics and log here")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.rounds < 2:
        parser.error("need --workers >= 1 and --rounds >= 2")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        result = soak(args, args.out)
    else:
        with TemporaryDirectory(prefix="psrv-soak-") as tmp:
            result = soak(args, Path(tmp))
    ok = "rss_growth_pct" in result and not result["timed_out"] and result["server_exit"] == 0
    if ok:
        flat = result["fds_end"] <= result["fds_warm"] and result["fds_max"] <= result["fds_warm"] + 2
        result["fds_flat"] = flat
        result["pass"] = ok = flat and result["rss_growth_pct"] <= args.max_growth and not result["worker_errors"]
    print(
        f"soak: {result['workers']} workers x {result['rounds_closed']}/{result['rounds']} rounds "
        f"({result['algorithm']} on {result['data']}) in {result['wall_s']} s; server exit {result['server_exit']}"
    )
    if "rss_growth_pct" not in result:
        print("too few samples while it trained (after warm-up, before the last round): more --rounds or less --every")
    else:
        print(
            f"server RSS {result['rss_warm_mb']} MB at round {result['warm_round']} -> {result['rss_end_mb']} MB at "
            f"round {result['end_round']} ({result['rss_growth_pct']:+.2f}%, peak {result['rss_peak_mb']} MB); "
            f"open fds {result['fds_warm']} -> {result['fds_end']} (max {result['fds_max']})"
        )
    series = result.pop("series", [])
    print(json.dumps(result))
    result["series"] = series
    if args.json is not None:
        args.json.write_text(json.dumps({**result, "series": result.pop("series", [])}, indent=1))
    if result["timed_out"]:
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

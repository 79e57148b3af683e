"""How many workers and what model size one parameter server holds: round time and the server's
CPU per round against the number of workers M (issue 14, "Server capacity, measured").

    python scripts/capacity.py                                   # LAQ and SASG, M = 10, 100, 1000, d = 7,850
    python scripts/capacity.py --workers 10 100 --shapes 99999,10 --rounds 20   # d = 1e6
    python scripts/capacity.py --workers 1000 --algorithms laq --profile /tmp/cap   # py-spy on the server

Each row is one run, bounded in time (``--timeout``): a real ``psrv start-server`` process (the
server as users run it: gRPC, engine, metrics file) and one load-generator process that plays M
logical workers on one gRPC channel with asyncio: each registers, opens its Rounds stream and
answers every broadcast with a skip notice or a precomputed upload, so the workers cost almost
nothing and the figures are the server's:

- uploads: round 0 every worker uploads; afterwards a worker uploads in a round with probability
  ``--upload-fraction`` (drawn from a seeded generator per worker and round, the same for every
  M), else it skips (``lazy_rule``). LAQ: a random float32 innovation quantized by psrv's LAQ
  quantizer (the algorithm's default 4 bits); SASG: psrv's top-k (ratio 1%) of a random float32
  vector. Made once per run and sent as they are (worker and round implied by the stream).
- measured between the first arrival of round ``--warmup``'s broadcast and that of the last
  round's (``rounds - 1``), so registration, round 0's snapshots and the final broadcast are
  outside: wall time per round, and the CPU (utime + stime, ``/proc/PID/stat``) of the server
  process and of the load generator per round. ``machine busy`` is the whole machine's CPU
  (``/proc/stat``) over the same window, in cores: other people's processes share it, so the
  server's CPU per round is the figure that depends least on the load.
- ``--profile DIR``: py-spy (``pip install py-spy``) samples the server during the window (raw
  stacks, idle waits dropped) and the script splits the server's CPU into gRPC machinery, the
  engine's report paths, round close, metrics, broadcast encoding and the rest.

The shape is given as F,C (features, classes: logreg, d = (F + 1)·C): 784,10 is the default task
(logreg on MNIST, d = 7,850); 99999,10 is d = 1e6.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

DEFAULT_FRACTION = {"laq": 0.03, "sasg": 0.1}
TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores: not idle, not iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / TICK


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path.home() / ".local/bin/py-spy")
    if not Path(found).exists():
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- load generator
def _payload(algorithm: str, dim: int) -> bytes:
    """One upload as the Rounds stream's ``push`` field (worker and round left to the stream)."""
    import numpy as np

    from psrv import codec, rpc, stream
    from psrv.compress import make_compressor
    from psrv.compress.laq import quantize

    rng = np.random.default_rng(1)
    x = rng.standard_normal(dim, dtype=np.float32) * np.float32(1e-3)
    if algorithm == "laq":
        p = quantize(x, np.zeros(dim, dtype=np.float32), 4)
    else:
        p = make_compressor("topk", ratio=0.01).compress(x, rng)
    up = codec.upload_to_wire("", 0, 0.5, p)
    return stream.field_bytes(rpc.PUSH, *up.parts)


async def _loadgen(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from psrv import codec, rpc
    from psrv.v1 import psrv_pb2 as pb

    f, c = args.shape
    dim = (f + 1) * c
    push = _payload(args.algorithm, dim)
    skip = codec.rounds_skip("lazy_rule", 0.5).SerializeToString()
    arrivals: dict[int, float] = {}  # round -> first arrival of its broadcast
    marks: dict[int, tuple[float, float, float, float]] = {}
    spy: list[subprocess.Popen] = []
    me = os.getpid()
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        register = channel.unary_unary(f"/{rpc.SERVICE}/Register")
        rounds = channel.stream_stream(f"/{rpc.SERVICE}/Rounds")
        ids = [f"w{m}" for m in range(args.workers)]

        async def reg(wid: str) -> None:
            req = pb.RegisterRequest(worker_id=wid, num_samples=100, n_features=f, n_classes=c)
            for attempt in range(50):
                try:
                    await register(req.SerializeToString(), timeout=120)
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == 49:
                        raise
                    await asyncio.sleep(0.05 * (attempt + 1))

        for i in range(0, len(ids), 50):  # in batches: the server limits registrations per second per host
            await asyncio.gather(*(reg(w) for w in ids[i : i + 50]))

        async def worker(m: int, wid: str) -> int:
            rng = random.Random(m * 1_000_003 + args.seed)
            q: asyncio.Queue[bytes | None] = asyncio.Queue()
            await q.put(pb.RoundsRequest(open=pb.RoundsOpen(worker_id=wid, round=0)).SerializeToString())

            async def requests():
                while (item := await q.get()) is not None:
                    yield item

            call = rounds(requests())
            k, uploads, buf = 0, 0, None
            async for raw in call:
                msg = pb.RoundsResponse.FromString(raw)
                kind = msg.WhichOneof("response")
                if kind == "rejected":
                    continue
                if kind == "model_piece":
                    piece = msg.model_piece
                    if buf is None:
                        buf = bytearray()
                    buf += piece.data
                    if len(buf) < piece.total_size:
                        continue
                    model, buf = pb.GetModelResponse.FromString(bytes(buf)), None
                else:
                    model = msg.model
                k = model.round
                if k not in arrivals:
                    arrivals[k] = time.monotonic()
                    if k in (args.warmup, args.rounds - 1):
                        marks[k] = (time.monotonic(), proc_cpu(args.server_pid), proc_cpu(me), machine_busy())
                    if k == args.warmup and args.spy_out:  # py-spy the server over the measured rounds only
                        spy.append(subprocess.Popen(
                            [py_spy(), "record", "--nonblocking", "-r", "250", "-f", "raw", "-p",
                             str(args.server_pid), "-o", args.spy_out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        ))  # fmt: skip
                    if k == args.rounds - 1 and spy:
                        spy[0].send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
                if model.done:
                    break
                up = k == 0 or rng.random() < args.upload_fraction
                uploads += up
                await q.put(push if up else skip)
            await q.put(None)
            return uploads

        t0 = time.monotonic()
        uploads = await asyncio.gather(*(worker(m, w) for m, w in enumerate(ids)))
    for p in spy:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    a, b = marks[args.warmup], marks[args.rounds - 1]
    n = args.rounds - 1 - args.warmup
    return {
        "rounds_measured": n,
        "wall_ms": 1e3 * (b[0] - a[0]) / n,
        "server_cpu_ms": 1e3 * (b[1] - a[1]) / n,
        "loadgen_cpu_ms": 1e3 * (b[2] - a[2]) / n,
        "machine_busy_cores": (b[3] - a[3]) / (b[0] - a[0]),
        "uploads": sum(uploads),
        "run_s": time.monotonic() - t0,
        "push_bytes": len(push),
    }


# ----------------------------------------------------------------------------- one run
IDLE_LEAVES = ("wait (threading.py", "_wait_once", "poll", "_get (queue", "get (queue.py", "select", "sleep")
PARTS = [  # first match wins, looked for anywhere in the stack (innermost psrv frame decides)
    ("metrics record", ("_close_round", "round_closed (psrv/metrics.py", "MetricsSink")),
    ("broadcast encode", ("_publish", "broadcast_to_wire", "_snapshot")),
    ("engine report (skip/push)", ("skip (psrv/engine.py", "push (psrv/engine.py", "_absorb_reported")),
    ("engine serve (wait + wake-ups)", ("serve (psrv/engine.py",)),
    ("servicer (decode, count, limits)", ("psrv/server.py", "psrv/rpc.py", "psrv/codec.py", "psrv/limits.py")),
]


def split_profile(raw: Path, cpu_ms: float) -> dict[str, float]:
    """py-spy raw stacks (``a;b;c N``) of the server, idle waits dropped, scaled to ``cpu_ms``."""
    shares: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        leaf = frames[-1]
        if any(x in leaf for x in IDLE_LEAVES) or "wait_for" in leaf:
            continue
        part = "gRPC machinery (grpc/_server, cygrpc)"
        for name, keys in PARTS:
            if any(any(key in fr for key in keys) for fr in frames):
                part = name
                break
        shares[part] += int(n)
    total = sum(shares.values()) or 1
    return {k: cpu_ms * v / total for k, v in shares.most_common()}


def run_one(algorithm: str, workers: int, shape: tuple[int, int], args: argparse.Namespace, tmp: Path) -> dict:
    port = free_port()
    tag = f"{algorithm}-{workers}-{shape[0]}x{shape[1]}"
    log = (tmp / f"{tag}.server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "psrv", "start-server", "--algorithm", algorithm, "--workers", str(workers),
         "--rounds", str(args.rounds), "--host", "127.0.0.1", "--port", str(port), "--shape", f"{shape[0]},{shape[1]}",
         "--round-timeout", "120", "--register-timeout", str(args.timeout), "--metrics", str(tmp / f"{tag}.jsonl"),
         "--overwrite-metrics", "--summary-json", str(tmp / f"{tag}.summary.json")],
        cwd=args.code, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if server.poll() is not None:
                raise SystemExit(f"server exited: {(tmp / f'{tag}.server.log').read_text()[-2000:]}")
            time.sleep(0.2)
        cmd = [sys.executable, __file__, "--loadgen", f"127.0.0.1:{port}", "--server-pid", str(server.pid),
               "--algorithms", algorithm, "--workers", str(workers), "--shapes", f"{shape[0]},{shape[1]}",
               "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--upload-fraction",
               str(args.fraction[algorithm])]  # fmt: skip
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            cmd += ["--spy-out", str(args.profile / f"{tag}.raw")]
        gen = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = gen.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            gen.kill()
            raise SystemExit(f"{tag}: no result within --timeout {args.timeout} s") from None
        if gen.returncode != 0:
            raise SystemExit(f"{tag}: load generator failed:\n{err[-3000:]}")
        server.wait(timeout=60)
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    rows = [json.loads(x) for x in (tmp / f"{tag}.jsonl").read_text().splitlines()]
    measured = rows[args.warmup :]
    window = sorted(r["round_time"] for r in rows if args.warmup <= r["round"] < args.rounds - 1)
    result.update(
        algorithm=algorithm,
        workers=workers,
        dim=(shape[0] + 1) * shape[1],
        median_round_ms=1e3 * window[len(window) // 2],
        skips=sum(r["skips"] for r in measured) / max(1, sum(len(r["workers"]) for r in measured)),
    )
    if args.profile and (args.profile / f"{tag}.raw").exists():
        result["profile"] = split_profile(args.profile / f"{tag}.raw", result["server_cpu_ms"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", nargs="+", type=int, default=[10, 100, 1000])
    ap.add_argument("--algorithms", nargs="+", default=["laq", "sasg"], choices=sorted(DEFAULT_FRACTION))
    ap.add_argument("--shapes", nargs="+", default=["784,10"], help="F,C: logreg shapes (d = (F + 1) * C)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="rounds left out first (round 0: all upload)")
    ap.add_argument("--upload-fraction", action="append", default=[], metavar="ALG=P",
                    help=f"probability that a worker uploads in a round (default {DEFAULT_FRACTION})")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take")
    ap.add_argument("--profile", type=Path, help="py-spy the server into this directory and split its CPU")
    ap.add_argument("--code", type=Path, default=HERE, help="the psrv checkout the server runs (default: this one)")
    ap.add_argument("--json", type=Path, help="also write every row here")
    ap.add_argument("--keep", type=Path, help="keep the server logs and metrics here")
    ap.add_argument("--loadgen", help=argparse.SUPPRESS)
    ap.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--spy-out", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds < args.warmup + 3:
        ap.error("--rounds must be at least --warmup + 3")
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    if args.loadgen:
        args.target, args.algorithm, args.shape = args.loadgen, args.algorithms[0], shapes[0]
        args.workers = args.workers[0]
        args.upload_fraction = float(args.upload_fraction[0])
        print(json.dumps(asyncio.run(_loadgen(args))))
        return
    args.fraction = dict(DEFAULT_FRACTION)
    for item in args.upload_fraction:
        alg, _, p = item.partition("=")
        args.fraction[alg] = float(p)
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="psrv-capacity-"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(
        f"server: {args.code.resolve()}; {args.rounds} rounds, measured from round {args.warmup} to "
        f"{args.rounds - 1}; uploads {args.fraction}"
    )
    head = f"{'algorithm':<9} {'d':>9} {'M':>5} {'round ms':>9} {'median':>7} {'server CPU ms':>13} "
    head += f"{'per worker':>10} {'loadgen CPU':>11} {'busy cores':>10} {'skips':>6}"
    print(head, flush=True)
    rows = []
    for shape in shapes:
        for algorithm in args.algorithms:
            for workers in args.workers:
                r = run_one(algorithm, workers, shape, args, tmp)
                rows.append(r)
                print(
                    f"{algorithm:<9} {r['dim']:>9,} {workers:>5} {r['wall_ms']:>9.1f} {r['median_round_ms']:>7.1f} "
                    f"{r['server_cpu_ms']:>13.1f} {r['server_cpu_ms'] / workers:>10.3f} {r['loadgen_cpu_ms']:>11.1f} "
                    f"{r['machine_busy_cores']:>10.2f} {r['skips']:>6.1%}",
                    flush=True,
                )
                for part, ms in r.get("profile", {}).items():
                    print(f"    {part:<40} {ms:8.2f} ms/round")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

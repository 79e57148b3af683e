"""How many workers and what model size one parameter server holds: round time and the server's
CPU per round against the number of workers M (issue 14, "Server capacity, measured").

    python scripts/capacity.py                                   # LAQ and SASG, M = 10, 100, 1000, d = 7,850
    python scripts/capacity.py --workers 10 100 --shapes 99999,10 --rounds 20   # d = 1e6
    python scripts/capacity.py --workers 1000 --algorithms laq --profile /tmp/cap   # profile the server

Each row is one run, bounded in time (``--timeout``): a real ``psrv start-server`` process (the
server as users run it: gRPC, engine, metrics file) and one load-generator process that plays M
logical workers on one gRPC channel with asyncio: each registers, opens its Rounds stream and
answers every broadcast with a skip notice or a precomputed upload, so the workers cost almost
nothing and the figures are the server's:

- uploads: round 0 every worker uploads; afterwards a worker uploads in a round with probability
  ``--upload-fraction`` (drawn from a seeded generator per worker and round, the same for every
  M), else it skips (``lazy_rule``). LAQ: a random float32 innovation quantized by psrv's LAQ
  quantizer (the algorithm's default 4 bits); SASG: psrv's top-k (ratio 1%) of a random float32
  vector. Four of them made once per run, one drawn per upload and sent as it is (worker and round
  implied by the stream).
- measured between the first arrival of round ``--warmup``'s broadcast and that of the last
  round's (``rounds - 1``), so registration, round 0's snapshots and the final broadcast are
  outside: wall time per round, and the CPU (the on-CPU time of all threads,
  ``/proc/PID/task/*/schedstat``) of the server process and of the load generator per round.
  ``machine busy`` is the whole machine's CPU (``/proc/stat``) over the same window, in cores:
  other people's processes share it, so the server's CPU per round is the figure that depends
  least on the load.
- ``--profile DIR``: the server runs under yappi (``pip install yappi``; CPU clock, every Python
  thread), profiling only the measured window, and the script splits the profiled CPU into the
  engine's parts, the servicer, gRPC's Python layer and the rest. yappi slows the server (its
  CPU per round is not the unprofiled one; use the shares), and sees no gRPC C-core thread.

The shape is given as F,C (features, classes: logreg, d = (F + 1)·C): 784,10 is the default task
(logreg on MNIST, d = 7,850); 99999,10 is d = 1e6.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
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
PAYLOADS = 4  # different precomputed uploads per run


def proc_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` so far: the on-CPU time of each of its threads (``schedstat``,
    nanoseconds; ``/proc/PID/stat``'s utime + stime count in 10 ms ticks, too coarse for a few
    rounds at M = 10). A thread that has exited takes its time with it: the server's do not exit."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:  # it has exited
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError):  # the thread ended meanwhile
            pass
    return total / 1e9


def proc_cpu_ticks(pid: int) -> float:
    """utime + stime of process ``pid`` from ``/proc/PID/stat`` (10 ms ticks), threads that have
    exited included (a worker process's threads come and go: their schedstat goes with them)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores: not idle, not iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- load generator
def _payload(algorithm: str, dim: int, seed: int) -> bytes:
    """One upload as the Rounds stream's ``push`` field (worker and round left to the stream)."""
    import numpy as np

    from psrv import codec, rpc, stream
    from psrv.compress import make_compressor
    from psrv.compress.laq import quantize

    rng = np.random.default_rng(seed)
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
    # a few different uploads, drawn per upload: a replacing rule (SASG) whose worker sent the same
    # vector again would leave the aggregate as it was, and its broadcast empty
    pushes = [_payload(args.algorithm, dim, seed) for seed in range(PAYLOADS)]
    skip = codec.rounds_skip("lazy_rule", 0.5).SerializeToString()
    arrivals: dict[int, float] = {}  # round -> first arrival of its broadcast
    marks: dict[int, tuple[float, float, float, float]] = {}
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
                    if args.profiled and k in (args.warmup, args.rounds - 1):  # the server's profiler: start, stop
                        os.kill(args.server_pid, signal.SIGUSR1 if k == args.warmup else signal.SIGUSR2)
                if model.done:
                    break
                up = k == 0 or rng.random() < args.upload_fraction
                uploads += up
                await q.put(rng.choice(pushes) if up else skip)
            await q.put(None)
            return uploads

        t0 = time.monotonic()
        uploads = await asyncio.gather(*(worker(m, w) for m, w in enumerate(ids)))
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
        "push_bytes": len(pushes[0]),
    }


# ----------------------------------------------------------------------------- one run
#: where the server's profiled CPU goes: (part, functions whose own time counts there), first match wins
PARTS = [
    ("engine: serve (long poll, snapshot)", ("RoundEngine.serve", "RoundEngine._snapshot")),
    (
        "engine: skip/push, absorb",
        ("RoundEngine.skip", "RoundEngine.push", "._absorb", "._accept"),
    ),
    ("engine: round close + metrics record", ("RoundEngine._close_round", "psrv/metrics.py:MetricsSink", "json/")),
    ("engine: publish + broadcast encode", ("RoundEngine._publish", "psrv/codec.py:broadcast")),
    ("engine: other", ("psrv/engine.py",)),
    ("servicer: stream loop, decode, count", ("psrv/server.py", "psrv/rpc.py", "psrv/codec.py", "psrv/stream.py")),
    ("servicer: limits, byte counter", ("psrv/limits.py", "psrv/metrics.py:ByteCounter")),
    ("gRPC Python (grpc/_server.py, _common, cygrpc calls)", ("grpc/",)),
    ("threading, queue, locks (incl. GIL hand-offs)", ("threading.py", "queue.py", "_thread.", "lock")),
]


def yappi_server(out: str, argv: list[str]) -> None:
    """``psrv ARGV`` under yappi (CPU clock, every thread): SIGUSR1 starts it, SIGUSR2 stops it and
    writes the functions' own CPU (``tsub``) and inclusive CPU (``ttot``) of the window to ``out``."""
    import yappi

    yappi.set_clock_type("cpu")

    def start(*_: Any) -> None:
        yappi.clear_stats()
        yappi.start(builtins=True, profile_threads=True)

    def stop(*_: Any) -> None:
        yappi.stop()
        rows = [[f"{st.module}:{st.name}", st.tsub, st.ttot, st.ncall] for st in yappi.get_func_stats()]
        Path(out).write_text(json.dumps(rows))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from psrv.cli import main

    main(argv, prog_name="psrv")


def split_profile(path: Path) -> dict[str, float]:
    """Shares of the profiled CPU (functions' own time), by :data:`PARTS`: a function counts in the
    first part one of whose keys its ``module:name`` contains."""
    shares: Counter[str] = Counter()
    for name, tsub, _ttot, _n in json.loads(path.read_text()):
        part = "other (builtins, numpy, protobuf, ...)"
        for label, keys in PARTS:
            if any(key in name for key in keys):
                part = label
                break
        shares[part] += tsub
    total = sum(shares.values()) or 1.0
    return {k: v / total for k, v in shares.most_common()}


def run_one(algorithm: str, workers: int, shape: tuple[int, int], args: argparse.Namespace, tmp: Path) -> dict:
    port = free_port()
    tag = f"{algorithm}-{workers}-{shape[0]}x{shape[1]}"
    log = (tmp / f"{tag}.server.log").open("w")
    server_cmd = [sys.executable, "-m", "psrv"]
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        server_cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--yappi-server",
            str(args.profile / f"{tag}.json"),
        ]
    server = subprocess.Popen(
        [*server_cmd, "start-server", "--algorithm", algorithm, "--workers", str(workers),
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
            cmd += ["--profiled"]
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
    if args.profile:
        result["profile"] = split_profile(args.profile / f"{tag}.json")
    return result


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (the worker processes ``psrv run`` started)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for tid in os.listdir(f"/proc/{p}/task"):
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                kids = []
            out += kids
            todo += kids
    return out


def run_real(algorithm: str, workers: int, args: argparse.Namespace, tmp: Path) -> dict:
    """``psrv run --workers M`` as users start it (real workers, virtual ones when M is above the
    cores; ``--processes``): the runner process holds the server; CPU of it and of its worker
    processes between the end of round ``--warmup`` and of round ``rounds - 2``, from its metrics."""
    out = tmp / f"run-{algorithm}-{workers}"
    cmd = [sys.executable, "-m", "psrv", "run", "--algorithm", algorithm, "--workers", str(workers), "--rounds",
           str(args.rounds), "--eval-every", "0", "--round-timeout", "120", "--out", str(out)]  # fmt: skip
    if args.processes:
        cmd += ["--processes", str(args.processes)]
    log = (tmp / f"run-{algorithm}-{workers}.log").open("w")
    runner = subprocess.Popen(cmd, cwd=args.code, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    metrics = out / algorithm / "metrics.jsonl"
    marks = []
    kids: list[int] = []
    t0 = time.monotonic()
    try:
        for target in (args.warmup, args.rounds - 2):
            while True:
                done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
                if done > target:
                    break
                if runner.poll() is not None or time.monotonic() - t0 > args.timeout:
                    raise SystemExit(f"psrv run failed or took longer than --timeout; see {log.name}")
                time.sleep(0.01)
            kids = kids or _children(runner.pid)  # the same processes at both marks
            cpu = proc_cpu_ticks(runner.pid), sum(proc_cpu_ticks(k) for k in kids)
            marks.append((time.monotonic(), *cpu, machine_busy()))
        runner.wait(timeout=args.timeout)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
        log.close()
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    (a, b), n = marks, args.rounds - 2 - args.warmup
    measured = rows[args.warmup + 1 : args.rounds - 1]
    times = sorted(r["round_time"] for r in measured)
    return {
        "algorithm": algorithm,
        "workers": workers,
        "dim": 7850,
        "wall_ms": 1e3 * (b[0] - a[0]) / n,
        "median_round_ms": 1e3 * times[len(times) // 2],
        "server_cpu_ms": 1e3 * (b[1] - a[1]) / n,
        "loadgen_cpu_ms": 1e3 * (b[2] - a[2]) / n,  # here: the worker processes
        "machine_busy_cores": (b[3] - a[3]) / (b[0] - a[0]),
        "skips": sum(r["skips"] for r in measured) / max(1, sum(len(r["workers"]) for r in measured)),
        "start_s": a[0] - t0,
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--yappi-server":
        yappi_server(sys.argv[2], sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", nargs="+", type=int, default=[10, 100, 1000])
    ap.add_argument("--algorithms", nargs="+", default=["laq", "sasg"], choices=sorted(DEFAULT_FRACTION))
    ap.add_argument("--shapes", nargs="+", default=["784,10"], help="F,C: logreg shapes (d = (F + 1) * C)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="rounds left out first (round 0: all upload)")
    ap.add_argument("--upload-fraction", action="append", default=[], metavar="ALG=P",
                    help=f"probability that a worker uploads in a round (default {DEFAULT_FRACTION})")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take")
    ap.add_argument("--profile", type=Path, help="run the server under yappi, keep its profiles here, split its CPU")
    ap.add_argument("--launch", choices=["loadgen", "run"], default="loadgen",
                    help="loadgen: the asyncio load generator plays the workers; run: `psrv run` with real "
                    "(virtual above the cores) workers on the default task, the server inside the runner")  # fmt: skip
    ap.add_argument("--processes", type=int, help="--launch run: worker processes (psrv run --processes)")
    ap.add_argument("--code", type=Path, default=HERE, help="the psrv checkout the server runs (default: this one)")
    ap.add_argument("--json", type=Path, help="also write every row here")
    ap.add_argument("--keep", type=Path, help="keep the server logs and metrics here")
    ap.add_argument("--loadgen", help=argparse.SUPPRESS)
    ap.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--profiled", action="store_true", help=argparse.SUPPRESS)
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
    other = "workers CPU" if args.launch == "run" else "loadgen CPU"
    head += f"{'per worker':>10} {other:>11} {'busy cores':>10} {'skips':>6}"
    print(head, flush=True)
    rows = []
    for shape in shapes:
        for algorithm in args.algorithms:
            for workers in args.workers:
                r = (
                    run_real(algorithm, workers, args, tmp)
                    if args.launch == "run"
                    else run_one(algorithm, workers, shape, args, tmp)
                )
                rows.append(r)
                print(
                    f"{algorithm:<9} {r['dim']:>9,} {workers:>5} {r['wall_ms']:>9.1f} {r['median_round_ms']:>7.1f} "
                    f"{r['server_cpu_ms']:>13.1f} {r['server_cpu_ms'] / workers:>10.3f} {r['loadgen_cpu_ms']:>11.1f} "
                    f"{r['machine_busy_cores']:>10.2f} {r['skips']:>6.1%}",
                    flush=True,
                )
                for part, share in r.get("profile", {}).items():
                    print(f"    {part:<55} {share:6.1%}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""psrv's dense GD round against a raw-TCP round that moves the same bytes between the same processes.

    python scripts/bench_transport.py --dim 1e7 --workers 4 --rounds 8

Both sides run the same job on loopback: a server process and M worker processes, logistic
regression (``n_classes = 10``, ``n_features = dim / 10 - 1``) on a few random rows per worker (an
``.npz`` per worker, ``--rows``), plain GD with dense float32 uploads. Per round the server sends the
float32 model to every worker and every worker sends back a dense float32 gradient.

- ``psrv``: ``psrv start-server`` and M ``psrv start-worker`` processes, unchanged: gRPC, protobuf,
  psrv's codec, the round engine. A round's time is the difference of consecutive ``elapsed``
  values of the server's metrics (publish, the round, the close: everything between two rounds).
- ``raw``: the same processes made by hand: the server sends an 8-byte header and the model's bytes
  over one TCP connection per worker (a thread each, as gRPC serves calls), the worker receives them
  into a buffer it keeps, computes the same gradient with the same task code, and sends its float32
  bytes back; the server sums the gradients in float64 and takes the step. No serialization, no
  framing beyond the header, no copies beyond what the kernel needs.

Rounds after the first ``--warmup`` are timed (``--repeat`` runs of each configuration, interleaved,
pooled); the table gives the medians and psrv / raw, of the
whole round and of its exchange: from the moment the model is ready to go to the moment the last
gradient has arrived (psrv: the engine's ``round_time``; raw: sending, computing and receiving), so
the rest is the server's work between rounds (aggregating, the step, encoding the next model). Each
configuration runs once with glibc's malloc as psrv sets it up (:mod:`psrv.memory`) and once with
glibc's defaults (``PSRV_MALLOC=default``); ``--malloc`` picks (``env``: the thresholds through glibc's
environment variables instead). The peak RSS of the server and of the
largest worker come from ``wait4`` on the processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's psrv, not an installed one

import numpy as np  # noqa: E402

N_CLASSES = 10
LR = 1e-3
HEADER = struct.Struct("<q")  # raw protocol: the round (-1: stop), then the payload bytes


def _dim(text: str) -> int:
    value = float(text)
    if value != int(value) or int(value) % N_CLASSES or value < 2 * N_CLASSES:
        raise argparse.ArgumentTypeError(f"dim must be a multiple of {N_CLASSES} (>= {2 * N_CLASSES}), got {text}")
    return int(value)


def n_features(dim: int) -> int:
    return dim // N_CLASSES - 1


def write_data(folder: Path, dim: int, workers: int, rows: int) -> list[Path]:
    """One ``.npz`` per worker: ``rows`` random float32 rows; labels include class 9 so every
    worker infers the same ``n_classes``."""
    paths = []
    for i in range(workers):
        rng = np.random.default_rng(i)
        X = rng.standard_normal((rows, n_features(dim)), dtype=np.float32)
        y = np.arange(rows) % N_CLASSES
        y[-1] = N_CLASSES - 1
        path = folder / f"w{i}.npz"
        np.savez(path, X=X, y=y)
        paths.append(path)
    return paths


def _env(malloc: str) -> dict[str, str]:
    """``tuned``: psrv's own set-up; ``default``: glibc's defaults; ``env``: glibc's defaults but for
    the two thresholds set through glibc's environment variables (the old recipe)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "PSRV_MALLOC"}
    env["PYTHONPATH"] = str(ROOT)
    if malloc != "tuned":
        env["PSRV_MALLOC"] = "default"
    if malloc == "env":
        env.update(MALLOC_MMAP_THRESHOLD_=str(1 << 30), MALLOC_TRIM_THRESHOLD_=str(2 << 30))
    return env


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    """Reap ``proc``; its peak RSS in bytes (ru_maxrss)."""
    give_up = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
            return usage.ru_maxrss * 1024
        if time.monotonic() > give_up:
            proc.kill()
            raise RuntimeError(f"{proc.args} did not finish in {timeout:g} s")
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


class CpuMonitor:
    """CPU seconds (user + system, every process of the run) between the end of round ``warmup - 1``
    and the end of the last round, read from /proc as the progress file (a line per closed round)
    grows: a figure that other load on the machine disturbs far less than wall time."""

    def __init__(self, progress: Path, warmup: int, rounds: int) -> None:
        self.progress, self.marks = progress, (max(warmup, 1), rounds)
        self.pids: list[int] = []
        self.samples: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _cpu(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        while not self._stop.wait(0.002) and len(self.samples) < len(self.marks):
            if not self.pids:
                continue
            try:
                done = self.progress.read_bytes().count(b"\n")
            except OSError:
                continue
            for mark in self.marks:
                if done >= mark and mark not in self.samples:
                    self.samples[mark] = sum(self._cpu(pid) for pid in self.pids)

    def per_round(self) -> float:
        self._stop.set()
        self._thread.join()
        first, last = self.marks
        if last not in self.samples or first not in self.samples or last == first:
            return math.nan
        return (self.samples[last] - self.samples[first]) / (last - first)


# ------------------------------------------------------------------------------- psrv
def run_psrv(paths: list[Path], dim: int, rounds: int, warmup: int, malloc: str, folder: Path, timeout: float) -> dict:
    metrics = folder / f"psrv-{malloc}.jsonl"
    metrics.unlink(missing_ok=True)
    monitor = CpuMonitor(metrics, warmup, rounds)
    server_cmd = [
        sys.executable, "-m", "psrv", "start-server", "--host", "127.0.0.1", "--port", "0",
        "--algorithm", "gd", "--lr", str(LR), "--workers", str(len(paths)), "--rounds", str(rounds),
        "--round-timeout", "600", "--metrics", str(metrics),
    ]  # fmt: skip
    env = _env(malloc)
    err = open(folder / f"psrv-server-{malloc}.log", "w+")
    procs = [subprocess.Popen(server_cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)]
    try:
        port = _port_from_log(err, procs[0], timeout)
        for i, path in enumerate(paths):
            log = folder / f"psrv-w{i}-{malloc}.log"
            procs.append(start_worker(port, ["--worker-id", f"w{i}", "--data", str(path)], env, log, ROOT))
        monitor.pids = [p.pid for p in procs]
        rss = [_wait(p, timeout) for p in procs]
    finally:
        _stop(procs)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {
        "periods": list(np.diff([0.0, *(r["elapsed"] for r in records)])),
        "exchanges": [r["round_time"] for r in records],
        "cpu": monitor.per_round(),
        "server_rss": rss[0],
        "worker_rss": max(rss[1:]),
    }


def start_worker(port: int, args: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    """``psrv start-worker`` against the server on ``port`` (all its rows its own: no test split),
    output to ``log``."""
    cmd = [sys.executable, "-m", "psrv", "start-worker", "--server", f"127.0.0.1:{port}", "--test-fraction", "0"]
    return subprocess.Popen([*cmd, *args], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=cwd)


def _port_from_log(log, proc: subprocess.Popen, timeout: float) -> int:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        log.seek(0)
        m = re.search(r"listening on [^:]+:(\d+)", log.read())
        if m:
            return int(m.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError("server did not start")


# ------------------------------------------------------------------------------- raw TCP
def _recv_into(conn: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        n = conn.recv_into(view)
        if not n:
            raise ConnectionError("peer closed")
        view = view[n:]


def raw_server(dim: int, workers: int, rounds: int, port_file: Path, result_file: Path, progress: Path) -> None:
    import threadpoolctl

    from psrv import memory

    memory.tune_malloc()
    threadpoolctl.threadpool_limits(1, user_api="blas")  # as psrv's server
    theta = np.zeros(dim)
    listener = socket.create_server(("127.0.0.1", 0))
    port_file.write_text(str(listener.getsockname()[1]))
    conns = [listener.accept()[0] for _ in range(workers)]
    grads = [np.empty(dim, np.float32) for _ in range(workers)]
    periods, exchanges = [], []
    with ThreadPoolExecutor(workers) as pool:
        for k in range(rounds + 1):
            t0 = time.perf_counter()
            model = theta.astype(np.float32) if k < rounds else np.zeros(0, np.float32)

            def serve(i: int, k: int = k, model: np.ndarray = model) -> None:
                conns[i].sendall(HEADER.pack(k if k < rounds else -1))
                conns[i].sendall(memoryview(model).cast("B"))
                if k < rounds:
                    _recv_into(conns[i], memoryview(grads[i]).cast("B"))

            t1 = time.perf_counter()
            list(pool.map(serve, range(workers)))
            exchanges.append(time.perf_counter() - t1)
            if k == rounds:
                break
            total = np.zeros(dim)
            for g in grads:
                total += g
            theta -= LR * total
            periods.append(time.perf_counter() - t0)
            with progress.open("a") as f:
                f.write(f"{k}\n")
    result_file.write_text(json.dumps({"periods": periods, "exchanges": exchanges[:rounds]}))


def raw_worker(port: int, data_path: Path, workers: int, result_file: Path) -> None:
    from psrv import data, memory
    from psrv.tasks import make_task

    memory.tune_malloc()
    import threadpoolctl
    import torch

    torch.set_num_threads(1)  # as psrv's worker
    threadpoolctl.threadpool_limits(1, user_api="blas")
    ds = data.load(str(data_path))
    task = make_task("logreg", ds.n_features, ds.n_classes)
    task.local_loss_grad(np.zeros(task.dim), ds.X[:2], ds.y[:2], len(ds), workers)  # warm-up, as psrv's worker
    model = np.empty(task.dim, np.float32)
    head = bytearray(HEADER.size)
    conn = socket.create_connection(("127.0.0.1", port))
    compute = []
    while True:
        _recv_into(conn, memoryview(head))
        (k,) = HEADER.unpack(head)
        if k < 0:
            break
        _recv_into(conn, memoryview(model).cast("B"))
        t0 = time.perf_counter()
        _, grad = task.local_loss_grad(model, ds.X, ds.y, len(ds) * workers, workers)
        grad32 = grad.astype(np.float32)
        compute.append(time.perf_counter() - t0)
        conn.sendall(memoryview(grad32).cast("B"))
    result_file.write_text(json.dumps({"compute": compute}))


def run_raw(paths: list[Path], dim: int, rounds: int, warmup: int, malloc: str, folder: Path, timeout: float) -> dict:
    env = _env(malloc)
    me = [sys.executable, str(Path(__file__).resolve())]
    port_file, result = folder / f"raw-port-{malloc}", folder / f"raw-server-{malloc}.json"
    progress = folder / f"raw-progress-{malloc}"
    for f in (port_file, progress):
        f.unlink(missing_ok=True)
    monitor = CpuMonitor(progress, warmup, rounds)
    server_cmd = [
        *me,
        "_raw-server",
        str(dim),
        str(len(paths)),
        str(rounds),
        str(port_file),
        str(result),
        str(progress),
    ]
    procs = [subprocess.Popen(server_cmd, env=env)]
    try:
        give_up = time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > give_up or procs[0].poll() is not None:
                raise RuntimeError("raw server did not start")
            time.sleep(0.05)
        port = port_file.read_text()
        outs = [folder / f"raw-w{i}-{malloc}.json" for i in range(len(paths))]
        for path, out in zip(paths, outs, strict=True):
            procs.append(subprocess.Popen([*me, "_raw-worker", port, str(path), str(len(paths)), str(out)], env=env))
        monitor.pids = [p.pid for p in procs]
        rss = [_wait(p, timeout) for p in procs]
    finally:
        _stop(procs)
    compute = [c for out in outs for c in json.loads(out.read_text())["compute"]]
    return {
        **json.loads(result.read_text()),
        "cpu": monitor.per_round(),
        "server_rss": rss[0],
        "worker_rss": max(rss[1:]),
        "compute": statistics.median(compute),
    }


# ------------------------------------------------------------------------------- transfers
def transfer_client(port: int, dim: int, rounds: int, kind: str, result_file: Path) -> None:
    """One client of a psrv server, by hand: per round, after the round has opened, the model
    (GetModel) and a dense float32 upload (Push), both ``kind`` = unary or stream; times each call."""
    import grpc

    from psrv import codec, memory, rpc
    from psrv.payload import dense
    from psrv.v1 import psrv_pb2 as pb

    memory.tune_malloc()
    g = np.random.default_rng(0).standard_normal(dim, dtype=np.float32)
    above = 0 if kind == "stream" else 2**62
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=rpc.channel_options()) as channel:
        stub = rpc.CountingStub(channel, stream_above=above)
        req = pb.RegisterRequest(worker_id="w0", num_samples=1, n_features=n_features(dim), n_classes=N_CLASSES)
        stub.Register(req, timeout=60, wait_for_ready=True)
        down, up = [], []
        for k in range(rounds + 1):
            time.sleep(0.5 + dim * 3e-8)  # the round is open and its model encoded (3 s at d = 1e8)
            t0 = time.perf_counter()
            model = stub.GetModel(pb.GetModelRequest(worker_id="w0", round=k), timeout=600)
            down.append(time.perf_counter() - t0)
            if model.done:
                break
            t0 = time.perf_counter()
            stub.Push(codec.upload_to_wire("w0", k, 0.0, dense(g)), timeout=600)
            up.append(time.perf_counter() - t0)
    methods = sorted({m for _, m in stub.counter.bytes})
    result_file.write_text(json.dumps({"down": down, "up": up, "methods": methods}))


def run_transfer(dim: int, rounds: int, kind: str, folder: Path, timeout: float) -> dict:
    server_cmd = [
        sys.executable, "-m", "psrv", "start-server", "--host", "127.0.0.1", "--port", "0",
        "--algorithm", "gd", "--lr", str(LR), "--workers", "1", "--rounds", str(rounds), "--round-timeout", "600",
    ]  # fmt: skip
    env = _env("tuned")
    err = open(folder / f"transfer-server-{kind}.log", "w+")
    procs = [subprocess.Popen(server_cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)]
    result = folder / f"transfer-{kind}.json"
    try:
        port = _port_from_log(err, procs[0], timeout)
        client = [sys.executable, str(Path(__file__).resolve()), "_transfer-client", str(port), str(dim)]
        procs.append(subprocess.Popen([*client, str(rounds), kind, str(result)], env=env))
        rss = [_wait(p, timeout) for p in procs]
    finally:
        _stop(procs)
    return {**json.loads(result.read_text()), "server_rss": rss[0], "worker_rss": rss[1]}


# ------------------------------------------------------------------------------- driver
def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"  # CPU time comes in clock ticks: 0 for tiny rounds


def _median(periods: list[float], warmup: int) -> float:
    return statistics.median(periods[warmup:] or periods)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_raw-server":
        dim, workers, rounds, port_file, result, progress = argv[1:]
        raw_server(int(dim), int(workers), int(rounds), Path(port_file), Path(result), Path(progress))
        return 0
    if argv and argv[0] == "_raw-worker":
        port, path, workers, result = argv[1:]
        raw_worker(int(port), Path(path), int(workers), Path(result))
        return 0
    if argv and argv[0] == "_transfer-client":
        port, dim, rounds, kind, result = argv[1:]
        transfer_client(int(port), int(dim), int(rounds), kind, Path(result))
        return 0
    p = argparse.ArgumentParser(prog="scripts/bench_transport.py", description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=_dim, default=10**7, help="model dimension (multiple of 10), e.g. 1e7")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="rounds left out of the medians")
    p.add_argument("--rows", type=int, default=2, help="training rows per worker")
    p.add_argument(
        "--modes",
        default="psrv,raw",
        help="comma-separated: psrv, raw (the GD round); unary, stream (one model and one upload a round)",
    )
    p.add_argument(
        "--malloc",
        default="tuned,default",
        help="comma-separated: tuned (psrv's set-up), default (glibc's), env (MALLOC_*_THRESHOLD_ variables)",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs of each configuration, interleaved; rounds pooled")
    p.add_argument("--timeout", type=float, default=600.0, help="per run, seconds")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    mallocs = [m.strip() for m in args.malloc.split(",") if m.strip()]
    runners = {"psrv": run_psrv, "raw": run_raw}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="psrv-bench-") as tmp:
        folder = Path(tmp)
        mb = args.dim * 4 / 1e6
        transfers = [m for m in modes if m in ("unary", "stream")]
        if transfers:
            print(f"d = {args.dim:.3g} ({mb:.0f} MB float32), one client, {args.rounds} rounds", flush=True)
        for kind in transfers:
            r = run_transfer(args.dim, args.rounds, kind, folder, args.timeout)
            results[kind] = r
            print(
                f"{kind:>6}: model {_median(r['down'], args.warmup) * 1e3:7.1f} ms, "
                f"upload {_median(r['up'], args.warmup) * 1e3:7.1f} ms (medians; methods {', '.join(r['methods'])}); "
                f"peak RSS server {r['server_rss'] / 2**20:.0f} MiB, client {r['worker_rss'] / 2**20:.0f} MiB",
                flush=True,
            )
        modes = [m for m in modes if m in runners]
        if modes:
            paths = write_data(folder, args.dim, args.workers, args.rows)
            print(
                f"d = {args.dim:.3g} ({mb:.0f} MB float32), M = {args.workers}, {args.rounds} rounds "
                f"(medians of rounds {args.warmup}..{args.rounds - 1}), {args.rows} rows per worker; "
                f"per round {args.workers} x {mb:.0f} MB down and up",
                flush=True,
            )
        runs: dict[str, list[dict]] = {}
        for repeat in range(args.repeat if modes else 0):
            for malloc in mallocs:
                for mode in modes:
                    r = runners[mode](paths, args.dim, args.rounds, args.warmup, malloc, folder, args.timeout)
                    runs.setdefault(f"{mode}/{malloc}", []).append(r)
                    extra = f", worker compute {r['compute'] * 1e3:.0f} ms" if "compute" in r else ""
                    print(
                        f"{mode:>5} malloc={malloc:<8} run {repeat + 1}: round "
                        f"{_median(r['periods'], args.warmup) * 1e3:7.1f} ms (exchange "
                        f"{_median(r['exchanges'], args.warmup) * 1e3:6.1f} ms), CPU {r['cpu'] * 1e3:6.0f} ms/round "
                        f"(rounds: {', '.join(f'{t * 1e3:.0f}' for t in r['periods'])}); peak RSS server "
                        f"{r['server_rss'] / 2**20:.0f} MiB, worker {r['worker_rss'] / 2**20:.0f} MiB{extra}",
                        flush=True,
                    )
    for key, rs in runs.items():
        results[key] = {
            "median": statistics.median(t for r in rs for t in r["periods"][args.warmup :]),
            "exchange": statistics.median(t for r in rs for t in r["exchanges"][args.warmup :]),
            "cpu": statistics.median(r["cpu"] for r in rs),
            "server_rss": max(r["server_rss"] for r in rs),
            "worker_rss": max(r["worker_rss"] for r in rs),
            "runs": rs,
        }
        r = results[key]
        print(
            f"{key:>14}: median round {r['median'] * 1e3:7.1f} ms, exchange {r['exchange'] * 1e3:6.1f} ms, "
            f"CPU {r['cpu'] * 1e3:6.0f} ms/round ({len(rs)} runs); peak RSS server {r['server_rss'] / 2**20:.0f} MiB, "
            f"worker {r['worker_rss'] / 2**20:.0f} MiB"
        )
    for malloc in mallocs:
        psrv, raw = results.get(f"psrv/{malloc}"), results.get(f"raw/{malloc}")
        if psrv and raw:
            print(
                f"malloc={malloc}: psrv / raw TCP = {_ratio(psrv['median'], raw['median'])} (round time), "
                f"{_ratio(psrv['exchange'], raw['exchange'])} (exchange), "
                f"{_ratio(psrv['cpu'], raw['cpu'])} (CPU time of all processes)"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

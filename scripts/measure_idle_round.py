"""What one idle (all-skip) LAQ round costs: bytes per worker on the wire, and wall time.

Two measurements, both bounded (a few rounds, a few seconds of CPU each):

``bytes`` (root: it makes its own network namespace and captures on its loopback)
    For each ``--code LABEL=PATH`` (a psrv checkout; default: this one), a ``psrv start-server
    --algorithm laq`` with ``--workers`` ``psrv start-worker`` processes of that checkout runs for
    ``--rounds`` rounds inside a fresh network namespace while ``psrv inspect capture`` (of this
    checkout) records its loopback. ``--code LABEL=PATH@TRANSPORT`` passes ``--transport
    TRANSPORT`` (``unary`` or ``stream``) to the server; without it the checkout's default runs.
    The capture is decoded with :mod:`psrv.inspect.pcap` (the
    gRPC records: method, round, message length) plus a pass over the same reassembled byte
    streams that splits HTTP/2 into frames. Per worker connection, an idle window is the time
    from the packet that completes the worker's ``GetModel`` request of round k to the one of
    round k+1 (unary), or from the packet that completes the ``model`` of round k on the
    worker's Rounds stream to the one of round k+1 (stream), for every k with ``uploads == 0`` in
    rounds k-1 and k (metrics.jsonl): it holds the broadcast of round k (nobody uploaded in k-1:
    the round header / empty update) and the worker's skip notice, (unary) their replies and
    trailers, flow control, pings and the TCP ACKs. Every
    packet in the window is counted: TCP payload = gRPC messages + framing (5-byte gRPC prefixes,
    HTTP/2 frame headers, HPACK blocks, WINDOW_UPDATE, PING, ...), and the IP+TCP headers of each
    packet as captured. Loopback has a 64 KiB MTU and offloads segmentation, so the script also
    gives the TCP/IP bytes an Ethernet link (MSS 1448 with timestamps: 52 header bytes per
    segment) would carry for the same payloads.

``wall`` (no root)
    ``--wall-workers`` workers of this checkout, LAQ for ``--wall-rounds`` rounds, started as
    ``psrv run`` starts them (one server process here, so its CPU is measured the same way): wall
    time per round from the server's metrics, CPU seconds per process (``os.wait4``), and one run
    per process kind under cProfile with a CPU clock (``time.process_time``) that splits a worker's
    CPU per round into the gradient, the LAQ step, the two unary calls and the rest, and the
    server's into the engine's calls; a last run with one worker profiled on the wall clock tells
    how long it waits for the round. ``gd`` is run once for the same figures.

    sudo python scripts/measure_idle_round.py --code before=/work/wt/idle-before --code after=.
    sudo python scripts/measure_idle_round.py --code unary=.@unary --code stream=.@stream --skip-wall
    python scripts/measure_idle_round.py --skip-bytes              # wall time only, no root
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from psrv.inspect.pcap import PcapDecoder  # noqa: E402
from psrv.inspect.pcapfile import read_packets  # noqa: E402
from psrv.inspect.tcpip import parse_tcp  # noqa: E402

PORT = 50051
WALL_CODE = [HERE]  # the checkout the wall-time runs start (--wall-code)
H2_TYPES = {
    0: "DATA",
    1: "HEADERS",
    2: "PRIORITY",
    3: "RST_STREAM",
    4: "SETTINGS",
    6: "PING",
    7: "GOAWAY",
    8: "WINDOW_UPDATE",
}
PREFACE_LEN = 24
MSS = 1448  # Ethernet MTU 1500 - 20 (IPv4) - 20 (TCP) - 12 (timestamps)
ETH_TCPIP = 52


def psrv_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "psrv", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    end = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"run did not finish within {timeout:.0f} s") from None


# ---------------------------------------------------------------- bytes of an idle round


def capture_run(code: Path, out: Path, rounds: int, workers: int, timeout: float, transport: str | None = None) -> None:
    """One LAQ run of ``code`` in a fresh network namespace, its loopback captured to out/run.pcap."""
    ns = f"psrv-idle-{os.getpid()}-{out.name}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        inns = ["ip", "netns", "exec", ns]
        cap = subprocess.Popen(
            [*inns, *psrv_cmd("inspect", "capture", "-w", str(out / "run.pcap"), "--port", str(PORT), "--iface", "lo")],
            cwd=HERE,
            stderr=open(out / "capture.log", "w"),
        )
        procs.append(cap)
        time.sleep(1.5)  # the capture socket is open before anyone connects (HPACK state)
        server = subprocess.Popen(
            [
                *inns,
                *server_cmd(
                    "laq",
                    workers,
                    rounds,
                    PORT,
                    out / "metrics.jsonl",
                    transport,
                    "--summary-json",
                    str(out / "summary.json"),
                ),
            ],
            cwd=code,
            stdout=open(out / "server.log", "w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(server)
        ws = [
            subprocess.Popen(
                [
                    *inns,
                    *psrv_cmd(
                        "start-worker",
                        "--server",
                        f"127.0.0.1:{PORT}",
                        "--worker-id",
                        f"w{i}",
                        "--data",
                        "mnist",
                        "--shard",
                        f"{i}/{workers}",
                    ),
                ],
                cwd=code,
                stdout=open(out / f"w{i}.log", "w"),
                stderr=subprocess.STDOUT,
            )
            for i in range(workers)
        ]
        procs += ws
        wait_all([server, *ws], timeout)
        time.sleep(0.5)
        cap.send_signal(signal.SIGINT)
        cap.wait(30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        subprocess.run(["ip", "netns", "del", ns], check=False)


class FrameSplitter:
    """HTTP/2 frames of one direction of one connection, from its reassembled bytes."""

    def __init__(self) -> None:
        self.buf = b""
        self.skip = PREFACE_LEN  # up: the client preface; down: 0 (set by the caller)

    def feed(self, data: bytes) -> list[tuple[int, int, int]]:
        """(type, stream id, frame length with its 9-byte header) of every frame completed."""
        self.buf += data
        if self.skip:
            n = min(self.skip, len(self.buf))
            self.buf, self.skip = self.buf[n:], self.skip - n
        out = []
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + length:
                break
            out.append((self.buf[3], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF, 9 + length))
            self.buf = self.buf[9 + length :]
        return out


def analyse_capture(out: Path) -> dict[str, Any]:
    """Per worker per idle round: message, framing (by HTTP/2 frame type) and TCP/IP bytes."""
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl") if line.strip()]
    uploads = {m["round"]: m["uploads"] for m in metrics}
    idle = {k for k in uploads if uploads[k] == 0 and uploads.get(k - 1) == 0}

    now = [0.0]
    frames: list[tuple[float, str, str, int, int, int]] = []  # time, conn, dir, type, stream, bytes
    splitters: dict[tuple[str, str], FrameSplitter] = {}

    def on_bytes(conn: str, direction: str, data: bytes) -> None:
        sp = splitters.get((conn, direction))
        if sp is None:
            sp = splitters[(conn, direction)] = FrameSplitter()
            sp.skip = PREFACE_LEN if direction == "up" else 0
        for ftype, stream, n in sp.feed(data):
            frames.append((now[0], conn, direction, ftype, stream, n))

    dec = PcapDecoder(PORT, on_bytes=on_bytes)
    packets: list[tuple[float, str, str, int, int]] = []  # time, conn, dir, tcp payload, ip+tcp header
    for pkt in read_packets(out / "run.pcap"):
        now[0] = pkt.time
        seg = parse_tcp(pkt.linktype, pkt.data)
        dec.feed(pkt)
        if seg is None or PORT not in (seg.src[1], seg.dst[1]):
            continue
        client = seg.src if seg.dst[1] == PORT else seg.dst
        ip_len = len(pkt.data) - 16  # Linux cooked (SLL) link header
        packets.append(
            (
                pkt.time,
                f"{client[0]}:{client[1]}",
                "up" if seg.dst[1] == PORT else "down",
                len(seg.payload),
                ip_len - len(seg.payload),
            )
        )
    records = dec.finish()
    msgs = [r for r in records if r["type"] == "message"]

    # per connection: the worker, and the time its GetModel request of round k was complete
    # (unary), or the time the broadcast of round k on its Rounds stream was (stream)
    worker_of: dict[str, str] = {}
    bounds: dict[str, dict[int, float]] = defaultdict(dict)
    for r in msgs:
        if r.get("worker"):
            worker_of.setdefault(r["conn"], r["worker"])
        unary = r["method"] == "GetModel" and r["dir"] == "up"
        stream = r["method"] == "Rounds" and r["message"] in ("RoundsResponse.model", "RoundsResponse.model_piece")
        if (unary or stream) and r["round"] is not None:
            bounds[r["conn"]].setdefault(r["round"], r["time"])

    def windows(conn: str) -> list[tuple[float, float]]:
        b = bounds[conn]
        return [(b[k], b[k + 1]) for k in sorted(idle) if k in b and k + 1 in b]

    def inside(conn: str, t: float, ws: list[tuple[float, float]]) -> bool:
        return any(lo <= t < hi for lo, hi in ws)

    tot: dict[str, float] = defaultdict(float)
    n_windows = 0
    for conn in bounds:
        ws = windows(conn)
        n_windows += len(ws)
        for t, c, d, payload, hdr in packets:
            if c == conn and inside(conn, t, ws):
                tot[f"packets_{d}"] += 1
                tot[f"tcp_payload_{d}"] += payload
                tot[f"tcpip_{d}"] += hdr
                segments = max(1, -(-payload // MSS))
                tot[f"tcpip_eth_{d}"] += ETH_TCPIP * segments
                # an Ethernet receiver ACKs every second full segment: the ACKs loopback never needed
                tot[f"tcpip_eth_{'down' if d == 'up' else 'up'}"] += ETH_TCPIP * (segments // 2)
        for r in msgs:
            if r["conn"] == conn and inside(conn, r["time"], ws):
                size = sum(r["bytes"][k] for k in ("header", "indices", "values", "codes", "zstd"))
                tot[f"message_{r['dir']}"] += size
                tot[f"msg {r['dir']} {r['method']} {r['message']}"] += size
                tot[f"count {r['dir']} {r['method']} {r['message']}"] += 1
        for t, c, d, ftype, _stream, n in frames:
            if c == conn and inside(conn, t, ws):
                name = H2_TYPES.get(ftype, str(ftype))
                tot[f"frame {d} {name}"] += n
                tot[f"frames {d} {name}"] += 1
    per = {k: v / n_windows for k, v in tot.items()} if n_windows else {}
    for d in ("up", "down"):
        per[f"framing_{d}"] = per.get(f"tcp_payload_{d}", 0) - per.get(f"message_{d}", 0)
    return {
        "rounds": len(metrics),
        "idle_rounds": len(idle),
        "windows": n_windows,
        "workers": sorted(set(worker_of.values())),
        "per_worker_round": per,
        "decoder": dec.stats,
    }


def bytes_table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        ("gRPC messages (protobuf)", "message"),
        ("framing (gRPC prefix, HTTP/2)", "framing"),
        ("TCP/IP headers, loopback as captured", "tcpip"),
        ("TCP/IP headers, Ethernet MSS 1448 (est.)", "tcpip_eth"),
        ("packets", "packets"),
    ]
    labels = list(results)
    head = f"{'per worker per all-skip round':<42}" + "".join(
        f"{lab + ' ' + d:>14}" for lab in labels for d in ("up", "down", "total")
    )
    lines = [head, "-" * len(head)]
    for name, key in rows:
        cells = ""
        for lab in labels:
            p = results[lab]["per_worker_round"]
            up, down = p.get(f"{key}_up", 0.0), p.get(f"{key}_down", 0.0)
            cells += f"{up:>14.1f}{down:>14.1f}{up + down:>14.1f}"
        lines.append(f"{name:<42}{cells}")
    total = ""
    for lab in labels:
        p = results[lab]["per_worker_round"]
        s = {d: sum(p.get(f"{k}_{d}", 0.0) for k in ("message", "framing", "tcpip")) for d in ("up", "down")}
        total += f"{s['up']:>14.1f}{s['down']:>14.1f}{s['up'] + s['down']:>14.1f}"
    lines.append(f"{'on the wire (loopback)':<42}{total}")
    lines.append("")
    for lab in labels:
        r, p = results[lab], results[lab]["per_worker_round"]
        lines.append(
            f"{lab}: {r['windows']} idle worker-rounds ({r['idle_rounds']} of {r['rounds']} rounds all-skip, "
            f"workers {', '.join(r['workers'])})"
        )
        for k in sorted(p):
            if k.startswith(("msg ", "frame ")):
                count_key = (
                    k.replace("msg ", "count ", 1) if k.startswith("msg ") else k.replace("frame ", "frames ", 1)
                )
                lines.append(f"  {k:<52}{p[k]:>9.1f} bytes  x{p.get(count_key, 0):.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- wall time of a round


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a running process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds the whole machine was busy since boot (all processes, everyone's)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def last_round(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        return json.loads(lines[-1])["round"] if lines else -1
    except (OSError, ValueError, IndexError):
        return -1


def py_spy() -> str | None:
    import shutil

    found = shutil.which("py-spy") or str(Path.home() / ".local/bin/py-spy")
    return found if Path(found).exists() else None


def server_cmd(
    algorithm: str, workers: int, rounds: int, port: int, metrics: Path, transport: str | None, *extra: str
) -> list[str]:
    """``psrv start-server`` on 127.0.0.1:``port`` (``transport`` None: the server's default)."""
    return psrv_cmd(
        "start-server",
        *("--algorithm", algorithm, "--workers", str(workers), "--rounds", str(rounds)),
        *("--host", "127.0.0.1", "--port", str(port), "--metrics", str(metrics)),
        *(["--transport", transport] if transport else []),
        *extra,
    )


def local_run(
    algorithm: str,
    workers: int,
    rounds: int,
    out: Path,
    warm: int,
    spy: tuple[str, ...] = (),
    transport: str = "stream",
) -> dict[str, Any]:
    """Server + ``workers`` worker processes on loopback (what ``psrv run`` starts, the server in
    its own process here). CPU of every process and of the machine between the end of round
    ``warm`` and of round ``rounds - warm``; ``spy``: processes ("server", "w0", ...) that py-spy
    samples (raw stacks, on-CPU only) over the same rounds."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    metrics = out / "metrics.jsonl"
    procs = {"server": server_cmd(algorithm, workers, rounds, port, metrics, transport)}
    for i in range(workers):
        procs[f"w{i}"] = psrv_cmd(
            "start-worker",
            "--server",
            f"127.0.0.1:{port}",
            "--worker-id",
            f"w{i}",
            "--data",
            "mnist",
            "--shard",
            f"{i}/{workers}",
        )
    ps = {
        name: subprocess.Popen(cmd, cwd=WALL_CODE[0], stdout=open(out / f"{name}.log", "w"), stderr=subprocess.STDOUT)
        for name, cmd in procs.items()
    }
    spies: list[subprocess.Popen] = []
    try:
        end = time.monotonic() + 300
        marks: list[dict[str, Any]] = []
        for target in (warm, rounds - warm):
            while last_round(metrics) < target:
                if time.monotonic() > end or any(p.poll() not in (None, 0) for p in ps.values()):
                    raise SystemExit(f"{algorithm} run failed or took too long; logs in {out}")
                time.sleep(0.002)
            marks.append(
                {
                    "t": time.monotonic(),
                    "round": last_round(metrics),
                    "machine": machine_busy(),
                    **{n: proc_cpu(p.pid) for n, p in ps.items()},
                }
            )
            if target == warm and spy:
                exe = py_spy()
                if exe is None:
                    raise SystemExit("py-spy not found (pip install py-spy)")
                spies = [
                    subprocess.Popen(
                        [
                            exe,
                            "record",
                            "--nonblocking",
                            "--rate",
                            "1000",
                            "--format",
                            "raw",
                            "-o",
                            str(out / f"{n}.spy.txt"),
                            "--pid",
                            str(ps[n].pid),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=open(out / f"{n}.spy.log", "w"),
                    )
                    for n in spy
                ]
        for sp in spies:
            sp.send_signal(signal.SIGINT)
        for sp in spies:
            sp.wait(30)
        wait_all(list(ps.values()), 120)
    finally:
        for p in [*ps.values(), *spies]:
            if p.poll() is None:
                p.kill()
    a, b = marks
    n = b["round"] - a["round"]
    recs = [json.loads(line) for line in open(metrics) if line.strip()][a["round"] + 1 : b["round"] + 1]
    ts = sorted(m["round_time"] for m in recs)
    skips = sum(m["skips"] for m in recs)
    return {
        "rounds": n,
        "wall_ms": 1e3 * (b["t"] - a["t"]) / n,
        "round_median_ms": 1e3 * ts[len(ts) // 2],
        "skip_share": skips / max(1, skips + sum(m["uploads"] for m in recs)),
        "cpu_ms": {name: 1e3 * (b[name] - a[name]) / n for name in ps},
        "machine_ms": 1e3 * (b["machine"] - a["machine"]) / n,
        "out": out,
    }


#: py-spy frame substrings -> part (first match from the top of the list, searched leaf to root)
WORKER_PARTS = [
    ("gradient (task.local_loss_grad, torch)", ("local_loss_grad",)),
    ("LAQ step (skip rule, quantizer)", ("step (psrv/algorithms", "step (/")),
    ("decode + replica update", ("model_from_proto", "receive (worker/client.py", "receive (/")),
    ("Skip/Push unary call", ("_report (",)),
    ("GetModel unary call", ("run_worker (",)),
]
SERVER_PARTS = [
    ("round close (engine: close, aggregate, update, publish)", ("_close_round", "_publish")),
    ("GetModel handler", ("GetModel",)),
    ("Skip handler", ("Skip",)),
    ("Push handler", ("Push",)),
    ("gRPC server machinery (polling, thread pool)", ("grpc/",)),
]


#: leaf frames of a thread that is blocked, not running
WAITING = (
    "Condition.wait (",
    "_worker (concurrent/futures/thread.py:81)",
    "_serve (grpc/_server.py:1314)",
    "Event.wait (",
    "_next (grpc/_channel.py",
    "_blocking (grpc/_channel.py",
    "wait (grpc/_common.py",
    "sleep (",
)


def spy_split(path: Path, parts: list[tuple[str, tuple[str, ...]]], cpu_ms: float) -> dict[str, float]:
    """Share of on-CPU samples per part, scaled to the process's measured CPU ms per round."""
    counts: dict[str, int] = defaultdict(int)
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        if any(frames[-1].startswith(w) for w in WAITING):
            continue  # blocked (py-spy's idle detection misses these), not on a CPU
        part = "other (interpreter, logging, ...)"
        for name, needles in parts:
            if any(nd in f for f in frames for nd in needles):
                part = name
                break
        counts[part] += int(n)
    total = sum(counts.values()) or 1
    return {k: cpu_ms * v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def gradient_alone(workers: int, repeat: int = 300) -> float:
    """CPU ms per full local gradient of one shard (this checkout's task and data loading)."""
    import numpy as np
    import torch

    from psrv.tasks import make_task
    from worker.client import WorkerConfig, load_worker_data

    torch.set_num_threads(1)
    ds = load_worker_data(WorkerConfig(server="", worker_id="w0", shard=0, num_shards=workers))
    task = make_task("logreg", ds.n_features, ds.n_classes)
    rows = ds.X.view()
    rows.setflags(write=False)  # as a worker holds its shard (worker/client.py _Job): logreg may go sparse
    ds = type(ds)(rows, ds.y, ds.n_classes, ds.name)
    theta = np.zeros(task.dim)
    for _ in range(20):
        task.local_loss_grad(theta, ds.X, ds.y, len(ds) * workers, workers)
    t0 = time.process_time()  # CPU, not wall: on a shared machine the wall clock measures the others
    for _ in range(repeat):
        task.local_loss_grad(theta, ds.X, ds.y, len(ds) * workers, workers)
    return 1e3 * (time.process_time() - t0) / repeat


def wall(args: argparse.Namespace, tmp: Path) -> str:
    w, r, warm = args.wall_workers, args.wall_rounds, 20
    cores = os.cpu_count() or 1
    lines = [f"{w} workers, {r} rounds, steady state = rounds {warm + 1}..{r - warm}; {cores} cores"]
    lines[0] += f"; code {WALL_CODE[0]}"
    for algo, transport in [(a, t) for t in args.wall_transports.split(",") for a in args.wall_algorithms.split(",")]:
        res = local_run(algo, w, r, tmp / f"wall-{algo}-{transport}", warm, transport=transport)
        cw = sum(v for k, v in res["cpu_ms"].items() if k != "server")
        ours = cw + res["cpu_ms"]["server"]
        lines.append(
            f"{algo} ({transport}): {res['wall_ms']:.1f} ms per round "
            f"(median round_time {res['round_median_ms']:.1f}), "
            f"skips {100 * res['skip_share']:.1f}%; CPU per round: workers {cw:.1f} ms "
            f"({cw / w:.2f} per worker-round), server {res['cpu_ms']['server']:.1f} ms, ours {ours:.1f} ms "
            f"= {ours / cores:.1f} ms per core; the whole machine was busy {res['machine_ms']:.1f} ms CPU per round "
            f"(others: {res['machine_ms'] - ours:.1f})"
        )
    g = gradient_alone(w)
    lines.append(f"full local gradient of one shard alone (this checkout, 1 thread): {g:.2f} ms CPU")
    if args.skip_spy:
        return "\n".join(lines)
    res = local_run("laq", w, r, tmp / "wall-spy", warm, ("server", "w0"))
    lines.append(f"laq under py-spy (server and w0 sampled at 1 kHz, on-CPU stacks): {res['wall_ms']:.1f} ms per round")
    for name, parts in (("w0", WORKER_PARTS), ("server", SERVER_PARTS)):
        cpu = res["cpu_ms"][name]
        lines.append(f"{name}: {cpu:.2f} ms CPU per round, split by py-spy samples:")
        lines += [f"  {k:<58}{v:8.2f}" for k, v in spy_split(res["out"] / f"{name}.spy.txt", parts, cpu).items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--code",
        action="append",
        default=[],
        help="LABEL=PATH[@TRANSPORT] of a psrv checkout (repeatable); TRANSPORT: passed as start-server --transport.",
    )
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--wall-rounds", type=int, default=200)
    ap.add_argument("--wall-workers", type=int, default=10)
    ap.add_argument("--wall-transports", default="stream,unary", help="Transports of the wall-time runs.")
    ap.add_argument("--wall-algorithms", default="laq,gd", help="Algorithms of the wall-time runs.")
    ap.add_argument("--wall-code", type=Path, default=HERE, help="The checkout the wall-time runs start.")
    ap.add_argument("--skip-spy", action="store_true", help="No py-spy run (where py-spy cannot attach).")
    ap.add_argument("--skip-bytes", action="store_true")
    ap.add_argument("--skip-wall", action="store_true")
    ap.add_argument("--keep", default=None, help="Keep captures, logs and profiles in this directory.")
    args = ap.parse_args()
    WALL_CODE[0] = args.wall_code
    codes = dict(c.split("=", 1) for c in args.code) or {"head": str(HERE)}
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="psrv-idle-"))
    tmp.mkdir(parents=True, exist_ok=True)
    if not args.skip_bytes:
        if os.geteuid() != 0:
            raise SystemExit("the byte measurement needs root (a network namespace and a capture); --skip-bytes")
        results = {}
        for label, spec in codes.items():
            path, _, transport = spec.partition("@")
            out = tmp / f"bytes-{label}"
            out.mkdir(parents=True, exist_ok=True)
            capture_run(Path(path).resolve(), out, args.rounds, args.workers, timeout=180, transport=transport or None)
            results[label] = analyse_capture(out)
        print(bytes_table(results))
        (tmp / "bytes.json").write_text(json.dumps(results, indent=1))
        print()
    if not args.skip_wall:
        print(wall(args, tmp))
    print(f"\nfiles in {tmp}")


if __name__ == "__main__":
    main()

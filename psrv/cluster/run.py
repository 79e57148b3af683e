"""``psrv cluster run``: a server and M workers, each in its own network namespace with a shaped link.

Steps: build the namespaces (:mod:`psrv.cluster.netns`), shape every host's uplink and downlink
(:mod:`psrv.cluster.shaping`), start ``python -m psrv start-server`` and ``python -m psrv
start-worker`` inside them -- the commands a user runs on real hosts -- wait, read the counters
(:mod:`psrv.cluster.counters`), and tear everything down, also on failure or Ctrl-C.

Where the shaping happens (``shape_at``):

- ``bridge`` (default): the orchestrator shapes each host's ``eth0`` egress (uplink) and the
  bridge-side veth's egress (downlink). No ifb needed.
- ``host``: each host shapes itself, as a container does: the processes are started through
  ``python -m psrv.cluster.entrypoint`` with ``PSRV_RATE_UP``/``PSRV_RATE_DOWN``, which shapes
  ``eth0`` egress and (via ifb) ingress, and writes the counters to ``counters-<host>.json``.
  This is the docker-compose path, run without Docker.

Outputs in ``out_dir``: ``metrics.jsonl`` (the server's per-round metrics), ``summary.json`` (this
module's summary: the server's summary, final loss/accuracy, per-host message vs wire bytes, per-round
timing), ``server.log``, ``w<i>.log``, ``model.npy`` and, with ``capture``, ``capture.npz`` (every
frame) and ``wire-uploads.jsonl`` (every upload seen on the wire: worker, start, seconds, bytes).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from psrv.cluster import counters, shaping
from psrv.cluster.netns import ClusterError, Topology, interrupt_guard, require_root, set_offload
from psrv.cluster.shaping import LinkRates, format_rate

SERVER = "server"
SHAPE_AT = ("bridge", "host")
_ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds the psrv package


@dataclass(frozen=True)
class ClusterConfig:
    workers: int = 2
    rounds: int = 100
    algorithm: str = "gd"
    compressor: str = ""
    lr: float = 0.02
    options: Mapping[str, float] = field(default_factory=dict)
    task: str | None = None
    l2: float = 0.01
    task_options: Mapping[str, float] = field(default_factory=dict)
    round_timeout: float = 10.0
    seed: int = 0
    zstd: bool = False
    data: str = "mnist"
    split: str = "iid"
    test_fraction: float = 0.2
    rate: LinkRates = LinkRates()  # every worker's link unless worker_rates says otherwise
    worker_rates: Mapping[int, LinkRates] = field(default_factory=dict)
    server_rate: LinkRates = LinkRates()  # default: the server's link is not shaped
    qdisc: str = "tbf"
    shape_at: str = "bridge"
    offload: bool = True
    capture: bool = False
    port: int = 50051
    timeout: float = 600.0  # the whole run, seconds
    crash_after: Mapping[int, int] = field(default_factory=dict)  # worker index -> rounds (fault injection)
    server_args: tuple[str, ...] = ()  # more start-server options, verbatim

    def __post_init__(self) -> None:
        if self.workers < 1 or self.rounds < 0:
            raise ValueError("need workers >= 1 and rounds >= 0")
        if self.shape_at not in SHAPE_AT:
            raise ValueError(f"shape_at must be one of {', '.join(SHAPE_AT)}")
        if self.qdisc not in shaping.QDISCS:
            raise ValueError(f"qdisc must be one of {', '.join(shaping.QDISCS)}")
        bad = sorted(i for i in [*self.worker_rates, *self.crash_after] if not 0 <= i < self.workers)
        if bad:
            raise ValueError(f"worker index {bad[0]} out of range 0..{self.workers - 1}")

    def link(self, host: str) -> LinkRates:
        if host == SERVER:
            return self.server_rate
        return self.worker_rates.get(int(host[1:]), self.rate)


def _python() -> list[str]:
    return [sys.executable, "-m"]


def server_argv(cfg: ClusterConfig, host_ip: str, out: Path) -> list[str]:
    args = [
        "start-server",
        "--algorithm", cfg.algorithm,
        "--workers", str(cfg.workers),
        "--rounds", str(cfg.rounds),
        "--lr", repr(cfg.lr),
        "--l2", repr(cfg.l2),
        "--round-timeout", repr(cfg.round_timeout),
        "--seed", str(cfg.seed),
        "--host", host_ip,
        "--port", str(cfg.port),
        "--register-timeout", repr(min(300.0, cfg.timeout)),
        "--metrics", str(out / "metrics.jsonl"),
        "--summary-json", str(out / "server-summary.json"),
        "--model-out", str(out / "model.npy"),
    ]  # fmt: skip
    if cfg.compressor:
        args += ["--compressor", cfg.compressor]
    if cfg.task:
        args += ["--task", cfg.task]
    if cfg.zstd:
        args += ["--zstd"]
    for k, v in cfg.options.items():
        args += ["-o", f"{k}={v!r}"]
    for k, v in cfg.task_options.items():
        args += ["-t", f"{k}={v!r}"]
    return [*args, *cfg.server_args]


def worker_argv(cfg: ClusterConfig, index: int, server_address: str) -> list[str]:
    args = [
        "start-worker",
        "--server", server_address,
        "--worker-id", f"w{index}",
        "--data", cfg.data,
        "--shard", f"{index}/{cfg.workers}",
        "--split", cfg.split,
        "--test-fraction", repr(cfg.test_fraction),
        "--seed", str(cfg.seed),
        "--connect-timeout", repr(min(120.0, cfg.timeout)),
    ]  # fmt: skip
    if index in cfg.crash_after:
        args += ["--crash-after", str(cfg.crash_after[index])]
    return args


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cluster(cfg: ClusterConfig, out_dir: str | Path, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one job on a fresh shaped cluster; always removes the namespaces it made. Returns the summary."""
    require_root()
    say = echo or (lambda s: None)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "server-summary.json", "model.npy", "capture.npz", "wire-uploads.jsonl"):
        (out / stale).unlink(missing_ok=True)
    hosts = [SERVER, *(f"w{i}" for i in range(cfg.workers))]
    logs: list[Any] = []
    with interrupt_guard(), Topology(hosts) as topo:
        try:
            return _run(cfg, topo, out, logs, say)
        finally:
            problems = topo.down()
            for f in logs:
                f.close()
            if problems:
                say("cleanup problems: " + "; ".join(problems))


def _run(cfg: ClusterConfig, topo: Topology, out: Path, logs: list[Any], say: Callable[[str], None]) -> dict[str, Any]:
    server = topo.hosts[SERVER]
    say(f"cluster {topo.prefix}: {len(topo.hosts)} namespaces on a bridge in {topo.hub}")
    if not cfg.offload:
        for h in topo.hosts.values():
            set_offload(h.iface, False, h.netns)
            set_offload(h.peer, False, topo.hub)
    probes: dict[str, counters.Probe] = {}
    if cfg.shape_at == "bridge":
        for h in topo.hosts.values():
            rates = cfg.link(h.name)
            shaping.shape_egress(h.iface, rates.up, h.netns, cfg.qdisc)  # uplink
            shaping.shape_egress(h.peer, rates.down, topo.hub, cfg.qdisc)  # downlink, from the far end
            probes[h.name] = counters.Probe((h.iface, h.netns), (h.iface, h.netns), (h.peer, topo.hub))
        before = {name: p.read() for name, p in probes.items()}

    cap_proc = None
    if cfg.capture:
        cap_proc = topo.hub_popen(
            [*_python(), "psrv.cluster.counters", "capture", "--out", str(out / "capture.npz"),
             *(h.peer for h in topo.hosts.values())],
            stdout=subprocess.PIPE, text=True, env=_child_env(),
        )  # fmt: skip
        line = cap_proc.stdout.readline() if cap_proc.stdout else ""
        if "ready" not in line:
            raise ClusterError("frame capture did not start")

    def start(host: str, argv: list[str], log_name: str) -> Any:
        f = open(out / log_name, "w")
        logs.append(f)
        h = topo.hosts[host]
        env: dict[str, str] = {}
        if cfg.shape_at == "host":
            rates = cfg.link(host)
            env = {
                "PSRV_VERBOSE": "1",
                shaping.ENV_UP: format_rate(rates.up),
                shaping.ENV_DOWN: format_rate(rates.down),
                shaping.ENV_IFACE: h.iface,
                shaping.ENV_QDISC: cfg.qdisc,
                "PSRV_COUNTERS": str(out / f"counters-{host}.json"),
            }
            role = "server" if host == SERVER else "worker"
            argv = [*_python(), "psrv.cluster.entrypoint", role, *argv[1:]]
        else:
            argv = [*_python(), "psrv", "-v", *argv]  # -v: registration is logged (see _wait)
        f.write("$ " + " ".join(argv) + "\n")
        f.flush()
        return topo.popen(host, argv, stdout=f, stderr=f.fileno(), env=_child_env(env))

    started = time.monotonic()
    srv = start(SERVER, server_argv(cfg, server.ip, out), "server.log")
    address = f"{server.ip}:{cfg.port}"
    workers = [start(f"w{i}", worker_argv(cfg, i, address), f"w{i}.log") for i in range(cfg.workers)]
    say(f"server at {address}; {cfg.workers} workers started; {cfg.algorithm}, {cfg.rounds} rounds")
    _wait(cfg, srv, workers, started, out)
    wall = time.monotonic() - started
    if cap_proc is not None:
        cap_proc.terminate()
        cap_proc.wait(timeout=30)

    server_log = (out / "server.log").read_text(errors="replace")
    if srv.returncode != 0:
        raise ClusterError(f"server exited with {srv.returncode}:\n{_tail(server_log)}")
    summary: dict[str, Any] = json.loads((out / "server-summary.json").read_text())
    summary.update(_evaluate(cfg, out))

    host_rows = []
    worker_results = [_last_json((out / f"w{i}.log").read_text(errors="replace")) for i in range(cfg.workers)]
    cap = counters.load_capture(str(out / "capture.npz")) if cap_proc is not None else None
    for name, h in topo.hosts.items():
        rates = cfg.link(name)
        row: dict[str, Any] = {
            "host": name,
            "ip": h.ip,
            "rate_up": rates.up,
            "rate_down": rates.down,
        }
        if name == SERVER:
            row["exit_code"] = srv.returncode
            row["message_bytes_sent"], row["message_bytes_received"] = summary["bytes_down"], summary["bytes_up"]
        else:
            i = int(name[1:])
            res = worker_results[i]
            row["exit_code"] = workers[i].returncode
            row["message_bytes_sent"] = res.get("bytes_up") if res else None
            row["message_bytes_received"] = res.get("bytes_down") if res else None
        if cfg.shape_at == "bridge":
            d = counters.delta(probes[name].read(), before[name])
        else:
            d = _entrypoint_counters(out / f"counters-{name}.json")
        for key, count in d.items():
            for field_, value in count.items():
                row[f"{key}_{field_}"] = value
        if cap is not None:
            row.update({f"capture_{k}": v for k, v in counters.capture_totals(cap, h.peer).items()})
        host_rows.append(row)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = {
        "algorithm": cfg.algorithm,
        "workers": cfg.workers,
        "rounds": cfg.rounds,
        "shape_at": cfg.shape_at,
        "qdisc": cfg.qdisc,
        "offload": cfg.offload,
        "rate": cfg.rate.describe(),
        "server_rate": cfg.server_rate.describe(),
        "worker_rates": {f"w{i}": cfg.link(f"w{i}").describe() for i in range(cfg.workers)},
        "wall_time": wall,
        "server": summary,
        "worker_exit_codes": [p.returncode for p in workers],
        "hosts": host_rows,
        "totals": _totals(summary, host_rows),
        "timing": _timing(records, cap, cfg, topo, out),
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def _wait(cfg: ClusterConfig, srv: Any, workers: Sequence[Any], started: float, out: Path) -> None:
    """Until the server exits. A worker that dies before registering fails the run at once (the
    server would wait for it until its registration timeout). If every worker is gone, the server
    gets a grace period (it may still be closing rounds by deadline) and is then stopped. Enforces
    ``cfg.timeout``."""
    all_gone_at = None
    grace = 3 * cfg.round_timeout + 10
    checked: set[int] = set()
    while srv.poll() is None:
        now = time.monotonic()
        if now - started > cfg.timeout:
            raise ClusterError(f"the run did not finish within --timeout {cfg.timeout:g} s")
        for i, p in enumerate(workers):
            if i not in checked and p.poll() is not None:
                checked.add(i)
                log = (out / f"w{i}.log").read_text(errors="replace")
                if p.returncode != 0 and "registered as" not in log:
                    raise ClusterError(f"worker w{i} exited with {p.returncode} before registering:\n{_tail(log)}")
        if len(checked) == len(workers):
            all_gone_at = all_gone_at or now
            if now - all_gone_at > grace:
                srv.terminate()  # the server turns SIGTERM into a failed run and exits
                srv.wait(timeout=15)
                break
        time.sleep(0.1)
    if srv.returncode != 0:
        return  # the caller reports the server's failure; Topology.down() stops the workers
    deadline = time.monotonic() + 20
    for p in workers:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # a worker that hangs is killed by Topology.down()
            p.kill()
            p.wait(timeout=5)


def _evaluate(cfg: ClusterConfig, out: Path) -> dict[str, Any]:
    from psrv.runner import DataConfig, evaluate

    model = out / "model.npy"
    if not model.exists():
        return {}
    dc = DataConfig(cfg.data, cfg.split, cfg.test_fraction, cfg.seed)
    return evaluate(cfg.task or "logreg", {"l2": cfg.l2, **cfg.task_options}, np.load(model), dc)


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
    return None


def _tail(text: str, n: int = 20) -> str:
    return "\n".join(text.splitlines()[-n:])


def _entrypoint_counters(path: Path) -> dict[str, dict[str, int]]:
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get("delta", {})


def _sum(rows: Sequence[Mapping[str, Any]], key: str) -> int | None:
    values = [r.get(key) for r in rows]
    return None if any(v is None for v in values) else int(sum(values))


def _totals(summary: Mapping[str, Any], hosts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Message bytes (psrv's serialized protobuf, every RPC) next to wire bytes (frames that left a host,
    each counted once: on the host it left)."""
    workers = [h for h in hosts if h["host"] != SERVER]
    server = next(h for h in hosts if h["host"] == SERVER)
    msg_up, msg_down = int(summary["bytes_up"]), int(summary["bytes_down"])
    wire_up, wire_down = _sum(workers, "wire_tx_bytes"), server.get("wire_tx_bytes")
    out: dict[str, Any] = {
        "message_bytes": msg_up + msg_down,
        "message_bytes_up": msg_up,
        "message_bytes_down": msg_down,
        "wire_bytes_up": wire_up,
        "wire_bytes_down": wire_down,
        "wire_packets": _sum(hosts, "wire_tx_packets"),
        "iface_bytes": _sum(hosts, "iface_tx_bytes"),
        "iface_packets": _sum(hosts, "iface_tx_packets"),
        "capture_bytes": _sum(hosts, "capture_tx_bytes") if "capture_tx_bytes" in server else None,
    }
    out["wire_bytes"] = None if wire_up is None or wire_down is None else wire_up + wire_down
    out["wire_over_message"] = out["wire_bytes"] / out["message_bytes"] if out["wire_bytes"] else None
    return out


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _timing(
    records: Sequence[Mapping[str, Any]],
    cap: dict[str, np.ndarray] | None,
    cfg: ClusterConfig,
    topo: Topology,
    out_dir: Path,
) -> dict[str, Any]:
    """Per-round timing from the server's metrics, and per-upload wire time from the capture.

    Round 0 includes every worker's warm-up (first gradient, lazy imports) and is reported apart;
    the means and medians are over rounds 1.. ("steady"). ``slowest_wait`` is the server's: the
    latency of the last report of the round. ``straggler_wait`` is how much longer the round waited
    for its slowest report than for its fastest one."""
    steady = list(records[1:]) or list(records)
    rt = [r["round_time"] for r in steady]
    slow = [r["slowest_wait"] for r in steady if r.get("slowest_wait") is not None]
    spread = []
    for r in steady:
        lat = [w["latency"] for w in r["workers"] if w.get("latency") is not None]
        if lat:
            spread.append(max(lat) - min(lat))
    out: dict[str, Any] = {
        "first_round_time": records[0]["round_time"] if records else None,
        "round_time_mean": statistics.fmean(rt) if rt else None,
        "round_time_median": _median(rt),
        "slowest_wait_mean": statistics.fmean(slow) if slow else None,
        "straggler_wait_mean": statistics.fmean(spread) if spread else None,
        "worker_latency_median": [],
    }
    for i in range(cfg.workers):
        lat = [r["workers"][i]["latency"] for r in steady if r["workers"][i].get("latency") is not None]
        out["worker_latency_median"].append(_median(lat))
    if cap is not None:
        names = list(cap["ifaces"])
        uploads = []
        for i in range(cfg.workers):
            h = topo.hosts[f"w{i}"]
            sel = (cap["iface"] == names.index(h.peer)) & (cap["outgoing"] == 0)
            up_msgs = [w["bytes"] for r in records for w in r["workers"][i : i + 1] if w["status"] == "upload"]
            big = int(0.5 * _median(up_msgs)) if up_msgs else 1 << 62
            bursts = counters.upload_bursts(
                cap["t"][sel], cap["payload"][sel], cap["length"][sel], cfg.link(h.name).up, min_bytes=big
            )
            with open(out_dir / "wire-uploads.jsonl", "a" if i else "w") as f:  # every upload seen on the wire
                for b in bursts:
                    f.write(json.dumps({"worker": i, **b}) + "\n")
            uploads.append(
                {
                    "uploads_seen": len(bursts),
                    "upload_seconds_median": _median([b["seconds"] for b in bursts]),
                    "upload_wire_bytes_median": _median([b["wire_bytes"] for b in bursts]),
                    "upload_message_bytes_median": _median(up_msgs),
                }
            )
        out["uploads"] = uploads
    return out


def with_algorithm(cfg: ClusterConfig, algorithm: str, rounds: int | None = None) -> ClusterConfig:
    return replace(cfg, algorithm=algorithm, rounds=cfg.rounds if rounds is None else rounds)

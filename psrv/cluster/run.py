"""``psrv cluster run``: a server and M workers, each in its own network namespace with a shaped link.

Steps: build the namespaces (:mod:`psrv.cluster.netns`), shape every host's uplink and downlink
(:mod:`psrv.cluster.shaping`), start ``python -m psrv start-server`` and ``python -m psrv
start-worker`` inside them -- the commands a user runs on real hosts -- wait, read the counters
(:mod:`psrv.cluster.counters`) and the frame capture (:mod:`psrv.cluster.capture`), and tear
everything down, also on failure or Ctrl-C. The figures are :mod:`psrv.cluster.analysis`'s; the
files in the run folder are listed in :mod:`psrv.cluster.outputs`.

Where the shaping happens (``shape_at``):

- ``bridge`` (default): the orchestrator shapes each host's ``eth0`` egress (uplink) and the
  bridge-side veth's egress (downlink). No ifb needed.
- ``host``: each host shapes itself, as a container does: the processes are started through
  ``python -m psrv.cluster.entrypoint`` with ``PSRV_RATE_UP``/``PSRV_RATE_DOWN``, which shapes
  ``eth0`` egress and (via ifb) ingress, and writes the counters to ``counters-<host>.json``.
  This is the docker-compose path, run without Docker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from psrv import certs
from psrv.cluster import analysis, counters, outputs, shaping
from psrv.cluster.capture import load_capture
from psrv.cluster.config import SERVER, ClusterConfig
from psrv.cluster.netns import ClusterError, Topology, interrupt_guard, require_root, set_offload
from psrv.cluster.shaping import format_rate
from psrv.options import device_argv, worker_id, worker_ids

_ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds the psrv package


def _python() -> list[str]:
    return [sys.executable, "-m"]


def server_argv(cfg: ClusterConfig, host_ip: str, out: Path) -> list[str]:
    """``start-server`` and its arguments (the job's options, built in :mod:`psrv.options`)."""
    return [
        "start-server",
        *cfg.job.argv(),
        "--host", host_ip,
        "--port", str(cfg.port),
        "--register-timeout", repr(min(300.0, cfg.timeout)),
        "--metrics", str(out / outputs.METRICS),
        "--summary-json", str(out / outputs.SERVER_SUMMARY),
        "--model-out", str(out / outputs.MODEL),
        "--data", cfg.data.data, *(["--regression"] if cfg.data.regression else []),  # the server owns the shape
        "--worker-ids", ",".join(worker_ids(cfg.workers)),
        *cfg.server_args,
    ]  # fmt: skip


def worker_argv(cfg: ClusterConfig, index: int, server_address: str, host_ip: str | None = None) -> list[str]:
    """``start-worker`` and its arguments (the data's options, built in :mod:`psrv.options`); a dsgd
    worker also serves its neighbours on ``host_ip`` (its namespace's address), port ``cfg.port``."""
    args = [
        "start-worker",
        "--server", server_address,
        "--worker-id", worker_id(index),
        "--shard", f"{index}/{cfg.workers}",
        *cfg.data.argv(),
        *device_argv(cfg.device),
        "--connect-timeout", repr(min(120.0, cfg.timeout)),
    ]  # fmt: skip
    if index in cfg.crash_after:
        args += ["--crash-after", str(cfg.crash_after[index])]
    if cfg.job.algorithm == "dsgd" and host_ip is not None:
        args += ["--gossip-listen", f"{host_ip}:{cfg.port}"]
    return args


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a process started in a namespace: this psrv first on the path, unbuffered."""
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
    outputs.clear_stale(out)
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
    probes = _shape(cfg, topo)
    before = {name: p.read() for name, p in probes.items()}
    cap_proc = _start_capture(topo, out) if cfg.capture else None

    started = time.monotonic()
    ids = worker_ids(cfg.workers)
    pki = certs.make_test_pki(out / "tls", ids, hosts=[server.ip]) if cfg.tls else None
    srv_argv = [*server_argv(cfg, server.ip, out), *(pki.server_argv() if pki else ())]
    srv = _launch(cfg, topo, SERVER, srv_argv, out, logs)
    address = f"{server.ip}:{cfg.port}"
    workers = [
        _launch(
            cfg,
            topo,
            w,
            [*worker_argv(cfg, i, address, topo.hosts[w].ip), *(pki.worker_argv(w) if pki else ())],
            out,
            logs,
        )  # fmt: skip
        for i, w in enumerate(ids)
    ]
    say(f"server at {address}; {cfg.workers} workers started; {cfg.algorithm}, {cfg.rounds} rounds")
    _wait(cfg, srv, workers, started, out)
    wall = time.monotonic() - started
    if cap_proc is not None:
        cap_proc.terminate()
        cap_proc.wait(timeout=30)

    if srv.returncode != 0:
        raise ClusterError(f"server exited with {srv.returncode}:\n{outputs.tail(outputs.read_log(out, SERVER))}")
    after = {name: p.read() for name, p in probes.items()}
    counts = {name: counters.delta(after[name], before[name]) for name in probes}
    cap = load_capture(str(out / outputs.CAPTURE)) if cap_proc is not None else None
    return _summarize(cfg, topo, out, srv.returncode, [p.returncode for p in workers], counts, cap, wall)


def _shape(cfg: ClusterConfig, topo: Topology) -> dict[str, counters.Probe]:
    """Offload off if asked; with ``shape_at="bridge"`` shape every link from outside and return
    where each host's traffic is counted (``host``: each host shapes and counts itself)."""
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
    return probes


def _start_capture(topo: Topology, out: Path) -> subprocess.Popen[str]:
    """The frame capture on the bridge side of every veth, in the hub namespace; returns once it listens."""
    peers = [h.peer for h in topo.hosts.values()]
    argv = [*_python(), "psrv.cluster.capture", "--out", str(out / outputs.CAPTURE), *peers]
    proc = topo.hub_popen(argv, stdout=subprocess.PIPE, text=True, env=child_env())
    line = proc.stdout.readline() if proc.stdout else ""
    if "ready" not in line:
        raise ClusterError("frame capture did not start")
    return proc


def _launch(cfg: ClusterConfig, topo: Topology, host: str, argv: list[str], out: Path, logs: list[Any]) -> Any:
    """Start one psrv process in ``host``'s namespace, its output in ``<host>.log``."""
    f = open(out / outputs.log_name(host), "w")
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
            "PSRV_COUNTERS": str(outputs.counters_path(out, host)),
        }
        role = "server" if host == SERVER else "worker"
        argv = [*_python(), "psrv.cluster.entrypoint", role, *argv[1:]]
    else:
        argv = [*_python(), "psrv", "-v", *argv]  # -v: registration is logged (see _wait)
    f.write("$ " + " ".join(argv) + "\n")
    f.flush()
    return topo.popen(host, argv, stdout=f, stderr=f.fileno(), env=child_env(env))


def _wait(cfg: ClusterConfig, srv: Any, workers: Sequence[Any], started: float, out: Path) -> None:
    """Until the server exits. A worker that dies before registering fails the run at once (the
    server would wait for it until its registration timeout). If every worker is gone, the server
    gets a grace period (it may still be closing rounds by deadline) and is then stopped. Enforces
    ``cfg.timeout``."""
    all_gone_at = None
    grace = 3 * cfg.job.round_timeout + 10
    checked: set[int] = set()
    while srv.poll() is None:
        now = time.monotonic()
        if now - started > cfg.timeout:
            raise ClusterError(f"the run did not finish within --timeout {cfg.timeout:g} s")
        for i, p in enumerate(workers):
            if i not in checked and p.poll() is not None:
                checked.add(i)
                log = outputs.read_log(out, f"w{i}")
                if p.returncode != 0 and "registered as" not in log:
                    raise ClusterError(
                        f"worker w{i} exited with {p.returncode} before registering:\n{outputs.tail(log)}"
                    )
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
    from psrv.runner import evaluate

    model = out / outputs.MODEL
    if not model.exists():
        return {}
    return evaluate(cfg.job.task, cfg.job.all_task_options(), np.load(model), cfg.data)


def _summarize(
    cfg: ClusterConfig,
    topo: Topology,
    out: Path,
    server_exit: int,
    worker_exits: list[int],
    counts: Mapping[str, dict[str, dict[str, int]]],
    cap: analysis.Capture | None,
    wall: float,
) -> dict[str, Any]:
    """The run's summary from what it left in ``out``; also written to ``summary.json`` (and, with a
    capture, every upload seen on the wire to ``wire-uploads.jsonl``)."""
    summary = outputs.server_summary(out)
    summary.update(_evaluate(cfg, out))
    host_rows = []
    for name, h in topo.hosts.items():
        if name == SERVER:
            # a dsgd coordinator's own bytes (its summary's bytes_up/down are the workers' gossip and all)
            sent = summary.get("coordinator_bytes_down", summary["bytes_down"])
            exit_code, received = server_exit, summary.get("coordinator_bytes_up", summary["bytes_up"])
        else:
            res = outputs.worker_result(out, int(name[1:]))
            exit_code = worker_exits[int(name[1:])]
            sent, received = (res.get("bytes_up"), res.get("bytes_down")) if res else (None, None)
        count = counts[name] if cfg.shape_at == "bridge" else outputs.entrypoint_counters(out, name)
        captured = analysis.capture_totals(cap, h.peer) if cap is not None else None
        host_rows.append(analysis.host_row(name, h.ip, cfg.link(name), exit_code, sent, received, count, captured))

    records = outputs.metrics(out)
    timing = analysis.round_timing(records, cfg.workers)
    if cap is not None:
        uplinks = [(topo.hosts[f"w{i}"].peer, cfg.link(f"w{i}").up) for i in range(cfg.workers)]
        timing["uploads"], bursts = analysis.upload_timing(records, cap, uplinks)
        outputs.write_wire_uploads(out, bursts)
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
        "worker_exit_codes": worker_exits,
        "hosts": host_rows,
        "totals": analysis.totals(summary, host_rows),
        "timing": timing,
    }
    outputs.write_summary(out, result)
    return result

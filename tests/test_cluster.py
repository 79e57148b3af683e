"""The shaped namespace cluster (psrv.cluster): rates, tc commands, frame accounting, the CLI, and --
as root -- real runs of 1 server + 2 workers in network namespaces that must finish and leave no
namespace behind, also when a worker crashes or the run is interrupted.

The root tests skip (with the reason) when not root or when ``ip netns`` does not work here."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from psrv.cluster import analysis, capture, entrypoint, netns, outputs, shaping
from psrv.cluster.cli import cluster
from psrv.cluster.config import ClusterConfig
from psrv.cluster.run import server_argv, worker_argv
from psrv.cluster.shaping import LinkRates, parse_link, parse_rate
from psrv.options import DataConfig, JobConfig
from psrv.report import format_report

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ no root
def test_parse_rate() -> None:
    assert parse_rate("10mbit") == 10_000_000
    assert parse_rate("1Mbit") == 1_000_000
    assert parse_rate("500kbit") == 500_000
    assert parse_rate("1gbit") == 1_000_000_000
    assert parse_rate("2mbps") == 16_000_000  # tc: bps is bytes per second
    assert parse_rate("2.5mbit") == 2_500_000
    for off in ("none", "", "0", "off", None):
        assert parse_rate(off) is None
    for bad in ("fast", "10 furlongs", "-1mbit", "1bit"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    assert parse_link("1mbit/10mbit") == LinkRates(1_000_000, 10_000_000)
    assert parse_link("5mbit") == LinkRates(5_000_000, 5_000_000)
    assert parse_link("none") == LinkRates(None, None)
    assert shaping.format_rate(10_000_000) == "10mbit" and shaping.format_rate(None) == "none"


def test_egress_commands() -> None:
    (tbf,) = shaping.egress_commands("eth0", 10_000_000, "tbf")
    assert tbf[:6] == ["qdisc", "replace", "dev", "eth0", "root", "tbf"]
    burst, limit = int(tbf[tbf.index("burst") + 1]), int(tbf[tbf.index("limit") + 1])
    assert burst >= 2 * 1514 and limit >= 64 * 1024  # two frames at least; 100 ms of queue at least
    htb = shaping.egress_commands("eth0", 1_000_000, "htb")
    assert [c[2] for c in htb] == ["dev"] * 3 and "1mbit" not in " ".join(htb[1]) and "1000000bit" in htb[1]
    assert shaping.egress_commands("eth0", None) == [
        ["qdisc", "replace", "dev", "eth0", "root", "pfifo", "limit", "10000"]
    ]
    with pytest.raises(ValueError):
        shaping.egress_commands("eth0", 1_000_000, "netem")


def _tcp_frame(payload: int, total: int | None = None) -> tuple[bytes, int]:
    eth = b"\xaa" * 12 + b"\x08\x00"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 32 + payload, 0, 0, 64, 6, 0, b"\x0a" * 4, b"\x0b" * 4)
    tcp = b"\0" * 12 + bytes([8 << 4]) + b"\0" * 19  # data offset 8 words = 32 bytes
    return eth + ip + tcp, 14 + 20 + 32 + payload if total is None else total


def test_parse_frame_counts_super_packets_as_frames() -> None:
    head, n = _tcp_frame(1448)
    assert capture.parse_frame(head, n) == (1514, 1, 1448)
    head, n = _tcp_frame(0)
    assert capture.parse_frame(head, n) == (66, 1, 0)  # a pure ACK
    head, n = _tcp_frame(10 * 1448 + 100)  # a GSO super-packet: 11 frames on a wire
    assert capture.parse_frame(head, n) == (10 * 1448 + 100 + 11 * 66, 11, 10 * 1448 + 100)
    arp = b"\xff" * 12 + b"\x08\x06" + b"\0" * 28
    assert capture.parse_frame(arp, 42) == (42, 1, -1)


def test_upload_bursts_time_the_upload_and_drop_the_next_request() -> None:
    rate = 10_000_000
    frame_s = 1514 * 8 / rate
    t, payload, wire = [], [], []
    for start in (0.0, 0.100):  # two uploads of 22 full frames, 100 ms apart
        for i in range(22):
            t.append(start + i * frame_s)
            payload.append(1448)
            wire.append(1514)
        t.append(start + 21 * frame_s + 0.0004)  # an ACK in between: no payload, ignored
        payload.append(0)
        wire.append(66)
        t.append(start + 21 * frame_s + 0.003)  # the next model request, 3 ms after the last frame
        payload.append(150)
        wire.append(216)
    bursts = analysis.upload_bursts(np.array(t), np.array(payload), np.array(wire), rate, min_bytes=10_000)
    assert len(bursts) == 2
    for b in bursts:
        assert b["frames"] == 22 and b["wire_bytes"] == 22 * 1514
        assert b["seconds"] == pytest.approx(22 * frame_s, rel=1e-6)
    assert analysis.upload_bursts(np.array([]), np.array([]), np.array([]), rate) == []


def _round(time: float, lat: list[float | None], nbytes: list[int], slowest: float | None = None) -> dict[str, Any]:
    workers = [
        {"latency": x, "status": "upload" if x is not None else "skip", "bytes": n}
        for x, n in zip(lat, nbytes, strict=True)
    ]
    return {"round_time": time, "slowest_wait": slowest, "workers": workers}


def test_round_timing_reports_round_0_apart() -> None:
    records = [
        _round(2.0, [1.9, 1.0], [100, 100], 1.9),  # warm-up
        _round(0.1, [0.08, 0.02], [100, 100], 0.08),
        _round(0.2, [None, 0.04], [0, 100]),  # w0 skipped; no slowest report
        _round(0.3, [0.12, 0.06], [100, 100], 0.12),
    ]
    t = analysis.round_timing(records, workers=2)
    assert t["first_round_time"] == 2.0
    assert t["round_time_mean"] == pytest.approx(0.2) and t["round_time_median"] == pytest.approx(0.2)
    assert t["slowest_wait_mean"] == pytest.approx(0.1)
    assert t["straggler_wait_mean"] == pytest.approx((0.06 + 0.0 + 0.06) / 3)
    assert t["worker_latency_median"] == pytest.approx([0.10, 0.04])
    only = analysis.round_timing(records[:1], workers=2)  # one round: it is all there is
    assert only["round_time_mean"] == 2.0 and only["worker_latency_median"] == [1.9, 1.0]
    none = analysis.round_timing([], workers=2)
    assert none["first_round_time"] is None and none["worker_latency_median"] == [None, None]


def test_upload_timing_per_worker_from_the_capture() -> None:
    rate = 10_000_000
    frame_s = 1514 * 8 / rate
    rows = []  # (t, iface, outgoing, length, frames, payload); ifaces: 0 = server, 1 = w0, 2 = w1
    for start in (0.0, 0.1):
        rows += [(start + i * frame_s, 1, 0, 1514, 1, 1448) for i in range(22)]  # w0's upload
        rows.append((start + 21 * frame_s + 0.003, 1, 0, 216, 1, 150))  # w0's next model request
        rows += [(start + 0.03 + i * frame_s, 1, 1, 1514, 1, 1448) for i in range(30)]  # the model, to w0
        rows += [(start + 0.05 + i * 1e-5, 2, 0, 1514, 1, 1448) for i in range(10)]  # w1's, unshaped
    arr = np.array(rows, dtype=np.float64)
    cap = {f: arr[:, j] for j, f in enumerate(capture.CAPTURE_FIELDS)}
    cap["ifaces"] = np.array(["vs", "v0", "v1"])
    records = [_round(0.1, [0.05, 0.05], [22 * 1448, 10 * 1448]) for _ in range(2)]
    figures, bursts = analysis.upload_timing(records, cap, [("v0", rate), ("v1", None)])
    assert [f["uploads_seen"] for f in figures] == [2, 2] and [len(b) for b in bursts] == [2, 2]
    assert [b["start"] for b in bursts[0]] == [0.0, 0.1]
    w0, w1 = figures
    assert w0["upload_seconds_median"] == pytest.approx(22 * frame_s)
    assert w0["upload_wire_bytes_median"] == 22 * 1514 and w0["upload_message_bytes_median"] == 22 * 1448
    assert w1["upload_seconds_median"] == pytest.approx(9e-5) and w1["upload_wire_bytes_median"] == 10 * 1514
    assert analysis.capture_totals(cap, "v0") == {
        "tx_bytes": 2 * (22 * 1514 + 216),
        "tx_packets": 2 * 23,
        "rx_bytes": 2 * 30 * 1514,
        "rx_packets": 60,
    }
    assert analysis.capture_totals(cap, "elsewhere") == {}


def _rows(worker_counts: dict[str, dict[str, int]] | None = None, captured: bool = True) -> list[dict[str, Any]]:
    def counts(tx: int) -> dict[str, dict[str, int]]:
        return {"wire_tx": {"bytes": tx, "packets": tx // 1000, "drops": 0}, "iface_tx": {"bytes": tx, "packets": 1}}

    cap = {"tx_bytes": 1, "tx_packets": 1, "rx_bytes": 1, "rx_packets": 1} if captured else None
    return [
        analysis.host_row("server", "10.0.0.1", LinkRates(None, None), 0, 400, 3000, counts(600), cap),
        analysis.host_row("w0", "10.0.0.2", LinkRates(10_000_000, 10_000_000), 0, 1500, 200, counts(1700), cap),
        analysis.host_row(
            "w1",
            "10.0.0.3",
            LinkRates(1_000_000, None),
            17,
            None,
            None,
            counts(1900) if worker_counts is None else worker_counts,
            cap,
        ),
    ]


def test_host_rows_and_totals_put_message_next_to_wire_bytes() -> None:
    rows = _rows()
    assert rows[1]["wire_tx_bytes"] == 1700 and rows[1]["iface_tx_packets"] == 1 and rows[1]["capture_rx_bytes"] == 1
    assert rows[2]["exit_code"] == 17 and rows[2]["message_bytes_sent"] is None and rows[2]["rate_down"] is None
    t = analysis.totals({"bytes_up": 3000, "bytes_down": 400}, rows)
    assert (t["message_bytes"], t["message_bytes_up"], t["message_bytes_down"]) == (3400, 3000, 400)
    assert (t["wire_bytes_up"], t["wire_bytes_down"], t["wire_bytes"]) == (3600, 600, 4200)
    assert t["wire_over_message"] == pytest.approx(4200 / 3400) and t["capture_bytes"] == 3
    assert t["wire_packets"] == 0 + 1 + 1 and t["iface_bytes"] == 4200 and t["iface_packets"] == 3
    # a host without wire counters (its counters file missing): no wire total, no ratio
    t = analysis.totals({"bytes_up": 3000, "bytes_down": 400}, _rows(worker_counts={}, captured=False))
    assert t["wire_bytes_up"] is None and t["wire_bytes"] is None and t["wire_over_message"] is None
    assert t["capture_bytes"] is None


def test_format_report_table_and_lines() -> None:
    rows = _rows()
    timing = analysis.round_timing([_round(2.0, [1.0, 1.5], [9, 9], 1.5), _round(0.1, [0.05, None], [9, 0], 0.05)], 2)
    timing["uploads"] = [
        {"uploads_seen": 3, "upload_seconds_median": 0.0125, "upload_wire_bytes_median": 1514,
         "upload_message_bytes_median": 1448},
        {"uploads_seen": 0, "upload_seconds_median": None, "upload_wire_bytes_median": None,
         "upload_message_bytes_median": None},
    ]  # fmt: skip
    server = {"rounds": 2, "final_loss": 0.25, "accuracy": None, "bytes_up": 3000, "bytes_down": 400}
    result = {"algorithm": "gd", "wall_time": 3.21, "hosts": rows, "server": server, "timing": timing}
    result["totals"] = analysis.totals(server, rows)
    lines = format_report(result).splitlines()
    assert lines[0].split() == ["host", "ip", "up", "down", "exit", "msg", "sent", "wire", "tx", "pkts", "tx", "iface",
                                "tx", "msg", "recv", "wire", "rx", "pkts", "rx"]  # fmt: skip
    assert set(lines[1]) == {"-", " "}
    assert lines[4].split()[:8] == ["w1", "10.0.0.3", "1mbit", "none", "17", "-", "1,900", "1"]
    assert "gd: 2 rounds in 3.2 s; final loss 0.250000, accuracy -" in lines
    assert "wire bytes 4,200 (up 3,600, down 600); wire/message 1.2353" in lines[7]
    assert lines[8].startswith("per round (after round 0, which took 2000.0 ms): wall 100.0 ms mean")
    assert "worker latency medians (ms): 50.0, -" in lines[8]
    assert lines[9] == "w0 uploads on the wire: 3 seen, median 12.50 ms for 1,514 wire bytes (1,448 message bytes)"
    assert lines[10] == "w1 uploads on the wire: 0 seen, median - ms for - wire bytes (- message bytes)"


def test_outputs_read_back_and_write(tmp_path: Path) -> None:
    for name in [*outputs.STALE, outputs.SUMMARY]:
        (tmp_path / name).write_text("old")
    outputs.clear_stale(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [outputs.SUMMARY]  # only what this run writes anyway
    (tmp_path / "w1.log").write_text(
        '$ psrv start-worker\n{"bytes_up": 1}\nregistered\n{"bytes_up": 5, "bytes_down": 7}\nbye\n'
    )
    assert outputs.worker_result(tmp_path, 1) == {"bytes_up": 5, "bytes_down": 7}
    assert outputs.last_json("{not json\n") is None
    assert outputs.entrypoint_counters(tmp_path, "w1") == {}
    outputs.counters_path(tmp_path, "w1").write_text(json.dumps({"delta": {"wire_tx": {"bytes": 3}}}))
    assert outputs.entrypoint_counters(tmp_path, "w1") == {"wire_tx": {"bytes": 3}}
    outputs.write_wire_uploads(tmp_path, [[{"start": 1.0}, {"start": 2.0}], [], [{"start": 3.0}]])
    lines = [json.loads(x) for x in (tmp_path / outputs.WIRE_UPLOADS).read_text().splitlines()]
    assert lines == [{"worker": 0, "start": 1.0}, {"worker": 0, "start": 2.0}, {"worker": 2, "start": 3.0}]


def test_config_validation_and_commands_exist_in_the_cli() -> None:
    from psrv.cli import main

    with pytest.raises(ValueError):
        ClusterConfig(job=JobConfig(workers=2), worker_rates={2: LinkRates(1_000_000, None)})
    with pytest.raises(ValueError):
        ClusterConfig(job=JobConfig(workers=2), crash_after={-1: 3})
    job = JobConfig(workers=2, options={"bits": 4.0}, task_options={"hidden": 10.0}, zstd=True, compressor="topk")
    cfg = ClusterConfig(job=job, data=DataConfig(split="contiguous", regression=True))
    for argv in (server_argv(cfg, "10.0.0.1", Path("/tmp/x")), worker_argv(cfg, 1, "10.0.0.1:50051")):
        cmd = main.commands[argv[0]]
        cmd.make_context(argv[0], argv[1:])  # every option exists and every value parses


def test_cli_rejects_bad_options_before_touching_anything() -> None:
    runner = CliRunner()
    r = runner.invoke(cluster, ["run", "--worker-rate", "x=1mbit"])
    assert r.exit_code == 2 and "I=RATE" in r.output
    r = runner.invoke(cluster, ["run", "--rate", "fast"])
    assert r.exit_code == 2 and "bad rate" in r.output
    r = runner.invoke(cluster, ["run", "--algorithm", "nope"])
    assert r.exit_code == 2 and "unknown algorithm" in r.output


def test_says_root_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    r = CliRunner().invoke(cluster, ["run", "--workers", "2"])
    assert r.exit_code == 1 and "needs root" in r.output
    r = CliRunner().invoke(cluster, ["clean"])
    assert r.exit_code == 1 and "needs root" in r.output


def test_entrypoint_builds_the_psrv_command() -> None:
    assert entrypoint.command("server", ["--port", "1"])[1:] == ["-m", "psrv", "start-server", "--port", "1"]
    assert entrypoint.command("worker", [])[3] == "start-worker"
    with pytest.raises(SystemExit):
        entrypoint.command("client", [])
    assert shaping.rates_from_env({"PSRV_RATE_UP": "1mbit"}) == LinkRates(1_000_000, None)
    with pytest.raises(shaping.ShapingError):
        shaping.rates_from_env({"PSRV_RATE_DOWN": "lots"})
    assert entrypoint.main(["--help"]) == 0


def _measure_script() -> Any:
    """scripts/cluster_measure.py, imported from its file (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("cluster_measure", ROOT / "scripts" / "cluster_measure.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_script_analysis() -> None:
    """The measurement script's pure parts: the round and time at which a loss is first reached."""
    m = _measure_script()
    records = [{"round": i, "loss": 1.0 / (i + 1), "elapsed": 1.0 + 0.5 * i} for i in range(6)]
    assert m.time_to_loss(records, 0.25) == (3, 1.5)  # seconds from the end of round 0
    assert m.time_to_loss(records, 0.01) == (None, None)


# ------------------------------------------------------------------------------------------ root
def _netns_works() -> str | None:
    if os.geteuid() != 0:
        return "needs root (creates network namespaces)"
    probe = f"psrv-{os.getpid()}-0000-probe"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns` unusable: {exc}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    return None


_SKIP = _netns_works()
needs_netns = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


def _ours(pids: set[int]) -> list[str]:
    return [ns for ns in netns.list_netns() if any(ns.startswith(f"psrv-{p}-") for p in pids)]


@pytest.fixture
def owned_pids():
    """Pids whose namespaces this test may create; whatever is left of them is removed in finally."""
    pids = {os.getpid()}
    try:
        yield pids
    finally:
        netns.remove_namespaces(_ours(pids))


@pytest.mark.root
@pytest.mark.slow
@needs_netns
def test_which_counter_is_right(owned_pids: set[int]) -> None:
    """qdisc "Sent" counts the frames TCP sent, offload on or off; interface counters undercount
    with offload on (super-packets), and agree once it is off."""
    rows = _measure_script().calibrate_counters(None, 400_000, settings=[(True, False), (False, False)], capture=False)
    on, off = rows
    for r in rows:
        assert r["bytes"] == 400_000
        # handshake, FIN, ARP (and on a busy machine a few window probes): control frames on top of the data
        assert 0 <= r["qdisc_tx_bytes"] - r["expected_tx_bytes"] < 0.005 * r["expected_tx_bytes"], r
        assert 0 <= r["qdisc_tx_packets"] - r["expected_tx_packets"] <= 20, r
    assert on["iface_tx_packets"] < 0.5 * on["expected_tx_packets"]
    assert on["iface_tx_bytes"] < on["expected_tx_bytes"] * 0.98
    assert off["iface_tx_bytes"] == off["qdisc_tx_bytes"] and off["iface_tx_packets"] == off["qdisc_tx_packets"]
    assert not _ours(owned_pids)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.process
@needs_netns
def test_shaped_cluster_run(tmp_path: Path, owned_pids: set[int]) -> None:
    """1 server + 2 workers on links of different rates: finishes, counts message and wire bytes per
    host, leaves no namespace behind."""
    out = tmp_path / "run"
    args = ["run", "--workers", "2", "--rounds", "8", "--algorithm", "gd", "--rate", "20mbit",
            "--worker-rate", "1=5mbit/50mbit", "--round-timeout", "60", "--capture", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(cluster, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert not _ours(owned_pids)
    s = json.loads((out / "summary.json").read_text())
    assert s["worker_exit_codes"] == [0, 0] and s["server"]["rounds"] == 8, s["worker_exit_codes"]
    hosts = {h["host"]: h for h in s["hosts"]}
    assert (hosts["w0"]["rate_up"], hosts["w1"]["rate_up"], hosts["w1"]["rate_down"]) == (20e6, 5e6, 50e6)
    for h in hosts.values():
        assert h["wire_tx_bytes"] > h["message_bytes_sent"] > 0
        assert h["wire_rx_bytes"] > h["message_bytes_received"] > 0
        # two independent frame counts agree (up to a stray FIN/ACK outside the capture's window)
        assert abs(h["wire_tx_packets"] - h["capture_tx_packets"]) <= 2, h
    t = s["totals"]
    assert t["message_bytes"] == s["server"]["bytes_up"] + s["server"]["bytes_down"]
    assert 1.0 < t["wire_over_message"] < 1.2
    assert "wire/message" in r.output and "w1" in r.output
    (up,) = {u["upload_message_bytes_median"] for u in s["timing"]["uploads"]}
    assert up > 7850 * 4  # dense float32 uploads, each seen on the wire
    assert all(u["uploads_seen"] >= 6 for u in s["timing"]["uploads"])
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 8


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.process
@needs_netns
def test_worker_crash_through_the_container_entrypoint(tmp_path: Path, owned_pids: set[int]) -> None:
    """Each host shapes itself through psrv.cluster.entrypoint (the docker path: egress + ifb ingress,
    counters written by the entrypoint); worker 1 dies after its first round; the run still finishes.
    (After its first round, not later: on a loaded machine a slow worker can fall so far behind that
    the run ends before it reaches a later round.)"""
    if not _ifb_works():
        pytest.skip("no ifb device here: ingress shaping (the container path) cannot be tested")
    out = tmp_path / "crash"
    args = ["run", "--workers", "2", "--rounds", "8", "--algorithm", "gd", "--rate", "20mbit", "--qdisc", "htb",
            "--shape-at", "host", "--round-timeout", "4", "--crash-worker", "1=1", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(cluster, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert not _ours(owned_pids)
    s = json.loads((out / "summary.json").read_text())
    assert s["worker_exit_codes"][1] == 17, (out / "w1.log").read_text()  # the fault injection's exit code
    assert s["server"]["rounds"] == 8 and s["server"]["deadline_misses"] >= 3
    for host in ("server", "w0", "w1"):
        c = json.loads((out / f"counters-{host}.json").read_text())
        assert c["delta"]["wire_tx"]["bytes"] > 0 and c["delta"]["wire_rx"]["bytes"] > 0
    assert json.loads((out / "counters-w0.json").read_text())["rate_down"] == 20_000_000
    assert "fault injection" in (out / "w1.log").read_text()


def _ifb_works() -> bool:
    with netns.Topology(["probe"]) as topo:  # probe in a namespace of our own, never in the root one
        return shaping.ifb_available(topo.hosts["probe"].netns)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.process
@needs_netns
@pytest.mark.parametrize(("sig", "when"), [(signal.SIGINT, "training"), (signal.SIGTERM, "starting")])
def test_interrupt_removes_everything(tmp_path: Path, owned_pids: set[int], sig: signal.Signals, when: str) -> None:
    """Ctrl-C during training, SIGTERM while the processes start: every process and namespace goes."""
    code = (
        "import sys; from psrv.cluster.cli import cluster; "
        f"cluster(['run', '--algorithm', 'gd', '--workers', '2', '--rounds', '500', '--rate', '10mbit', "
        f"'--out', {str(tmp_path)!r}])"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    owned_pids.add(proc.pid)
    try:
        deadline = time.monotonic() + 60
        ready = tmp_path / ("metrics.jsonl" if when == "training" else "w1.log")
        while time.monotonic() < deadline and not (ready.exists() and ready.stat().st_size > 0):
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            time.sleep(0.1)
        assert ready.exists(), f"{ready} never appeared"
        assert _ours({proc.pid}), "the run made no namespaces"
        time.sleep(0.5)
        procs_inside = [p for ns in _ours({proc.pid}) for p in netns.netns_pids(ns)]
        assert procs_inside  # server and workers run inside
        proc.send_signal(sig)
        output = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 128 + sig, output
        assert "namespaces were removed" in output
        assert not _ours({proc.pid})
        for pid in procs_inside:
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"process {pid} survived"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.process
@needs_netns
def test_entrypoint_shapes_eth0_then_execs_psrv(owned_pids: set[int]) -> None:
    """The container path without a cluster: rates from the environment, tc on eth0 (egress) and on
    an ifb device (ingress), then `psrv start-worker` runs in the same process (exec)."""
    if not _ifb_works():
        pytest.skip("no ifb device here: ingress shaping (the container path) cannot be tested")
    with netns.Topology(["c"]) as topo:
        ns = topo.hosts["c"].netns
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "psrv.cluster.entrypoint", "worker", "--help"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PSRV_RATE_UP": "1mbit", "PSRV_RATE_DOWN": "2mbit"}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "start-worker" in done.stdout and "--server" in done.stdout
        assert "eth0 up 1mbit, down 2mbit" in done.stderr
        egress = shaping.describe_qdiscs("eth0", ns)
        assert any("tbf" in line and "rate 1Mbit" in line for line in egress), egress
        ingress = shaping.describe_qdiscs(shaping.ifb_name("eth0"), ns)
        assert any("tbf" in line and "rate 2Mbit" in line for line in ingress), ingress
        bad = subprocess.run(argv, capture_output=True, text=True, env={**env, "PSRV_RATE_UP": "fast"}, timeout=60)
        assert bad.returncode == 2 and "PSRV_RATE_UP" in bad.stderr
    assert not _ours(owned_pids)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.process
@needs_netns
def test_a_worker_that_cannot_start_fails_the_run_fast(tmp_path: Path, owned_pids: set[int]) -> None:
    args = ["run", "--workers", "2", "--rounds", "5", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path)]
    started = time.monotonic()
    r = CliRunner().invoke(cluster, args)
    # the data is now checked before any namespace or process starts (the task is probed on it)
    assert r.exit_code == 2 and "missing.csv: no such file" in r.output, r.output
    assert time.monotonic() - started < 60  # not the server's 300 s registration timeout
    assert not _ours(owned_pids)


@pytest.mark.root
@needs_netns
def test_stale_namespaces_of_dead_runs_are_found(owned_pids: set[int]) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    owned_pids.add(pid)
    name = f"psrv-{pid}-abcd-hub"
    netns.ip("netns", "add", name)
    assert name in netns.stale_namespaces()
    assert netns.remove_namespaces([name]) == [name]
    assert name not in netns.list_netns()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.process
@needs_netns
def test_cluster_run_over_mutual_tls(tmp_path: Path, owned_pids: set[int]) -> None:
    """`--tls`: certificates for the server's address and each worker are made in <out>/tls; the
    processes run with the TLS and token options and the run completes."""
    out = tmp_path / "tls"
    args = ["run", "--workers", "2", "--rounds", "3", "--algorithm", "gd", "--rate", "none",
            "--round-timeout", "60", "--tls", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(cluster, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert not _ours(owned_pids)
    s = json.loads((out / "summary.json").read_text())
    assert s["worker_exit_codes"] == [0, 0] and s["server"]["rounds"] == 3
    assert "--tls-client-ca" in (out / "server.log").read_text()
    assert "--token-file" in (out / "w1.log").read_text() and (out / "tls" / "workers" / "w1.key").exists()

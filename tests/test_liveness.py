"""Liveness: the server knows who is alive (a worker whose Rounds stream ends is not waited for),
a run short of ``--min-workers`` live workers fails after a bounded wait with a clear message, and
workers that lose the server retry with backoff and jitter, reconnect and go on -- or give up after
``--retry-for`` with one line. Driven by hand through a real server (fast), and with real worker
processes that are killed, stopped and cut off (marked ``process``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from click.testing import CliRunner

from psrv import codec, rpc
from psrv.cli import main
from psrv.options import DataConfig, JobConfig, server_argv, worker_argv
from psrv.payload import dense
from psrv.server import ParameterServer, ServerConfig, create_server
from psrv.v1 import psrv_pb2 as pb
from tests.test_server import DIM, RPC_TIMEOUT, Harness, expect_status
from worker.client import Backoff, ServerLost, WorkerConfig, check_address, run_worker

Code = grpc.StatusCode
DIGITS = DataConfig(data="digits", test_fraction=0.2, seed=3)


def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.02)


def _open(h: Harness, worker: str) -> rpc.RoundStream:
    return h.stub.Rounds(pb.RoundsOpen(worker_id=worker, round=0))


# ============================================================================ by hand, fast


def test_a_worker_whose_stream_ends_is_not_waited_for(make_harness: Callable[..., Harness]) -> None:
    """Round 0 would wait 30 s for w1; its stream ends, so the round closes as soon as w0 reports."""
    h = make_harness(num_workers=2, rounds=2, round_timeout=30.0)
    h.register("w0")
    h.register("w1")
    h.start()
    s = _open(h, "w1")
    s.receive()
    s.close()  # cancelled, as a killed worker's connection would be
    _until(lambda: not h.ps.engine.state.workers["w1"].responsive, 5.0, "the server to notice")
    assert h.ps.engine.state.workers["w1"].gone == "its Rounds stream closed"
    t0 = time.monotonic()
    h.model("w0", 0)
    h.push("w0", 0, dense(np.ones(DIM, np.float32)))
    assert h.model("w0", 1).round == 1 and time.monotonic() - t0 < 5.0
    rec = h.ps.records[0]
    assert [w["status"] for w in rec["workers"]] == ["upload", "deadline"] and rec["round_time"] < 5.0


def test_quorum_lost_fails_the_run_after_a_bounded_wait(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(num_workers=2, rounds=5, round_timeout=30.0, min_workers=2, quorum_wait=0.5)
    h.register("w0")
    h.register("w1")
    h.start()
    s = _open(h, "w1")
    s.receive()
    t0 = time.monotonic()
    s.close()
    h.thread.join(10.0)
    assert not h.thread.is_alive() and time.monotonic() - t0 < 5.0  # quorum_wait, not the 30 s deadline
    assert isinstance(h.run_error, RuntimeError) and h.ps.phase == "failed"
    msg = str(h.run_error)
    assert "only 1 of 2 workers are live, below --min-workers 2" in msg
    assert "0.5 s (--quorum-wait)" in msg and "w1 (its Rounds stream closed)" in msg and "\n" not in msg
    with expect_status(Code.ABORTED, "below --min-workers 2"):  # the workers left are told why
        h.model("w0", 1)


def test_a_rejoin_within_the_quorum_wait_lets_the_run_go_on(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(num_workers=2, rounds=1, round_timeout=30.0, min_workers=2, quorum_wait=20.0)
    h.register("w0")
    h.register("w1")
    h.start()
    first = _open(h, "w1")
    first.receive()
    first.close()
    _until(lambda: not h.ps.engine.state.workers["w1"].responsive, 5.0, "the server to notice")
    again = _open(h, "w1")  # the worker is back on a new stream: live again
    data, _ = again.receive()
    assert pb.GetModelResponse.FromString(data).round == 0
    again.skip(codec.rounds_skip("lazy_rule", 1.0))
    h.model("w0", 0)
    h.push("w0", 0, dense(np.ones(DIM, np.float32)))
    data, _ = again.receive()
    assert pb.GetModelResponse.FromString(data).done
    again.close(finished=True)
    assert h.model("w0", 1).done
    h.thread.join(10.0)
    assert h.run_error is None and h.summary["rounds"] == 1


def test_silent_unary_workers_fail_the_run_instead_of_waiting_out_every_round(
    make_harness: Callable[..., Harness],
) -> None:
    """Unary transport, nobody reports: after max_misses deadlines no worker is live; the run fails
    after the quorum wait instead of waiting out all 50 rounds' deadlines and ending as trained."""
    h = make_harness(num_workers=2, rounds=50, round_timeout=0.3, max_misses=2, transport="unary", quorum_wait=0.3)
    h.register("w0")
    h.register("w1")
    t0 = time.monotonic()
    h.start()
    h.thread.join(10.0)
    assert not h.thread.is_alive() and time.monotonic() - t0 < 5.0
    assert h.ps.phase == "failed" and len(h.ps.records) == 2
    assert "only 0 of 2 workers are live" in str(h.run_error)
    assert "w0 (missed 2 deadlines in a row), w1 (missed 2 deadlines in a row)" in str(h.run_error)


def test_a_second_report_on_the_stream_is_rejected_and_the_stream_goes_on(
    make_harness: Callable[..., Harness],
) -> None:
    """A skip already recorded for w0 (forged, or a report that arrived twice): w0's own report
    for that round is ``rejected`` (ALREADY_EXISTS), not the end of its stream."""
    h = make_harness(num_workers=2, rounds=2)
    h.register("w0")
    h.register("w1")
    h.start()
    s = _open(h, "w0")
    s.receive()
    h.skip("w0", 0)
    s.push(codec.upload_to_wire("w0", 0, 1.0, dense(np.ones(DIM, np.float32))))
    # the refusal goes down at once (before the next broadcast); then w1's skip closes the round
    _until(lambda: h.ps.counter.messages["down", "Rounds"] >= 2, 5.0, "the refusal")
    h.skip("w1", 0)
    data, rejected = s.receive()
    assert rejected is not None and "already reported" in rejected.reason
    assert pb.GetModelResponse.FromString(data).round == 1 and not h.ps.theta.any()
    s.skip(codec.rounds_skip("lazy_rule", 1.0))
    h.skip("w1", 1)
    data, _ = s.receive()
    assert pb.GetModelResponse.FromString(data).done
    s.close(finished=True)


def test_min_workers_is_checked() -> None:
    with pytest.raises(ValueError, match="--min-workers must be in 0..--workers"):
        ServerConfig(num_workers=2, min_workers=3)
    with pytest.raises(ValueError, match="--quorum-wait"):
        ServerConfig(quorum_wait=float("inf"))
    result = CliRunner().invoke(main, ["start-server", "--algorithm", "gd", "--workers", "2", "--min-workers", "3"])
    assert result.exit_code == 2 and "--min-workers must be in 0..--workers (2), got 3" in result.output


@pytest.mark.parametrize("bad", ["localhost", "host:notaport", ":0", "127.0.0.1:0", "h:70000", "a b:1", ""])
def test_malformed_server_addresses_fail_at_once(bad: str) -> None:
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        check_address(bad)


@pytest.mark.parametrize("good", ["127.0.0.1:50051", "server:1", "[::1]:50051", "dns:///server:50051", "unix:/tmp/s"])
def test_well_formed_server_addresses_pass(good: str) -> None:
    assert check_address(good) == good


def test_backoff_is_exponential_with_full_jitter() -> None:
    b = Backoff(base=0.1, cap=5.0, rng=np.random.default_rng(0))
    for n, ceiling in [(0, 0.1), (3, 0.8), (6, 5.0), (200, 5.0)]:
        delays = np.array([b.delay(n) for _ in range(4000)])
        assert delays.min() >= 0 and delays.max() <= ceiling
        assert delays.mean() == pytest.approx(ceiling / 2, rel=0.05)  # U(0, 1) * the ceiling


def test_an_unreachable_server_is_named_with_the_cause() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = WorkerConfig(server=f"127.0.0.1:{port}", worker_id="w0", connect_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(ServerLost) as info:
        run_worker(cfg, _digits_shard(0, 1))
    assert time.monotonic() - t0 < 1.0 + 6.0
    msg = str(info.value)
    assert f"cannot reach the server at 127.0.0.1:{port}: UNAVAILABLE" in msg
    assert "Connection refused" in msg and "(--connect-timeout 1)" in msg and "\n" not in msg


def _digits_shard(i: int, m: int) -> Any:
    from psrv import data
    from worker.client import load_training_data

    train, _ = load_training_data(DIGITS.data, DIGITS.test_fraction, DIGITS.seed)
    return data.shard(train, i, m, "iid", DIGITS.seed)


# ============================================================================ real processes


def _spawn(tmp: Path, key: str, address: str, i: int, m: int, *extra: str) -> subprocess.Popen:
    """``psrv start-worker`` for shard i of m (worker id ``w{i}``), its stdout and stderr in files."""
    cmd = worker_argv(address, i, m, DIGITS, ("--retry-for", "20", *extra))
    with open(tmp / f"{key}.out", "w") as out, open(tmp / f"{key}.err", "w") as err:
        return subprocess.Popen(cmd, stdout=out, stderr=err)


def _output(tmp: Path, key: str) -> tuple[dict[str, Any] | None, str]:
    """A worker's summary (its JSON line on stdout; None if it printed none) and its stderr."""
    text = (tmp / f"{key}.out").read_text().strip()
    return (json.loads(text) if text else None), (tmp / f"{key}.err").read_text()


class _Run:
    """A server in this process (its run loop in a thread) and worker processes (``psrv start-worker``,
    as ``psrv run`` starts them), plus an optional pacer: a worker this test drives, which holds every
    round for ``pace`` seconds until released, so the run lasts while the test kills, stops or
    restarts the others."""

    def __init__(self, tmp: Path, port: int = 0, **config: Any) -> None:
        self.tmp = tmp
        self.ps = ParameterServer(
            ServerConfig(**{"register_timeout": 120.0, "start_timeout": 60.0, "record_tail": 1000, **config})
        )
        self.server, self.port = create_server(self.ps, f"127.0.0.1:{port}")
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.released = threading.Event()
        self.pacer: threading.Thread | None = None

    def _run(self) -> None:
        try:
            self.summary = self.ps.run()
        except BaseException as exc:  # noqa: BLE001 - read by the test
            self.error = exc

    def start(self) -> _Run:
        self.thread.start()
        return self

    def worker(self, key: str, i: int, m: int, *extra: str) -> subprocess.Popen:
        self.procs[key] = _spawn(self.tmp, key, self.address, i, m, *extra)
        return self.procs[key]

    def output(self, key: str) -> tuple[dict[str, Any] | None, str]:
        return _output(self.tmp, key)

    def pace(self, worker_id: str, pace: float) -> None:
        channel = grpc.insecure_channel(self.address)
        stub = rpc.CountingStub(channel)
        stub.Register(pb.RegisterRequest(worker_id=worker_id, num_samples=1, n_features=64, n_classes=10))

        def loop() -> None:
            k = 0
            try:
                while True:
                    model = stub.GetModel(pb.GetModelRequest(worker_id=worker_id, round=k), timeout=30)
                    if model.done:
                        return
                    k = model.round
                    self.released.wait(pace)
                    stub.Skip(codec.skip_to_proto(worker_id, k, "lazy_rule", None), timeout=RPC_TIMEOUT)
                    k += 1
            except grpc.RpcError:
                return  # the run failed or ended: nothing left to pace
            finally:
                channel.close()

        self.pacer = threading.Thread(target=loop, daemon=True)
        self.pacer.start()

    def status(self, worker_id: str) -> list[str]:
        return [next(w["status"] for w in r["workers"] if w["id"] == worker_id) for r in self.ps.records]

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        if self.thread.is_alive():
            self.ps.fail("test over")
        self.released.set()
        self.server.stop(None).wait(5)
        self.thread.join(10)


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[Callable[..., _Run]]:
    made: list[_Run] = []

    def make(**config: Any) -> _Run:
        run = _Run(tmp_path, **config)
        made.append(run)
        return run

    yield make
    for run in made:
        run.close()


@pytest.mark.process
@pytest.mark.slow
def test_kill_9_a_worker_then_restart_it_under_its_id(make_run: Callable[..., _Run]) -> None:
    """gd, 2 worker processes and the pacer. w1 is killed mid-run: the server notices at once (its
    stream closed; no 30 s deadline waited out), the run goes on, its rounds are misses; a new w1
    process registers under its id, rejoins from a snapshot, and the run completes."""
    # the pacer holds each round 0.1 s until released: 300 rounds last 30 s, time for a restart on a busy machine
    r = make_run(algorithm="gd", options={"lr": 0.05}, num_workers=3, rounds=300, round_timeout=30.0)
    r.worker("w0", 0, 2)
    r.worker("w1", 1, 2)
    r.pace("zpace", 0.1)
    r.start()
    _until(lambda: len(r.ps.records) >= 3, 120, "three rounds")
    r.procs["w1"].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    w1 = r.ps.engine.state.workers["w1"]
    _until(lambda: not w1.responsive, 10, "the server to notice the kill")
    assert time.monotonic() - killed < 5.0 and w1.gone == "its Rounds stream closed"
    r.worker("w1b", 1, 2)  # the same id (w1) and shard
    _until(lambda: r.ps.engine.state.rejoins == 1 and "upload" in r.status("w1")[-2:], 120, "w1 to rejoin")
    r.released.set()
    r.thread.join(120)
    assert r.error is None and r.summary["rounds"] == 300 and r.summary["rejoins"] == 1
    statuses = r.status("w1")
    assert "deadline" in statuses and statuses[-1] == "upload"  # missed while dead, back to the end
    assert max(rec["round_time"] for rec in r.ps.records) < 30.0  # no deadline was waited out
    assert r.procs["w1"].wait(30) == -signal.SIGKILL
    assert r.procs["w0"].wait(30) == 0 and r.procs["w1b"].wait(30) == 0
    back, _ = r.output("w1b")
    assert back["worker_id"] == "w1" and back["index"] == w1.index and 0 < back["rounds"] < 300


@pytest.mark.process
@pytest.mark.slow
def test_a_worker_stopped_past_the_deadline_catches_up(make_run: Callable[..., _Run]) -> None:
    """SIGSTOP w1 until two rounds have closed without it (each waits 1 s for it); after SIGCONT its
    stale report is rejected, it takes the round the server is at and uploads again to the end."""
    r = make_run(algorithm="gd", options={"lr": 0.05}, num_workers=2, rounds=200, round_timeout=1.0, max_misses=100)
    r.worker("w1", 1, 2)
    r.pace("zpace", 0.05)
    r.start()
    _until(lambda: len(r.ps.records) >= 3, 120, "three rounds")
    os.kill(r.procs["w1"].pid, signal.SIGSTOP)
    stopped = len(r.ps.records)
    try:  # the misses themselves, not a fixed sleep (which a loaded machine may not fill with two deadlines)
        _until(lambda: r.status("w1")[stopped:].count("deadline") >= 2, 60, "two rounds closed without w1")
    finally:
        os.kill(r.procs["w1"].pid, signal.SIGCONT)
    resumed = len(r.ps.records)
    _until(lambda: "upload" in r.status("w1")[resumed:], 60, "w1 to upload again")
    r.released.set()
    r.thread.join(300)  # the ~130 rounds left, unpaced: seconds here, over a minute on 2 overloaded cores
    assert r.error is None and r.summary["rounds"] == 200
    statuses = r.status("w1")
    assert statuses.count("deadline") >= 2 and statuses[-1] == "upload"
    assert r.procs["w1"].wait(30) == 0
    result, _ = r.output("w1")
    assert result["reconnects"] == 0  # the same stream all along: keepalive (15 s) did not cut it


@pytest.mark.process
@pytest.mark.slow
def test_a_worker_that_loses_the_server_retries_then_exits_with_one_line(make_run: Callable[..., _Run]) -> None:
    r = make_run(algorithm="gd", num_workers=1, rounds=10**6, round_timeout=5.0, quorum_wait=0.1)
    w = r.worker("w0", 0, 1, "--retry-for", "2")
    r.start()
    _until(lambda: len(r.ps.records) >= 3, 120, "three rounds")
    r.server.stop(None).wait(5)  # the server is gone, as if killed
    gone = time.monotonic()
    rc = w.wait(2.0 + 15.0)
    assert rc == 1 and time.monotonic() - gone >= 2.0 * 0.9
    _, err = r.output("w0")
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"Error: worker w0: cannot reach the server at {r.address}: UNAVAILABLE")
    assert last.endswith("(--retry-for 2)") and "Traceback" not in err


@pytest.mark.process
@pytest.mark.slow
def test_a_worker_survives_a_server_restart_and_a_late_server(tmp_path: Path) -> None:
    """The worker starts before any server listens (it keeps trying), trains with the first server,
    loses it, and finishes the run of a new server started on the same port a moment later."""
    with socket.socket() as s:  # a free port, for now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = dict(algorithm="gd", options={"lr": 0.05}, num_workers=1, round_timeout=5.0, quorum_wait=0.1)
    w = _spawn(tmp_path, "w0", f"127.0.0.1:{port}", 0, 1)
    runs: list[_Run] = []
    try:
        time.sleep(2.0)  # the worker is up and retrying against a closed port
        assert w.poll() is None
        runs.append(_Run(tmp_path, port=port, **job, rounds=10**6).start())
        a = runs[-1]
        _until(lambda: len(a.ps.records) >= 3, 120, "three rounds with the first server")
        a.server.stop(None).wait(5)
        a.thread.join(10)
        time.sleep(0.5)
        runs.append(_Run(tmp_path, port=port, **job, rounds=5).start())
        b = runs[-1]
        b.thread.join(60)
        assert b.error is None and b.summary["rounds"] == 5 and b.summary["uploads"] == 5
        assert w.wait(30) == 0
        result, _ = _output(tmp_path, "w0")
        assert result["reconnects"] == 1 and result["uploads"] >= 3 + 5
    finally:
        if w.poll() is None:
            w.kill()
        w.wait()
        for run in runs:
            run.close()


def _server_process(tmp: Path, *args: str, netns_argv: list[str] | None = None) -> tuple[subprocess.Popen, Path]:
    """``psrv start-server`` (gd on digits' shape) with a metrics file; its stderr in ``server.err``."""
    metrics = tmp / "metrics.jsonl"
    cmd = server_argv(
        JobConfig(algorithm="gd", lr=0.05, workers=2, rounds=10**6, round_timeout=30.0),
        ("--metrics", str(metrics), *args),
    )
    with open(tmp / "server.err", "w") as err:
        return subprocess.Popen([*(netns_argv or []), *cmd], stdout=subprocess.DEVNULL, stderr=err), metrics


def _records(metrics: Path) -> list[dict[str, Any]]:
    if not metrics.exists():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]


@pytest.mark.process
@pytest.mark.slow
def test_start_server_fails_with_one_line_when_the_quorum_is_lost(tmp_path: Path) -> None:
    """--min-workers 2: a worker killed mid-run leaves one live; after --quorum-wait 1 the server
    exits 1 naming who is gone and why, and the surviving worker exits 1 saying the run failed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, metrics = _server_process(
        tmp_path, "--host", "127.0.0.1", "--port", str(port), "--min-workers", "2", "--quorum-wait", "1"
    )
    workers = [_spawn(tmp_path, f"w{i}", f"127.0.0.1:{port}", i, 2) for i in range(2)]
    try:
        _until(lambda: len(_records(metrics)) >= 3, 120, "three rounds")
        workers[1].kill()
        killed = time.monotonic()
        assert server.wait(30) == 1 and time.monotonic() - killed < 1.0 + 10.0
        err = (tmp_path / "server.err").read_text()
        last = err.strip().splitlines()[-1]
        assert last.startswith("Error: round ") and "Traceback" not in err
        assert "only 1 of 2 workers are live, below --min-workers 2, after waiting 1 s (--quorum-wait)" in last
        assert last.endswith("gone: w1 (its Rounds stream closed)")
        assert workers[0].wait(30) == 1
        _, w0_err = _output(tmp_path, "w0")
        assert "Error: worker w0: run failed: round" in w0_err and "below --min-workers 2" in w0_err
    finally:
        for p in (server, *workers):
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("cut", [3.0, 22.0])
def test_a_cut_link_heals_and_the_run_completes(tmp_path: Path, cut: float) -> None:
    """Server and two workers in network namespaces, the server's uplink slow (so rounds take a
    while), --min-workers 2; wb's link goes down for ``cut`` seconds: rounds close without it at
    their 1 s deadline, after 3 misses the run waits for it (quorum); it comes back and uploads to
    the end; everyone exits 0. 3 s: its stream survives (TCP retransmits). 22 s: keepalive (10 s +
    5 s) drops the connection, the worker retries until the link is up, registers again and goes on."""
    if os.geteuid() != 0 or shutil.which("tc") is None:
        pytest.skip("needs root and tc (network namespaces, shaping)")
    from psrv.cluster.netns import Topology, ip
    from psrv.cluster.shaping import shape_egress

    with Topology(["srv", "wa", "wb"]) as topo:
        # the server's uplink at 200 kbit/s: two 2.6 kB broadcasts take ~0.2 s, so the rounds last
        shape_egress(topo.hosts["srv"].iface, 200_000, topo.hosts["srv"].netns)
        address = f"{topo.hosts['srv'].ip}:50051"
        server, metrics = _server_process(
            tmp_path, "--rounds", "60", "--round-timeout", "1", "--host", "0.0.0.0", "--port", "50051",
            "--min-workers", "2", "--quorum-wait", "60",
            netns_argv=topo.exec_argv("srv", []),
        )  # fmt: skip
        topo.procs.append(server)
        workers = {}
        for i, host in enumerate(("wa", "wb")):
            cmd = worker_argv(address, i, 2, DIGITS, ("--retry-for", "30"))
            with open(tmp_path / f"{host}.out", "w") as out, open(tmp_path / f"{host}.err", "w") as err:
                workers[host] = topo.popen(host, cmd, stdout=out, stderr=err)
        _until(lambda: len(_records(metrics)) >= 10, 120, "ten rounds")
        ns = topo.hosts["wb"].netns
        ip("-n", ns, "link", "set", "dev", "eth0", "down")
        try:
            time.sleep(cut)
        finally:
            ip("-n", ns, "link", "set", "dev", "eth0", "up")
        assert server.wait(120) == 0, (tmp_path / "server.err").read_text()[-2000:]
        assert workers["wa"].wait(30) == 0 and workers["wb"].wait(30) == 0
        statuses = [next(w["status"] for w in r["workers"] if w["id"] == "w1") for r in _records(metrics)]
        assert len(statuses) == 60 and statuses.count("deadline") >= 2 and statuses[-1] == "upload"
        result, _ = _output(tmp_path, "wb")
        if cut > rpc.KEEPALIVE_TIME_S + rpc.KEEPALIVE_TIMEOUT_S + 2:
            assert result["reconnects"] == 1


def test_a_late_report_brings_a_dropped_worker_back(make_harness: Callable[..., Harness]) -> None:
    """A worker no longer waited for whose reports arrive after the others' (a slow link after a
    cut) would never catch up: its late report is refused, but it is waited for again from then on."""
    h = make_harness(num_workers=2, rounds=3, round_timeout=0.5, max_misses=1, transport="unary")
    h.register("a")
    h.register("b")
    h.start()
    h.model("a", 0)
    h.push("a", 0, dense(np.ones(DIM, np.float32)))  # b misses round 0: no longer waited for
    h.model("a", 1)
    h.push("a", 1, dense(np.ones(DIM, np.float32)))  # round 1 closes at once, without b
    assert h.model("a", 2).round == 2 and not h.ps.engine.state.workers["b"].responsive
    with expect_status(Code.FAILED_PRECONDITION, "round 1 is not open"):
        h.skip("b", 1)
    assert h.ps.engine.state.workers["b"].responsive  # waited for again...
    h.push("a", 2, dense(np.ones(DIM, np.float32)))
    time.sleep(0.1)
    assert h.ps.round == 2  # ...so round 2 is still open for b's report
    h.skip("b", 2)
    assert h.model("b", 3).done
    assert [w["status"] for w in h.ps.records[2]["workers"]] == ["upload", "lazy_rule"]
    assert h.ps.records[1]["workers"][1]["status"] == "deadline"


@pytest.mark.process
@pytest.mark.slow
def test_psrv_run_reports_a_lost_quorum(tmp_path: Path) -> None:
    """The embedded run (``psrv run``'s) of 2 workers with --min-workers 2: worker 1 crashes after 2
    rounds; the run fails within the quorum wait with the message, instead of training on."""
    from psrv.runner import run_local

    cfg = ServerConfig(algorithm="gd", num_workers=2, rounds=10**6, round_timeout=30.0, min_workers=2, quorum_wait=0.5,
                       register_timeout=120.0, start_timeout=60.0)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"only 1 of 2 workers are live.*gone: w1 \(its Rounds stream closed\)"):
        run_local(cfg, DIGITS, tmp_path / "run", worker_extra={1: ("--crash-after", "2")})

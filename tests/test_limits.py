"""The server owns the job and has limits (README, "Limits"): the task's shape comes from the server,
only configured ids take slots, and every limit a caller can run into is RESOURCE_EXHAUSTED (or
PERMISSION_DENIED) naming the flag that changes it; round records stream to disk, not to memory."""

from __future__ import annotations

import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from click.testing import CliRunner

from psrv import codec, rpc, stream
from psrv.cli import check_port_free, main
from psrv.engine import EngineError, RoundEngine, ServerConfig
from psrv.limits import CallLimiter, LimitExceeded, TransportLimits
from psrv.metrics import MetricsSink
from psrv.payload import dense
from psrv.server import ParameterServer, create_server
from psrv.v1 import psrv_pb2 as pb
from tests.test_server import DIM, N_CLASSES, N_FEATURES, RPC_TIMEOUT, Harness, _req, expect_status

Code = grpc.StatusCode


# ============================================================================ the task's shape
def test_the_configured_shape_exists_before_anyone_registers_and_a_bogus_one_allocates_nothing(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness(num_workers=2, task_shape=(N_FEATURES, N_CLASSES))
    assert h.ps.theta is not None and h.ps.theta.size == DIM  # the server's, not the first caller's
    tracemalloc.start()
    try:
        with expect_status(Code.INVALID_ARGUMENT, "'bogus' refused", "2000000 features / 100 classes", "4 / 3"):
            h.stub.Register(_req("bogus", n_features=2_000_000, n_classes=100), timeout=RPC_TIMEOUT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # a 2e6 x 100 model would be 1.6 GB
    assert h.ps.theta.size == DIM and not h.ps.engine.state.workers
    assert "bogus" in h.ps.engine.refused
    h.register("w0")
    h.register("w1")
    assert h.ps.phase == "training"


def test_a_shape_fixed_by_the_first_registration_is_bounded_by_max_dim(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(num_workers=1, max_dim=1000)
    tracemalloc.start()
    try:
        with expect_status(Code.RESOURCE_EXHAUSTED, "2000000 features x 100", "limit of 1000 parameters", "--max-dim"):
            h.stub.Register(_req("w0", n_features=2_000_000, n_classes=100), timeout=RPC_TIMEOUT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    assert h.ps.theta is None and h.ps.engine.state.aggregator is None  # nothing was made
    h.register("w0")  # a fitting registration still fixes the shape
    assert h.ps.theta.size == DIM
    # the task's own size counts too: an mlp of 4 x 3 with 200 hidden units has more than 1000 parameters
    engine = RoundEngine(ServerConfig(task="mlp", task_options={"hidden": 200}, max_dim=1000))
    with pytest.raises(EngineError, match="1603 parameters, more than the limit of 1000 \\(--max-dim\\)"):
        engine.register("w0", 10, 4, 3)
    assert engine.state.theta is None
    # a shape the server is configured with is the operator's choice: --max-dim bounds registrations only
    assert RoundEngine(ServerConfig(task_shape=(2000, 10), max_dim=1000)).dim == 20010


def test_a_worker_refused_for_its_shape_is_named_when_registration_times_out() -> None:
    engine = RoundEngine(ServerConfig(num_workers=2, task_shape=(4, 3), register_timeout=0.2))
    engine.register("w0", 10, 4, 3)
    with pytest.raises(EngineError, match="4 / 3"):
        engine.register("w1", 10, 5, 3)
    with pytest.raises(RuntimeError) as err:
        engine.run()
    message = str(err.value)
    assert "only 1 of 2 workers registered" in message and "worker 'w1' refused" in message
    assert "5 features / 3 classes" in message and "\n" not in message


def test_start_server_derives_the_shape_from_the_data_or_shape_and_refuses_a_mismatch(tmp_path: Path) -> None:
    from psrv.options import server_shape

    assert server_shape("logreg", "digits", None, False, 0) == (64, 10)
    assert server_shape("logreg", None, (7, 2), False, 0) == (7, 2)
    assert server_shape("logreg", None, None, False, 0) is None  # the documented fallback
    with pytest.raises(ValueError, match="--shape 7,2 does not match --data digits: 64,10"):
        server_shape("logreg", "digits", (7, 2), False, 0)
    result = CliRunner().invoke(main, ["start-server", "--algorithm", "gd", "--shape", "3"])
    assert result.exit_code == 2 and "expected F,C" in result.output


# ============================================================================ who takes a slot
def test_only_configured_ids_take_slots(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(num_workers=2, worker_ids=("w0", "w1"), task_shape=(N_FEATURES, N_CLASSES))
    with expect_status(Code.PERMISSION_DENIED, "'intruder'", "--worker-ids"):
        h.stub.Register(_req("intruder"), timeout=RPC_TIMEOUT)
    assert not h.ps.engine.state.workers  # no slot taken
    h.register("w1")
    h.register("w0")
    assert h.ps.phase == "training" and sorted(h.ps.engine.state.workers) == ["w0", "w1"]
    with pytest.raises(ValueError, match="one id per worker"):
        ServerConfig(num_workers=3, worker_ids=("w0", "w1"))


def test_a_long_id_is_refused_without_a_slot(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(num_workers=1, max_id_bytes=16)
    with expect_status(Code.RESOURCE_EXHAUSTED, "17 bytes", "limit of 16", "--max-id-bytes"):
        h.stub.Register(_req("x" * 17), timeout=RPC_TIMEOUT)
    assert not h.ps.engine.state.workers and h.ps.theta is None
    h.register("x" * 16)
    assert h.ps.phase == "training"


# ============================================================================ messages and calls
def test_an_oversized_push_is_refused_by_the_limit_derived_from_the_dimension(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness(num_workers=1, max_message_bytes=None, task_shape=(N_FEATURES, N_CLASSES))
    assert h.ps.max_message_bytes == stream.limit_for(DIM) < 2 << 20  # not a fixed 512 MB
    h.register("w0")
    before = h.ps.counter.total("up")
    push = h.channel.unary_unary(f"/{rpc.SERVICE}/Push")
    junk = pb.PushRequest(worker_id="w0", round=0).SerializeToString() + b"\x00" * (8 << 20)
    with expect_status(Code.RESOURCE_EXHAUSTED):
        push(junk, timeout=RPC_TIMEOUT)
    assert h.ps.counter.total("up") == before  # never handed to psrv, so never counted
    # an upload of the model's size is fine
    h.start()
    h.model("w0", 0)
    h.push("w0", 0, dense(np.ones(DIM, np.float32)))


def _server(config: ServerConfig, limits: TransportLimits) -> tuple[ParameterServer, grpc.Server, grpc.Channel]:
    ps = ParameterServer(config, limits=limits)
    server, port = create_server(ps, "127.0.0.1:0")
    return ps, server, grpc.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture
def limited() -> Iterator[Callable[..., tuple[ParameterServer, grpc.Channel]]]:
    made: list[tuple[ParameterServer, grpc.Server, grpc.Channel]] = []

    def make(config: ServerConfig, limits: TransportLimits) -> tuple[ParameterServer, grpc.Channel]:
        made.append(_server(config, limits))
        return made[-1][0], made[-1][2]

    yield make
    for ps, server, channel in made:
        ps.fail("test over")
        channel.close()
        server.stop(None).wait(5)


def test_long_polls_beyond_the_per_worker_limit_are_refused_and_the_run_finishes(limited: Any) -> None:
    """A registered caller that never reports (w2: no longer waited for after one missed deadline)
    opens 100 long polls at once: two are held, the rest refused at once; w0 and w1 train on."""
    rounds = 4
    config = ServerConfig(num_workers=3, rounds=rounds, task_shape=(4, 3), worker_ids=("w0", "w1", "w2"),
                          start_timeout=0.0, done_grace=1.0, downlink="dense", round_timeout=0.5,
                          max_misses=1)  # fmt: skip
    ps, channel = limited(config, TransportLimits(calls_per_worker=2))
    stub = rpc.CountingStub(channel)
    for wid in ("w0", "w1", "w2"):
        stub.Register(_req(wid), timeout=RPC_TIMEOUT)
    run = threading.Thread(target=ps.run, daemon=True)
    run.start()
    get_model = stub._calls["GetModel"]
    poll = pb.GetModelRequest(worker_id="w2", round=1).SerializeToString()
    flood = [get_model.future(poll, timeout=30) for _ in range(100)]
    t0 = time.monotonic()
    for k in range(rounds):
        for wid in ("w0", "w1"):
            stub.GetModel(pb.GetModelRequest(worker_id=wid, round=k), timeout=RPC_TIMEOUT)
            stub.Skip(codec.skip_to_proto(wid, k, "lazy_rule", 1.0), timeout=RPC_TIMEOUT)
    for wid in ("w0", "w1"):
        assert stub.GetModel(pb.GetModelRequest(worker_id=wid, round=rounds), timeout=RPC_TIMEOUT).done
    run.join(10)
    took = time.monotonic() - t0
    assert not run.is_alive() and ps.phase == "done" and ps.summary()["rounds"] == rounds
    assert took < 5  # round 0's deadline (w2 never reports), then no waiting
    refused = []
    for f in flood:
        try:
            f.result(timeout=10)
        except grpc.RpcError as exc:
            refused.append(exc)
    assert len(refused) >= 98 and all(e.code() == Code.RESOURCE_EXHAUSTED for e in refused)
    named = [e for e in refused if "--max-calls-per-worker" in (e.details() or "")]
    assert named and all("'w2' has 2 calls in progress" in e.details() for e in named)
    assert ps.servicer.calls.held("w2") == 0  # every held call was released


def test_a_stalled_upload_stream_is_ended_and_the_anonymous_budget_is_bounded(limited: Any) -> None:
    config = ServerConfig(num_workers=1, rounds=1, task_shape=(4, 3))
    ps, channel = limited(config, TransportLimits(anonymous_calls=2, stream_idle_timeout=0.5))
    push_stream = channel.stream_unary(f"/{rpc.SERVICE}/PushStream")
    stop = threading.Event()

    def stalled() -> Iterator[bytes]:
        # a piece that declares a 1 MB message, then nothing more
        yield next(stream.pieces(b"\x00" * (1 << 20), chunk=16 << 10))
        stop.wait(30)

    calls = [push_stream.future(stalled(), timeout=20) for _ in range(3)]
    codes = []
    t0 = time.monotonic()
    for c in calls:
        try:
            c.result(timeout=15)
        except grpc.RpcError as exc:
            codes.append((exc.code(), exc.details()))
    took = time.monotonic() - t0
    stop.set()
    exhausted = [d for code, d in codes if code == Code.RESOURCE_EXHAUSTED]
    assert len(exhausted) == 1 and "--max-anonymous-calls" in exhausted[0]
    assert [code for code, _ in codes].count(Code.CANCELLED) == 2  # ended by the idle timeout
    assert took < 10 and ps.servicer.calls.held(None) == 0


def test_call_limiter_counts_and_releases_once() -> None:
    limiter = CallLimiter(per_worker=2, anonymous=1)
    a, b = limiter.acquire("w0"), limiter.acquire("w0")
    with pytest.raises(LimitExceeded, match="'w0' has 2 calls"):
        limiter.acquire("w0")
    limiter.acquire("w1")  # another id has its own budget
    a()
    a()  # idempotent
    assert limiter.held("w0") == 1
    b()
    assert limiter.held("w0") == 0
    limiter.acquire(None)
    with pytest.raises(LimitExceeded, match="--max-anonymous-calls"):
        limiter.acquire(None)


def test_a_second_server_on_the_same_port_fails_with_one_line() -> None:
    ps = ParameterServer(ServerConfig(num_workers=1))
    server, port = create_server(ps, "127.0.0.1:0")
    try:
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}: port in use"):
            check_port_free("127.0.0.1", port)
        with pytest.raises(RuntimeError, match="could not bind|Failed to bind"):  # no SO_REUSEPORT
            create_server(ParameterServer(ServerConfig(num_workers=1)), f"127.0.0.1:{port}")
        result = CliRunner().invoke(
            main, ["start-server", "--algorithm", "gd", "--host", "127.0.0.1", "--port", str(port)]
        )
        assert result.exit_code == 1
        assert result.output.strip() == f"Error: cannot listen on 127.0.0.1:{port}: port in use (another server?)"
    finally:
        server.stop(None).wait(5)
    with socket.socket() as s:  # free again once the server stopped
        s.bind(("127.0.0.1", port))


# ============================================================================ round records
def test_records_are_not_kept_and_the_totals_equal_the_metrics_file(tmp_path: Path) -> None:
    rounds, tail = 300, 16
    metrics = tmp_path / "metrics.jsonl"
    sink = MetricsSink(metrics)
    config = ServerConfig(num_workers=2, rounds=rounds, record_tail=tail, start_timeout=0.0, done_grace=0.5,
                          algorithm="lag-wk", downlink="dense", round_timeout=10.0)  # fmt: skip
    engine = RoundEngine(config, sink=sink, encode=lambda b: b)
    engine.register("w0", 10, 4, 3)
    engine.register("w1", 12, 4, 3)
    grad = dense(np.full(engine.dim, 0.01, np.float32))
    done = threading.Event()
    longest = [0]

    def worker(wid: str, upload_every: int) -> None:
        k = 0
        while not done.is_set():
            b = engine.wait_model(wid, k, timeout=10.0)
            if b.done:
                return
            if k % upload_every == 0:
                engine.push(wid, b.round, grad, loss=1.0, nbytes=100 + k)
            else:
                engine.skip(wid, b.round, "lazy_rule", loss=0.5, nbytes=7)
            longest[0] = max(longest[0], len(engine.state.records))
            k = b.round + 1

    threads = [threading.Thread(target=worker, args=(w, e), daemon=True) for w, e in (("w0", 1), ("w1", 3))]
    for t in threads:
        t.start()
    summary = engine.run()
    done.set()
    for t in threads:
        t.join(5)
    sink.close()
    assert longest[0] <= tail and len(engine.state.records) == tail  # a bounded tail, not every round
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(lines) == summary["rounds"] == rounds
    assert summary["uploads"] == sum(r["uploads"] for r in lines) == rounds + 100
    assert summary["skips"] == sum(r["skips"] for r in lines) == rounds - 100
    assert summary["payload_bits"] == sum(r["payload_bits"] for r in lines) > 0
    assert summary["upload_bytes"] == sum(r["bytes_up"] for r in lines)
    assert summary["wall_time"] == lines[-1]["elapsed"] and summary["last_round_loss"] == lines[-1]["loss"]
    assert [r["round"] for r in engine.state.records] == list(range(rounds - tail, rounds))


def test_a_declared_huge_message_is_refused_at_its_length_prefix() -> None:
    """Raw HTTP/2 (h2): a Push whose gRPC length prefix declares 500 MB, of which 16 KB are sent, is
    refused at once with RESOURCE_EXHAUSTED (the fixed 512 MB limit held it open, waiting)."""
    import struct

    import h2.config
    import h2.connection
    import h2.events

    ps = ParameterServer(ServerConfig(num_workers=1, task_shape=(N_FEATURES, N_CLASSES)))
    server, port = create_server(ps, "127.0.0.1:0")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            sid = conn.get_next_available_stream_id()
            headers = [(":method", "POST"), (":scheme", "http"), (":path", f"/{rpc.SERVICE}/Push"),
                       (":authority", "psrv"), ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
            conn.send_headers(sid, headers)
            conn.send_data(sid, b"\x00" + struct.pack(">I", 500 << 20) + b"\x00" * 16000)
            sock.sendall(conn.data_to_send())
            status, give_up = None, time.monotonic() + 10
            while status is None and time.monotonic() < give_up:
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                        status = dict(event.headers).get(b"grpc-status", status)
                sock.sendall(conn.data_to_send())
        assert status == b"8"  # RESOURCE_EXHAUSTED
        assert ps.counter.total("up") == 0
    finally:
        server.stop(None).wait(5)

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
from psrv.limits import CallLimiter, LimitExceeded, RateLimiter, TransportLimits, host_of
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
    assert all(rpc.retry_after(e) is not None for e in refused)  # each says: it passes, try again
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
    # the client may see its status before the server's handler has ended and released its call
    give_up = time.monotonic() + 10
    while ps.servicer.calls.held(None) and time.monotonic() < give_up:
        time.sleep(0.01)
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


# ============================================================================ calls per second
class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    clock = _Clock()
    limiter = RateLimiter(rate=2.0, burst=3, anonymous_rate=1.0, anonymous_burst=1, clock=clock)
    for _ in range(3):
        limiter.take(("id", "w0"), "worker 'w0'")  # the burst
    with pytest.raises(LimitExceeded, match=r"worker 'w0' started more than 2 calls per second .*--max-call-rate"):
        limiter.take(("id", "w0"), "worker 'w0'")
    clock.now += 0.25  # half a token: still refused (a refusal takes nothing)
    with pytest.raises(LimitExceeded):
        limiter.take(("id", "w0"), "worker 'w0'")
    clock.now += 0.25  # one token
    limiter.take(("id", "w0"), "worker 'w0'")
    with pytest.raises(LimitExceeded):
        limiter.take(("id", "w0"), "worker 'w0'")
    clock.now += 60  # a long pause refills to the burst, not beyond
    for _ in range(3):
        limiter.take(("id", "w0"), "worker 'w0'")
    with pytest.raises(LimitExceeded):
        limiter.take(("id", "w0"), "worker 'w0'")
    limiter.take(("id", "w1"), "worker 'w1'")  # another caller has its own bucket
    # anonymous callers: their own rate and burst, and their own flag
    limiter.take((RateLimiter.ANONYMOUS, "10.0.0.9"), "callers from 10.0.0.9")
    with pytest.raises(LimitExceeded, match=r"10\.0\.0\.9 .* 1 calls per second .*--max-anonymous-call-rate"):
        limiter.take((RateLimiter.ANONYMOUS, "10.0.0.9"), "callers from 10.0.0.9")
    unlimited = RateLimiter(rate=0.0, burst=1, anonymous_rate=0.0, clock=clock)
    for _ in range(100):
        unlimited.take(("id", "w0"), "w0")
        unlimited.take((RateLimiter.ANONYMOUS, "h"), "h")
    assert len(unlimited) == 0  # no limit keeps no buckets


def test_rate_limiter_memory_is_bounded_and_idle_buckets_go_first() -> None:
    clock = _Clock()
    limiter = RateLimiter(rate=1.0, burst=5, anonymous_rate=1.0, max_buckets=3, clock=clock)
    for key in ("a", "b", "c", "c"):
        limiter.take(("id", key), key)  # a: 4 tokens left, b: 4, c: 3
    assert len(limiter) == 3
    clock.now += 1.0
    for _ in range(3):
        limiter.take(("id", "a"), "a")  # a: 5 - 3 = 2, and b is now the least recently used
    clock.now += 1.0  # b (4 + 2) and c (3 + 2) are full again, a (2 + 1) is not
    limiter.take(("id", "d"), "d")  # forgets the full b and c, keeps a
    assert set(limiter._buckets) == {("id", "a"), ("id", "d")}
    # a flood of new keys never holds more than max_buckets, the least recently used go
    for i in range(10_000):
        limiter.take((RateLimiter.ANONYMOUS, f"10.{i >> 8}.{i & 255}.1"), "h")
    assert len(limiter) == 3
    assert list(limiter._buckets)[-1] == (RateLimiter.ANONYMOUS, "10.39.15.1")
    # a forgotten bucket that was not full comes back full: the cap trades that for bounded memory
    limiter.take(("id", "a"), "a")


def test_host_of_drops_the_port_and_groups_ipv6_by_its_64() -> None:
    assert host_of("ipv4:10.1.2.3:50123") == "10.1.2.3"
    assert host_of("ipv6:[2001:db8:1:2:aaaa::1]:5000") == "2001:db8:1:2::/64"
    assert host_of("ipv6:%5B2001:db8:1:2:bbbb::7%5D:6000") == "2001:db8:1:2::/64"  # the same machine's /64
    assert host_of("ipv6:[::1]:5000") == "::1"
    assert host_of("ipv6:[::ffff:10.0.0.1]:5000") == "10.0.0.1"
    assert host_of("unix:/tmp/psrv.sock") == "unix:/tmp/psrv.sock"
    assert host_of("") == "?"


def test_over_the_call_rate_a_worker_gets_resource_exhausted_and_health_is_not_limited(limited: Any) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    config = ServerConfig(num_workers=1, rounds=1, task_shape=(4, 3), worker_ids=("w0",), start_timeout=0.0)
    ps, channel = limited(config, TransportLimits(call_rate=1.0, anonymous_call_rate=1.0, call_burst=3))
    stub = rpc.CountingStub(channel)
    stub.Register(_req("w0"), timeout=RPC_TIMEOUT)  # a configured id: its own bucket from its first call
    for _ in range(2):
        with expect_status(Code.FAILED_PRECONDITION):  # charged, then refused by the engine
            stub.Skip(codec.skip_to_proto("w0", 7, "lazy_rule", 1.0), timeout=RPC_TIMEOUT)
    with expect_status(
        Code.RESOURCE_EXHAUSTED, "worker 'w0' (from 127.0.0.1)", "1 calls per second", "--max-call-rate"
    ) as refused_rate:
        stub.Skip(codec.skip_to_proto("w0", 7, "lazy_rule", 1.0), timeout=RPC_TIMEOUT)
    # a limit that passes: gRPC's retry pushback says when the next token comes (1 call per second)
    assert 0.0 < rpc.retry_after(refused_rate.error) <= 1.0
    # junk ids share the host's anonymous bucket, whose burst is at least 2 x --workers
    register = channel.unary_unary(f"/{rpc.SERVICE}/Register")
    refused = []
    for i in range(6):
        try:
            register(_req(f"junk{i}").SerializeToString(), timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            refused.append((exc.code(), exc.details()))
    assert [c for c, _ in refused].count(Code.RESOURCE_EXHAUSTED) == 3
    assert all("--max-anonymous-call-rate" in d for c, d in refused if c == Code.RESOURCE_EXHAUSTED)
    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(20):
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT).status == 1  # SERVING


def test_a_rounds_stream_is_one_call_however_many_rounds_it_carries() -> None:
    """Stream transport: a worker's rounds travel on one Rounds call, so a rate of 1 call/s with a
    burst of 3 (Register, Rounds, one to spare) carries a 40-round run."""
    ps = ParameterServer(
        ServerConfig(num_workers=1, rounds=40, round_timeout=20.0, done_grace=2.0, transport="stream",
                     worker_ids=("w0",), algorithm="gd"),
        limits=TransportLimits(call_rate=1.0, anonymous_call_rate=1.0, call_burst=3),
    )  # fmt: skip
    server, port = create_server(ps)
    try:
        from worker.client import WorkerConfig, load_training_data, run_worker

        train, _ = load_training_data("digits", 0.2, 0)
        cfg = WorkerConfig(server=f"127.0.0.1:{port}", worker_id="w0", data="digits", connect_timeout=20)
        done: list[Any] = []
        t = threading.Thread(target=lambda: done.append(run_worker(cfg, train)), daemon=True)
        t.start()
        summary = ps.run()
        t.join(30)
        assert summary["rounds"] == 40 and done and ps.phase == "done"
        assert ps.counter.messages["up", "Rounds"] > 40  # many messages, one call
    finally:
        ps.fail("test over")
        server.stop(None).wait(5)


def test_resyncs_on_a_rounds_stream_are_charged_as_calls(limited: Any) -> None:
    """The only message a worker sends at will on its stream, a resync, costs a broadcast: over the
    rate the stream ends with RESOURCE_EXHAUSTED (burst 3: the Rounds call and two resyncs)."""
    config = ServerConfig(num_workers=1, rounds=3, task_shape=(4, 3), start_timeout=0.0, downlink="dense")
    ps, channel = limited(config, TransportLimits(call_rate=0.5, call_burst=3))
    stub = rpc.CountingStub(channel)
    stub.Register(_req("w0"), timeout=RPC_TIMEOUT)
    threading.Thread(target=lambda: pytest.raises(RuntimeError, ps.run), daemon=True).start()  # failed at the end
    s = stub.Rounds(pb.RoundsOpen(worker_id="w0", round=0))
    s.receive()
    for _ in range(2):
        s.resync()
        data, _ = s.receive()
        assert pb.GetModelResponse.FromString(data).round == 0
    s.resync()
    with expect_status(Code.RESOURCE_EXHAUSTED, "worker 'w0'", "--max-call-rate"):
        s.receive()
    s.close()


def _flooded_run(flood: bool, rate: float = 20.0) -> tuple[float, dict[str, Any] | None, ParameterServer]:
    """Two workers (unary transport: two calls per round each) train 120 rounds; with ``flood``, a
    hostile process floods junk calls from the same host from before registration to the end."""
    import subprocess
    import sys

    from psrv import data
    from worker.client import WorkerConfig, load_training_data, run_worker

    m, rounds = 2, 120
    ps = ParameterServer(
        ServerConfig(num_workers=m, rounds=rounds, round_timeout=20.0, done_grace=2.0, transport="unary",
                     worker_ids=("w0", "w1"), algorithm="gd"),
        limits=TransportLimits(anonymous_call_rate=rate, call_burst=50),
    )  # fmt: skip
    server, port = create_server(ps)
    proc = None
    try:
        if flood:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.helpers.flood", str(port), "60", "4"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert proc.stdout is not None and "started" in proc.stdout.readline()
            time.sleep(0.3)  # the flood is under way (and its burst spent) before the workers come
        train, _ = load_training_data("digits", 0.2, 0)
        errors: list[BaseException] = []

        def work(i: int) -> None:
            cfg = WorkerConfig(server=f"127.0.0.1:{port}", worker_id=f"w{i}", data="digits", connect_timeout=20)
            try:
                run_worker(cfg, data.shard(train, i, m))
            except BaseException as exc:  # noqa: BLE001 -- reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(m)]
        for t in threads:
            t.start()
        assert ps.wait_registered(m, 20)
        t0 = time.monotonic()
        summary = ps.run()
        took = time.monotonic() - t0
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert summary["rounds"] == rounds and ps.phase == "done"
        result = None
        if proc is not None:
            out, _ = proc.communicate(timeout=20)  # closes its stdin: it stops
            result = json.loads(out.strip().splitlines()[-1])
        return took, result, ps
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        ps.fail("test over")
        server.stop(None).wait(5)


def test_a_flood_of_calls_from_the_workers_host_is_refused_and_the_run_is_not_slowed() -> None:
    """A hostile client on the workers' own host floods GetModel/Skip/Register/Push naming ids the
    server does not know (4 threads, as fast as it is answered), from before the workers register
    to the end of the run. The workers (configured ids: their own buckets) register and train
    unharmed; past its burst the flood gets RESOURCE_EXHAUSTED naming the flag, and the run's time
    stays within a loose bound of the same run without the flood (the machine is shared)."""
    quiet, _, _ = _flooded_run(flood=False)
    took, flood, ps = _flooded_run(flood=True)
    assert flood is not None
    codes, calls = flood["codes"], flood["calls"]
    refused = codes.get("RESOURCE_EXHAUSTED", 0)
    assert calls >= 200, flood  # a flood: far above 20 calls/s
    allowed = calls - refused
    assert allowed <= 50 + 20 * (took + 5) + 10, flood  # the burst, then the rate
    assert refused >= 0.8 * calls, flood
    assert "--max-anonymous-call-rate" in flood["sample"] and "127.0.0.1" in flood["sample"]
    assert took <= 4 * quiet + 3.0, (quiet, took)


def test_with_tokens_the_rate_is_the_authenticated_workers(tmp_path: Path) -> None:
    """With --worker-tokens a call counts against the worker its token names, whatever id it claims
    and whichever host it comes from: w0's token flooding as w1 spends w0's bucket, not w1's."""
    from psrv import tls

    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join(f"{w} {tls.hash_token('secret-' + w)}\n" for w in ("w0", "w1")))
    for w in ("w0", "w1"):
        (tmp_path / w).write_text(f"secret-{w}\n")
    config = ServerConfig(num_workers=2, rounds=1, task_shape=(4, 3), start_timeout=0.0)
    ps = ParameterServer(config, limits=TransportLimits(call_rate=1.0, call_burst=2))
    server, port = create_server(ps, "127.0.0.1:0", security=tls.ServerSecurity(tokens=str(tokens)))
    try:
        channels = {
            w: tls.ClientSecurity(token_file=str(tmp_path / w)).channel(f"127.0.0.1:{port}") for w in ("w0", "w1")
        }
        stubs = {w: rpc.CountingStub(channel) for w, channel in channels.items()}
        for _ in range(2):
            with expect_status(Code.PERMISSION_DENIED):  # w0's token acting as w1: charged to w0
                stubs["w0"].Skip(codec.skip_to_proto("w1", 0, "lazy_rule", 1.0), timeout=RPC_TIMEOUT)
        with expect_status(Code.RESOURCE_EXHAUSTED, "worker 'w0' started more than 1 calls", "--max-call-rate"):
            stubs["w0"].Register(_req("w0"), timeout=RPC_TIMEOUT)
        assert stubs["w1"].Register(_req("w1"), timeout=RPC_TIMEOUT).worker_index == 0  # its own bucket
        for channel in channels.values():
            channel.close()
    finally:
        ps.fail("test over")
        server.stop(None).wait(5)


def test_retry_after_reads_the_pushback_and_only_for_resource_exhausted() -> None:
    """A worker backs off and retries a refusal that passes (psrv's pushback in the trailing
    metadata, or gRPC's own refusal of calls over the server's concurrency limit) and exits on one
    that does not (RESOURCE_EXHAUSTED without pushback: a size, an id, the worker slots)."""

    class Refused(grpc.RpcError):
        def __init__(self, code: Code, details: str, trailing: tuple = ()) -> None:
            self._code, self._details, self._trailing = code, details, trailing

        def code(self) -> Code:
            return self._code

        def details(self) -> str:
            return self._details

        def trailing_metadata(self) -> tuple:
            return self._trailing

    exhausted = Code.RESOURCE_EXHAUSTED
    assert rpc.retry_after(Refused(exhausted, "calls", ((rpc.RETRY_PUSHBACK, "250"),))) == 0.25
    assert rpc.retry_after(Refused(exhausted, "calls", ((rpc.RETRY_PUSHBACK, "-1"),))) is None  # do not retry
    assert rpc.retry_after(Refused(exhausted, "calls", ((rpc.RETRY_PUSHBACK, "soon"),))) is None
    assert rpc.retry_after(Refused(exhausted, "Concurrent RPC limit exceeded")) == 0.0
    assert rpc.retry_after(Refused(exhausted, "model of 1e9 parameters is over --max-dim")) is None
    assert rpc.retry_after(Refused(Code.UNAVAILABLE, "x", ((rpc.RETRY_PUSHBACK, "250"),))) is None
    assert rpc.retry_after(ValueError("not a call")) is None

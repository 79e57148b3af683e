"""The Rounds stream (one persistent bidirectional stream per worker, see the top of psrv.proto):
driven by hand through a real server -- broadcasts down, reports up with worker and round implied,
both ends count the same bytes, big messages in pieces arrive exactly, a late report is
``rejected`` in front of the next broadcast, ``resync`` brings a snapshot, and bad streams end
with the status the unary calls would give, leaving the model untouched."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np

from psrv import codec, rpc, stream
from psrv.payload import dense
from psrv.replica import state_digest
from psrv.v1 import psrv_pb2 as pb
from tests.test_server import DIM, RPC_TIMEOUT, Harness, expect_status

Code = grpc.StatusCode


class _Stream:
    """A RoundStream whose broadcasts come back parsed."""

    def __init__(self, stream_: rpc.RoundStream) -> None:
        self.s = stream_
        self.push, self.skip, self.resync = stream_.push, stream_.skip, stream_.resync
        self.done = False

    def receive(self) -> tuple[pb.GetModelResponse, pb.RoundsRejected | None]:
        data, rejected = self.s.receive()
        model = pb.GetModelResponse.FromString(data)
        self.done = model.done
        return model, rejected

    def close(self) -> None:
        self.s.close(finished=self.done)


def _open(h: Harness, worker: str, round_: int = 0) -> _Stream:
    return _Stream(h.stub.Rounds(pb.RoundsOpen(worker_id=worker, round=round_)))


def _raw_rounds(h: Harness, messages: list[bytes]) -> list[bytes]:
    call = h.channel.stream_stream(f"/{rpc.SERVICE}/Rounds", request_serializer=bytes, response_deserializer=bytes)
    return list(call(iter(messages), timeout=RPC_TIMEOUT))


def test_a_run_on_streams_steps_exactly_and_both_ends_count_the_same_bytes(
    make_harness: Callable[..., Harness],
) -> None:
    lr = 0.5
    h = make_harness(algorithm="gd", options={"lr": lr}, num_workers=2, rounds=3, downlink="dense")
    h.register("w0")
    h.register("w1")
    h.start()
    streams = [_open(h, "w0"), _open(h, "w1")]
    rng = np.random.default_rng(0)
    theta = np.zeros(DIM)
    for k in range(3):
        g = rng.normal(size=(2, DIM)).astype(np.float32)
        for w, s in enumerate(streams):
            model, rejected = s.receive()
            assert model.round == k and rejected is None and not model.done
            np.testing.assert_array_equal(codec.tensor_from_proto(model.params, DIM), theta.astype(np.float32))
            if w == 0:
                s.push(codec.upload_to_wire("w0", k, 1.0, dense(g[0])))
            else:
                s.skip(codec.rounds_skip("lazy_rule", 2.0))  # gd stores w1's last upload: none yet (zero)
        theta = theta - lr * g[0].astype(np.float64)
    for s in streams:
        final, _ = s.receive()
        assert final.done
        np.testing.assert_array_equal(codec.tensor_from_proto(final.params, DIM), theta.astype(np.float32))
        s.close()
    np.testing.assert_array_equal(h.ps.theta, theta)
    assert [r["uploads"] for r in h.ps.records] == [1, 1, 1] and [r["skips"] for r in h.ps.records] == [1, 1, 1]
    counted = h.stub.counter
    assert {m for _, m in counted.bytes} == {"Register", "Rounds"}
    for key, n in counted.bytes.items():
        assert h.ps.counter.bytes[key] == n, key
        assert h.ps.counter.messages[key] == counted.messages[key], key
    # a skip on the stream: reason and loss only (worker and round are implied)
    assert len(codec.rounds_skip("lazy_rule", 2.0).SerializeToString()) == 13


def test_big_broadcasts_and_uploads_travel_in_pieces_on_the_stream(make_harness: Callable[..., Harness]) -> None:
    lr = 0.5
    h = make_harness(algorithm="gd", options={"lr": lr}, num_workers=1, rounds=2, downlink="dense")
    h.ps.servicer.stream_above, h.ps.servicer.chunk = 32, 7  # the 60-byte model goes in 7-byte pieces
    h.stub = rpc.CountingStub(h.channel, stream_above=32, chunk=5)
    h.register("w0")
    h.start()
    s = _open(h, "w0")
    theta = np.zeros(DIM)
    rng = np.random.default_rng(1)
    for k in range(2):
        model, _ = s.receive()
        np.testing.assert_array_equal(codec.tensor_from_proto(model.params, DIM), theta.astype(np.float32))
        g = rng.normal(size=DIM).astype(np.float32)
        s.push(codec.upload_to_wire("w0", k, 1.0, dense(g)))
        theta = theta - lr * g.astype(np.float64)
    final, _ = s.receive()
    assert final.done
    np.testing.assert_array_equal(h.ps.theta, theta)
    counted = h.stub.counter
    assert counted.messages["up", "Rounds"] > 2 * 12  # 60+ byte uploads in 5-byte pieces
    assert counted.messages["down", "Rounds"] > 3 * 8
    assert h.ps.counter.bytes["up", "Rounds"] == counted.bytes["up", "Rounds"]
    assert h.ps.counter.bytes["down", "Rounds"] == counted.bytes["down", "Rounds"]
    assert h.ps.records[0]["bytes_up"] == sum(
        len(p) for p in stream.pieces(codec.upload_to_wire("w0", 0, 1.0, dense(g)), 5, within=4)
    )


def test_a_late_report_is_rejected_before_the_next_broadcast(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(algorithm="gd", num_workers=1, rounds=2, round_timeout=0.3, max_misses=100, downlink="dense")
    h.register("w0")
    h.start()
    s = _open(h, "w0")
    first, _ = s.receive()
    assert first.round == 0
    give_up = time.monotonic() + 10
    while h.ps.round < 1 and time.monotonic() < give_up:  # round 0 closes at its deadline without us
        time.sleep(0.05)
    s.push(codec.upload_to_wire("w0", 0, 1.0, dense(np.ones(DIM, np.float32))))
    model, rejected = s.receive()
    assert rejected is not None and rejected.round == 0 and "not open" in rejected.reason
    assert model.round == 1
    assert h.ps.records[0]["uploads"] == 0 and not h.ps.theta.any()  # nothing of it was applied
    s.skip(codec.rounds_skip("lazy_rule", 1.0))
    final, rejected = s.receive()
    assert final.done and rejected is None
    s.close()


def test_resync_brings_the_round_again_as_a_snapshot(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(algorithm="lag-wk", num_workers=1, rounds=3, downlink="replica")
    h.register("w0")
    h.start()
    s = _open(h, "w0")
    first, _ = s.receive()
    assert first.HasField("snapshot")  # no replica yet
    s.push(codec.upload_to_wire("w0", 0, 1.0, dense(np.ones(DIM, np.float32))))
    update, _ = s.receive()
    assert update.round == 1 and update.HasField("update")  # the server knows our replica is of round 0
    s.resync()
    again, _ = s.receive()
    assert again.round == 1 and again.HasField("snapshot") and again.digest == update.digest
    m = codec.model_from_proto(again, DIM)
    assert state_digest(m.theta, m.total) == again.digest
    assert h.ps.records[0]["snapshots"] == 1
    s.skip(codec.rounds_skip("lazy_rule", 1.0))
    nxt, _ = s.receive()
    assert nxt.round == 2 and nxt.HasField("update")
    s.skip(codec.rounds_skip("lazy_rule", 1.0))
    final, _ = s.receive()
    assert final.done
    s.close()


def test_bad_streams_end_with_the_unary_status_and_touch_nothing(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(algorithm="gd", num_workers=1, rounds=1, downlink="dense")
    h.register("w0")
    h.start()
    skip = codec.rounds_skip("lazy_rule", 1.0).SerializeToString()
    opened = pb.RoundsRequest(open=pb.RoundsOpen(worker_id="w0")).SerializeToString()
    with expect_status(Code.INVALID_ARGUMENT, "first message must be `open`"):
        _raw_rounds(h, [skip])
    with expect_status(Code.NOT_FOUND, "unknown worker"):
        _raw_rounds(h, [pb.RoundsRequest(open=pb.RoundsOpen(worker_id="ghost")).SerializeToString()])
    with expect_status(Code.INVALID_ARGUMENT, "not a RoundsRequest"):
        _raw_rounds(h, [opened, b"\xff\xff\xff"])
    with expect_status(Code.INVALID_ARGUMENT, "expected this round's report"):
        _raw_rounds(h, [opened, opened])
    other = stream.field_bytes(3, codec.upload_to_wire("w1", 0, 1.0, dense(np.ones(DIM, np.float32))).tobytes())
    with expect_status(Code.INVALID_ARGUMENT, "worker 'w1' round 0 on the stream of worker 'w0'"):
        _raw_rounds(h, [opened, other])
    short = stream.field_bytes(3, codec.upload_to_wire("w0", 0, 1.0, dense(np.ones(DIM - 1, np.float32))).tobytes())
    with expect_status(Code.INVALID_ARGUMENT, "14 elements, expected 15"):
        _raw_rounds(h, [opened, short])
    assert h.ps.round == 0 and not h.ps.engine._open.reports and not h.ps.theta.any()
    good = stream.field_bytes(3, codec.upload_to_wire("", 0, 1.0, dense(np.ones(DIM, np.float32))).tobytes())
    replies = _raw_rounds(h, [opened, good])  # worker and round left out: implied by the stream
    assert len(replies) == 2 and pb.RoundsResponse.FromString(replies[-1]).model.done
    assert h.ps.records[0]["uploads"] == 1

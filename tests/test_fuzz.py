"""Property-based fuzzing (issue 11, "Fuzzing"): hostile and malformed messages (tests/helpers/fuzz.py)
against the decoders and a live server. The decoders return a valid object or raise their own error
(CodecError, StreamError), never anything else; the server answers every call with an expected
status (never UNKNOWN or INTERNAL) within its deadline, leaves the model and the aggregate
bit-identical, and then finishes the run exactly as if it had never been fuzzed.

Messages per run (``derandomize``: the same every time), about 2,500 without the slow tests: the
decoders 400 uploads, 150 Rounds streams (447 messages), 400 piece streams (875 pieces) and 300
broadcasts; a live server 300 calls (448 messages, gd). The slow tests add 2,000 uploads (a new
sample every run) and 3 x 1,300 calls to live servers (gd, laq, topk-ef; ~5,800 messages): about
10,300 in all. ``scripts/fuzz_server.py`` sends any number and prints the count per method and
status (README, "Fuzzing").
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psrv import codec, rpc, stream
from psrv.engine import Broadcast
from psrv.payload import Payload
from psrv.replica import AggregateChange
from psrv.server_opt import OptState
from psrv.v1 import psrv_pb2 as pb
from tests.helpers import fuzz

DIM = (fuzz.N_FEATURES + 1) * fuzz.N_CLASSES
_FAST = dict(database=None, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


# ------------------------------------------------------------------------------ decoders
@settings(max_examples=400, **_FAST)
@given(fuzz.push_bytes(DIM))
def test_the_upload_decoder_returns_a_valid_payload_or_a_codec_error(data: bytes) -> None:
    fuzz.check_upload_decoders(data, DIM)


@pytest.mark.slow
@settings(max_examples=2000, **{**_FAST, "derandomize": False})
@given(fuzz.push_bytes(DIM))
def test_many_uploads_to_the_decoder(data: bytes) -> None:
    """The same property over 2,000 more uploads (a new random sample every run)."""
    fuzz.check_upload_decoders(data, DIM)


@settings(max_examples=150, **_FAST)
@given(fuzz.rounds_stream(DIM))
def test_the_rounds_parser_never_raises(messages: list[bytes]) -> None:
    """Every Rounds message becomes a Part: one of the oneof's kinds, or ``error`` with the reason
    (an exception in a deserializer would end the stream with INTERNAL)."""
    kinds = {f.name for f in pb.RoundsRequest.DESCRIPTOR.oneofs_by_name["request"].fields} | {"error"}
    for data in messages:
        part = rpc._parse_rounds_request(data).msg
        assert part.kind in kinds
        if part.kind == "error":
            assert isinstance(part.body, stream.StreamError)


@settings(max_examples=400, **_FAST)
@given(st.binary(min_size=1, max_size=64).flatmap(lambda whole: st.tuples(st.just(whole), fuzz.pieces(whole))))
def test_the_reassembler_gives_the_whole_message_or_a_stream_error(case: tuple[bytes, list[bytes]]) -> None:
    """Pieces (valid, hostile offsets and sizes, random bytes) put back together: the result is the
    announced number of bytes, each piece's data where its offset says; anything else a StreamError."""
    _, messages = case
    whole = stream.Reassembler(limit=1 << 10, what="fuzz")
    expected = bytearray()
    try:
        for data in messages:
            piece = stream.parse_piece(data)
            whole.add(*piece)
            expected += bytes(piece.data)
        got = bytes(whole.result())
    except stream.StreamError:
        return
    assert got == bytes(expected) and len(got) == pb.PushStreamRequest.FromString(messages[0]).total_size


def _broadcasts() -> list[bytes]:
    """One broadcast of every form, as the server sends them."""
    rng = np.random.default_rng(0)
    theta, total = rng.standard_normal(DIM), rng.standard_normal(DIM)
    common = dict(round=3, total_samples=20, num_workers=2)
    step = Payload("sparse", DIM, values=np.ones(2, np.float32), indices=np.array([1, 5]))
    forms = [
        Broadcast(params=theta.astype(np.float32), recent_step_sq=(0.5,), **common),
        Broadcast(form="snapshot", theta=theta, total=total, opt_state=OptState(), **common),
        Broadcast(
            form="update", change=AggregateChange("values", DIM, indices=np.array([2]), values=total[2:3]), **common
        ),
        Broadcast(form="update", change=AggregateChange("aggregate", DIM, values=total), **common),
        Broadcast(form="update", change=AggregateChange("relay", DIM, payloads=(step,), workers=(1,)), **common),
        Broadcast(form="compressed", step=step, selected=(0,), **common),
    ]
    return [codec.broadcast_to_wire(b) for b in forms]


@settings(max_examples=300, **_FAST)
@given(st.sampled_from(_broadcasts()).flatmap(lambda b: st.one_of(fuzz.mutated(b), st.binary(max_size=64))))
def test_the_worker_decodes_a_broadcast_or_raises_a_codec_error(data: bytes) -> None:
    """The worker's side: a mutated or random broadcast is decoded into a model message whose arrays
    have the model's dimension, or refused with CodecError."""
    try:
        m = codec.model_from_wire(data, DIM)
    except codec.CodecError:
        return
    for arr in (m.params, m.theta):
        assert arr is None or arr.size == DIM
    assert m.form in ("dense", "snapshot", "update", "compressed")


# ------------------------------------------------------------------------------ a live server
def _fuzz_server(algorithm: str, examples: int) -> fuzz.HostileClient:
    """``examples`` hostile calls against a live server in the middle of round 0; the model and the
    aggregate do not change, and the run then ends on exactly the model of a run never fuzzed."""
    reference = fuzz.Target(algorithm)
    try:
        expected = reference.finish()
    finally:
        reference.close()
    target = fuzz.Target(algorithm)
    try:
        before = target.state()
        client = fuzz.HostileClient(target.channel)

        @settings(max_examples=examples, **_FAST)
        @given(fuzz.hostile_call(target.dim))
        def hostile(call: tuple[str, list[bytes]]) -> None:
            client.send(*call)

        hostile()
        print(f"{algorithm}:\n{client.table()}")
        assert target.state() == before
        assert target.finish().tobytes() == expected.tobytes()
    finally:
        target.close()
    return client


def test_a_live_server_answers_hostile_calls_and_then_serves_the_run() -> None:
    client = _fuzz_server("gd", 300)
    statuses = {s for _, s in client.counts}
    assert {"INVALID_ARGUMENT", "NOT_FOUND"} <= statuses  # the fuzzer reaches both the decoder and the engine
    assert sum(client.counts.values()) == 300


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["gd", "laq", "topk-ef"])
def test_many_hostile_calls_per_algorithm(algorithm: str) -> None:
    client = _fuzz_server(algorithm, 1300)
    assert sum(client.counts.values()) == 1300


def test_undecodable_requests_get_invalid_argument_naming_the_message() -> None:
    """Bytes that are not the method's request: INVALID_ARGUMENT naming the message type (gRPC's
    own deserializer error would be INTERNAL)."""
    target = fuzz.Target("gd")
    try:
        for method, name in (("Register", "RegisterRequest"), ("GetModel", "GetModelRequest"), ("Skip", "SkipRequest")):
            call = target.channel.unary_unary(f"/{rpc.SERVICE}/{method}")
            with pytest.raises(grpc.RpcError) as info:
                call(b"\xff\xff\xff", timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"not a valid {name}" in info.value.details()
    finally:
        target.close()


def test_long_polls_that_time_out_free_their_server_threads() -> None:
    """24 Rounds streams (twice the server's 12 threads) wait for a round that does not start and
    time out after 0.3 s (those past the id's --max-calls-per-worker are refused at once); the
    server's threads wait no longer than their callers, so a worker's call right after is answered
    at once (it waited for a thread up to 5 s before)."""
    target = fuzz.Target("gd")
    try:
        opened = pb.RoundsRequest(open=pb.RoundsOpen(worker_id=fuzz.REPORTED, round=1)).SerializeToString()
        clients = [fuzz.HostileClient(target.channel) for _ in range(24)]
        threads = [threading.Thread(target=c.send, args=("Rounds", [opened])) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        outcomes = [next(iter(c.counts)) for c in clients if sum(c.counts.values()) == 1]
        assert len(outcomes) == len(clients)
        assert set(outcomes) <= {("Rounds", "DEADLINE_EXCEEDED"), ("Rounds", "RESOURCE_EXHAUSTED")}
        assert outcomes.count(("Rounds", "DEADLINE_EXCEEDED")) >= 1
        started = time.monotonic()
        skip = pb.SkipRequest(worker_id=fuzz.REPORTED, round=0, reason=pb.SKIP_REASON_LAZY_RULE)
        assert fuzz.HostileClient(target.channel).send("Skip", [skip.SerializeToString()]) == "ALREADY_EXISTS"
        assert time.monotonic() - started < 1.0
    finally:
        target.close()

"""psrv.stream and the streamed RPCs (GetModelStream, PushStream): pieces are exactly what protobuf
makes of them, a streamed message arrives exactly, a bad piece stream is refused whole (nothing of it
reaches the model), and both ends count the same bytes.

Small models are streamed by giving the client stub tiny thresholds; one slow test moves a model of
12 million parameters (48 MB float32) each way through a real server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import grpc
import numpy as np
import pytest

from psrv import codec, rpc, stream
from psrv.engine import Broadcast
from psrv.payload import dense
from psrv.v1 import psrv_pb2 as pb
from tests.test_server import DIM, RPC_TIMEOUT, Harness, expect_status

Code = grpc.StatusCode
PIECE_TYPES = (pb.GetModelStreamResponse, pb.PushStreamRequest)


# ============================================================================ pieces


@pytest.mark.parametrize("piece_type", PIECE_TYPES)
@pytest.mark.parametrize("offset", [0, 1, 127, 128, 300, 2**40])
@pytest.mark.parametrize("size", [1, 127, 128, 70_000])
def test_piece_bytes_are_what_protobuf_serializes(piece_type: type, offset: int, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    total = offset + size + 5
    expected = piece_type(offset=offset, total_size=total, data=data).SerializeToString()
    assert stream.piece_bytes(offset, total, data) == expected
    half = size // 2
    assert stream.piece_bytes(offset, total, data[:half], memoryview(data)[half:]) == expected


def test_pieces_cut_consecutive_runs_across_parts() -> None:
    values = np.arange(10, dtype=np.float32)
    whole = stream.Serialized(b"head", memoryview(values).cast("B"), b"tail")
    assert whole.nbytes == len(whole) == 48 and whole.tobytes() == b"head" + values.tobytes() + b"tail"
    got = [pb.PushStreamRequest.FromString(p) for p in stream.pieces(whole, chunk=7)]
    assert [p.offset for p in got] == list(range(0, 48, 7))
    assert [len(p.data) for p in got] == [7] * 6 + [6]
    assert {p.total_size for p in got} == {48}
    assert b"".join(p.data for p in got) == whole.tobytes()
    assert list(stream.pieces(b"abc")) == [stream.piece_bytes(0, 3, b"abc")]
    with pytest.raises(stream.StreamError, match="empty message"):
        list(stream.pieces(b""))


def test_shared_pieces_are_cut_once_for_every_reader_and_then_let_go() -> None:
    """Three readers in three threads get exactly :func:`psrv.stream.pieces`; the pieces are the same
    objects for all of them (cut once), none is held once all three have it, and a fourth reader
    (one more than announced) cuts its own."""
    message = bytes(range(256)) * 40
    expected = list(stream.pieces(message, chunk=100, within=3))
    shared = stream.SharedPieces(message, readers=3, chunk=100, within=3)
    readers = [shared.reader() for _ in range(3)]
    first = [next(r) for r in readers]  # every reader has started: the first piece was cut once
    assert first[0] is first[1] is first[2] and first[0] == expected[0]
    got: list[list[bytes]] = [[] for _ in readers]
    threads = [threading.Thread(target=lambda i=i: got[i].extend(readers[i])) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert all([first[i], *got[i]] == expected for i in range(3))
    assert all(a is b is c for a, b, c in zip(*got, strict=True))
    assert shared.held == 0
    late = list(shared.reader())
    assert late == expected and late[0] is not first[0]


def _pb_fields(piece_type: type, data: bytes) -> tuple[int, int, bytes]:
    msg = piece_type.FromString(data)
    return msg.offset, msg.total_size, msg.data


@pytest.mark.parametrize("piece_type", PIECE_TYPES)
def test_parse_piece_reads_what_protobuf_reads(piece_type: type) -> None:
    plain = piece_type(offset=300, total_size=2**33, data=b"abc" * 50).SerializeToString()
    unknown = stream.varint(9 << 3 | 0) + stream.varint(5)  # field 9, varint
    unknown += stream.varint(10 << 3 | 1) + bytes(8) + stream.varint(11 << 3 | 5) + bytes(4)
    unknown += stream.varint(12 << 3 | 2) + stream.varint(3) + b"xyz"
    wrong_wire = stream.varint(3 << 3 | 0) + stream.varint(7)  # field 3 as a varint: an unknown field
    later = piece_type(offset=7, data=b"last").SerializeToString()  # fields again: the last ones win
    for message in (plain, unknown + plain, plain + unknown + wrong_wire, plain + later, b""):
        piece = stream.parse_piece(message)
        assert (piece.offset, piece.total_size, bytes(piece.data)) == _pb_fields(piece_type, message)
    assert isinstance(stream.parse_piece(plain).data, memoryview)  # a view, not a copy
    # every cut of a valid piece either reads as protobuf reads it or fails in both
    for cut in range(len(plain) + 1):
        try:
            expected = _pb_fields(piece_type, plain[:cut])
        except Exception:  # noqa: BLE001 - protobuf's DecodeError
            with pytest.raises(stream.StreamError, match="malformed piece"):
                stream.parse_piece(plain[:cut])
            continue
        piece = stream.parse_piece(plain[:cut])
        assert (piece.offset, piece.total_size, bytes(piece.data)) == expected


@pytest.mark.parametrize(
    "message",
    [b"\x08", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x1a\x05ab", b"\x0b", b"\x00\x01"],
    ids=["truncated varint", "overlong varint", "data past the end", "group", "field 0"],
)
def test_parse_piece_rejects_malformed_bytes(message: bytes) -> None:
    with pytest.raises(stream.StreamError, match="malformed piece"):
        stream.parse_piece(message)
    with pytest.raises(Exception):  # noqa: B017 - protobuf refuses them too
        pb.PushStreamRequest.FromString(message)


def test_serialized_bytes_are_not_copied_when_whole() -> None:
    data = b"x" * 100
    assert stream.Serialized(data).tobytes() is data


# ============================================================================ reassembly


def _reassemble(pieces: Iterable[tuple[int, int, bytes]], limit: int = 1000) -> bytes:
    whole = stream.Reassembler(limit, "test")
    for offset, total, data in pieces:
        whole.add(offset, total, data)
    return bytes(whole.result())


@pytest.mark.parametrize("worker_id", ["w0", "a-much-longer-worker-name"])
def test_reassembled_dense_values_land_aligned(worker_id: str) -> None:
    """The values of a streamed dense upload or model start on a 64-byte boundary of the buffer
    (numpy reads unaligned float32 about half as fast), whatever the header's length; the bytes are
    the message's either way, also for pieces that are no dense message at all."""
    g = np.arange(3001, dtype=np.float32)
    upload = codec.upload_to_wire(worker_id, 7, 1.5, dense(g)).tobytes()
    model = codec.broadcast_to_wire(Broadcast(round=5, total_samples=8, num_workers=4, params=g, recent_step_sq=(1.0,)))
    for message, decode in (
        (upload, lambda view: codec.WireUpload(view).payload(g.size).values),
        (model, lambda view: codec.model_from_wire(view, g.size).params),
    ):
        whole = stream.Reassembler()
        for piece in stream.pieces(message, chunk=1000):
            whole.add(*stream.parse_piece(piece))
        view = whole.result()
        assert bytes(view) == message
        values = decode(view)
        assert values.ctypes.data % stream.ALIGN == 0 and values.tobytes() == g.tobytes()
    noise = np.random.default_rng(0).bytes(5000)
    pieces = [stream.parse_piece(p) for p in stream.pieces(noise, 999)]
    assert _reassemble(pieces, limit=5000) == noise


def test_reassembly_puts_pieces_back_together() -> None:
    msg = bytes(range(200))
    parsed = [pb.GetModelStreamResponse.FromString(p) for p in stream.pieces(msg, chunk=64)]
    assert _reassemble((p.offset, p.total_size, p.data) for p in parsed) == msg


BAD_STREAMS = {
    "no pieces": ([], "no pieces"),
    "total_size 0": ([(0, 0, b"a")], "total_size 0 outside [1, 1000]"),
    "above the limit": ([(0, 1001, b"a")], "total_size 1001 outside [1, 1000]"),
    "missing piece": (
        [(0, 6, b"ab"), (4, 6, b"ef")],
        "offset 4, expected 2: the piece skips data (a piece is missing)",
    ),
    "first piece missing": ([(2, 6, b"cd")], "offset 2, expected 0"),
    "duplicate piece": ([(0, 6, b"ab"), (0, 6, b"ab")], "offset 0, expected 2: the piece repeats"),
    "overlapping piece": ([(0, 6, b"abc"), (2, 6, b"cd")], "repeats or overlaps"),
    "empty piece": ([(0, 6, b"ab"), (2, 6, b"")], "piece 1: empty piece"),
    "oversized piece": ([(0, 6, b"abcd"), (4, 6, b"efg")], "data runs to byte 7, past total_size 6"),
    "total_size changes": ([(0, 6, b"ab"), (2, 7, b"cd")], "total_size 7 differs from the first piece's 6"),
    "ends early": ([(0, 6, b"ab"), (2, 6, b"cd")], "ended after 4 of 6 bytes"),
}


@pytest.mark.parametrize("name", BAD_STREAMS)
def test_reassembly_rejects_bad_streams(name: str) -> None:
    pieces, fragment = BAD_STREAMS[name]
    with pytest.raises(stream.StreamError) as err:
        _reassemble(pieces)
    assert fragment in str(err.value) and str(err.value).startswith("test stream")


def test_limit_is_16_bytes_per_parameter_and_below_protobufs() -> None:
    assert stream.limit_for(10) == 160 + 2**20
    assert stream.limit_for(10**9) == 2**31 - 1


# ============================================================================ through a server


def _streaming(h: Harness, chunk: int = 7) -> None:
    """Make ``h``'s client stream every model and upload of DIM = 15, in pieces of ``chunk`` bytes."""
    h.stub = rpc.CountingStub(h.channel, stream_above=32, chunk=chunk)


def test_streamed_rounds_move_exact_values_and_count_the_same_bytes(make_harness: Callable[..., Harness]) -> None:
    lr = 0.5
    h = make_harness(algorithm="gd", options={"lr": lr}, num_workers=2, rounds=2)
    _streaming(h)
    h.register("w0")
    h.register("w1")
    h.start()
    rng = np.random.default_rng(1)
    g = [rng.normal(size=(2, DIM)).astype(np.float32) for _ in range(2)]
    theta = np.zeros(DIM)
    for k in range(2):
        pushed = h.stub.counter.bytes["up", "PushStream"]
        for w in range(2):
            np.testing.assert_array_equal(h.params(f"w{w}", k), theta.astype(np.float32))
            wire = codec.upload_to_wire(f"w{w}", k, 1.0, dense(g[k][w]))
            assert h.stub.Push(wire, timeout=RPC_TIMEOUT).round == k
        theta = theta - lr * (g[k][0].astype(np.float64) + g[k][1])
        h.params("w0", k + 1)  # round k has closed
        assert h.ps.records[k]["bytes_up"] == h.stub.counter.bytes["up", "PushStream"] - pushed
    final = h.model("w0", 2)
    assert final.done
    np.testing.assert_array_equal(h.ps.theta, theta)
    np.testing.assert_array_equal(codec.tensor_from_proto(final.params, DIM), theta.astype(np.float32))

    counted = h.stub.counter
    assert {m for _, m in counted.bytes} == {"Register", "GetModelStream", "PushStream"}
    assert counted.messages["up", "PushStream"] > 4 * 8  # 15 float32 in 7-byte pieces: many pieces each
    for key, n in counted.bytes.items():
        assert h.ps.counter.bytes[key] == n, key
        assert h.ps.counter.messages[key] == counted.messages[key], key


def test_stub_streams_only_above_its_threshold(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(algorithm="gd", num_workers=1, rounds=1)
    h.stub = rpc.CountingStub(h.channel, stream_above=100)  # 60-byte model: unary; 100+ byte upload: streamed
    h.register("w0")
    h.start()
    h.params("w0", 0)
    h.push("w0", 0, dense(np.ones(DIM, np.float64)))  # 120 bytes of values
    h.model("w0", 1)
    assert {m for _, m in h.stub.counter.bytes} == {"Register", "GetModel", "PushStream"}


def _raw_push_stream(h: Harness, pieces: list[bytes]) -> None:
    call = h.channel.stream_unary(
        f"/{rpc.SERVICE}/PushStream", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    call(iter(pieces), timeout=RPC_TIMEOUT)


def test_bad_push_streams_are_rejected_whole(make_harness: Callable[..., Harness]) -> None:
    lr = 0.5
    h = make_harness(algorithm="gd", options={"lr": lr}, num_workers=1, rounds=1)
    _streaming(h)
    h.register("w0")
    h.start()
    h.params("w0", 0)
    g = np.random.default_rng(2).normal(size=DIM).astype(np.float32)
    good = codec.upload_to_wire("w0", 0, 1.0, dense(g)).tobytes()
    evil = codec.upload_to_wire("w0", 0, 1.0, dense(100 * g)).tobytes()
    n = len(evil)
    cases = {
        "no pieces": ([], "PushStream stream: no pieces"),
        "missing piece": (
            [stream.piece_bytes(0, n, evil[:20]), stream.piece_bytes(40, n, evil[40:])],
            "offset 40, expected 20",
        ),
        "duplicate piece": (
            [stream.piece_bytes(0, n, evil[:20]), stream.piece_bytes(0, n, evil[:20])],
            "offset 0, expected 20: the piece repeats",
        ),
        "oversized piece": ([stream.piece_bytes(0, n, evil + b"x")], f"past total_size {n}"),
        "too big for the model": (
            [stream.piece_bytes(0, stream.limit_for(DIM) + 1, evil)],
            f"total_size {stream.limit_for(DIM) + 1} outside",
        ),
        "ends early": ([stream.piece_bytes(0, n, evil[:-1])], f"ended after {n - 1} of {n} bytes"),
        "not a PushRequest": ([stream.piece_bytes(0, 3, b"\xff\xff\xff")], "do not make a PushRequest"),
        "malformed piece": ([stream.piece_bytes(0, n, evil[:20]), b"\x1a\x05ab"], "malformed piece"),
        "a bad payload": (
            list(stream.pieces(codec.upload_to_wire("w0", 0, 1.0, dense(g[:-1])), chunk=9)),
            "14 elements, expected 15",
        ),
    }
    for name, (pieces, fragment) in cases.items():
        with expect_status(Code.INVALID_ARGUMENT, fragment):
            _raw_push_stream(h, pieces)
        assert h.ps.round == 0 and not h.ps.engine._open.reports, name  # nothing reached the round
    _raw_push_stream(h, list(stream.pieces(good, chunk=11)))
    assert h.model("w0", 1).done
    np.testing.assert_array_equal(h.ps.theta, -lr * g.astype(np.float64))  # the good upload alone
    assert h.ps.records[0]["uploads"] == 1


def test_unary_push_that_is_no_push_request_is_invalid_argument(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(algorithm="gd", num_workers=1, rounds=1)
    h.register("w0")
    h.start()
    h.params("w0", 0)
    call = h.channel.unary_unary(f"/{rpc.SERVICE}/Push", request_serializer=lambda b: b, response_deserializer=bytes)
    with expect_status(Code.INVALID_ARGUMENT, "not a valid PushRequest"):
        call(b"\x0a\x05w0", timeout=RPC_TIMEOUT)  # worker_id cut short
    assert h.push("w0", 0, dense(np.ones(DIM, np.float32))).round == 0


@pytest.mark.slow  # about 2-5 s and 1 GB: a 48 MB model and upload through gRPC
def test_big_model_and_upload_round_trip_exactly(make_harness: Callable[..., Harness]) -> None:
    n_features, n_classes = 1_199_999, 10
    dim = (n_features + 1) * n_classes  # 12e6 parameters: 48 MB as float32, above the 32 MiB stream threshold
    lr = 0.5  # a power of two: -lr * g is exact in float32
    h = make_harness(
        algorithm="gd", options={"lr": lr}, num_workers=1, rounds=1, round_timeout=120.0, max_dim=20_000_000
    )
    h.register("w0", n_features=n_features, n_classes=n_classes)
    h.start()
    first = h.model("w0", 0)
    assert not first.params.data.strip(b"\x00")  # logreg starts at zero
    g = np.random.default_rng(3).normal(size=dim).astype(np.float32)
    wire = codec.upload_to_wire("w0", 0, 1.0, dense(g))
    assert h.stub.Push(wire, timeout=120.0).round == 0
    final = h.stub.GetModel(pb.GetModelRequest(worker_id="w0", round=1), timeout=120.0)
    assert final.done
    np.testing.assert_array_equal(h.ps.theta, -lr * g.astype(np.float64))  # the upload arrived exactly
    np.testing.assert_array_equal(codec.tensor_from_proto(final.params, dim), -lr * g)  # and the model
    counted = h.stub.counter
    pieces = -(-len(wire) // stream.CHUNK_BYTES)  # 1 MiB each
    assert counted.messages["up", "PushStream"] == pieces
    assert counted.messages["down", "GetModelStream"] == -(-first.ByteSize() // stream.CHUNK_BYTES) * 2
    for key, n in counted.bytes.items():
        assert h.ps.counter.bytes[key] == n, key
    assert h.ps.records[0]["bytes_up"] == counted.bytes["up", "PushStream"]

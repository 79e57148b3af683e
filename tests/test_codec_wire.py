"""Uploads on the wire without copying dense values: codec.upload_to_wire serializes exactly what
upload_to_proto(...).SerializeToString() does, and codec.WireUpload reads exactly what
PushRequest.FromString + upload_from_proto read, viewing a dense payload's values in the received
bytes instead of copying them. Any message it cannot read in place (repeated or merged payload
fields, bytes protobuf would refuse) goes through protobuf whole."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from psrv import codec, stream
from psrv.compress.laq import quantize
from psrv.payload import Payload, dense, sparse, to_bfloat16, to_dense
from psrv.v1 import psrv_pb2 as pb

D = 1000


def _payloads() -> list[Payload]:
    g = np.random.default_rng(0).normal(size=D)
    return [
        dense(g.astype(np.float32)),
        dense(g),
        dense(g.astype(">f4")),  # big-endian values go little-endian
        dense(g.astype(np.float16)),
        Payload("dense", D, values=to_bfloat16(g.astype(np.float32)), value_format="bfloat16"),
        sparse(D, np.array([3, 500, 999]), np.ones(3, np.float32)),
        quantize(g, np.zeros(D), 4),
    ]


PAYLOADS = _payloads()
IDS = [f"{p.kind}-{p.value_dtype}" for p in PAYLOADS]


@pytest.mark.parametrize("p", PAYLOADS, ids=IDS)
@pytest.mark.parametrize("smoothness", [None, 2.5])
@pytest.mark.parametrize("zstd", [False, True])
def test_upload_to_wire_is_upload_to_proto_serialized(p: Payload, smoothness: float | None, zstd: bool) -> None:
    expected = codec.upload_to_proto("w7", 300, 0.25, p, zstd=zstd, smoothness=smoothness).SerializeToString()
    wire = codec.upload_to_wire("w7", 300, 0.25, p, zstd=zstd, smoothness=smoothness)
    assert wire.tobytes() == expected and wire.nbytes == len(expected)


def _same_as_protobuf(data: bytes, dim: int = D) -> codec.WireUpload:
    """WireUpload(data) reads what protobuf reads; returns it."""
    up = codec.WireUpload(data)
    msg = pb.PushRequest.FromString(data)
    for field in ("worker_id", "round", "local_loss"):
        assert getattr(up.request, field) == getattr(msg, field), field
    assert codec.upload_smoothness(up.request) == codec.upload_smoothness(msg)
    got, expected = up.payload(dim), codec.upload_from_proto(msg, dim)
    assert (got.kind, got.value_format) == (expected.kind, expected.value_format)
    np.testing.assert_array_equal(to_dense(got), to_dense(expected))
    return up


def _in_place(up: codec.WireUpload, data: bytes | bytearray) -> bool:
    values = up.payload(D).values
    return values is not None and np.shares_memory(values, np.frombuffer(data, np.uint8))


@pytest.mark.parametrize("p", PAYLOADS, ids=IDS)
@pytest.mark.parametrize("zstd", [False, True])
def test_wire_upload_reads_what_protobuf_reads(p: Payload, zstd: bool) -> None:
    data = codec.upload_to_proto("w1", 4, 0.5, p, zstd=zstd, smoothness=3.0).SerializeToString()
    up = _same_as_protobuf(data)
    assert _in_place(up, data) == (p.kind == "dense" and not up.request.HasField("zstd"))


def test_dense_values_are_viewed_in_a_reassembled_buffer() -> None:
    data = bytearray(codec.upload_to_wire("w1", 4, 0.5, dense(np.arange(D, dtype=np.float32))).tobytes())
    up = codec.WireUpload(memoryview(data))
    assert _in_place(up, data) and up.request.WhichOneof("payload") is None
    np.testing.assert_array_equal(up.payload(D).values, np.arange(D, dtype=np.float32))


def _field(number: int, body: bytes) -> bytes:
    return stream.varint(number << 3 | 2) + stream.varint(len(body)) + body


def test_unusual_but_valid_encodings_read_as_protobuf_reads_them() -> None:
    a, b = np.arange(D, dtype=np.float32), -np.arange(D, dtype=np.float32)
    head = pb.PushRequest(worker_id="w1", round=4, local_loss=0.5).SerializeToString()
    tensor_a = codec.tensor_to_proto(a).SerializeToString()
    sparse_msg = codec.payload_to_proto(sparse(D, np.array([1]), np.ones(1, np.float32))).SerializeToString()
    unknown = stream.varint(99 << 3 | 0) + stream.varint(7)
    cases = {
        "payload first": (_field(10, tensor_a) + head, True),
        "unknown fields": (head + unknown + _field(10, tensor_a + unknown) + unknown, True),
        "header fields repeated": (head + _field(10, tensor_a) + pb.PushRequest(round=9).SerializeToString(), True),
        "data twice (the last wins)": (head + _field(10, tensor_a + _field(3, b.tobytes())), False),
        "dense twice (merged: b's values)": (head + _field(10, tensor_a) + _field(10, _field(3, b.tobytes())), False),
        "another payload, then dense (dense wins)": (head + _field(11, sparse_msg) + _field(10, tensor_a), False),
    }  # fmt: skip
    for name, (data, in_place) in cases.items():
        up = _same_as_protobuf(data)
        assert _in_place(up, data) == in_place, name


@pytest.mark.parametrize("cut", [1, 10, -1, -4001])
def test_bytes_that_are_no_push_request_are_a_codec_error(cut: int) -> None:
    data = codec.upload_to_wire("w1", 4, 0.5, dense(np.ones(D, np.float32))).tobytes()
    with pytest.raises(Exception):  # noqa: B017 - protobuf's DecodeError
        pb.PushRequest.FromString(data[:cut])
    with pytest.raises(codec.CodecError, match="not a valid PushRequest"):
        codec.WireUpload(data[:cut])


def test_validation_is_upload_from_protos() -> None:
    nan = np.ones(D, np.float32)
    nan[5] = np.nan
    with pytest.raises(codec.CodecError, match="NaN or Inf"):
        codec.WireUpload(codec.upload_to_wire("w", 0, 0.0, dense(nan)).tobytes()).payload(D)
    with pytest.raises(codec.CodecError, match="local_loss"):
        codec.WireUpload(codec.upload_to_wire("w", 0, float("inf"), dense(np.ones(D))).tobytes()).payload(D)
    with pytest.raises(codec.CodecError, match="999 elements, expected 1000"):
        codec.WireUpload(codec.upload_to_wire("w", 0, 0.0, dense(np.ones(D - 1))).tobytes()).payload(D)
    with pytest.raises(codec.CodecError, match="no payload"):
        codec.WireUpload(pb.PushRequest(worker_id="w").SerializeToString()).payload(D)


@pytest.mark.parametrize("round_", [0, 1, 300])
@pytest.mark.parametrize("selected", [None, (), (0, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_broadcast_to_wire_is_broadcast_to_proto_serialized(round_: int, selected: Any, dtype: Any) -> None:
    from psrv.engine import Broadcast

    rng = np.random.default_rng(round_)
    for done in (False, True):
        for params in (rng.standard_normal(1000).astype(dtype), np.zeros(0, dtype)):
            b = Broadcast(form="dense", round=round_, total_samples=10, num_workers=3, done=done, selected=selected,
                          params=params, recent_step_sq=(0.5, 0.25)[: round_ % 3])  # fmt: skip
            assert codec.broadcast_to_wire(b) == codec.broadcast_to_proto(b).SerializeToString()

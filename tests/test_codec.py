"""Wire round-trips, exact wire sizes and input validation of ``psrv.codec`` (no network).

Expected sizes are computed from the protobuf wire format by hand (tag bytes + varint
lengths + field contents), so a change to the schema or to how a payload is laid
out on the wire shows up here as a formula that no longer holds.
"""

from __future__ import annotations

import dataclasses
import math
import struct

import numpy as np
import pytest

from psrv import bitpack, codec, varint
from psrv.codec import CodecError
from psrv.compress.laq import quantize
from psrv.compress.topk import TopK
from psrv.engine import Broadcast
from psrv.payload import Payload, dense, payload_bits, sparse, to_dense
from psrv.v1 import psrv_pb2 as pb

# --------------------------------------------------------------------------- wire-format helpers


def varint_len(n: int) -> int:
    """Bytes of the base-128 varint encoding of the non-negative integer ``n``."""
    assert n >= 0
    return max(1, math.ceil(n.bit_length() / 7))


def tag_len(field_number: int) -> int:
    return varint_len(field_number << 3)


def len_field(field_number: int, length: int, *, always: bool = False) -> int:
    """A length-delimited field (bytes, string, sub-message); proto3 omits an empty one
    unless it is a set oneof member / explicitly present sub-message (``always``)."""
    if length == 0 and not always:
        return 0
    return tag_len(field_number) + varint_len(length) + length


def varint_field(field_number: int, value: int) -> int:
    return 0 if value == 0 else tag_len(field_number) + varint_len(value)


def fixed_field(field_number: int, value: float, width: int) -> int:
    """double (width 8) or float (width 4); proto3 omits +0.0 only."""
    present = value != 0 or math.copysign(1.0, value) < 0
    return tag_len(field_number) + width if present else 0


def packed_uint64_field(field_number: int, values: list[int]) -> int:
    return len_field(field_number, sum(varint_len(v) for v in values))


def dense_tensor_size(dtype: int, shape: list[int], nbytes: int) -> int:
    return varint_field(1, dtype) + packed_uint64_field(2, shape) + len_field(3, nbytes)


def index_bytes(indices: np.ndarray, dim: int) -> tuple[int, int]:
    """The encoding the codec must pick (the smaller one) and its size in bytes."""
    packed = bitpack.index_width(dim) * math.ceil(len(indices) / 8)  # one padded plane per bit
    delta = varint.encoded_size(indices)
    return (pb.INDEX_ENCODING_DELTA_VARINT, delta) if delta < packed else (pb.INDEX_ENCODING_BITPACKED, packed)


def sparse_tensor_size(dim: int, indices: np.ndarray, value_bytes: int) -> int:
    nnz = len(indices)
    encoding, nbytes = index_bytes(indices, dim)
    return (
        varint_field(1, dim)
        + varint_field(2, nnz)
        + varint_field(3, encoding)
        + len_field(4, nbytes)
        + varint_field(5, pb.DTYPE_FLOAT32)
        + len_field(6, nnz * value_bytes)
    )


def laq_size(dim: int, radius: float, bits: int) -> int:
    code_bytes = bits * math.ceil(dim / 8)
    return varint_field(1, dim) + fixed_field(2, radius, 4) + varint_field(3, bits) + len_field(4, code_bytes)


def upload_size(worker_id: str, round_: int, loss: float, payload_field: int, payload_size: int) -> int:
    return (
        len_field(1, len(worker_id.encode()))
        + varint_field(2, round_)
        + fixed_field(3, loss, 8)
        + len_field(payload_field, payload_size, always=True)
    )


def test_wire_helpers_agree_with_protobuf_on_basics() -> None:
    assert [varint_len(n) for n in (0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**64 - 1)] == [
        1,
        1,
        1,
        2,
        2,
        3,
        3,
        4,
        10,
    ]
    for n in (0, 1, 127, 128, 300, 16384, 2**35):
        assert varint_field(1, n) == len(pb.PushResponse(round=n).SerializeToString())
    assert tag_len(15) == 1 and tag_len(16) == 2


# --------------------------------------------------------------------------- round-trips

RNG_SEED = 1234


def _rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


def _reparse_upload(msg: pb.PushRequest) -> pb.PushRequest:
    data = msg.SerializeToString()
    assert len(data) == msg.ByteSize()
    return pb.PushRequest.FromString(data)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_dense_payload_round_trip(dtype: type) -> None:
    values = _rng().normal(size=37).astype(dtype)
    p = dense(values)
    msg = _reparse_upload(codec.upload_to_proto("w0", 5, 0.25, p))
    assert msg.worker_id == "w0" and msg.round == 5 and msg.local_loss == 0.25
    assert msg.WhichOneof("payload") == "dense"
    back = codec.upload_from_proto(msg, 37)
    assert back.kind == "dense" and back.dim == 37
    assert back.values.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.values, values)
    np.testing.assert_array_equal(to_dense(back), values.astype(np.float64))
    assert payload_bits(back) == payload_bits(p) == np.dtype(dtype).itemsize * 8 * 37


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("d", [1, 2, 15, 1000, 1024, 1025])
def test_sparse_payload_round_trip(ratio: float, d: int) -> None:
    x = _rng().normal(size=d)
    p = TopK(ratio=ratio).compress(x)
    msg = _reparse_upload(codec.upload_to_proto("worker-7", 3, 1.5, p))
    assert msg.WhichOneof("payload") == "sparse"
    assert msg.sparse.index_encoding == index_bytes(p.indices, d)[0] and msg.sparse.value_dtype == pb.DTYPE_FLOAT32
    back = codec.upload_from_proto(msg, d)
    assert back.kind == "sparse" and back.dim == d
    np.testing.assert_array_equal(back.indices, p.indices)
    np.testing.assert_array_equal(back.values, p.values)
    np.testing.assert_array_equal(to_dense(back), to_dense(p))
    expect = np.zeros(d)
    expect[p.indices] = x[p.indices].astype(np.float32)
    np.testing.assert_array_equal(to_dense(back), expect)


def test_sparse_payload_float64_values_round_trip() -> None:
    p = sparse(50, np.array([0, 7, 49]), np.array([1.0, -2.5, 1e-300]))
    back = codec.sparse_from_proto(pb.SparseTensor.FromString(codec.payload_to_proto(p).SerializeToString()), 50)
    assert back.values.dtype == np.float64
    np.testing.assert_array_equal(back.values, p.values)
    np.testing.assert_array_equal(back.indices, [0, 7, 49])


def test_dense_payload_big_endian_values_are_sent_little_endian() -> None:
    p = dense(np.array([1.5, -2.0, 3.25], dtype=">f4"))
    back = codec.dense_from_proto(codec.payload_to_proto(p), 3)
    np.testing.assert_array_equal(back.values, [1.5, -2.0, 3.25])


def test_sparse_payload_big_endian_values_are_sent_little_endian() -> None:
    p = sparse(10, np.array([1, 4, 9]), np.array([1.5, -2.0, 3.25], dtype=">f4"))
    back = codec.sparse_from_proto(codec.payload_to_proto(p), 10)
    np.testing.assert_array_equal(back.values, [1.5, -2.0, 3.25])


def test_empty_sparse_payload_round_trip() -> None:
    p = sparse(10, np.array([], dtype=np.int64), np.array([], dtype=np.float32))
    back = codec.sparse_from_proto(codec.payload_to_proto(p), 10)
    assert back.indices.size == 0 and back.values.size == 0
    assert not to_dense(back).any()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 16])
def test_laq_payload_round_trip(bits: int) -> None:
    rng = _rng()
    d = 123
    grad, q_prev = rng.normal(size=d), rng.normal(size=d) * 0.1
    p = quantize(grad, q_prev, bits)
    msg = _reparse_upload(codec.upload_to_proto("w", 9, 2.0, p))
    assert msg.WhichOneof("payload") == "laq"
    assert msg.laq.bits == bits and msg.laq.dim == d
    back = codec.upload_from_proto(msg, d)
    assert back.kind == "laq" and back.bits == bits and back.dim == d
    assert back.scale == p.scale  # R is already a float32 value, so it survives exactly
    np.testing.assert_array_equal(back.codes, p.codes)
    assert int(back.codes.max()) < 2**bits
    np.testing.assert_array_equal(to_dense(back), to_dense(p))
    # the quantizer's promise: ||g - (q_prev + delta Q)||_inf <= tau * R
    tau = 1.0 / (2**bits - 1)
    assert np.max(np.abs(grad - (q_prev + to_dense(back)))) <= tau * back.scale * (1 + 1e-12)


def test_laq_zero_innovation_round_trip() -> None:
    g = np.arange(20, dtype=np.float64)
    p = quantize(g, g.copy(), 4)
    back = codec.laq_from_proto(pb.LaqPayload.FromString(codec.payload_to_proto(p).SerializeToString()), 20)
    assert back.scale == 0.0
    assert not to_dense(back).any()


@pytest.mark.parametrize("reason", ["lazy_rule", "not_selected"])
def test_skip_notice_round_trip(reason: str) -> None:
    msg = pb.SkipRequest.FromString(codec.skip_to_proto("w3", 11, reason, 0.75).SerializeToString())
    assert (msg.worker_id, msg.round, msg.local_loss) == ("w3", 11, 0.75)
    assert codec.skip_reason_from_proto(msg) == reason


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape", [(15,), (5, 3), (1,), (0,)])
def test_tensor_round_trip(dtype: type, shape: tuple[int, ...]) -> None:
    arr = _rng().normal(size=shape).astype(dtype)
    msg = pb.DenseTensor.FromString(codec.tensor_to_proto(arr).SerializeToString())
    assert list(msg.shape) == list(shape)
    back = codec.tensor_from_proto(msg, math.prod(shape))
    assert back.shape == shape and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, arr)
    assert not back.flags.writeable  # documented: a read-only view of the message bytes


def test_model_broadcast_round_trip() -> None:
    params = _rng().normal(size=(4 + 1) * 3)
    msg = pb.GetModelResponse(
        round=42,
        params=codec.tensor_to_proto(params.astype(np.float32)),
        recent_step_sq=[0.5, 0.25, 1e-9],
        total_samples=1000,
        num_workers=4,
        done=True,
    )
    back = pb.GetModelResponse.FromString(msg.SerializeToString())
    assert back == msg
    assert (back.round, back.total_samples, back.num_workers, back.done) == (42, 1000, 4, True)
    assert list(back.recent_step_sq) == [0.5, 0.25, 1e-9]
    np.testing.assert_array_equal(codec.tensor_from_proto(back.params, 15, "model"), params.astype(np.float32))


@pytest.mark.parametrize("selected", [None, (), (0, 2, 5)])
def test_broadcast_selection_round_trip(selected: tuple[int, ...] | None) -> None:
    """Absent selection: everyone computes; present, even empty: only the listed workers."""
    b = Broadcast(round=3, params=np.zeros(4, np.float32), recent_step_sq=(), total_samples=9, num_workers=6)
    msg = pb.GetModelResponse.FromString(
        codec.broadcast_to_proto(dataclasses.replace(b, selected=selected)).SerializeToString()
    )
    assert msg.HasField("selection") == (selected is not None)
    assert codec.selected_workers(msg) == selected


def test_payload_kinds_are_the_push_payload_fields() -> None:
    oneof = pb.PushRequest.DESCRIPTOR.oneofs_by_name["payload"]
    assert sorted(codec.PAYLOAD_KINDS) == sorted(f.name for f in oneof.fields if f.name != "zstd")
    assert sorted(codec.PAYLOAD_KINDS.values()) == sorted(v for v in pb.PayloadKind.values() if v)


def test_bit_plane_example_of_the_proto_file() -> None:
    """psrv.proto: values [5, 2, 7] with w = 3 are the planes 0b101, 0b110, 0b101 = bytes 05 06 05."""
    assert bitpack.pack(np.array([5, 2, 7]), 3) == bytes([5, 6, 5])
    laq = pb.LaqPayload(dim=3, radius=1.0, bits=3, codes=bytes([5, 6, 5]))
    assert list(codec.laq_from_proto(laq, 3).codes) == [5, 2, 7]


def test_smoothness_travels_only_when_given() -> None:
    p = dense(np.ones(3, np.float32))
    assert codec.upload_smoothness(codec.upload_to_proto("w", 0, 0.0, p)) is None
    sent = pb.PushRequest.FromString(codec.upload_to_proto("w", 0, 0.0, p, smoothness=0.0).SerializeToString())
    assert codec.upload_smoothness(sent) == 0.0


def test_register_messages_round_trip() -> None:
    req = pb.RegisterRequest(worker_id="w-é", num_samples=500, n_features=784, n_classes=10)
    assert pb.RegisterRequest.FromString(req.SerializeToString()) == req
    config = pb.RunConfig(
        algorithm="laq",
        compressor="",
        options={"lr": 0.02, "bits": 4.0, "D": 10.0},
        task="logreg",
        task_options={"l2": 0.01},
        dim=7850,
        num_workers=10,
        seed=2**40 + 3,
    )
    reply = pb.RegisterResponse(worker_index=7, config=config)
    back = pb.RegisterResponse.FromString(reply.SerializeToString())
    assert back == reply
    assert back.worker_index == 7
    assert dict(back.config.options) == {"lr": 0.02, "bits": 4.0, "D": 10.0}
    assert dict(back.config.task_options) == {"l2": 0.01}
    assert (back.config.algorithm, back.config.task, back.config.dim, back.config.seed) == (
        "laq",
        "logreg",
        7850,
        2**40 + 3,
    )


def test_push_and_skip_responses_round_trip() -> None:
    for r in (0, 1, 2**63):
        assert pb.PushResponse.FromString(pb.PushResponse(round=r).SerializeToString()).round == r
        assert pb.SkipResponse.FromString(pb.SkipResponse(round=r).SerializeToString()).round == r


# --------------------------------------------------------------------------- exact sizes and payload bits


@pytest.mark.parametrize("d", [15, 100, 4095, 5000, 7850])
def test_dense_upload_exact_size(d: int) -> None:
    wid, rnd, loss = "worker-0", 17, 0.693
    p = dense(_rng().normal(size=d).astype(np.float32))
    inner = dense_tensor_size(pb.DTYPE_FLOAT32, [d], 4 * d)
    expected = upload_size(wid, rnd, loss, 10, inner)
    data = codec.upload_to_proto(wid, rnd, loss, p).SerializeToString()
    assert len(data) == expected
    assert payload_bits(p) == 32 * d


def test_dense_sizes_cover_two_and_three_byte_length_varints() -> None:
    assert varint_len(4 * 100) == 2 and varint_len(4 * 4095) == 2
    assert varint_len(4 * 5000) == 3 and varint_len(4 * 7850) == 3


@pytest.mark.parametrize(
    ("d", "k"), [(15, 1), (15, 15), (1000, 10), (1000, 17), (1024, 100), (7850, 79), (100_000, 1000)]
)
def test_sparse_upload_exact_size(d: int, k: int) -> None:
    wid, rnd, loss = "w1", 300, 1.25
    p = TopK(k=k).compress(_rng().normal(size=d))
    assert len(p.indices) == k
    proto = codec.payload_to_proto(p)
    width = math.ceil(math.log2(d)) if d > 1 else 1
    assert bitpack.index_width(d) == width
    assert len(proto.indices) == index_bytes(p.indices, d)[1] <= width * math.ceil(k / 8)
    expected = upload_size(wid, rnd, loss, 11, sparse_tensor_size(d, p.indices, 4))
    assert len(codec.upload_to_proto(wid, rnd, loss, p).SerializeToString()) == expected
    assert payload_bits(p) == k * (32 + width)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("d", [15, 1000, 7850])
def test_laq_upload_exact_size(bits: int, d: int) -> None:
    wid, rnd, loss = "w2", 1, 3.5
    p = quantize(_rng().normal(size=d), np.zeros(d), bits)
    assert p.scale > 0
    proto = codec.payload_to_proto(p)
    assert len(proto.codes) == bits * math.ceil(d / 8)
    assert fixed_field(2, p.scale, 4) == 5  # the float32 radius: tag + 4 bytes
    expected = upload_size(wid, rnd, loss, 12, laq_size(d, p.scale, bits))
    assert len(codec.upload_to_proto(wid, rnd, loss, p).SerializeToString()) == expected
    assert payload_bits(p) == 32 + bits * d


@pytest.mark.parametrize(
    ("wid", "rnd", "reason", "loss"),
    [
        ("w0", 0, "lazy_rule", 0.0),
        ("w0", 5, "not_selected", 1.0),
        ("a-much-longer-worker-id", 2**40, "lazy_rule", -3.0),
    ],
)
def test_skip_notice_exact_size(wid: str, rnd: int, reason: str, loss: float) -> None:
    msg = codec.skip_to_proto(wid, rnd, reason, loss)
    expected = (
        len_field(1, len(wid))
        + varint_field(2, rnd)
        + varint_field(3, codec.SKIP_REASONS[reason])
        + 9  # local_loss is `optional`: present (tag + 8 bytes) even when 0.0
    )
    assert len(msg.SerializeToString()) == expected
    if rnd == 0 and loss == 0.0:
        assert expected == 2 + len(wid) + 2 + 9  # worker_id, reason and the loss


def test_skip_notice_without_loss_is_smallest() -> None:
    msg = codec.skip_to_proto("w0", 0, "not_selected", None)
    assert not msg.HasField("local_loss")
    assert len(msg.SerializeToString()) == 2 + 2 + 2  # worker_id and reason only
    assert codec.skip_reason_from_proto(pb.SkipRequest.FromString(msg.SerializeToString())) == "not_selected"


def _payloads_for(d: int) -> list[Payload]:
    rng = _rng()
    x = rng.normal(size=d)
    return [
        dense(x.astype(np.float32)),
        TopK(ratio=0.01).compress(x),
        TopK(ratio=0.1).compress(x),
        quantize(x, np.zeros(d), 2),
        quantize(x, np.zeros(d), 4),
        quantize(x, np.zeros(d), 8),
    ]


@pytest.mark.parametrize("d", [10_000, 7850 * 2, 100_003])
def test_wire_size_close_to_payload_bits(d: int) -> None:
    for p in _payloads_for(d):
        wire_bits = 8 * len(codec.upload_to_proto("worker-12", 123, 0.5, p).SerializeToString())
        formula = payload_bits(p)
        assert wire_bits <= 1.02 * formula + 64 * 8, (p.kind, wire_bits, formula)
        if p.kind != "sparse":  # padding aside, only sparse indices can beat the formula (delta varint)
            assert wire_bits >= formula - 8 * 8, p.kind
            assert abs(wire_bits - formula) <= 0.02 * formula + 64 * 8, (p.kind, wire_bits, formula)


def test_sparse_indices_never_cost_more_than_the_formula_and_less_when_sparse() -> None:
    d = 1_000_000
    rng = _rng()
    for k in (1, 10, 1000, 10_000, 500_000, d):
        idx = np.sort(rng.choice(d, k, replace=False))
        encoding, data = codec.encode_indices(idx, d)
        assert 8 * len(data) <= k * bitpack.index_width(d) + 8 * bitpack.index_width(d)
        if k == 10_000:  # gaps ~100: about 10 bits each instead of 20
            assert encoding == pb.INDEX_ENCODING_DELTA_VARINT and 8 * len(data) < 0.6 * k * bitpack.index_width(d)
        msg = pb.SparseTensor(
            dim=d,
            nnz=k,
            index_encoding=encoding,
            indices=data,
            value_dtype=pb.DTYPE_FLOAT32,
            values=np.zeros(k, np.float32).tobytes(),
        )
        np.testing.assert_array_equal(codec.sparse_from_proto(msg, d).indices, idx)


@pytest.mark.parametrize(
    ("data", "count", "fragment"),
    [
        (b"\x80", 1, "exactly 1"),
        (b"\x01\x01", 1, "exactly 1"),
        (b"\xff" * 10 + b"\x01", 1, "longer than 10"),
        (b"\x05\x05", 2, "out of range"),
    ],
)
def test_bad_delta_varint_indices(data: bytes, count: int, fragment: str) -> None:
    msg = pb.SparseTensor(
        dim=8,
        nnz=count,
        index_encoding=pb.INDEX_ENCODING_DELTA_VARINT,
        indices=data,
        value_dtype=pb.DTYPE_FLOAT32,
        values=np.zeros(count, np.float32).tobytes(),
    )
    with _raises(fragment):
        codec.sparse_from_proto(msg, 8)


# --------------------------------------------------------------------------- validation


def _raises(fragment: str):
    return pytest.raises(CodecError, match=fragment)


def _f32(*values: float) -> bytes:
    return np.array(values, dtype="<f4").tobytes()


@pytest.mark.parametrize(("code", "name"), [(pb.DTYPE_UNSPECIFIED, "DTYPE_UNSPECIFIED"), (99, "99")])
def test_tensor_unsupported_dtype(code: int, name: str) -> None:
    msg = pb.DenseTensor(dtype=code, shape=[2], data=b"\0" * 8)
    with _raises(f"unsupported dtype {name}"):
        codec.tensor_from_proto(msg)
    with _raises(f"unsupported dtype {name}"):
        codec.dense_from_proto(msg, 2)


def test_tensor_to_proto_rejects_non_float() -> None:
    with _raises("cannot put dtype int64"):
        codec.tensor_to_proto(np.arange(3, dtype=np.int64))


def test_tensor_data_length_not_matching_shape() -> None:
    msg = pb.DenseTensor(dtype=pb.DTYPE_FLOAT32, shape=[5, 3], data=_f32(*range(14)))
    with _raises("56 bytes of data, expected 60"):
        codec.tensor_from_proto(msg)
    with _raises("bytes of data"):
        codec.dense_from_proto(pb.DenseTensor(dtype=pb.DTYPE_FLOAT64, shape=[15], data=_f32(*range(15))), 15)


def test_tensor_element_count_not_expected_dim() -> None:
    with _raises("14 elements, expected 15"):
        codec.dense_from_proto(pb.DenseTensor(dtype=pb.DTYPE_FLOAT32, shape=[14], data=_f32(*range(14))), 15)
    with _raises("16 elements, expected 15"):
        codec.tensor_from_proto(pb.DenseTensor(dtype=pb.DTYPE_FLOAT32, shape=[4, 4], data=_f32(*range(16))), 15)


@pytest.mark.parametrize("shape", [[5, 3], [15, 1], [], [1, 15]])
def test_dense_payload_must_be_vector(shape: list[int]) -> None:
    msg = pb.DenseTensor(dtype=pb.DTYPE_FLOAT32, shape=shape, data=_f32(*range(math.prod(shape))))
    with _raises("is not a vector"):
        codec.dense_from_proto(msg, 15)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_dense_non_finite(bad: float) -> None:
    values = np.zeros(15, dtype=np.float32)
    values[7] = bad
    with _raises("NaN or Inf"):
        codec.dense_from_proto(codec.tensor_to_proto(values), 15)
    with _raises("NaN or Inf"):
        codec.tensor_from_proto(codec.tensor_to_proto(values.astype(np.float16)), 15)


def _sparse_msg(dim: int = 1000, indices: list[int] | None = None, **over: object) -> pb.SparseTensor:
    idx = [3, 500, 999] if indices is None else indices
    fields: dict[str, object] = dict(
        dim=dim,
        nnz=len(idx),
        index_encoding=pb.INDEX_ENCODING_BITPACKED,
        indices=bitpack.pack(np.array(idx, dtype=np.int64), bitpack.index_width(dim)),
        value_dtype=pb.DTYPE_FLOAT32,
        values=_f32(*[1.0] * len(idx)),
    )
    fields.update(over)
    return pb.SparseTensor(**fields)


def test_sparse_valid_baseline() -> None:
    p = codec.sparse_from_proto(_sparse_msg(), 1000)
    np.testing.assert_array_equal(p.indices, [3, 500, 999])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_sparse_non_finite(bad: float) -> None:
    with _raises("NaN or Inf"):
        codec.sparse_from_proto(_sparse_msg(values=_f32(1.0, bad, 2.0)), 1000)


def test_sparse_dim_mismatch() -> None:
    with _raises("dimension 1000, expected 999"):
        codec.sparse_from_proto(_sparse_msg(), 999)


def test_sparse_nnz_exceeds_dim() -> None:
    idx = list(range(11))
    with _raises("nnz 11 exceeds dimension 10"):
        codec.sparse_from_proto(_sparse_msg(dim=10, indices=idx), 10)


def test_sparse_wrong_packed_index_length() -> None:
    msg = _sparse_msg()
    msg.indices = msg.indices + b"\0"
    with _raises("indices: packed data has"):
        codec.sparse_from_proto(msg, 1000)
    msg.indices = msg.indices[:-2]
    with _raises("indices: packed data has"):
        codec.sparse_from_proto(msg, 1000)


def test_sparse_index_out_of_range() -> None:
    assert bitpack.index_width(1000) == 10  # 10 bits can say 1023
    msg = _sparse_msg(indices=[3, 500, 1023])
    with _raises(r"index 1023 out of range \[0, 1000\)"):
        codec.sparse_from_proto(msg, 1000)
    with _raises("out of range"):
        codec.sparse_from_proto(_sparse_msg(indices=[1000]), 1000)


@pytest.mark.parametrize("idx", [[3, 3, 7], [7, 3, 9], [0, 0], [999, 1]])
def test_sparse_indices_not_strictly_increasing(idx: list[int]) -> None:
    with _raises("strictly increasing"):
        codec.sparse_from_proto(_sparse_msg(indices=idx), 1000)


@pytest.mark.parametrize("enc", [pb.INDEX_ENCODING_UNSPECIFIED, 7])
def test_sparse_unsupported_index_encoding(enc: int) -> None:
    with _raises(f"unsupported index encoding {enc}"):
        codec.sparse_from_proto(_sparse_msg(index_encoding=enc), 1000)


def test_sparse_wrong_values_length_or_dtype() -> None:
    with _raises("8 bytes of data, expected 12"):
        codec.sparse_from_proto(_sparse_msg(values=_f32(1.0, 2.0)), 1000)
    with _raises("unsupported dtype DTYPE_UNSPECIFIED"):
        codec.sparse_from_proto(_sparse_msg(value_dtype=pb.DTYPE_UNSPECIFIED), 1000)


def _laq_msg(dim: int = 15, bits: int = 4, radius: float = 1.0) -> pb.LaqPayload:
    codes = np.arange(dim) % (2**bits)
    return pb.LaqPayload(dim=dim, radius=radius, bits=bits, codes=bitpack.pack(codes, bits))


def test_laq_valid_baseline() -> None:
    p = codec.laq_from_proto(_laq_msg(), 15)
    np.testing.assert_array_equal(p.codes, np.arange(15))


def test_laq_dim_mismatch() -> None:
    with _raises("dimension 15, expected 16"):
        codec.laq_from_proto(_laq_msg(), 16)


@pytest.mark.parametrize("bits", [0, 17, 32])
def test_laq_bits_out_of_range(bits: int) -> None:
    msg = pb.LaqPayload(dim=15, radius=1.0, bits=bits, codes=b"\0" * (max(bits, 1) * 2))
    with _raises(f"bits {bits} outside"):
        codec.laq_from_proto(msg, 15)


@pytest.mark.parametrize("radius", [-1.0, -1e-30, float("nan"), float("inf"), float("-inf")])
def test_laq_bad_radius(radius: float) -> None:
    with _raises("radius .* must be finite and >= 0"):
        codec.laq_from_proto(_laq_msg(radius=radius), 15)


def test_laq_radius_float32_overflow_is_rejected() -> None:
    # a float64 radius too big for float32 becomes inf on the wire
    msg = _laq_msg()
    msg.radius = 1e39
    assert math.isinf(pb.LaqPayload.FromString(msg.SerializeToString()).radius)
    with _raises("radius"):
        codec.laq_from_proto(pb.LaqPayload.FromString(msg.SerializeToString()), 15)


def test_laq_codes_length_wrong() -> None:
    for codes in (b"", b"\0" * 7, b"\0" * 9, _laq_msg(bits=3).codes):
        msg = _laq_msg()
        msg.codes = codes
        with _raises("codes: packed data has"):
            codec.laq_from_proto(msg, 15)


def test_upload_without_payload() -> None:
    with _raises("no payload"):
        codec.upload_from_proto(pb.PushRequest(worker_id="w", round=0, local_loss=1.0), 15)


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), float("-inf")])
def test_upload_non_finite_local_loss(loss: float) -> None:
    msg = codec.upload_to_proto("w", 0, loss, dense(np.zeros(15, dtype=np.float32)))
    with _raises("local_loss is NaN or Inf"):
        codec.upload_from_proto(msg, 15)


@pytest.mark.parametrize("reason", [3, pb.SKIP_REASON_UNSPECIFIED, 42])  # 3 was DEADLINE, never a wire value
def test_skip_invalid_reason(reason: int) -> None:
    msg = pb.SkipRequest(worker_id="w", round=0, reason=reason, local_loss=1.0)
    with _raises(f"invalid reason {reason}"):
        codec.skip_reason_from_proto(msg)


def test_skip_non_finite_local_loss() -> None:
    with _raises("local_loss is NaN or Inf"):
        codec.skip_reason_from_proto(codec.skip_to_proto("w", 0, "lazy_rule", float("nan")))


def test_codec_error_is_value_error() -> None:
    assert issubclass(CodecError, ValueError)


# --------------------------------------------------------------------------- bitpack


@pytest.mark.parametrize("width", range(1, 33))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1000])
def test_bitpack_round_trip(width: int, count: int) -> None:
    rng = np.random.default_rng([width, count])
    values = rng.integers(0, 2**width, size=count, dtype=np.uint64)
    if count:
        values[0] = 2**width - 1  # the extremes must survive too
        values[-1] = 0 if count > 1 else values[-1]
    data = bitpack.pack(values, width)
    assert len(data) == bitpack.packed_size(count, width) == width * math.ceil(count / 8)
    back = bitpack.unpack(data, count, width)
    assert back.shape == (count,)
    np.testing.assert_array_equal(back.astype(np.uint64), values)


def test_bitpack_layout_is_bit_planes_lsb_first() -> None:
    # plane 0 = low bits of (1, 2, 3) = 1,0,1 -> 0b101; plane 1 = 0,1,1 -> 0b110
    assert bitpack.pack(np.array([1, 2, 3]), 2) == bytes([0b101, 0b110])
    # nine values: every plane takes two bytes, the second holding only value 8's bit
    assert bitpack.pack(np.array([0] * 8 + [1]), 1) == bytes([0, 1])


@pytest.mark.parametrize("width", [1, 4, 8, 9, 16, 31, 32])
def test_bitpack_rejects_values_that_do_not_fit(width: int) -> None:
    with pytest.raises(ValueError, match=f"do not fit in {width} bits"):
        bitpack.pack(np.array([0, 2**width], dtype=np.int64), width)
    with pytest.raises(ValueError, match="do not fit"):
        bitpack.pack(np.array([1, -1], dtype=np.int64), width)


@pytest.mark.parametrize("width", [0, 33])
def test_bitpack_rejects_bad_width(width: int) -> None:
    with pytest.raises(ValueError, match="width must be in"):
        bitpack.pack(np.array([0]), width)
    with pytest.raises(ValueError, match="width must be in"):
        bitpack.unpack(b"", 0, width)


def test_bitpack_rejects_non_vector() -> None:
    with pytest.raises(ValueError, match="1-D"):
        bitpack.pack(np.zeros((2, 2), dtype=np.int64), 3)


@pytest.mark.parametrize(("count", "width", "nbytes"), [(9, 3, 3), (9, 3, 7), (8, 5, 0), (0, 4, 1), (1000, 10, 1249)])
def test_bitpack_unpack_rejects_wrong_length(count: int, width: int, nbytes: int) -> None:
    with pytest.raises(
        ValueError, match=f"packed data has {nbytes} bytes, expected {bitpack.packed_size(count, width)}"
    ):
        bitpack.unpack(b"\0" * nbytes, count, width)


@pytest.mark.parametrize(
    ("dim", "width"), [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (1000, 10), (1024, 10), (1025, 11), (7850, 13)]
)
def test_index_width(dim: int, width: int) -> None:
    assert bitpack.index_width(dim) == width


def test_struct_sanity_float32_radius() -> None:
    # the radius travels as float32: what the worker sends is what the server reads
    p = quantize(np.array([0.1, -0.3]), np.zeros(2), 4)
    assert struct.unpack("<f", struct.pack("<f", p.scale))[0] == p.scale

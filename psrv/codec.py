"""The one place that knows both core objects and protobuf messages.

``*_to_proto`` / ``*_from_proto`` pairs. Every ``from_proto`` validates what it
reads (dtype, lengths, dimension, index range, finite values) and raises
:class:`CodecError` with a message fit for a gRPC status; a bad message never
reaches the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zstandard

from psrv import bitpack, stream, varint
from psrv.payload import Payload, qsgd_code_width
from psrv.payload import from_bfloat16 as payload_from_bfloat16
from psrv.replica import AggregateChange
from psrv.server_opt import OptState, is_plain
from psrv.v1 import psrv_pb2 as pb

if TYPE_CHECKING:
    from psrv.engine import Broadcast, ServerConfig


class CodecError(ValueError):
    """A message that cannot be decoded into a valid core object."""


_NP_OF_DTYPE = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
}
_DTYPE_OF_NP = {np.dtype(v).name: k for k, v in _NP_OF_DTYPE.items()}


def _np_dtype(code: int, what: str) -> np.dtype:
    if code not in _NP_OF_DTYPE:
        name = pb.Dtype.Name(code) if code in pb.Dtype.values() else str(code)
        raise CodecError(f"{what}: unsupported dtype {name}")
    return _NP_OF_DTYPE[code]


def _dtype_code(arr: np.ndarray) -> int:
    try:
        return _DTYPE_OF_NP[arr.dtype.name]
    except KeyError:
        raise CodecError(f"cannot put dtype {arr.dtype} on the wire") from None


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    if values.size and not np.isfinite(values).all():
        raise CodecError(f"{what}: contains NaN or Inf")
    return values


def _array(data: bytes, dtype: np.dtype, count: int, what: str, finite: bool = True) -> np.ndarray:
    if len(data) != count * dtype.itemsize:
        raise CodecError(
            f"{what}: {len(data)} bytes of data, expected {count * dtype.itemsize} ({count} x {dtype.name})"
        )
    values = np.frombuffer(data, dtype=dtype)
    return _finite(values, what) if finite else values


# --- dense tensors ---------------------------------------------------------------


def _values_code(values: np.ndarray, value_format: str) -> int:
    return pb.DTYPE_BFLOAT16 if value_format == "bfloat16" else _dtype_code(values)


def _values(data: bytes, code: int, count: int, what: str, finite: bool = True) -> tuple[np.ndarray, str]:
    """Decode a value array; bfloat16 stays as raw uint16 bits (checked finite via float32).
    ``finite`` False: float values are not checked here (the caller's range check does it)."""
    if code == pb.DTYPE_BFLOAT16:
        raw = _array(data, np.dtype("<u2"), count, what)
        _finite(payload_from_bfloat16(raw), what)
        return raw, "bfloat16"
    return _array(data, _np_dtype(code, what), count, what, finite), ""


def tensor_to_proto(arr: np.ndarray, value_format: str = "") -> pb.DenseTensor:
    a = np.asarray(arr)
    code = _values_code(a, value_format)
    return pb.DenseTensor(dtype=code, shape=a.shape, data=_le_bytes(a, code))


def _le_bytes(a: np.ndarray, code: int) -> bytes:
    """Little-endian bytes whatever the array's byte order."""
    return a.astype(_NP_OF_DTYPE.get(code, np.dtype("<u2")), copy=False).tobytes()


def tensor_from_proto(msg: pb.DenseTensor, expected_size: int | None = None, what: str = "tensor") -> np.ndarray:
    """A read-only array viewing the message's bytes (float32 for bfloat16 data)."""
    raw, fmt = _tensor_values(msg, expected_size, what)
    return (payload_from_bfloat16(raw) if fmt else raw).reshape(tuple(msg.shape))


def _tensor_values(
    msg: pb.DenseTensor,
    expected_size: int | None,
    what: str,
    data: bytes | memoryview | None = None,
    finite: bool = True,
) -> tuple[np.ndarray, str]:
    size = math.prod(msg.shape)
    if expected_size is not None and size != expected_size:
        raise CodecError(f"{what}: {size} elements, expected {expected_size}")
    return _values(msg.data if data is None else data, msg.dtype, size, what, finite)


# --- payloads ----------------------------------------------------------------------


def encode_indices(indices: np.ndarray, dim: int) -> tuple[int, bytes]:
    """The smaller of fixed-width bit-packing (ceil(log2 d) bits per index, the papers'
    count) and delta + varint (smaller where the support is sparse), with its tag."""
    width = bitpack.index_width(dim)
    if varint.encoded_size(indices) < bitpack.packed_size(len(indices), width):
        return pb.INDEX_ENCODING_DELTA_VARINT, varint.encode_indices(indices)
    return pb.INDEX_ENCODING_BITPACKED, bitpack.pack(indices, width)


def payload_to_proto(p: Payload) -> Any:
    if p.kind == "dense":
        return tensor_to_proto(p.values, p.value_format)
    if p.kind == "sparse":
        encoding, indices = encode_indices(p.indices, p.dim)
        return pb.SparseTensor(
            dim=p.dim,
            nnz=len(p.indices),
            index_encoding=encoding,
            indices=indices,
            value_dtype=_values_code(p.values, p.value_format),
            values=_le_bytes(p.values, _values_code(p.values, p.value_format)),
        )
    if p.kind == "laq":
        return pb.LaqPayload(dim=p.dim, radius=p.scale, bits=p.bits, codes=bitpack.pack(p.codes, p.bits))
    if p.kind == "qsgd":
        return pb.QsgdPayload(
            dim=p.dim,
            norm=p.scale,
            levels=p.bits,
            signs=bitpack.pack(p.signs.astype(np.uint8), 1),
            codes=bitpack.pack(p.codes, qsgd_code_width(p.bits)),
        )
    if p.kind == "sign_sparse":
        encoding, indices = encode_indices(p.indices, p.dim)
        return pb.SignSparsePayload(
            dim=p.dim,
            nnz=len(p.indices),
            scale=p.scale,
            index_encoding=encoding,
            indices=indices,
            signs=bitpack.pack(p.signs.astype(np.uint8), 1),
        )
    raise CodecError(f"unknown payload kind {p.kind!r}")


def dense_from_proto(
    msg: pb.DenseTensor, dim: int, data: bytes | memoryview | None = None, finite: bool = True
) -> Payload:
    """``data``: the tensor's values when they are not in ``msg`` (:class:`WireUpload`); ``finite``
    False: float values are not checked for NaN and Inf here (see :meth:`WireUpload.payload`)."""
    if len(msg.shape) != 1:
        raise CodecError(f"dense payload: shape {list(msg.shape)} is not a vector")
    values, fmt = _tensor_values(msg, dim, "dense payload", data, finite)
    return Payload("dense", dim, values=values, value_format=fmt)


def _check_dim(msg: Any, dim: int, what: str) -> None:
    if msg.dim != dim:
        raise CodecError(f"{what}: dimension {msg.dim}, expected {dim}")


def _unpack(data: bytes, count: int, width: int, what: str) -> np.ndarray:
    try:
        return bitpack.unpack(data, count, width)
    except ValueError as exc:
        raise CodecError(f"{what}: {exc}") from None


def _indices(msg: Any, dim: int, what: str) -> np.ndarray:
    """Validated support of a sparse message: nnz <= dim, strictly increasing, in range."""
    _check_dim(msg, dim, what)
    if msg.nnz > dim:
        raise CodecError(f"{what}: nnz {msg.nnz} exceeds dimension {dim}")
    if msg.index_encoding == pb.INDEX_ENCODING_BITPACKED:
        indices = _unpack(msg.indices, msg.nnz, bitpack.index_width(dim), f"{what}: indices").astype(np.int64)
    elif msg.index_encoding == pb.INDEX_ENCODING_DELTA_VARINT:
        try:
            indices = varint.decode_indices(msg.indices, msg.nnz)
        except ValueError as exc:
            raise CodecError(f"{what}: indices: {exc}") from None
    else:
        raise CodecError(f"{what}: unsupported index encoding {msg.index_encoding}")
    if indices.size and indices.max() >= dim:
        raise CodecError(f"{what}: index {int(indices.max())} out of range [0, {dim})")
    if indices.size > 1 and not (np.diff(indices) > 0).all():
        raise CodecError(f"{what}: indices must be strictly increasing (sorted, no duplicates)")
    return indices


def _scale(value: float, what: str) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise CodecError(f"{what} {value} must be finite and >= 0")
    return float(value)


def sparse_from_proto(msg: pb.SparseTensor, dim: int) -> Payload:
    what = "sparse payload"
    indices = _indices(msg, dim, what)
    values, fmt = _values(msg.values, msg.value_dtype, msg.nnz, what)
    return Payload("sparse", dim, values=values, indices=indices, value_format=fmt)


def laq_from_proto(msg: pb.LaqPayload, dim: int) -> Payload:
    what = "laq payload"
    _check_dim(msg, dim, what)
    if not 1 <= msg.bits <= 16:
        raise CodecError(f"{what}: bits {msg.bits} outside [1, 16]")
    radius = _scale(msg.radius, f"{what}: radius")
    codes = _unpack(msg.codes, dim, msg.bits, f"{what}: codes")
    return Payload("laq", dim, codes=codes, scale=radius, bits=msg.bits)


MAX_QSGD_LEVELS = 2**16 - 1


def qsgd_from_proto(msg: pb.QsgdPayload, dim: int) -> Payload:
    what = "qsgd payload"
    _check_dim(msg, dim, what)
    if not 1 <= msg.levels <= MAX_QSGD_LEVELS:
        raise CodecError(f"{what}: levels {msg.levels} outside [1, {MAX_QSGD_LEVELS}]")
    norm = _scale(msg.norm, f"{what}: norm")
    signs = _unpack(msg.signs, dim, 1, f"{what}: signs").astype(bool)
    codes = _unpack(msg.codes, dim, qsgd_code_width(msg.levels), f"{what}: codes")
    if codes.size and codes.max() > msg.levels:
        raise CodecError(f"{what}: code {int(codes.max())} exceeds levels {msg.levels}")
    return Payload("qsgd", dim, codes=codes, signs=signs, scale=norm, bits=msg.levels)


def sign_sparse_from_proto(msg: pb.SignSparsePayload, dim: int) -> Payload:
    what = "sign_sparse payload"
    indices = _indices(msg, dim, what)
    scale = _scale(msg.scale, f"{what}: scale")
    signs = _unpack(msg.signs, msg.nnz, 1, f"{what}: signs").astype(bool)
    return Payload("sign_sparse", dim, indices=indices, signs=signs, scale=scale)


ZSTD_LEVEL = 3

#: payload kind (the ``PushRequest.payload`` field name) <-> ``PayloadKind`` value of a ZstdPayload
PAYLOAD_KINDS = {name.removeprefix("PAYLOAD_KIND_").lower(): value for name, value in pb.PayloadKind.items() if value}
_KIND_NAMES = {v: k for k, v in PAYLOAD_KINDS.items()}


def _push_request(worker_id: str, round_: int, local_loss: float, smoothness: float | None) -> pb.PushRequest:
    msg = pb.PushRequest(worker_id=worker_id, round=round_, local_loss=local_loss)
    if smoothness is not None:
        msg.smoothness = smoothness
    return msg


def upload_to_proto(
    worker_id: str,
    round_: int,
    local_loss: float,
    p: Payload,
    zstd: bool = False,
    smoothness: float | None = None,
) -> pb.PushRequest:
    """An upload; with ``zstd`` the payload is compressed when that makes it smaller.
    ``smoothness``: the worker's bound on L_m (sent with the first upload where the server selects with it)."""
    msg = _push_request(worker_id, round_, local_loss, smoothness)
    _put_payload(msg, p, zstd)
    return msg


def _put_payload(msg: Any, p: Payload, zstd: bool) -> None:
    """Set the ``payload`` oneof of ``msg`` (a PushRequest or a Payload)."""
    inner = payload_to_proto(p)
    if zstd:
        raw = inner.SerializeToString()
        packed = pb.ZstdPayload(
            kind=PAYLOAD_KINDS[p.kind], data=zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
        )
        if packed.ByteSize() < len(raw):  # then the whole field (tag, length, body) is smaller too
            msg.zstd.CopyFrom(packed)
            return
    getattr(msg, p.kind).CopyFrom(inner)


_DENSE_TAG = stream.varint(pb.PushRequest.DESCRIPTOR.fields_by_name["dense"].number << 3 | 2)
_DATA_TAG = stream.varint(pb.DenseTensor.DESCRIPTOR.fields_by_name["data"].number << 3 | 2)


def upload_to_wire(
    worker_id: str,
    round_: int,
    local_loss: float,
    p: Payload,
    zstd: bool = False,
    smoothness: float | None = None,
) -> stream.Serialized:
    """``upload_to_proto(...).SerializeToString()``, byte for byte, without copying a dense payload's
    values: the message is serialized without them and they follow as a view of the array
    (``dense`` and ``DenseTensor.data`` are the last fields of their messages, where protobuf puts
    them). Other payloads, and zstd, are serialized as usual."""
    if p.kind != "dense" or zstd or not p.values.size:
        msg = upload_to_proto(worker_id, round_, local_loss, p, zstd, smoothness)
        return stream.Serialized(msg.SerializeToString())
    field, raw = _dense_field(_DENSE_TAG, p.values, p.value_format)
    head = _push_request(worker_id, round_, local_loss, smoothness).SerializeToString()
    return stream.Serialized(head + field, raw)


def _dense_field(tag: bytes, arr: np.ndarray, value_format: str) -> tuple[bytes, memoryview]:
    """A DenseTensor field (``tag``) of ``arr`` serialized as protobuf would, split in two: every
    byte before the values (tag, length, dtype, shape, the data field's tag and length), and the
    values themselves as a little-endian view of the array (copied only if not already so)."""
    code = _values_code(arr, value_format)
    values = np.ascontiguousarray(arr, dtype=_NP_OF_DTYPE.get(code, np.dtype("<u2")))  # little-endian
    raw = memoryview(values).cast("B")
    tensor = pb.DenseTensor(dtype=code, shape=values.shape).SerializeToString() + _DATA_TAG + stream.varint(raw.nbytes)
    return tag + stream.varint(len(tensor) + raw.nbytes) + tensor, raw


def _unzstd(msg: pb.ZstdPayload, dim: int) -> tuple[str, Any]:
    """The inner payload message; its decompressed size is bounded (no zip bombs)."""
    kind = _KIND_NAMES.get(msg.kind)
    if kind is None:
        raise CodecError(f"zstd payload: unknown kind {msg.kind}")
    limit = 16 * dim + 1024  # generous: float64 values plus indices of every coordinate
    try:
        with zstandard.ZstdDecompressor().stream_reader(msg.data) as reader:
            raw = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd payload: {exc}") from None
    if len(raw) > limit:
        raise CodecError(f"zstd payload: decompresses to more than {limit} bytes")
    inner_type = type(getattr(pb.PushRequest(), kind))
    try:
        return kind, inner_type.FromString(raw)
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError
        raise CodecError(f"zstd payload: not a valid {kind} message") from None


_DECODERS = {
    "dense": dense_from_proto,
    "sparse": sparse_from_proto,
    "laq": laq_from_proto,
    "qsgd": qsgd_from_proto,
    "sign_sparse": sign_sparse_from_proto,
}


def upload_from_proto(msg: pb.PushRequest, dim: int) -> Payload:
    """The payload of an upload, validated against the model dimension ``dim``."""
    if not math.isfinite(msg.local_loss):
        raise CodecError("upload: local_loss is NaN or Inf")
    return _get_payload(msg, dim, "upload")


def _get_payload(msg: Any, dim: int, what: str) -> Payload:
    """The validated payload of ``msg``'s ``payload`` oneof (a PushRequest or a Payload)."""
    kind = msg.WhichOneof("payload")
    if kind is None:
        raise CodecError(f"{what} carries no payload")
    if kind == "zstd":
        kind, inner = _unzstd(msg.zstd, dim)
        return _DECODERS[kind](inner, dim)
    return _DECODERS[kind](getattr(msg, kind), dim)


_PAYLOAD_FIELDS = frozenset(f.number for f in pb.PushRequest.DESCRIPTOR.oneofs_by_name["payload"].fields)
_DENSE_FIELD = pb.PushRequest.DESCRIPTOR.fields_by_name["dense"].number
_DATA_FIELD = pb.DenseTensor.DESCRIPTOR.fields_by_name["data"].number


def _parse(msg_type: type, data: bytes | memoryview) -> Any:
    try:
        return msg_type.FromString(data)
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError
        raise CodecError(f"not a valid {msg_type.DESCRIPTOR.name} message") from None


def _split_dense(
    view: memoryview, msg_type: type, oneof: frozenset[int], dense_field: int
) -> tuple[Any, pb.DenseTensor, memoryview] | None:
    """A serialized ``msg_type`` whose one field of the ``oneof`` is a DenseTensor in field
    ``dense_field`` with one ``data`` field: (the message without that field, the tensor without its
    data, a view of the data in ``view``). None for anything else (protobuf then parses it whole
    and says what is wrong)."""
    try:
        present = [f for f in stream.wire_fields(view) if f.number in oneof]
        if len(present) != 1 or present[0].number != dense_field or present[0].wire != 2:
            return None
        (dense,) = present
        data = [f for f in stream.wire_fields(view, dense.value, dense.end) if f.number == _DATA_FIELD]
    except stream.StreamError:
        return None
    if len(data) != 1 or data[0].wire != 2:
        return None
    values = data[0]
    msg = _parse(msg_type, bytes(view[: dense.start]) + bytes(view[dense.end :]))
    tensor = _parse(pb.DenseTensor, bytes(view[dense.value : values.start]) + bytes(view[values.end : dense.end]))
    return msg, tensor, view[values.value : values.end]


class WireUpload:
    """A serialized PushRequest, read as ``pb.PushRequest.FromString`` reads it, except that the
    values of a dense payload stay where they are: :meth:`payload` views them in ``data`` (the
    received message, or the whole of a reassembled stream) instead of copying them twice (into
    protobuf's memory, then out of it). ``request`` holds every other field; on that fast path its
    payload is unset. Messages that are not one dense field with one ``data`` field (any other
    payload, repeated or merged fields, bytes protobuf would refuse) are parsed by protobuf whole.
    Raises :class:`CodecError` for bytes that are not a PushRequest."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        split = _split_dense(memoryview(data).cast("B"), pb.PushRequest, _PAYLOAD_FIELDS, _DENSE_FIELD)
        self._tensor: pb.DenseTensor | None = None
        self._values: memoryview | None = None
        if split is None:
            self.request = _parse(pb.PushRequest, data)
            return
        self.request, self._tensor, self._values = split

    def payload(self, dim: int, finite: bool = True) -> Payload:
        """The upload's payload, validated against the model dimension ``dim`` (as
        :func:`upload_from_proto`). ``finite`` False: a dense payload's float values are left for
        the caller to check for NaN and Inf (the engine's range check finds them in the pass it
        makes anyway: one pass over the upload less)."""
        if self._tensor is None:
            return upload_from_proto(self.request, dim)
        if not math.isfinite(self.request.local_loss):
            raise CodecError("upload: local_loss is NaN or Inf")
        return dense_from_proto(self._tensor, dim, self._values, finite)


def upload_smoothness(msg: pb.PushRequest) -> float | None:
    """The L_m bound an upload carries, if any."""
    return msg.smoothness if msg.HasField("smoothness") else None


# --- skip notices -------------------------------------------------------------------

#: reasons a worker may give; the engine's own ``deadline`` verdict has no wire value
SKIP_REASONS = {"lazy_rule": pb.SKIP_REASON_LAZY_RULE, "not_selected": pb.SKIP_REASON_NOT_SELECTED}
_SKIP_NAMES = {v: k for k, v in SKIP_REASONS.items()}


def skip_to_proto(worker_id: str, round_: int, reason: str, local_loss: float | None) -> pb.SkipRequest:
    msg = pb.SkipRequest(worker_id=worker_id, round=round_, reason=SKIP_REASONS[reason])
    if local_loss is not None:
        msg.local_loss = local_loss
    return msg


def rounds_skip(reason: str, local_loss: float | None) -> pb.RoundsRequest:
    """A skip notice on a Rounds stream: as :func:`skip_to_proto`, with worker and round implied."""
    msg = pb.RoundsRequest(skip=pb.RoundsSkip(reason=SKIP_REASONS[reason]))
    if local_loss is not None:
        msg.skip.local_loss = local_loss
    return msg


def skip_reason_from_proto(msg: pb.SkipRequest | pb.RoundsSkip) -> str:
    """The reason a worker gave (``lazy_rule`` or ``not_selected``)."""
    if msg.reason not in _SKIP_NAMES:
        raise CodecError(f"skip notice: invalid reason {msg.reason}")
    if msg.HasField("local_loss") and not math.isfinite(msg.local_loss):
        raise CodecError("skip notice: local_loss is NaN or Inf")
    return _SKIP_NAMES[msg.reason]


def broadcast_to_proto(b: Broadcast) -> pb.GetModelResponse:
    """The round's model broadcast (:class:`psrv.engine.Broadcast`) as a message: the plain model
    (``params``), the exact change for replicas (``update``), or the whole state (``snapshot``)."""
    msg = _broadcast_header(b)
    if b.form == "dense":
        msg.params.CopyFrom(tensor_to_proto(b.params))
        msg.recent_step_sq.extend(b.recent_step_sq)
    elif b.form == "update":
        msg.update.SetInParent()  # present even when nothing changed
        change_to_proto(b.change, msg.update, b.zstd)
        msg.digest = b.digest
    elif b.form == "compressed":
        _put_payload(msg.compressed, b.step, b.zstd)
        msg.recent_step_sq.extend(b.recent_step_sq)
        msg.digest = b.digest
    elif b.form == "snapshot":
        _put_state(msg.snapshot, "theta", b.theta)
        if b.total is not None:
            _put_state(msg.snapshot, "aggregate", b.total)
        msg.snapshot.recent_step_sq.extend(b.recent_step_sq)
        if b.opt_state is not None and not b.opt_state.empty:
            opt_state_to_proto(b.opt_state, msg.snapshot.server_opt)
        msg.digest = b.digest
    else:
        raise CodecError(f"unknown broadcast form {b.form!r}")
    return msg


def _broadcast_header(b: Broadcast) -> pb.GetModelResponse:
    """A broadcast's fields that do not depend on its form."""
    msg = pb.GetModelResponse(round=b.round, total_samples=b.total_samples, num_workers=b.num_workers, done=b.done)
    if b.selected is not None:
        msg.selection.SetInParent()  # present even when nobody is selected
        msg.selection.workers.extend(b.selected)
    return msg


_PARAMS_TAG = stream.varint(pb.GetModelResponse.DESCRIPTOR.fields_by_name["params"].number << 3 | 2)


def broadcast_to_wire(b: Broadcast) -> bytes:
    """``broadcast_to_proto(b).SerializeToString()``, byte for byte, with one copy of a dense
    model's values (protobuf would copy them four times: into ``bytes``, into the DenseTensor, into
    the response, out of it). Fields go in number order as protobuf writes them: ``round`` (1),
    ``params`` (2), then the rest. Every other form is serialized by protobuf."""
    if b.form != "dense" or not b.params.size:
        return broadcast_to_proto(b).SerializeToString()
    field, raw = _dense_field(_PARAMS_TAG, b.params, "")
    msg = _broadcast_header(b)
    msg.recent_step_sq.extend(b.recent_step_sq)
    head = pb.GetModelResponse(round=b.round).SerializeToString()
    rest = msg.SerializeToString()
    if not rest.startswith(head):
        raise CodecError("broadcast_to_wire: protobuf did not write `round` first")
    tail = rest[len(head) :]
    return b"".join((head, field, raw, tail))


def change_to_proto(change: AggregateChange, msg: pb.StateUpdate, zstd: bool = False) -> None:
    if change.kind == "relay":
        msg.relay.SetInParent()
        for worker, p in zip(change.workers, change.payloads, strict=True):
            _put_payload(msg.relay.contributions.add(worker=worker).payload, p, zstd)
    elif change.kind == "values":
        values = np.asarray(change.values, dtype=np.float64)
        msg.values.CopyFrom(payload_to_proto(Payload("sparse", change.dim, values=values, indices=change.indices)))
    elif change.kind == "aggregate":
        msg.aggregate.CopyFrom(tensor_to_proto(np.asarray(change.values, dtype=np.float64)))


@dataclass(frozen=True)
class ModelMessage:
    """A decoded GetModelResponse. ``form``: "dense" (``params``), "update" (``change``),
    "compressed" (``step``: EF21-P's model step) or "snapshot" (``theta``, ``total``, ``opt_state``;
    ``total`` is empty with a compressed downlink)."""

    form: str
    round: int
    total_samples: int
    num_workers: int
    done: bool
    selected: tuple[int, ...] | None
    recent_step_sq: tuple[float, ...] = ()
    params: np.ndarray | None = None
    change: AggregateChange | None = None
    step: Payload | None = None
    theta: np.ndarray | None = None
    total: np.ndarray | None = None
    opt_state: OptState = OptState()
    digest: int = 0


_FORMS = ("params", "update", "compressed", "snapshot")
_FORM_FIELDS = frozenset(pb.GetModelResponse.DESCRIPTOR.fields_by_name[f].number for f in _FORMS)
_PARAMS_FIELD = pb.GetModelResponse.DESCRIPTOR.fields_by_name["params"].number


def model_from_wire(data: bytes | bytearray | memoryview, dim: int) -> ModelMessage:
    """:func:`model_from_proto` of a serialized GetModelResponse, except that a dense model's
    values are viewed where they arrived (writable when ``data`` is, e.g. a reassembled stream)
    instead of being copied into protobuf's memory and out again."""
    split = _split_dense(memoryview(data).cast("B"), pb.GetModelResponse, _FORM_FIELDS, _PARAMS_FIELD)
    if split is None:
        return model_from_proto(_parse(pb.GetModelResponse, data), dim)
    msg, tensor, values = split
    raw, fmt = _tensor_values(tensor, dim, "model", data=values)
    params = (payload_from_bfloat16(raw) if fmt else raw).reshape(tuple(tensor.shape))
    return ModelMessage("dense", params=params, recent_step_sq=tuple(msg.recent_step_sq), **_model_common(msg))


def _model_common(msg: pb.GetModelResponse) -> dict[str, Any]:
    return dict(
        round=msg.round,
        total_samples=msg.total_samples,
        num_workers=msg.num_workers,
        done=msg.done,
        selected=selected_workers(msg),
        digest=msg.digest,
    )


def model_from_proto(msg: pb.GetModelResponse, dim: int) -> ModelMessage:
    """Decode and validate a broadcast of a ``dim``-parameter model."""
    forms = [f for f in _FORMS if msg.HasField(f)]
    if len(forms) != 1:
        raise CodecError(
            f"model broadcast: expected exactly one of params/update/compressed/snapshot, got {forms or 'none'}"
        )
    common = _model_common(msg)
    if forms[0] == "params":
        params = tensor_from_proto(msg.params, dim, "model")
        return ModelMessage("dense", params=params, recent_step_sq=tuple(msg.recent_step_sq), **common)
    if forms[0] == "snapshot":
        snap = msg.snapshot
        theta = _get_state(snap, "theta", dim)
        if theta is None:
            raise CodecError("snapshot: no theta")
        total = _get_state(snap, "aggregate", dim)
        total = np.zeros(0) if total is None else total
        opt_state = opt_state_from_proto(snap.server_opt, dim) if snap.HasField("server_opt") else OptState()
        return ModelMessage(
            "snapshot",
            theta=theta,
            total=total,
            opt_state=opt_state,
            recent_step_sq=tuple(snap.recent_step_sq),
            **common,
        )
    if forms[0] == "compressed":
        step = _get_payload(msg.compressed, dim, "model step")
        return ModelMessage("compressed", step=step, recent_step_sq=tuple(msg.recent_step_sq), **common)
    return ModelMessage("update", change=change_from_proto(msg.update, dim), **common)


def opt_state_to_proto(state: OptState, msg: pb.ServerOptState) -> None:
    """A server optimizer's state (:class:`psrv.server_opt.OptState`) into ``msg``, exactly."""
    msg.count, msg.beta1_power, msg.beta2_power = state.count, state.beta1_power, state.beta2_power
    if state.m is not None:
        _put_state(msg, "first_moment", state.m)
    if state.v is not None:
        _put_state(msg, "second_moment", state.v)


def opt_state_from_proto(msg: pb.ServerOptState, dim: int) -> OptState:
    """The state of ``opt_state_to_proto``; whether it fits the run's optimizer is the replica's
    check (:meth:`psrv.server_opt.ServerOpt.check_state`)."""
    powers = (msg.beta1_power, msg.beta2_power)
    if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in powers):
        raise CodecError(f"server optimizer state: beta powers must be in [0, 1], got {powers}")
    m, v = _get_state(msg, "first_moment", dim), _get_state(msg, "second_moment", dim)
    return OptState(msg.count, m, v, *powers)


def _put_state(snap: Any, name: str, arr: np.ndarray) -> None:
    """A float64 state vector of a snapshot as ``name`` (dense) or ``name_sparse`` (its nonzero
    coordinates), whichever encodes smaller: a model that starts at zero, or an aggregate before
    any upload, costs a few bytes instead of 8 per parameter."""
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    nz = np.flatnonzero(arr.view(np.uint64))  # bit patterns: a -0.0 is kept (the digest would see it)
    if 8 * len(nz) + len(encode_indices(nz, arr.size)[1]) < 8 * arr.size:
        sparse = Payload("sparse", arr.size, values=arr[nz], indices=nz)
        getattr(snap, f"{name}_sparse").CopyFrom(payload_to_proto(sparse))
    else:
        getattr(snap, name).CopyFrom(tensor_to_proto(arr))


def _get_state(snap: Any, name: str, dim: int) -> np.ndarray | None:
    """The float64 state vector ``name`` of a snapshot (a writable array), or None if absent."""
    form = snap.WhichOneof(f"{name}_form")
    if form is None:
        return None
    if form == name:
        return _float64_vector(getattr(snap, name), dim, f"snapshot {name}")
    msg = getattr(snap, form)
    if msg.value_dtype != pb.DTYPE_FLOAT64:
        raise CodecError(f"snapshot {name}: must be float64")
    p = sparse_from_proto(msg, dim)
    out = np.zeros(dim, dtype=np.float64)
    out[p.indices] = p.values
    return out


def _float64_vector(msg: pb.DenseTensor, dim: int, what: str) -> np.ndarray:
    if msg.dtype != pb.DTYPE_FLOAT64:
        raise CodecError(f"{what}: must be float64")
    return np.array(tensor_from_proto(msg, dim, what), dtype=np.float64)  # a writable copy


def change_from_proto(msg: pb.StateUpdate, dim: int) -> AggregateChange:
    kind = msg.WhichOneof("change")
    if kind is None:
        return AggregateChange()
    if kind == "relay":
        contributions = msg.relay.contributions
        payloads = tuple(_get_payload(c.payload, dim, "relayed contribution") for c in contributions)
        return AggregateChange("relay", payloads=payloads, workers=tuple(c.worker for c in contributions))
    if kind == "values":
        if msg.values.value_dtype != pb.DTYPE_FLOAT64:
            raise CodecError("aggregate values: must be float64")
        p = sparse_from_proto(msg.values, dim)
        return AggregateChange("values", dim=dim, indices=p.indices, values=np.asarray(p.values, dtype=np.float64))
    return AggregateChange("aggregate", values=_float64_vector(msg.aggregate, dim, "aggregate"))


def selected_workers(msg: pb.GetModelResponse) -> tuple[int, ...] | None:
    """The workers a broadcast selects; None when every worker computes."""
    return tuple(msg.selection.workers) if msg.HasField("selection") else None


def run_config_to_proto(config: ServerConfig, dim: int) -> pb.RunConfig:
    """Everything a worker needs to run the server's algorithm on its data."""
    c = config
    return pb.RunConfig(
        algorithm=c.algorithm,
        compressor=c.compressor,
        options=c.options,
        task=c.task,
        task_options=c.task_options,
        dim=dim,
        num_workers=c.num_workers,
        seed=c.seed,
        zstd=c.zstd,
        model_dtype=_dtype_code(np.empty(0, dtype=c.broadcast_dtype)),
        down_compressor=c.down_compressor,
        round_transport=pb.ROUND_TRANSPORT_STREAM if c.transport == "stream" else pb.ROUND_TRANSPORT_UNARY,
        server_opt="" if is_plain(c.server_opt) else c.server_opt,  # "": the same bytes as before server optimizers
    )


def model_dtype(config: pb.RunConfig) -> np.dtype:
    """The type workers compute theta in (float32 unless the run says otherwise)."""
    return _NP_OF_DTYPE.get(config.model_dtype, np.dtype("<f4"))


def rejoin_to_proto(round_: int, contribution: np.ndarray | None) -> pb.Rejoin:
    """What a rejoining worker is handed back (see ``RegisterResponse.rejoin``)."""
    msg = pb.Rejoin(round=round_)
    if contribution is not None:
        msg.contribution.CopyFrom(tensor_to_proto(np.asarray(contribution, dtype=np.float64)))
    return msg


def rejoin_from_proto(msg: pb.Rejoin, dim: int) -> tuple[int, np.ndarray | None]:
    """``(round, contribution or None)`` of a ``Rejoin`` (a writable float64 copy; ``CodecError``
    unless it has ``dim`` finite FLOAT64 values)."""
    if not msg.HasField("contribution"):
        return msg.round, None
    if msg.contribution.dtype != pb.DTYPE_FLOAT64:
        raise CodecError("Rejoin.contribution: expected FLOAT64 values")
    return msg.round, np.array(tensor_from_proto(msg.contribution, dim, "Rejoin.contribution"), dtype=np.float64)

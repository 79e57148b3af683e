"""The one place that knows both core objects and protobuf messages.

``*_to_proto`` / ``*_from_proto`` pairs. Every ``from_proto`` validates what it
reads (dtype, lengths, dimension, index range, finite values) and raises
:class:`CodecError` with a message fit for a gRPC status; a bad message never
reaches the model.
"""

from __future__ import annotations

import math

import numpy as np

from psrv import bitpack
from psrv.payload import Payload
from psrv.v1 import psrv_pb2 as pb


class CodecError(ValueError):
    """A message that cannot be decoded into a valid core object."""


_NP_OF_DTYPE = {pb.FLOAT32: np.dtype("<f4"), pb.FLOAT64: np.dtype("<f8"), pb.FLOAT16: np.dtype("<f2")}
_DTYPE_OF_NP = {np.dtype(v).name: k for k, v in _NP_OF_DTYPE.items()}


def _np_dtype(code: int, what: str) -> np.dtype:
    if code not in _NP_OF_DTYPE:
        name = pb.DType.Name(code) if code in pb.DType.values() else str(code)
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


def _array(data: bytes, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    if len(data) != count * dtype.itemsize:
        raise CodecError(
            f"{what}: {len(data)} bytes of data, expected {count * dtype.itemsize} ({count} x {dtype.name})"
        )
    return _finite(np.frombuffer(data, dtype=dtype), what)


# --- dense tensors ---------------------------------------------------------------


def tensor_to_proto(arr: np.ndarray) -> pb.DenseTensor:
    a = np.asarray(arr)
    code = _dtype_code(a)
    return pb.DenseTensor(dtype=code, shape=a.shape, data=a.astype(_NP_OF_DTYPE[code], copy=False).tobytes())


def tensor_from_proto(msg: pb.DenseTensor, expected_size: int | None = None, what: str = "tensor") -> np.ndarray:
    """A read-only array viewing the message's bytes."""
    dtype = _np_dtype(msg.dtype, what)
    size = math.prod(msg.shape)
    if expected_size is not None and size != expected_size:
        raise CodecError(f"{what}: {size} elements, expected {expected_size}")
    return _array(msg.data, dtype, size, what).reshape(tuple(msg.shape))


# --- payloads ----------------------------------------------------------------------


def payload_to_proto(p: Payload) -> pb.DenseTensor | pb.SparseTensor | pb.LaqPayload:
    if p.kind == "dense":
        return tensor_to_proto(p.values)
    if p.kind == "sparse":
        return pb.SparseTensor(
            dim=p.dim,
            nnz=len(p.indices),
            index_encoding=pb.BITPACKED,
            indices=bitpack.pack(p.indices, bitpack.index_width(p.dim)),
            value_dtype=_dtype_code(p.values),
            values=p.values.tobytes(),
        )
    if p.kind == "laq":
        return pb.LaqPayload(dim=p.dim, radius=p.scale, bits=p.bits, codes=bitpack.pack(p.codes, p.bits))
    raise CodecError(f"unknown payload kind {p.kind!r}")


def dense_from_proto(msg: pb.DenseTensor, dim: int) -> Payload:
    if len(msg.shape) != 1:
        raise CodecError(f"dense payload: shape {list(msg.shape)} is not a vector")
    return Payload("dense", dim, values=tensor_from_proto(msg, dim, "dense payload"))


def sparse_from_proto(msg: pb.SparseTensor, dim: int) -> Payload:
    what = "sparse payload"
    if msg.dim != dim:
        raise CodecError(f"{what}: dimension {msg.dim}, expected {dim}")
    if msg.nnz > dim:
        raise CodecError(f"{what}: nnz {msg.nnz} exceeds dimension {dim}")
    if msg.index_encoding != pb.BITPACKED:
        raise CodecError(f"{what}: unsupported index encoding {msg.index_encoding}")
    values = _array(msg.values, _np_dtype(msg.value_dtype, what), msg.nnz, what)
    try:
        indices = bitpack.unpack(msg.indices, msg.nnz, bitpack.index_width(dim)).astype(np.int64)
    except ValueError as exc:
        raise CodecError(f"{what}: indices: {exc}") from None
    if indices.size and indices[-1] >= dim:
        raise CodecError(f"{what}: index {int(indices.max())} out of range [0, {dim})")
    if indices.size > 1 and not (np.diff(indices) > 0).all():
        raise CodecError(f"{what}: indices must be strictly increasing (sorted, no duplicates)")
    return Payload("sparse", dim, values=values, indices=indices)


def laq_from_proto(msg: pb.LaqPayload, dim: int) -> Payload:
    what = "laq payload"
    if msg.dim != dim:
        raise CodecError(f"{what}: dimension {msg.dim}, expected {dim}")
    if not 1 <= msg.bits <= 16:
        raise CodecError(f"{what}: bits {msg.bits} outside [1, 16]")
    if not (math.isfinite(msg.radius) and msg.radius >= 0):
        raise CodecError(f"{what}: radius {msg.radius} must be finite and >= 0")
    try:
        codes = bitpack.unpack(msg.codes, dim, msg.bits)
    except ValueError as exc:
        raise CodecError(f"{what}: codes: {exc}") from None
    return Payload("laq", dim, codes=codes, scale=float(msg.radius), bits=msg.bits)


def upload_to_proto(worker_id: str, round_: int, local_loss: float, p: Payload) -> pb.Upload:
    msg = pb.Upload(worker_id=worker_id, round=round_, local_loss=local_loss)
    getattr(msg, p.kind).CopyFrom(payload_to_proto(p))
    return msg


_DECODERS = {"dense": dense_from_proto, "sparse": sparse_from_proto, "laq": laq_from_proto}


def upload_from_proto(msg: pb.Upload, dim: int) -> Payload:
    """The payload of an upload, validated against the model dimension ``dim``."""
    kind = msg.WhichOneof("payload")
    if kind is None:
        raise CodecError("upload carries no payload")
    if not math.isfinite(msg.local_loss):
        raise CodecError("upload: local_loss is NaN or Inf")
    return _DECODERS[kind](getattr(msg, kind), dim)


# --- skip notices -------------------------------------------------------------------

SKIP_REASONS = {"lazy_rule": pb.LAZY_RULE, "not_selected": pb.NOT_SELECTED, "deadline": pb.DEADLINE}
_SKIP_NAMES = {v: k for k, v in SKIP_REASONS.items()}


def skip_to_proto(worker_id: str, round_: int, reason: str, local_loss: float) -> pb.SkipNotice:
    return pb.SkipNotice(worker_id=worker_id, round=round_, reason=SKIP_REASONS[reason], local_loss=local_loss)


def skip_reason_from_proto(msg: pb.SkipNotice) -> str:
    """The reason a worker gave; DEADLINE is the server's own verdict and never valid on the wire."""
    if msg.reason not in _SKIP_NAMES or msg.reason == pb.DEADLINE:
        raise CodecError(f"skip notice: invalid reason {msg.reason}")
    if not math.isfinite(msg.local_loss):
        raise CodecError("skip notice: local_loss is NaN or Inf")
    return _SKIP_NAMES[msg.reason]

"""Hostile messages for property-based fuzzing (hypothesis), and a hostile client that sends them
to a live server the way a client generated from ``psrv.proto`` would (raw bytes on the service's
method paths). Used by tests/test_fuzz.py and scripts/fuzz_server.py.

What is generated (each a list of serialized messages for one call; a stream's messages in order):
random bytes; messages built field by field with hostile values (wrong dimensions, out-of-range,
unsorted or duplicate indices, NaN/Inf and huge finite values, huge declared lengths and counts,
unknown dtypes, encodings and kinds, wrong round ids, unknown worker ids, zstd bombs); and valid
messages mutated byte by byte (flips, truncation, insertion, deletion, duplication, extra fields).

No id the fuzzer can produce names :data:`QUIET`, the worker that has not reported yet and keeps
the round open, so nothing the fuzzer sends can close a round or stand in for an honest report.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cache

import grpc
import numpy as np
import zstandard
from google.protobuf.message import DecodeError
from hypothesis import strategies as st

from psrv import bitpack, codec, rpc, stream
from psrv.compress import make_compressor
from psrv.limits import TransportLimits
from psrv.payload import Payload, to_dense, values_of
from psrv.server import ParameterServer, ServerConfig, create_server
from psrv.v1 import psrv_pb2 as pb

#: the registered worker that never reports while the fuzzer runs (no mutation of "w0" reaches it)
QUIET = "zq-quiet-7f3a9c1e"
#: the registered worker that has already reported for the open round
REPORTED = "w0"

U32, U64 = 2**32 - 1, 2**64 - 1
#: statuses a hostile call may get; never UNKNOWN (an uncaught exception) or INTERNAL
EXPECTED = frozenset(
    {
        "OK",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "RESOURCE_EXHAUSTED",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "DEADLINE_EXCEEDED",  # only for the long polls (GetModel, GetModelStream, Rounds): see HostileClient
    }
)
#: calls that may legitimately wait for the next round (a long poll) until their deadline
LONG_POLLS = frozenset({"GetModel", "GetModelStream", "Rounds"})

_FLOATS_SPECIAL = [0.0, -0.0, 1.0, -1.0, 5e-324, 1e-45, 3e38, -3.4028235e38, 1e300, -1e300, 1.7976931348623157e308]
_NP = {pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_FLOAT64: "<f8", pb.DTYPE_FLOAT16: "<f2", pb.DTYPE_BFLOAT16: "<u2"}


# ---------------------------------------------------------------------------------- scalars
def floats() -> st.SearchStrategy[float]:
    return st.sampled_from(_FLOATS_SPECIAL + [float("nan"), float("inf"), -float("inf")]) | st.floats()


def worker_ids() -> st.SearchStrategy[str]:
    """The reported worker (half the time: its calls get past NOT_FOUND), unknown ids, empty, long,
    odd characters; never :data:`QUIET`."""
    fixed = st.sampled_from(["", "w1", "w00", "W0", "w0 ", "\x00", "é", "x" * 300, "w" * 5000])
    return st.one_of(st.just(REPORTED), st.just(REPORTED), fixed, st.text(max_size=24)).filter(lambda s: s != QUIET)


def rounds() -> st.SearchStrategy[int]:
    return st.sampled_from([0, 2, 3, 2**31, 2**32, 2**63 - 1, U64]) | st.integers(0, U64)


def u32() -> st.SearchStrategy[int]:
    return st.sampled_from([0, 1, 2, 3, 4, 5, 14, 15, 16, 255, 2**16, U32]) | st.integers(0, U32)


def u64() -> st.SearchStrategy[int]:
    return st.sampled_from([0, 1, 15, 16, 2**31, 2**32, 2**62, U64]) | st.integers(0, U64)


# ---------------------------------------------------------------------------------- arrays
@st.composite
def float_bytes(draw: st.DrawFn, dtype_code: int, count: int) -> bytes:
    """``count`` values of the dtype (hostile ones mixed in), or the wrong number of bytes."""
    how = draw(st.sampled_from(["right", "right", "wrong", "random"]))
    if how == "random":
        return draw(st.binary(max_size=64))
    n = count if how == "right" else draw(st.integers(0, count + 3))
    n = min(n, 4096)
    np_type = _NP.get(dtype_code, "<f4")
    base = draw(st.sampled_from(["normal", "const", "mixed"]))
    if base == "const":
        values = np.full(n, draw(floats()))
    else:
        values = np.random.default_rng(draw(st.integers(0, 2**32))).standard_normal(n)
        if base == "mixed" and n:
            for _ in range(draw(st.integers(1, 3))):
                values[draw(st.integers(0, n - 1))] = draw(floats())
    with np.errstate(over="ignore", invalid="ignore"):
        if np_type == "<u2":  # bfloat16: the high half of float32
            return (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        return values.astype(np_type).tobytes()


@st.composite
def index_bytes(draw: st.DrawFn, dim: int, nnz: int) -> tuple[int, bytes]:
    """(index_encoding, indices): sorted, unsorted, duplicate or out-of-range indices, bit-packed
    or delta-varint (with any gaps), or a wrong encoding or length."""
    encoding = draw(st.sampled_from([pb.INDEX_ENCODING_BITPACKED, pb.INDEX_ENCODING_DELTA_VARINT, 0, 3, 99]))
    n = min(nnz, 256)
    how = draw(st.sampled_from(["sorted", "unsorted", "duplicate", "out-of-range", "random"]))
    if how == "random":
        return encoding, draw(st.binary(max_size=48))
    idx = sorted(draw(st.lists(st.integers(0, max(dim - 1, 0)), min_size=n, max_size=n, unique=n <= dim)))
    if how == "unsorted" and n > 1:
        idx = idx[::-1]
    elif how == "duplicate" and n > 1:
        idx[1] = idx[0]
    elif how == "out-of-range" and n:
        idx[-1] = draw(st.sampled_from([dim, dim + 1, 2**32, 2**63]))
    if encoding == pb.INDEX_ENCODING_DELTA_VARINT:
        gaps = [idx[0]] + [b - a - 1 for a, b in zip(idx, idx[1:], strict=False)] if idx else []  # psrv.varint: gap - 1
        return encoding, b"".join(stream.varint(g % 2**64) for g in gaps)
    width = bitpack.index_width(max(dim, 2))
    values = np.array(idx, dtype=np.uint64)
    if values.size and int(values.max()) >= 1 << width:  # an index beyond the width: packed wider
        return encoding, bitpack.pack(values % (1 << bitpack.MAX_WIDTH), bitpack.MAX_WIDTH)
    return encoding, bitpack.pack(values, width)


def dims(dim: int) -> st.SearchStrategy[int]:
    return st.sampled_from([dim, dim, dim, dim - 1, dim + 1, 0, 1, 2**31, U64]) | st.integers(0, U64)


def value_dtypes() -> st.SearchStrategy[int]:
    return st.sampled_from([pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, 0, 7, 2**20])


# ---------------------------------------------------------------------------------- payloads
@st.composite
def dense_tensor(draw: st.DrawFn, dim: int) -> pb.DenseTensor:
    code = draw(value_dtypes())
    shape = draw(
        st.sampled_from([[dim], [dim], [], [dim, 1], [dim + 1], [0], [2**40], [2**32, 2**32]])
        | st.lists(st.integers(0, U64), max_size=3)
    )
    count = int(np.prod(np.array(shape, dtype=object))) if shape else 1
    return pb.DenseTensor(dtype=code, shape=shape, data=draw(float_bytes(code, count if count <= 4096 else dim)))


@st.composite
def sparse_tensor(draw: st.DrawFn, dim: int) -> pb.SparseTensor:
    d = draw(dims(dim))
    nnz = draw(st.sampled_from([0, 1, 3, dim, dim + 1, 2**32, U64]) | st.integers(0, dim + 2))
    encoding, indices = draw(index_bytes(dim, min(nnz, dim + 2)))
    code = draw(value_dtypes())
    values = draw(float_bytes(code, min(nnz, dim + 2)))
    return pb.SparseTensor(dim=d, nnz=nnz, index_encoding=encoding, indices=indices, value_dtype=code, values=values)


@st.composite
def laq_payload(draw: st.DrawFn, dim: int) -> pb.LaqPayload:
    bits = draw(st.sampled_from([0, 1, 2, 3, 4, 8, 16, 17, 64, U32]))
    codes_n = bitpack.packed_size(dim, bits) if 1 <= bits <= 64 else 4
    codes = draw(st.binary(min_size=codes_n, max_size=codes_n) | st.binary(max_size=64))
    return pb.LaqPayload(dim=draw(dims(dim)), bits=bits, radius=draw(floats()), codes=codes)


@st.composite
def qsgd_payload(draw: st.DrawFn, dim: int) -> pb.QsgdPayload:
    levels = draw(st.sampled_from([0, 1, 2, 15, 16, 255, 2**16 - 1, 2**16, U32]))
    width = max(1, int(levels).bit_length())
    signs_n, codes_n = bitpack.packed_size(dim, 1), bitpack.packed_size(dim, min(width, 64))
    return pb.QsgdPayload(
        dim=draw(dims(dim)),
        levels=levels,
        norm=draw(floats()),
        signs=draw(st.binary(min_size=signs_n, max_size=signs_n) | st.binary(max_size=32)),
        codes=draw(st.binary(min_size=codes_n, max_size=codes_n) | st.binary(max_size=64)),
    )


@st.composite
def sign_sparse_payload(draw: st.DrawFn, dim: int) -> pb.SignSparsePayload:
    nnz = draw(st.sampled_from([0, 1, 3, dim, dim + 1, U64]) | st.integers(0, dim + 2))
    encoding, indices = draw(index_bytes(dim, min(nnz, dim + 2)))
    n = min(nnz, dim + 2)
    return pb.SignSparsePayload(
        dim=draw(dims(dim)),
        nnz=nnz,
        index_encoding=encoding,
        indices=indices,
        scale=draw(floats()),
        signs=draw(st.binary(min_size=(n + 7) // 8, max_size=(n + 7) // 8) | st.binary(max_size=16)),
    )


@cache
def zstd_bomb() -> bytes:
    """64 MiB of zeros, zstd-compressed to a few kB."""
    return zstandard.ZstdCompressor(level=3).compress(bytes(64 << 20))


_KINDS = {"dense": dense_tensor, "sparse": sparse_tensor, "laq": laq_payload, "qsgd": qsgd_payload}
_KINDS["sign_sparse"] = sign_sparse_payload


@st.composite
def zstd_payload(draw: st.DrawFn, dim: int) -> pb.ZstdPayload:
    kind = draw(st.sampled_from(list(pb.PayloadKind.values()) + [99]))
    how = draw(st.sampled_from(["inner", "inner", "bomb", "random", "not-zstd"]))
    if how == "bomb":
        data = zstd_bomb()
    elif how == "random":
        data = zstandard.ZstdCompressor().compress(draw(st.binary(max_size=64)))
    elif how == "not-zstd":
        data = draw(st.binary(max_size=64))
    else:
        name = draw(st.sampled_from(sorted(_KINDS)))
        data = zstandard.ZstdCompressor().compress(draw(_KINDS[name](dim)).SerializeToString())
    return pb.ZstdPayload(kind=kind, data=data)


@st.composite
def push_request(draw: st.DrawFn, dim: int) -> pb.PushRequest:
    msg = pb.PushRequest(worker_id=draw(worker_ids()), round=draw(rounds()), local_loss=draw(floats()))
    if draw(st.booleans()):
        msg.smoothness = draw(floats())
    kind = draw(st.sampled_from([*sorted(_KINDS), "zstd", "none"]))
    if kind == "zstd":
        msg.zstd.CopyFrom(draw(zstd_payload(dim)))
    elif kind != "none":
        getattr(msg, kind).CopyFrom(draw(_KINDS[kind](dim)))
    return msg


# ---------------------------------------------------------------------------------- requests
@st.composite
def register_request(draw: st.DrawFn) -> pb.RegisterRequest:
    return pb.RegisterRequest(
        worker_id=draw(worker_ids()), num_samples=draw(u64()), n_features=draw(u32()), n_classes=draw(u32())
    )


@st.composite
def get_model_request(draw: st.DrawFn, msg_type: type = pb.GetModelRequest) -> object:
    msg = msg_type(worker_id=draw(worker_ids()), round=draw(rounds()))
    if draw(st.booleans()):
        msg.replica_round = draw(rounds())
    return msg


@st.composite
def skip_request(draw: st.DrawFn) -> pb.SkipRequest:
    msg = pb.SkipRequest(worker_id=draw(worker_ids()), round=draw(rounds()), reason=draw(st.integers(0, 4)))
    if draw(st.booleans()):
        msg.local_loss = draw(floats())
    return msg


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with 1-4 byte-level mutations."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "duplicate", "append-field"]))
        n = len(buf)
        if op in ("flip", "set") and n:
            i = draw(st.integers(0, n - 1))
            buf[i] = buf[i] ^ (1 << draw(st.integers(0, 7))) if op == "flip" else draw(st.integers(0, 255))
        elif op == "truncate" and n:
            del buf[draw(st.integers(0, n - 1)) :]
        elif op == "insert":
            i = draw(st.integers(0, n))
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del buf[i : i + draw(st.integers(1, 8))]
        elif op == "duplicate" and n:
            i = draw(st.integers(0, n - 1))
            buf[i:i] = buf[i : i + draw(st.integers(1, 16))]
        elif op == "append-field":  # any field number and wire type, a huge declared length
            tag = stream.varint((draw(st.integers(1, 2**29 - 1)) << 3) | draw(st.integers(0, 7)))
            buf += tag + stream.varint(draw(u64())) + draw(st.binary(max_size=8))
    return bytes(buf)


def message(structured: st.SearchStrategy[object]) -> st.SearchStrategy[bytes]:
    """Serialized ``structured`` messages, the same mutated, or random bytes."""
    serialized = structured.map(lambda m: m.SerializeToString())
    return st.one_of(serialized, serialized.flatmap(mutated), st.binary(max_size=96))


_COMPRESSORS = ["dense", "fp16", "bf16", "topk", "randk", "laq", "qsgd", "sq"]


@st.composite
def valid_push(draw: st.DrawFn, dim: int) -> pb.PushRequest:
    """A well-formed upload of one of psrv's compressors, its vector with hostile values mixed in
    (NaN, Inf, huge finite ones), from a registered or unknown worker, for some round; optionally
    zstd-compressed. Mutated, these are the "mutated valid messages"."""
    x = np.random.default_rng(draw(st.integers(0, 2**32))).standard_normal(dim)
    for _ in range(draw(st.integers(0, 2))):
        x[draw(st.integers(0, dim - 1))] = draw(floats())
    name = draw(st.sampled_from(_COMPRESSORS))
    options = {"ratio": draw(st.sampled_from([0.1, 0.5, 1.0]))} if name in ("topk", "randk") else {}
    try:
        with np.errstate(all="ignore"):
            payload = make_compressor(name, **options).compress(x, np.random.default_rng(0))
    except (ValueError, OverflowError, FloatingPointError):
        payload = make_compressor("dense").compress(np.zeros(dim), np.random.default_rng(0))
    worker = draw(st.one_of(st.just(REPORTED), worker_ids()))
    loss = draw(st.one_of(st.just(1.0), floats()))
    return codec.upload_to_proto(worker, draw(rounds()), loss, payload, zstd=draw(st.booleans()))


def push_bytes(dim: int) -> st.SearchStrategy[bytes]:
    valid = valid_push(dim).map(lambda m: m.SerializeToString())
    return st.one_of(message(push_request(dim)), valid, valid.flatmap(mutated))


@st.composite
def pieces(draw: st.DrawFn, whole: bytes, wrap: type = pb.PushStreamRequest) -> list[bytes]:
    """``whole`` cut into pieces (``wrap`` messages), or pieces with hostile offsets, sizes and data."""
    how = draw(st.sampled_from(["valid", "valid", "hostile", "random"]))
    if how == "random":
        return draw(st.lists(st.binary(max_size=40), min_size=0, max_size=4))
    if how == "valid" and whole:
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(whole) - 1)), max_size=3))))
        bounds = [0, *[c for c in cuts if c < len(whole)], len(whole)]
        return [
            wrap(offset=a, total_size=len(whole), data=whole[a:b]).SerializeToString()
            for a, b in zip(bounds, bounds[1:], strict=False)
        ]
    out = []
    for _ in range(draw(st.integers(0, 4))):
        out.append(
            wrap(
                offset=draw(st.sampled_from([0, 1, len(whole), U64]) | st.integers(0, 64)),
                total_size=draw(st.sampled_from([0, len(whole), len(whole) + 1, 2**40, U64]) | st.integers(0, 64)),
                data=draw(st.binary(max_size=16) | st.just(whole)),
            ).SerializeToString()
        )
    return out


@st.composite
def rounds_stream(draw: st.DrawFn, dim: int) -> list[bytes]:
    """The client side of a Rounds stream: an `open` (hostile or not), then up to three reports."""
    opened = pb.RoundsOpen(worker_id=draw(worker_ids()), round=draw(rounds()))
    if draw(st.booleans()):
        opened.replica_round = draw(rounds())
    out = [draw(message(st.just(pb.RoundsRequest(open=opened))))]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["skip", "push", "piece", "resync", "open", "random"]))
        if kind == "skip":
            skip = pb.RoundsSkip(reason=draw(st.integers(0, 4)))
            if draw(st.booleans()):
                skip.local_loss = draw(floats())
            req = pb.RoundsRequest(skip=skip).SerializeToString()
        elif kind == "push":
            req = stream.field_bytes(rpc.PUSH, draw(push_bytes(dim)))
        elif kind == "piece":
            whole = draw(push_bytes(dim))
            for piece in draw(pieces(whole)):
                out.append(stream.field_bytes(rpc.PUSH_PIECE, piece))
            continue
        elif kind == "resync":
            req = pb.RoundsRequest(resync=pb.RoundsResync()).SerializeToString()
        elif kind == "open":
            req = pb.RoundsRequest(open=opened).SerializeToString()
        else:
            req = draw(st.binary(max_size=40))
        out.append(draw(st.just(req) | mutated(req)))
    return out


@st.composite
def hostile_call(draw: st.DrawFn, dim: int) -> tuple[str, list[bytes]]:
    """(method, the serialized messages the client sends)."""
    method = draw(st.sampled_from(sorted(rpc.METHODS)))
    if method == "Register":
        return method, [draw(message(register_request()))]
    if method == "GetModel":
        return method, [draw(message(get_model_request()))]
    if method == "GetModelStream":
        return method, [draw(message(get_model_request(pb.GetModelStreamRequest)))]
    if method == "Skip":
        return method, [draw(message(skip_request()))]
    if method == "Push":
        return method, [draw(push_bytes(dim))]
    if method == "PushStream":
        return method, draw(pieces(draw(push_bytes(dim))))
    return method, draw(rounds_stream(dim))


# ---------------------------------------------------------------------------------- decoder properties
def check_payload(p: Payload, dim: int) -> None:
    """What every decoded upload satisfies (the engine relies on it)."""
    assert p.dim == dim
    if p.indices is not None:
        idx = p.indices.astype(np.int64)
        assert ((idx >= 0) & (idx < dim)).all() and (np.diff(idx) > 0).all()
    if p.kind == "dense":
        assert p.values.size == dim
    if p.kind == "sparse":
        assert p.values.size == p.indices.size
    if p.values is not None:
        assert np.isfinite(values_of(p)).all()
    if p.kind in ("laq", "qsgd", "sign_sparse"):
        assert np.isfinite(p.scale) and p.scale >= 0
    if p.kind == "laq":
        assert p.codes.size == dim and int(p.codes.max(initial=0)) < 2**p.bits
    if p.kind == "qsgd":
        assert p.codes.size == p.signs.size == dim and int(p.codes.max(initial=0)) <= p.bits
    if p.kind == "sign_sparse":
        assert p.signs.size == p.indices.size
    with np.errstate(over="ignore", invalid="ignore"):
        assert to_dense(p).shape == (dim,)


def check_upload_decoders(data: bytes, dim: int) -> bool:
    """Both decoders of an upload -- psrv's wire-level fast path (``WireUpload``) and protobuf's
    parse -- either refuse the bytes (CodecError, protobuf's DecodeError) or give the same valid
    payload; anything else raises. True when the upload was accepted."""
    try:
        fast = codec.WireUpload(data).payload(dim)
    except codec.CodecError:
        fast = None
    try:
        slow = codec.upload_from_proto(pb.PushRequest.FromString(data), dim)
    except (codec.CodecError, DecodeError):
        slow = None
    if fast is None:
        assert slow is None, "protobuf's parse accepted an upload the fast path refused"
        return False
    check_payload(fast, dim)
    assert slow is not None, "the fast path accepted an upload protobuf's parse refused"
    assert fast.kind == slow.kind and to_dense(fast).tobytes() == to_dense(slow).tobytes()
    return True


# ---------------------------------------------------------------------------------- the client
@dataclass
class HostileClient:
    """Sends serialized messages on the service's method paths and counts the statuses.

    Every call has a deadline: ``poll_deadline`` for the calls that may wait for the next round,
    ``deadline`` for the others. A call that takes longer than its deadline plus ``slack`` is a
    hang; one that is not a long poll and ends with DEADLINE_EXCEEDED is a hang too."""

    channel: grpc.Channel
    deadline: float = 5.0
    poll_deadline: float = 0.3
    slack: float = 2.0
    counts: Counter = field(default_factory=Counter)  # (method, status) -> calls
    messages: int = 0

    def send(self, method: str, messages: list[bytes]) -> str:
        """The status the call ended with (its name); raises AssertionError on a crash or a hang."""
        path = f"/{rpc.SERVICE}/{method}"
        kind = rpc.KINDS[method]
        limit = self.poll_deadline if method in LONG_POLLS else self.deadline
        started = time.monotonic()
        try:
            if kind == "unary":
                self.channel.unary_unary(path)(messages[0], timeout=limit)
            elif kind == "server_stream":
                for _ in self.channel.unary_stream(path)(messages[0], timeout=limit):
                    pass
            elif kind == "client_stream":
                self.channel.stream_unary(path)(iter(messages), timeout=limit)
            else:
                for _ in self.channel.stream_stream(path)(iter(messages), timeout=limit):
                    pass
            status, details = "OK", ""
        except grpc.RpcError as exc:
            status, details = exc.code().name, exc.details()
        took = time.monotonic() - started
        self.counts[method, status] += 1
        self.messages += max(1, len(messages))
        assert status in EXPECTED, f"{method} got {status}: {details} (messages {[m[:64] for m in messages]})"
        assert status != "DEADLINE_EXCEEDED" or method in LONG_POLLS, f"{method} hung: {details}"
        assert took <= limit + self.slack, f"{method} took {took:.2f} s, deadline {limit} s"
        return status

    def table(self) -> str:
        """Calls per method and status, one line each, and the totals."""
        lines = [f"{m:<15} {s:<20} {n:>7}" for (m, s), n in sorted(self.counts.items())]
        by_status = Counter()
        for (_, s), n in self.counts.items():
            by_status[s] += n
        lines.append(f"{'all':<15} {'calls':<20} {sum(self.counts.values()):>7}")
        lines.append(f"{'all':<15} {'messages':<20} {self.messages:>7}")
        lines += [f"{'all':<15} {s:<20} {n:>7}" for s, n in sorted(by_status.items())]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- the target
#: the task shape the target's workers register with (logreg: d = (4 + 1) x 3 = 15)
N_FEATURES, N_CLASSES = 4, 3


def honest_gradient(worker: int, round_: int, dim: int) -> np.ndarray:
    return np.random.default_rng([worker, round_]).standard_normal(dim).astype(np.float32)


class Target:
    """A live server (port 0) with two registered workers, :data:`REPORTED` and :data:`QUIET`, in
    round 0 of a ``rounds``-round run: REPORTED has uploaded, QUIET has not, so round 0 stays open
    (its deadline is far away) while the fuzzer sends. :meth:`state` is what must not change;
    :meth:`finish` lets both workers upload honestly to the end and returns the final model, which
    must be bit-identical to that of a run that was never fuzzed."""

    def __init__(self, algorithm: str = "gd", rounds: int = 3, **config: object) -> None:
        options = {"lr": 0.1, **({"ratio": 1.0} if algorithm == "topk-ef" else {})}
        self.ps = ParameterServer(
            ServerConfig(
                algorithm=algorithm,
                options=options,
                num_workers=2,
                rounds=rounds,
                round_timeout=600.0,
                register_timeout=30.0,
                start_timeout=0.0,
                done_grace=5.0,
                **config,
            ),
            # no call rate: the fuzzer's thousands of calls must reach the decoders, not the rate limit
            limits=TransportLimits(call_rate=0.0, anonymous_call_rate=0.0),
        )
        self.server, port = create_server(self.ps, "127.0.0.1:0")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=rpc.channel_options())
        self.stub = rpc.CountingStub(self.channel)
        self.rounds = rounds
        self.summary: dict | None = None
        for wid in (REPORTED, QUIET):
            request = pb.RegisterRequest(worker_id=wid, num_samples=10, n_features=N_FEATURES, n_classes=N_CLASSES)
            self.stub.Register(request, timeout=10)
        self.dim = self.ps.engine.dim
        self.thread = threading.Thread(target=self._run, name="fuzz-target", daemon=True)
        self.thread.start()
        self._report(REPORTED, 0)

    def _run(self) -> None:
        try:
            self.summary = self.ps.run()
        except RuntimeError:  # failed by close(): nothing to report
            pass

    def _report(self, wid: str, k: int) -> None:
        """The honest worker's report for round ``k`` (after the model of round ``k`` is out)."""
        self.stub.GetModel(pb.GetModelRequest(worker_id=wid, round=k), timeout=30)
        compressor = {"gd": "dense", "topk-ef": "topk", "laq": "laq"}.get(self.ps.config.algorithm, "dense")
        rng = np.random.default_rng([7, k, len(wid)])
        options = {"ratio": 1.0} if compressor == "topk" else {}
        payload = make_compressor(compressor, **options).compress(
            honest_gradient(len(wid), k, self.dim).astype(np.float64), rng
        )
        self.stub.Push(codec.upload_to_proto(wid, k, 1.0, payload), timeout=30)

    def state(self) -> bytes:
        """The model and the aggregate, as bytes."""
        e = self.ps.engine
        with e._cond:
            return e.state.theta.tobytes() + e.state.aggregator.total.tobytes()

    def finish(self) -> np.ndarray:
        """QUIET reports round 0, then both report every round to the end; the final model."""
        self._report(QUIET, 0)
        for k in range(1, self.rounds):
            for wid in (REPORTED, QUIET):
                self._report(wid, k)
        for wid in (REPORTED, QUIET):  # the final broadcast, as a worker fetches it
            self.stub.GetModel(pb.GetModelRequest(worker_id=wid, round=self.rounds), timeout=30)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the run did not end"
        assert self.summary is not None and self.summary["rounds"] == self.rounds
        return self.ps.theta.copy()

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None).wait(5)
        if self.thread.is_alive():
            self.ps.fail("fuzz target closed")
            self.thread.join(10)

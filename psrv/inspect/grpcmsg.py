"""gRPC messages of psrv -> what they were and what each part of them cost.

:func:`field_split` walks the protobuf wire format itself (tag varint, then the value or the
length varint and the bytes) over the top-level fields and one level into a payload
submessage, and charges every byte to one category, so the split adds up exactly to the
message length:

* ``indices``: ``SparseTensor.indices``, ``SignSparsePayload.indices``;
* ``values``: ``DenseTensor.data`` (upload payloads and the broadcast model), ``SparseTensor.values``;
* ``codes``: ``LaqPayload.codes``, ``QsgdPayload.signs`` and ``.codes``, ``SignSparsePayload.signs``;
* ``zstd``: ``ZstdPayload.data`` (a compressed payload, whatever it holds);
* ``header``: everything else (tags, lengths, ids, rounds, scalars, shapes, the run config).

A message of the Rounds stream (``RoundsRequest`` / ``RoundsResponse``) wraps the unary message in
its oneof; the split goes one level deeper there, so a ``push`` is split as a ``PushRequest`` and a
``model`` as a ``GetModelResponse`` (the oneof's tag and length are ``header``). Its record's
``message`` names the oneof member (``RoundsRequest.skip``, ``RoundsResponse.model``, ...).
Worker and round are implied by the stream: a record takes the worker of the stream's ``open``,
and the round of the ``open``, of each broadcast (``model``, or the first ``model_piece`` of a big
one) and of a ``rejected``; a report (``skip``, ``push``, ``push_piece``, ``resync``) gets the round
of the last broadcast before it on that stream (up and down messages taken in time order).

:class:`ConnectionDecoder` turns one connection's bytes (both directions) into JSON-ready
records: one ``message`` record per gRPC message, one ``frames`` record per stream direction
that carried no message (e.g. a trailers-only error reply), and at the end one ``connection``
record per direction with the bytes that belong to no stream. For every direction::

    relayed == preface + control + late + partial + undecoded + sum(record["wire_bytes"])
    record["wire_bytes"] == sum(record["bytes"].values())
    record["proto_bytes"] == header + indices + values + codes + zstd == len(message)
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor

from psrv.inspect.http2 import CONNECTION_KEYS, DIRECTIONS, GRPC_PREFIX_BYTES, H2_KEYS, H2Connection, StreamPart
from psrv.rpc import METHODS, SERVICE
from psrv.v1 import psrv_pb2 as pb

PROTO_KEYS = ("header", "indices", "values", "codes", "zstd")
#: every key of a record's ``bytes``, in order
BYTE_KEYS = (*H2_KEYS, "grpc_prefix", *PROTO_KEYS)

#: payload submessages one level down: field number -> category (unlisted fields: header)
_LEAF: dict[str, dict[int, str]] = {
    "DenseTensor": {3: "values"},
    "SparseTensor": {4: "indices", 6: "values"},
    "LaqPayload": {4: "codes"},
    "QsgdPayload": {4: "codes", 5: "codes"},
    "SignSparsePayload": {5: "indices", 6: "codes"},
    "ZstdPayload": {2: "zstd"},
}


#: messages whose oneof wraps another message (the Rounds stream's): split one level deeper
_WRAPPERS = ("RoundsRequest", "RoundsResponse")
#: the Rounds method's name, and its messages' oneofs
ROUNDS = "Rounds"
_ONEOF = {"RoundsRequest": "request", "RoundsResponse": "response"}


def _descend(desc: Descriptor) -> dict[int, Any]:
    """Top-level fields of ``desc`` whose submessage is split further (through a wrapper's oneof
    into the wrapped message's fields)."""
    out: dict[int, Any] = {}
    for f in desc.fields:
        if f.message_type is None:
            continue
        if f.message_type.name in _LEAF:
            out[f.number] = _LEAF[f.message_type.name]
        elif desc.name in _WRAPPERS and (inner := _descend(f.message_type)):
            out[f.number] = inner
    return out


_DESCEND: dict[str, dict[int, Any]] = {}


def _varint(data: bytes, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _walk(data: bytes, i: int, end: int, fields: dict[int, Any], split: dict[str, int]) -> None:
    while i < end:
        start = i
        key, i = _varint(data, i, end)
        wire = key & 7
        if wire == 0:
            _, i = _varint(data, i, end)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, body = _varint(data, i, end)
            i = body + n
            if i > end:
                raise ValueError("length-delimited field runs past its message")
            target = fields.get(key >> 3)
            if isinstance(target, str):
                split["header"] += body - start
                split[target] += n
                continue
            if isinstance(target, dict):
                split["header"] += body - start
                _walk(data, body, i, target, split)
                continue
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > end:
            raise ValueError("field runs past its message")
        split["header"] += i - start


def field_split(data: bytes, desc: Descriptor) -> dict[str, int]:
    """Bytes of a serialized ``desc`` message per category; sums to ``len(data)``.
    Raises ``ValueError`` on malformed wire data."""
    if desc.full_name not in _DESCEND:
        _DESCEND[desc.full_name] = _descend(desc)
    split = dict.fromkeys(PROTO_KEYS, 0)
    _walk(data, 0, len(data), _DESCEND[desc.full_name], split)
    return split


def method_name(path: str) -> str:
    """``/psrv.v1.ParameterServerService/Push`` -> ``Push``; any other path stays as it is."""
    prefix = f"/{SERVICE}/"
    if path.startswith(prefix) and path[len(prefix) :] in METHODS:
        return path[len(prefix) :]
    return path


def _enum_name(enum: Any, value: int) -> str:
    """``SKIP_REASON_LAZY_RULE`` -> ``lazy_rule``, ``PAYLOAD_KIND_SIGN_SPARSE`` -> ``sign_sparse``; an
    unknown value as its number."""
    if value not in enum.values():
        return str(value)
    prefix = enum.DESCRIPTOR.values[0].name.removesuffix("UNSPECIFIED")
    return enum.Name(value).removeprefix(prefix).lower()


def _leading_varint(data: bytes, number: int) -> int | None:
    """The varint field ``number`` of a message whose serialized bytes start with ``data`` (a first
    piece): protobuf writes fields in number order, so a higher field first means it is absent (0).
    None when ``data`` ends before that is known."""
    i, end = 0, len(data)
    try:
        while i < end:
            key, i = _varint(data, i, end)
            if key >> 3 > number:
                return 0
            wire = key & 7
            if key >> 3 == number and wire == 0:
                return _varint(data, i, end)[0]
            if wire == 0:
                _, i = _varint(data, i, end)
            elif wire == 1 or wire == 5:
                i += 8 if wire == 1 else 4
            elif wire == 2:
                n, i = _varint(data, i, end)
                i += n
            else:
                return None
    except ValueError:
        return None
    return 0 if i == end and end else None


def _describe_rounds(msg: Any, info: dict[str, Any]) -> dict[str, Any]:
    """A Rounds message: the oneof member it carries, and what that says."""
    name = msg.DESCRIPTOR.name
    member = msg.WhichOneof(_ONEOF[name])
    if member is None:
        raise ValueError(f"a {name} with nothing set")
    info["message"] = f"{name}.{member}"
    body = getattr(msg, member)
    if member == "open":
        info["worker"], info["round"] = body.worker_id or None, body.round
    elif member == "push":
        inner = _describe_unary(body, dict(info))
        info.update(worker=inner["worker"], round=body.round or None, kind=inner["kind"])
    elif member == "skip":
        info["kind"] = _enum_name(pb.SkipReason, body.reason)
    elif member == "model":
        info.update(round=body.round, kind="final" if body.done else "")
    elif member == "rejected":
        info.update(round=body.round, kind="rejected")
    elif member == "resync":
        info["kind"] = "resync"
    elif member in ("push_piece", "model_piece"):
        info["kind"] = "piece"
        if member == "model_piece" and body.offset == 0:
            info["round"] = _leading_varint(body.data, 1)  # GetModelResponse.round
    return info


def _describe_unary(msg: Any, info: dict[str, Any]) -> dict[str, Any]:
    if hasattr(msg, "worker_id"):
        info["worker"] = msg.worker_id or None
    if hasattr(msg, "round"):
        info["round"] = msg.round
    if isinstance(msg, pb.PushRequest):
        kind = msg.WhichOneof("payload") or ""
        info["kind"] = f"zstd:{_enum_name(pb.PayloadKind, msg.zstd.kind)}" if kind == "zstd" else kind
    elif isinstance(msg, pb.SkipRequest):
        info["kind"] = _enum_name(pb.SkipReason, msg.reason)
    elif isinstance(msg, pb.GetModelResponse):
        info["kind"] = "final" if msg.done else ""
    return info


def describe(method: str, direction: str, data: bytes) -> dict[str, Any]:
    """What a psrv message says: its type, worker, round and payload kind. A Rounds message says
    only what it carries itself (a report's round is the stream's: see :class:`ConnectionDecoder`)."""
    if method not in METHODS:
        return {"message": None, "worker": None, "round": None, "kind": ""}
    msg_type = METHODS[method][0 if direction == "up" else 1]
    msg = msg_type.FromString(data)
    info: dict[str, Any] = {"message": msg_type.DESCRIPTOR.name, "worker": None, "round": None, "kind": ""}
    if msg_type.DESCRIPTOR.name in _WRAPPERS:
        return _describe_rounds(msg, info)
    return _describe_unary(msg, info)


def _split_message(method: str, direction: str, data: bytes, compressed: bool) -> tuple[dict[str, Any], str | None]:
    """(info + proto byte split, error)."""
    info: dict[str, Any] = {"message": None, "worker": None, "round": None, "kind": ""}
    split = dict.fromkeys(PROTO_KEYS, 0)
    error = None
    if compressed:
        split["header"] = len(data)
        info["kind"] = "grpc-compressed"
        return {**info, "split": split}, None
    try:
        info = describe(method, direction, data)
        if method in METHODS:
            desc = METHODS[method][0 if direction == "up" else 1].DESCRIPTOR
            split = field_split(data, desc)
        else:
            split["header"] = len(data)
    except Exception as exc:  # noqa: BLE001 - a message we cannot read is logged, not fatal
        split = dict.fromkeys(PROTO_KEYS, 0)
        split["header"] = len(data)
        error = f"{type(exc).__name__}: {exc}"
    return {**info, "split": split}, error


def _status(part: StreamPart) -> tuple[int | None, str | None]:
    headers = part.headers
    if "grpc-status" not in headers:
        return None, None
    try:
        code = int(headers["grpc-status"])
    except ValueError:
        return None, headers["grpc-status"]
    return code, (headers.get("grpc-message") or None) if code else None


class ConnectionDecoder:
    """One TCP connection's HTTP/2 bytes -> records (see the module docstring)."""

    def __init__(self, conn: str) -> None:
        self.conn = conn
        self.h2 = H2Connection()
        self.worker: str | None = None  # the last worker id seen on this connection
        self.workers: set[str] = set()  # every worker id seen (in-process workers share one connection)
        self._ctx: dict[int, dict[str, Any]] = {}  # stream id -> what its request said
        self._streams = dict.fromkeys(DIRECTIONS, 0)  # wire bytes of stream records per direction
        self._messages = dict.fromkeys(DIRECTIONS, 0)
        self._closed = False

    def feed(self, direction: str, data: bytes, time: float) -> list[dict[str, Any]]:
        return self._records(self.h2.feed(direction, data, time))

    def close(self, time: float) -> list[dict[str, Any]]:
        """Flush open streams and append one ``connection`` record per direction."""
        if self._closed:
            return []
        self._closed = True
        out = self._records(self.h2.close(time))
        for d in DIRECTIONS:
            acct = self.h2.accounting(d)
            conn_bytes = sum(acct[k] for k in CONNECTION_KEYS)
            out.append(
                {
                    "type": "connection",
                    "time": time,
                    "conn": self.conn,
                    "dir": d,
                    "worker": next(iter(self.workers)) if len(self.workers) == 1 else None,
                    "workers": sorted(self.workers),
                    "relayed": acct["fed"],
                    **{k: acct[k] for k in CONNECTION_KEYS},
                    "streams": self._streams[d],
                    "messages": self._messages[d],
                    "balanced": acct["fed"] == conn_bytes + self._streams[d],
                    "error": acct["error"],
                }
            )
        return out

    def _records(self, parts: list[StreamPart]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        i = 0
        while i < len(parts):
            part = parts[i]
            if method_name(part.path) != ROUNDS:
                out.extend(self._part_records(part))
                i += 1
                continue
            # a Rounds stream's parts come together (request first): take its messages in time order
            mine = [part]
            while i + 1 < len(parts) and parts[i + 1].stream_id == part.stream_id and len(mine) < 2:
                i += 1
                mine.append(parts[i])
            out.extend(self._rounds_records(mine))
            i += 1
        return out

    def _message_record(
        self, part: StreamPart, msg: Any, method: str, ctx: dict[str, Any], rounds: bool
    ) -> dict[str, Any]:
        d = part.direction
        info, error = _split_message(method, d, msg.data, msg.compressed)
        if info["worker"] and (d == "up" or rounds):
            ctx["worker"] = self.worker = info["worker"]
            self.workers.add(info["worker"])
        if info["round"] is not None and (d == "up" or rounds) and info["kind"] != "rejected":
            ctx["round"] = info["round"]  # unary: a request's round; Rounds: open, and each broadcast
        worker = info["worker"] or ctx["worker"] or self.worker
        rnd = info["round"] if info["round"] is not None else ctx["round"]
        nbytes = {**msg.h2, "grpc_prefix": GRPC_PREFIX_BYTES, **info["split"]}
        return {
            "type": "message",
            "time": msg.time,
            **self._base(part, method),
            "message": info["message"],
            "worker": worker,
            "round": rnd,
            "kind": info["kind"],
            "compressed": msg.compressed,
            "bytes": nbytes,
            "proto_bytes": len(msg.data),
            "wire_bytes": sum(nbytes.values()),
            **self._tail(part),
            "error": error,
        }

    def _base(self, part: StreamPart, method: str) -> dict[str, Any]:
        return {"conn": self.conn, "dir": part.direction, "stream": part.stream_id, "method": method}

    @staticmethod
    def _tail(part: StreamPart) -> dict[str, Any]:
        status, detail = _status(part) if part.direction == "down" else (None, None)
        return {"status": status, "detail": detail, "reset": part.reset, "incomplete": part.incomplete}

    def _frames_record(self, part: StreamPart, method: str, ctx: dict[str, Any]) -> dict[str, Any]:
        nbytes = {**part.h2, "grpc_prefix": 0, **dict.fromkeys(PROTO_KEYS, 0)}
        return {
            "type": "frames",
            "time": part.end_time,
            **self._base(part, method),
            "message": None,
            "worker": ctx["worker"] or self.worker,
            "round": ctx["round"],
            "kind": "",
            "compressed": False,
            "bytes": nbytes,
            "proto_bytes": 0,
            "wire_bytes": sum(nbytes.values()),
            **self._tail(part),
            "error": None,
        }

    def _book(self, out: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for r in out:
            self._streams[r["dir"]] += r["wire_bytes"]
            self._messages[r["dir"]] += r["type"] == "message"
        return out

    def _part_records(self, part: StreamPart) -> list[dict[str, Any]]:
        method = method_name(part.path)
        ctx = self._ctx.setdefault(part.stream_id, {"worker": None, "round": None})
        out = [self._message_record(part, msg, method, ctx, rounds=False) for msg in part.messages]
        if not part.messages:
            out.append(self._frames_record(part, method, ctx))
        if part.direction == "down":
            self._ctx.pop(part.stream_id, None)
        return self._book(out)

    def _rounds_records(self, parts: list[StreamPart]) -> list[dict[str, Any]]:
        """A Rounds stream: both directions' messages merged by time (on a tie the broadcast comes
        before the report, except that nothing comes before the stream's first request), so a
        report gets the round of the broadcast before it; then a ``frames`` record for a direction
        that carried no message."""
        ctx = {"worker": None, "round": None}
        by_dir = {p.direction: p for p in parts}
        up = by_dir.get("up")
        down = by_dir.get("down")
        ups = up.messages if up else []
        downs = down.messages if down else []
        out: list[dict[str, Any]] = []
        i = j = 0
        while i < len(ups) or j < len(downs):
            take_up = j >= len(downs) or (
                i < len(ups) and (ups[i].time < downs[j].time or (i == 0 and ups[i].time == downs[j].time))
            )
            if take_up:
                out.append(self._message_record(up, ups[i], ROUNDS, ctx, rounds=True))
                i += 1
            else:
                out.append(self._message_record(down, downs[j], ROUNDS, ctx, rounds=True))
                j += 1
        for part in parts:
            if not part.messages:
                out.append(self._frames_record(part, ROUNDS, ctx))
        self._ctx.pop(parts[0].stream_id, None)
        return self._book(out)

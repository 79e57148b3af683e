"""gRPC plumbing shared by server and worker: method table, byte counting, channels, and the
streamed form of big messages (:mod:`psrv.stream`).

Bytes are counted where they cross the gRPC boundary: the (de)serializers handed
to gRPC see exactly the serialized message bytes that go into or come out of the
channel, so ``bytes_up``/``bytes_down`` are measured, not estimated. (Each gRPC
message additionally carries a 5-byte length prefix and HTTP/2 framing; those
are visible to the wire-level tools, not here.) A streamed message counts as the
pieces that carried it, each one message on the channel.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from psrv import stream
from psrv.metrics import ByteCounter
from psrv.v1 import psrv_pb2 as pb

__all__ = [
    "ByteCounter",
    "CountingStub",
    "Part",
    "Received",
    "RoundStream",
    "channel_options",
    "generic_handler",
    "keepalive_options",
]

_SERVICE = pb.DESCRIPTOR.services_by_name["ParameterServerService"]

#: the gRPC service name: method paths are ``/{SERVICE}/{method}``
SERVICE = _SERVICE.full_name

#: method name -> (request type, response type), from the service in psrv.proto
METHODS: dict[str, tuple[type, type]] = {
    m.name: (GetMessageClass(m.input_type), GetMessageClass(m.output_type)) for m in _SERVICE.methods
}

_KIND_OF = {(False, False): "unary", (False, True): "server_stream", (True, False): "client_stream"}

#: method name -> "unary", "server_stream" (GetModelStream), "client_stream" (PushStream) or
#: "bidi" (Rounds)
KINDS: dict[str, str] = {
    m.name: _KIND_OF.get((m.client_streaming, m.server_streaming), "bidi") for m in _SERVICE.methods
}

#: Default cap on one gRPC message; bigger models and uploads travel as streams of pieces.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


#: HTTP/2 keepalive: each end pings the other every KEEPALIVE_TIME_S seconds (also while no call is
#: active) and drops the connection when a ping is not answered within KEEPALIVE_TIMEOUT_S, so a
#: peer gone without a word (a cut link, a powered-off host, a stopped process) is noticed within
#: about 15 s: the server stops waiting for that worker, the worker reconnects.
#: the trailing metadata with which a server refusing a call says when to try again (gRPC's retry
#: pushback, gRFC A6 "gRPC Retry Design"): psrv sends it with RESOURCE_EXHAUSTED for limits that pass
RETRY_PUSHBACK = "grpc-retry-pushback-ms"

#: what gRPC itself says refusing a call over the server's maximum_concurrent_rpcs (no metadata of ours)
_GRPC_CONCURRENCY_REFUSAL = "Concurrent RPC limit"


def retry_after(exc: BaseException) -> float | None:
    """For a call refused RESOURCE_EXHAUSTED over a limit that passes (psrv's pushback, or gRPC's own
    limit on calls at once): the seconds to wait before trying again; None for any other failure."""
    if not isinstance(exc, grpc.RpcError) or exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_PUSHBACK:
            try:
                ms = int(value)
            except ValueError:
                return None
            return ms / 1000.0 if ms >= 0 else None  # negative: do not retry
    return 0.0 if _GRPC_CONCURRENCY_REFUSAL in (exc.details() or "") else None


KEEPALIVE_TIME_S = 10.0
KEEPALIVE_TIMEOUT_S = 5.0


def keepalive_options(server: bool = False) -> list[tuple[str, int]]:
    """gRPC channel (client) or server arguments for :data:`KEEPALIVE_TIME_S` pings. A server also
    permits its clients' pings (at most one per half interval, any number without data), else it
    would answer them with GOAWAY ``too_many_pings``."""
    opts = [
        ("grpc.keepalive_time_ms", int(KEEPALIVE_TIME_S * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # 0: no limit (default 2, then pings stop)
    ]
    if server:
        opts += [
            ("grpc.http2.min_ping_interval_without_data_ms", int(KEEPALIVE_TIME_S * 500)),
            ("grpc.http2.max_ping_strikes", 0),  # 0: pings within the interval are not held against a client
        ]
    return opts


@dataclass(frozen=True)
class Received:
    """A request as the server handler sees it: the parsed message and its size on the wire."""

    msg: Any
    nbytes: int


def _parser(msg_type: type) -> Callable[[bytes], Received]:
    """A request that does not parse becomes its :class:`psrv.stream.StreamError`, for the handler
    to raise (INVALID_ARGUMENT): an exception here would end the call with INTERNAL."""

    def parse(data: bytes) -> Received:
        try:
            return Received(msg_type.FromString(data), len(data))
        except DecodeError as exc:
            return Received(stream.StreamError(f"not a valid {msg_type.DESCRIPTOR.name} ({exc})"), len(data))

    return parse


class Part(NamedTuple):
    """One message of a Rounds stream, by the name of its oneof field (``push``, ``model_piece``,
    ...) and its value: a parsed message, a :class:`psrv.stream.Piece` (pieces), the serialized
    bytes (``push``, so dense values are not copied by protobuf), or for a message that does not
    parse, kind ``error`` and the :class:`psrv.stream.StreamError` saying why (raised by the
    handler, not in the deserializer, which could only end the call with INTERNAL)."""

    kind: str
    body: Any


def _rounds_part(data: bytes, msg_type: type, oneof: str, raw: int, piece: int) -> Part:
    """A Rounds message as a :class:`Part`: the common case (one field, the oneof's) read with
    :func:`psrv.stream.wire_fields` so field ``raw`` stays bytes and field ``piece`` is read
    without copying its data; anything else parsed by protobuf."""
    view = memoryview(data).cast("B")
    try:
        fields = list(stream.wire_fields(view))
        if len(fields) == 1 and fields[0].wire == 2 and fields[0].number in (raw, piece):
            f = fields[0]
            name = msg_type.DESCRIPTOR.fields_by_number[f.number].name
            body = view[f.value : f.end]
            return Part(name, stream.parse_piece(body) if f.number == piece else body)
        msg = msg_type.FromString(data)
    except (stream.StreamError, DecodeError) as exc:
        return Part("error", stream.StreamError(f"Rounds: not a {msg_type.DESCRIPTOR.name} ({exc})"))
    kind = msg.WhichOneof(oneof)
    if kind is None:
        return Part("error", stream.StreamError(f"Rounds: a {msg_type.DESCRIPTOR.name} with nothing set"))
    body = getattr(msg, kind)
    if kind == msg_type.DESCRIPTOR.fields_by_number[raw].name:
        body = memoryview(body.SerializeToString())
    elif kind == msg_type.DESCRIPTOR.fields_by_number[piece].name:
        body = stream.Piece(body.offset, body.total_size, memoryview(body.data))
    return Part(kind, body)


def _field_number(msg_type: type, name: str) -> int:
    return msg_type.DESCRIPTOR.fields_by_name[name].number


#: field numbers of the Rounds messages' oneofs
PUSH, PUSH_PIECE = _field_number(pb.RoundsRequest, "push"), _field_number(pb.RoundsRequest, "push_piece")
RESPONSE_MODEL, RESPONSE_MODEL_PIECE, RESPONSE_REJECTED = (
    _field_number(pb.RoundsResponse, name) for name in ("model", "model_piece", "rejected")
)


def _parse_rounds_request(data: bytes) -> Received:
    return Received(_rounds_part(data, pb.RoundsRequest, "request", raw=PUSH, piece=PUSH_PIECE), len(data))


def _request_parser(method: str, msg_type: type, raw: Collection[str]) -> Callable[[bytes], Received]:
    if method == "HostRounds":  # parsed by protobuf (an error, as a StreamError, for the handler to raise)
        return _parser(msg_type)
    if KINDS[method] == "bidi":
        return _parse_rounds_request
    if KINDS[method] == "client_stream":
        return _parse_piece
    return _unparsed if method in raw else _parser(msg_type)


def _unparsed(data: bytes) -> Received:
    return Received(data, len(data))


def _parse_piece(data: bytes) -> Received:
    """A PushStream piece as :class:`psrv.stream.Piece` (its data not copied)."""
    return Received(_piece_or_error(data), len(data))


def _piece_or_error(data: bytes) -> stream.Piece | stream.StreamError:
    """A malformed piece as its error, for the handler to raise: an exception in a deserializer
    would end the call with gRPC's INTERNAL "Exception deserializing", not the reason."""
    try:
        return stream.parse_piece(data)
    except stream.StreamError as exc:
        return exc


def generic_handler(handlers: dict[str, Callable[..., Any]], raw: Collection[str] = ()) -> grpc.GenericRpcHandler:
    """Server handlers receive :class:`Received` and return already-serialized bytes,
    so the handler itself knows (and records) the size of every request and reply. A
    ``server_stream`` handler returns an iterator of serialized messages; a ``client_stream``
    handler receives an iterator of :class:`Received` pieces (:class:`psrv.stream.Piece`). The
    handlers of the unary methods in ``raw`` receive their request's bytes, unparsed."""
    factories = {
        "unary": grpc.unary_unary_rpc_method_handler,
        "server_stream": grpc.unary_stream_rpc_method_handler,
        "client_stream": grpc.stream_unary_rpc_method_handler,
        "bidi": grpc.stream_stream_rpc_method_handler,
    }
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            name: factories[KINDS[name]](
                handlers[name],
                request_deserializer=_request_parser(name, req, raw),
                response_serializer=bytes,
            )
            for name, (req, _) in METHODS.items()
        },
    )


def _identity(data: bytes) -> bytes:
    return data


def _serialized(request: Any) -> stream.Serialized:
    return request if isinstance(request, stream.Serialized) else stream.Serialized(request.SerializeToString())


class CountingStub:
    """Client stub whose every call counts the bytes it sends ("up") and receives ("down").

    ``GetModel`` and ``Push`` take and return their unary messages whichever form travels: a
    PushRequest of more than ``stream_above`` serialized bytes goes as PushStream pieces, and once
    a Register reply has announced a model of more than ``stream_above`` bytes (4 per parameter),
    GetModel asks with GetModelStream. ``GetModelStream`` and ``PushStream`` always stream.

    Sent bytes are booked when the call ends, unless it failed with UNAVAILABLE: then no
    server saw them (e.g. a registration retried while the server is still starting)."""

    def __init__(
        self,
        channel: grpc.Channel,
        counter: ByteCounter | None = None,
        stream_above: int = stream.STREAM_ABOVE,
        chunk: int = stream.CHUNK_BYTES,
    ) -> None:
        self.counter = counter or ByteCounter()
        self.stream_above, self.chunk = stream_above, chunk
        self.model_dim = 0  # from the last Register reply; decides GetModel's form and the stream limit
        factories = {"unary": channel.unary_unary, "server_stream": channel.unary_stream}
        factories["client_stream"] = channel.stream_unary
        factories["bidi"] = channel.stream_stream
        self._calls = {
            name: factories[KINDS[name]](
                f"/{SERVICE}/{name}", request_serializer=_identity, response_deserializer=self._deserializer(name, resp)
            )
            for name, (_, resp) in METHODS.items()
        }

    def _booked(self, method: str, sent: list[int], call: Callable[[], Any]) -> Any:
        """``call()``, booking the sizes in ``sent`` (the requests handed to gRPC) as it ends."""
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                sent.clear()
            raise
        finally:
            for nbytes in list(sent):
                self.counter.add("up", method, nbytes)

    def _unary(self, method: str, request: Any, **kwargs: Any) -> Any:
        data = request.SerializeToString()
        return self._booked(method, [len(data)], lambda: self._calls[method](data, **kwargs))

    def Register(self, request: pb.RegisterRequest, **kwargs: Any) -> pb.RegisterResponse:
        reply = self._unary("Register", request, **kwargs)
        self.model_dim = reply.config.dim
        return reply

    def model_limit(self) -> int:
        """The largest broadcast this client reassembles from pieces (for the registered model)."""
        return stream.limit_for(self.model_dim) if self.model_dim else stream.MAX_MESSAGE

    def GetModel(self, request: pb.GetModelRequest, **kwargs: Any) -> pb.GetModelResponse:
        if 4 * self.model_dim > self.stream_above:
            return self.GetModelStream(request, **kwargs)
        return self._unary("GetModel", request, **kwargs)

    def Push(self, request: pb.PushRequest | stream.Serialized, **kwargs: Any) -> pb.PushResponse:
        """``request``: a PushRequest, or one already serialized (:func:`psrv.codec.upload_to_wire`)."""
        data = _serialized(request)
        if data.nbytes > self.stream_above:
            return self._push_stream(data, **kwargs)
        return self._booked("Push", [data.nbytes], lambda: self._calls["Push"](data.tobytes(), **kwargs))

    def Skip(self, request: pb.SkipRequest, **kwargs: Any) -> pb.SkipResponse:
        return self._unary("Skip", request, **kwargs)

    def Probe(self, request: pb.ProbeRequest, **kwargs: Any) -> pb.ProbeResponse:
        return self._unary("Probe", request, **kwargs)

    def GetModelStream(self, request: pb.GetModelRequest, **kwargs: Any) -> pb.GetModelResponse:
        """GetModel as a stream of pieces (raises :class:`psrv.stream.StreamError` on a bad stream)."""
        stream_request = pb.GetModelStreamRequest(worker_id=request.worker_id, round=request.round)
        if request.HasField("replica_round"):
            stream_request.replica_round = request.replica_round
        data = stream_request.SerializeToString()
        whole = stream.Reassembler(self.model_limit(), "GetModelStream")

        def receive() -> memoryview:
            for piece in self._calls["GetModelStream"](data, **kwargs):
                if isinstance(piece, stream.StreamError):
                    raise piece
                whole.add(*piece)
            return whole.result()

        return pb.GetModelResponse.FromString(self._booked("GetModelStream", [len(data)], receive))

    def PushStream(self, request: pb.PushRequest | stream.Serialized, **kwargs: Any) -> pb.PushResponse:
        """Push as a stream of pieces."""
        return self._push_stream(_serialized(request), **kwargs)

    def _push_stream(self, data: stream.Serialized, **kwargs: Any) -> pb.PushResponse:
        sent: list[int] = []

        def requests() -> Iterator[bytes]:
            for piece in stream.pieces(data, self.chunk):
                sent.append(len(piece))
                yield piece

        reply = self._booked("PushStream", sent, lambda: self._calls["PushStream"](requests(), **kwargs))
        return pb.PushResponse(round=reply.round)

    def Rounds(self, open_: pb.RoundsOpen) -> RoundStream:
        """Open this worker's Rounds stream (see :class:`RoundStream`)."""
        return RoundStream(self, open_)

    def HostRounds(self, requests: Iterator[bytes]) -> Any:
        """Open a HostRounds stream (:mod:`worker.host`): ``requests`` are serialized
        HostRoundsRequests (counted "up" by the caller); the replies come parsed, counted "down"."""
        return self._calls["HostRounds"](requests)

    def _deserializer(self, method: str, msg_type: type) -> Callable[[bytes], Any]:
        parse = {"server_stream": _piece_or_error, "bidi": _parse_rounds_response}.get(
            KINDS[method], msg_type.FromString
        )
        if method == "HostRounds":  # a virtual workers' host (worker.host)
            parse = msg_type.FromString

        def deserialize(data: bytes) -> Any:
            self.counter.add("down", method, len(data))
            return parse(data)

        return deserialize


def _parse_rounds_response(data: bytes) -> Part:
    return _rounds_part(data, pb.RoundsResponse, "response", raw=RESPONSE_MODEL, piece=RESPONSE_MODEL_PIECE)


class Outbox:
    """The requests of a client stream, serialized: :meth:`put` from any thread, each counted "up"
    under ``method``; gRPC reads them from ``iter(outbox)`` until :meth:`close` (the half-close)."""

    def __init__(self, counter: ByteCounter, method: str) -> None:
        self.counter, self.method = counter, method
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def put(self, data: bytes) -> None:
        self.counter.add("up", self.method, len(data))
        self._queue.put(data)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[bytes]:
        while (item := self._queue.get()) is not None:
            yield item


class RoundStream:
    """The worker's end of its Rounds stream (see the top of ``psrv.proto``): :meth:`receive` the
    next broadcast, then report it with :meth:`skip` or :meth:`push`, or ask for it again as a
    snapshot with :meth:`resync`. Every message is counted as it is handed to gRPC ("up") or
    parsed ("down"), under the method name ``Rounds``. Big uploads and broadcasts (over the stub's
    ``stream_above``) travel as pieces on the same stream."""

    def __init__(self, stub: CountingStub, open_: pb.RoundsOpen) -> None:
        self.stub = stub
        self._out = Outbox(stub.counter, "Rounds")
        self._send(pb.RoundsRequest(open=open_).SerializeToString())
        self._replies = stub._calls["Rounds"](iter(self._out))
        self._limit = stub.model_limit()

    def _send(self, data: bytes) -> None:
        self._out.put(data)

    def skip(self, request: pb.RoundsRequest) -> None:
        """Send a report that is no upload (a ``skip``; see :func:`psrv.codec.rounds_skip`)."""
        self._send(request.SerializeToString())

    def resync(self) -> None:
        self._send(pb.RoundsRequest(resync=pb.RoundsResync()).SerializeToString())

    def push(self, upload: stream.Serialized) -> None:
        """Send an upload (a serialized PushRequest), in pieces if it is big."""
        if upload.nbytes > self.stub.stream_above:
            for piece in stream.pieces(upload, self.stub.chunk, within=PUSH_PIECE):
                self._send(piece)
        else:
            self._send(stream.field_bytes(PUSH, *upload.parts))

    def receive(self) -> tuple[memoryview, pb.RoundsRejected | None]:
        """The next broadcast (a serialized GetModelResponse: decode it with
        :func:`psrv.codec.model_from_wire`), and the server's ``rejected`` of the last report if it
        sent one. Raises ``grpc.RpcError`` when the stream ends with an error status, and
        :class:`psrv.stream.StreamError` for messages that do not make a broadcast."""
        rejected = None
        whole: stream.Reassembler | None = None
        for kind, body in self._replies:
            if kind == "error":
                raise body
            if kind == "rejected":
                rejected = body
            elif kind == "model":
                return body, rejected
            elif kind == "model_piece":
                whole = whole or stream.Reassembler(self._limit, "Rounds")
                whole.add(*body)
                if whole.complete:
                    return whole.result(), rejected
        raise stream.StreamError("Rounds: the server ended the stream before the final broadcast")

    def close(self, finished: bool = False) -> None:
        """End the stream from this side. ``finished`` (the final broadcast has arrived): end this
        half and read the server's OK (it has nothing more to send), so the stream ends cleanly on
        the wire; otherwise (an error, a worker that leaves) cancel the call."""
        self._out.close()
        if not finished:
            self._replies.cancel()
            return
        try:
            for _ in self._replies:
                pass
        except grpc.RpcError:
            pass

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

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message_factory import GetMessageClass

from psrv import stream
from psrv.metrics import ByteCounter
from psrv.v1 import psrv_pb2 as pb

__all__ = ["ByteCounter", "CountingStub", "Received", "channel_options", "generic_handler"]

_SERVICE = pb.DESCRIPTOR.services_by_name["ParameterServerService"]

#: the gRPC service name: method paths are ``/{SERVICE}/{method}``
SERVICE = _SERVICE.full_name

#: method name -> (request type, response type), from the service in psrv.proto
METHODS: dict[str, tuple[type, type]] = {
    m.name: (GetMessageClass(m.input_type), GetMessageClass(m.output_type)) for m in _SERVICE.methods
}

#: method name -> "unary", "server_stream" (GetModelStream) or "client_stream" (PushStream)
KINDS: dict[str, str] = {
    m.name: "client_stream" if m.client_streaming else "server_stream" if m.server_streaming else "unary"
    for m in _SERVICE.methods
}

#: Default cap on one gRPC message; bigger models and uploads travel as streams of pieces.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


@dataclass(frozen=True)
class Received:
    """A request as the server handler sees it: the parsed message and its size on the wire."""

    msg: Any
    nbytes: int


def _parser(msg_type: type) -> Callable[[bytes], Received]:
    def parse(data: bytes) -> Received:
        return Received(msg_type.FromString(data), len(data))

    return parse


def _request_parser(method: str, msg_type: type, raw: Collection[str]) -> Callable[[bytes], Received]:
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

    def GetModelStream(self, request: pb.GetModelRequest, **kwargs: Any) -> pb.GetModelResponse:
        """GetModel as a stream of pieces (raises :class:`psrv.stream.StreamError` on a bad stream)."""
        stream_request = pb.GetModelStreamRequest(worker_id=request.worker_id, round=request.round)
        if request.HasField("replica_round"):
            stream_request.replica_round = request.replica_round
        data = stream_request.SerializeToString()
        limit = stream.limit_for(self.model_dim) if self.model_dim else stream.MAX_MESSAGE
        whole = stream.Reassembler(limit, "GetModelStream")

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

    def _deserializer(self, method: str, msg_type: type) -> Callable[[bytes], Any]:
        parse = _piece_or_error if KINDS[method] == "server_stream" else msg_type.FromString

        def deserialize(data: bytes) -> Any:
            self.counter.add("down", method, len(data))
            return parse(data)

        return deserialize

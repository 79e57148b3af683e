"""gRPC plumbing shared by server and worker: method table, byte counting, channels.

Bytes are counted where they cross the gRPC boundary: the (de)serializers handed
to gRPC see exactly the serialized message bytes that go into or come out of the
channel, so ``bytes_up``/``bytes_down`` are measured, not estimated. (Each gRPC
message additionally carries a 5-byte length prefix and HTTP/2 framing; those
are visible to the wire-level tools, not here.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from psrv.metrics import ByteCounter
from psrv.v1 import psrv_pb2 as pb

__all__ = ["ByteCounter", "CountingStub", "Received", "channel_options", "generic_handler"]

SERVICE = "psrv.v1.ParameterServer"

#: method name -> (request type, response type)
METHODS: dict[str, tuple[type, type]] = {
    "Register": (pb.RegisterRequest, pb.RegisterReply),
    "GetModel": (pb.ModelRequest, pb.ModelBroadcast),
    "Push": (pb.Upload, pb.Ack),
    "Skip": (pb.SkipNotice, pb.Ack),
}

#: Default cap on one message; large enough for a float64 model of 64M parameters.
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


def generic_handler(handlers: dict[str, Callable[[Received, grpc.ServicerContext], bytes]]) -> grpc.GenericRpcHandler:
    """Server handlers receive :class:`Received` and return already-serialized bytes,
    so the handler itself knows (and records) the size of every request and reply."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            name: grpc.unary_unary_rpc_method_handler(
                handlers[name], request_deserializer=_parser(req), response_serializer=bytes
            )
            for name, (req, _) in METHODS.items()
        },
    )


class CountingStub:
    """Client stub whose every call counts the bytes it sends ("up") and receives ("down").

    Sent bytes are booked when the call ends, unless it failed with UNAVAILABLE: then no
    server saw them (e.g. a registration retried while the server is still starting)."""

    def __init__(self, channel: grpc.Channel, counter: ByteCounter | None = None) -> None:
        self.counter = counter or ByteCounter()
        self._sent = threading.local()
        for name, (_, resp) in METHODS.items():
            call = channel.unary_unary(
                f"/{SERVICE}/{name}",
                request_serializer=self._serializer,
                response_deserializer=self._deserializer(name, resp),
            )
            setattr(self, name, self._counted(name, call))

    def _serializer(self, msg: Any) -> bytes:
        data = msg.SerializeToString()
        self._sent.nbytes = len(data)
        return data

    def _counted(self, method: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def invoke(request: Any, **kwargs: Any) -> Any:
            self._sent.nbytes = None
            try:
                return call(request, **kwargs)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    self._sent.nbytes = None
                raise
            finally:
                if self._sent.nbytes is not None:
                    self.counter.add("up", method, self._sent.nbytes)

        return invoke

    def _deserializer(self, method: str, msg_type: type) -> Callable[[bytes], Any]:
        def deserialize(data: bytes) -> Any:
            self.counter.add("down", method, len(data))
            return msg_type.FromString(data)

        return deserialize

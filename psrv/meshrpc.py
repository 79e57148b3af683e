"""gRPC plumbing of decentralized runs (``protos/psrv/v1/mesh.proto``), shared by the coordinator
(:mod:`psrv.mesh`) and the workers (:mod:`worker.gossip`): method tables from the descriptor,
handlers that see each request's size on the wire, and client calls that count what they send
and receive. Bytes are the serialized messages, as :mod:`psrv.rpc` counts them (without gRPC's
5-byte prefix and HTTP/2 framing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from psrv.rpc import Received
from psrv.v1 import mesh_pb2 as mpb

MESH_SERVICE = mpb.DESCRIPTOR.services_by_name["MeshService"]
GOSSIP_SERVICE = mpb.DESCRIPTOR.services_by_name["GossipService"]


def _types(service: Any) -> dict[str, tuple[type, type]]:
    return {m.name: (GetMessageClass(m.input_type), GetMessageClass(m.output_type)) for m in service.methods}


def generic_handler(service: Any, handlers: dict[str, Callable[[Received, Any], bytes]]) -> grpc.GenericRpcHandler:
    """Unary handlers of ``service`` that get a :class:`psrv.rpc.Received` (the parsed request and its
    size; a request that does not parse is refused with INVALID_ARGUMENT) and return bytes."""
    table = {}
    for name, (req_type, _) in _types(service).items():
        fn = handlers[name]

        def parse(data: bytes, req_type: type = req_type) -> Received:
            try:
                return Received(req_type.FromString(data), len(data))
            except DecodeError as exc:
                return Received(ValueError(f"not a valid {req_type.DESCRIPTOR.name} ({exc})"), len(data))

        def handle(req: Received, context: Any, fn: Callable[..., bytes] = fn) -> bytes:
            if isinstance(req.msg, ValueError):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(req.msg))
            return fn(req, context)

        table[name] = grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=parse, response_serializer=lambda b: b
        )
    return grpc.method_handlers_generic_handler(service.full_name, table)


class Caller:
    """Unary calls of ``service`` on ``channel`` with their sizes: ``call(name, request)`` returns
    (response, bytes sent, bytes received); ``future(name, data)`` sends serialized bytes."""

    def __init__(self, channel: grpc.Channel, service: Any) -> None:
        self._methods = {
            name: channel.unary_unary(
                f"/{service.full_name}/{name}",
                request_serializer=lambda b: b,
                response_deserializer=lambda data, t=resp: (t.FromString(data), len(data)),
            )
            for name, (_, resp) in _types(service).items()
        }

    def call(self, name: str, request: Any, timeout: float) -> tuple[Any, int, int]:
        data = request.SerializeToString()
        reply, nbytes = self._methods[name](data, timeout=timeout)
        return reply, len(data), nbytes

    def future(self, name: str, data: bytes, timeout: float) -> grpc.Future:
        return self._methods[name].future(data, timeout=timeout)

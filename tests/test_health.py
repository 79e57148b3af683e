"""The standard gRPC health service and server reflection on a real server (port 0): SERVING while
the run registers and trains, NOT_SERVING once it has ended; reflection lists psrv's service."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from psrv import rpc
from psrv.server import ParameterServer, ServerConfig, create_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _status(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_serving_then_not_serving_and_reflection_lists_services() -> None:
    ps = ParameterServer(ServerConfig(num_workers=1, rounds=1, register_timeout=0.3))
    server, port = create_server(ps, "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert ps.phase == "registering"
            assert _status(channel) == SERVING
            assert _status(channel, rpc.SERVICE) == SERVING
            with pytest.raises(grpc.RpcError) as err:
                _status(channel, "no.such.Service")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name for s in reply.list_services_response.service}
            assert {rpc.SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
            (reply,) = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=rpc.SERVICE)])
            )
            assert reply.file_descriptor_response.file_descriptor_proto  # the proto, without the .proto file

            # nobody registers: the run fails after register_timeout and health says so
            runner = threading.Thread(target=lambda: _quiet(ps.run))
            runner.start()
            runner.join(10)
            assert ps.phase == "failed"
            assert _status(channel) == NOT_SERVING
            assert _status(channel, rpc.SERVICE) == NOT_SERVING
    finally:
        server.stop(None)


def test_fail_sets_not_serving() -> None:
    ps = ParameterServer(ServerConfig(num_workers=1, rounds=1))
    server, port = create_server(ps, "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert _status(channel) == SERVING
            ps.fail("terminated")
            assert _status(channel) == NOT_SERVING
    finally:
        server.stop(None)


def _quiet(fn: Callable[[], object]) -> None:
    with contextlib.suppress(RuntimeError):  # the run fails: nobody registered
        fn()

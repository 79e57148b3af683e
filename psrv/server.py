"""The parameter server over gRPC (``psrv start-server``): a thin servicer in front of the round
engine (:mod:`psrv.engine`).

The servicer decodes each request (:mod:`psrv.codec`), hands core objects to the engine, maps the
engine's domain errors and codec errors to gRPC status codes, and encodes the reply. It counts the
bytes of every message it receives and sends. The model broadcast is serialized once per round.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from typing import Any, NamedTuple

import grpc
import numpy as np
import threadpoolctl
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from psrv import codec, memory, rpc, stream, tls
from psrv.engine import (
    AlreadyExists,
    EngineError,
    FailedPrecondition,
    NotReady,
    RoundEngine,
    RoundSink,
    ServerConfig,
    raise_hidden_interrupt,
)
from psrv.hostrounds import host_rounds
from psrv.limits import CallLimiter, LimitExceeded, RateLimiter, TransportLimits, Watchdog, host_of
from psrv.metrics import ByteCounter
from psrv.v1 import psrv_pb2 as pb

log = logging.getLogger("psrv.server")

__all__ = ["HEALTH_SERVICES", "ParameterServer", "ServerConfig", "Servicer", "create_server"]

#: the names the health service answers for: the whole server ("") and psrv's service
HEALTH_SERVICES = ("", rpc.SERVICE)


class Servicer:
    """gRPC handlers for one engine: decode, call the engine, encode; errors become statuses.

    The streamed forms (GetModelStream, PushStream) share GetModel's and Push's code: the model's
    bytes, encoded once per round, go out as pieces; the pieces of an upload are put back together
    and checked (:class:`psrv.stream.Reassembler`, at most :func:`psrv.stream.limit_for` the model's
    dimension) before anything decodes them, so a bad stream is refused whole."""

    #: handlers that receive their request serialized (``Received.msg`` is the bytes)
    RAW = frozenset({"Push"})

    def __init__(
        self,
        engine: RoundEngine,
        counter: ByteCounter,
        chunk: int = stream.CHUNK_BYTES,
        stream_above: int = stream.STREAM_ABOVE,
        limits: TransportLimits | None = None,
    ) -> None:
        self.engine, self.counter, self.chunk, self.stream_above = engine, counter, chunk, stream_above
        #: checks that a call's credentials name the worker it acts for (:mod:`psrv.tls`); None: open
        self.auth: tls.Authenticator | None = None
        self.limits = limits or TransportLimits()
        self.calls = CallLimiter(self.limits.calls_per_worker, self.limits.anonymous_calls)
        lim = self.limits  # every worker of a loopback run registers from one host: its burst holds them all
        self.rate = RateLimiter(lim.call_rate, lim.call_burst, lim.anonymous_call_rate,
                                max(lim.call_burst, 2 * engine.config.num_workers))  # fmt: skip
        self._configured = frozenset(engine.config.worker_ids)
        self.watchdog = Watchdog()
        self.max_message_bytes = 0  # the largest message received (Probe says it), set by create_server
        self._shared: stream.SharedPieces | None = None  # the pieces of the round's broadcast, cut once
        self._shared_lock = threading.Lock()

    def _charge(self, context: Any, worker_id: str) -> None:
        """Count one call (or a Rounds resync) against its caller's rate (README, "Limits"):
        with credentials the caller is the worker they name; without, the caller's host together
        with ``worker_id`` when that id is registered or configured (``--worker-ids``), else the
        host's anonymous bucket. Raises :class:`LimitExceeded` over the rate."""
        if context is None:
            return
        if self.auth is not None:
            who = self._identity(context)
            if who is not None:
                self.rate.take(("id", who), f"worker {who!r}")
                return
        host = host_of(context.peer())
        if worker_id and (worker_id in self.engine.state.workers or worker_id in self._configured):
            self.rate.take(("host", host, worker_id), f"worker {worker_id!r} (from {host})")
        else:
            self.rate.take((RateLimiter.ANONYMOUS, host), f"callers from {host} without a registered worker id")

    def _identity(self, context: Any) -> str | None:
        """The worker the call's credentials name (token, else client certificate), or None."""
        assert self.auth is not None
        if self.auth.tokens is not None:
            return self.auth.token_identity(context.invocation_metadata())
        if self.auth.certs:
            names = self.auth.cert_identities(context)
            return "/".join(sorted(names)) if names else None
        return None

    def _hold(self, worker_id: str | None, context: Any) -> Callable[[], None]:
        """One long-lived call for ``worker_id`` (registered: its own budget; else the shared one);
        returns its release, also run when the call ends (RESOURCE_EXHAUSTED over the limit)."""
        key = worker_id if worker_id is not None and worker_id in self.engine.state.workers else None
        release = self.calls.acquire(key)
        if context is not None:
            context.add_callback(release)
        return release

    def _idle_guard(self, context: Any) -> int:
        """Watch a stream inside an upload: no piece for ``stream_idle_timeout`` s cancels the call."""

        def expire() -> None:
            log.warning("an upload stream sent nothing for %g s (--stream-idle-timeout): ended",
                        self.limits.stream_idle_timeout)  # fmt: skip
            context.cancel()

        return self.watchdog.watch(self.limits.stream_idle_timeout, expire)

    def _authorize(self, context: Any, worker_id: str) -> None:
        """Abort with UNAUTHENTICATED / PERMISSION_DENIED unless the call may act as ``worker_id``."""
        if self.auth is not None:
            self.auth.authorize(context, worker_id)

    def handlers(self) -> dict[str, Callable[..., Any]]:
        out: dict[str, Callable[..., Any]] = {
            name: self._wrap(name, getattr(self, name)) for name, kind in rpc.KINDS.items() if kind == "unary"
        }
        out["GetModelStream"] = self._get_model_stream
        out["PushStream"] = self._push_stream
        out["Rounds"] = self._rounds
        out["HostRounds"] = lambda requests, context: host_rounds(self, requests, context)  # virtual workers
        return out

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[[rpc.Received, grpc.ServicerContext], bytes]:
        def handle(req: rpc.Received, context: grpc.ServicerContext) -> bytes:
            self.counter.add("up", name, req.nbytes)
            return self._reply(name, self._call(fn, req.msg, req.nbytes, context))

        return handle

    @staticmethod
    def _call(fn: Callable[..., Any], msg: Any, nbytes: int, context: Any) -> Any:
        try:
            if isinstance(msg, stream.StreamError):  # a request that did not parse (psrv.rpc._parser)
                raise msg
            return fn(msg, nbytes, context)
        except EngineError as exc:
            context.abort(getattr(grpc.StatusCode, exc.status), str(exc))
        except (codec.CodecError, stream.StreamError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except LimitExceeded as exc:
            if exc.retry_after is not None:  # a limit that passes: gRPC's retry pushback says when to try again
                context.set_trailing_metadata(((rpc.RETRY_PUSHBACK, str(math.ceil(1000 * exc.retry_after))),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    def _reply(self, name: str, reply: Any) -> bytes:
        data = reply if isinstance(reply, bytes) else reply.SerializeToString()
        self.counter.add("down", name, len(data))
        return data

    def _get_model_stream(self, req: rpc.Received, context: grpc.ServicerContext) -> Iterator[bytes]:
        self.counter.add("up", "GetModelStream", req.nbytes)
        data = self._call(self.GetModel, req.msg, req.nbytes, context)
        return self._counted("GetModelStream", stream.pieces(data, self.chunk))

    def _pieces(self, data: bytes, within: int, shared: bool = True) -> Iterator[bytes]:
        """The pieces of a broadcast; those of the round's broadcast (``shared``: not a snapshot, which
        few workers need) are cut once for all the workers (:class:`psrv.stream.SharedPieces`)."""
        if not shared:
            return stream.pieces(data, self.chunk, within=within)
        with self._shared_lock:
            pieces = self._shared
            if pieces is None or pieces.message is not data or pieces.within != within:
                readers = max(1, len(self.engine.state.workers))
                pieces = self._shared = stream.SharedPieces(data, readers, self.chunk, within)
        return pieces.reader()

    def _counted(self, method: str, messages: Iterable[bytes]) -> Iterator[bytes]:
        """``messages`` as they go down, each counted under ``method``."""
        for data in messages:
            self.counter.add("down", method, len(data))
            yield data

    def _push_stream(self, requests: Iterator[rpc.Received], context: grpc.ServicerContext) -> bytes:
        nbytes = 0

        def reassemble(_msg: Any, _nbytes: int, _context: Any) -> codec.WireUpload:
            nonlocal nbytes
            whole = stream.Reassembler(stream.limit_for(self.engine.dim), "PushStream")
            release = self._hold(None, context)  # whose upload it is shows only at its end
            guard = self._idle_guard(context)
            try:
                for piece in requests:
                    self.watchdog.touch(guard)
                    self.counter.add("up", "PushStream", piece.nbytes)
                    nbytes += piece.nbytes
                    if isinstance(piece.msg, stream.StreamError):
                        raise piece.msg
                    whole.add(*piece.msg)
            finally:
                self.watchdog.forget(guard)
                release()
            try:
                return codec.WireUpload(whole.result())
            except codec.CodecError:
                raise codec.CodecError("PushStream: the pieces do not make a PushRequest") from None

        upload = self._call(reassemble, None, 0, context)
        self._call(lambda *_: self._charge(context, upload.request.worker_id), None, 0, context)  # id known at its end
        reply = self._call(self._push, upload, nbytes, context)
        return self._reply("PushStream", pb.PushStreamResponse(round=reply.round))

    # ------------------------------------------------------------------ Rounds: one stream per worker
    def _rounds(self, requests: Iterator[rpc.Received], context: grpc.ServicerContext) -> Iterator[bytes]:
        """A worker's whole run on one stream (see the top of ``psrv.proto``): the broadcast of each
        round, then that round's report, until the final broadcast. Errors end the stream with the
        status the unary calls would give; a report too late for its round (or a second report for
        it) gets ``rejected``."""
        first = self._next_part(requests)
        if first is None:
            return
        kind, opened = first.kind, first.body
        if kind != "open":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Rounds: the first message must be `open`, not `{kind}`")
        worker_id, k = opened.worker_id, opened.round
        self._call(lambda *_: self._charge(context, worker_id), None, 0, context)  # one call, not per message
        self._authorize(context, worker_id)
        replica = opened.replica_round if opened.HasField("replica_round") else None
        self._call(lambda *_: self.engine.worker(worker_id), None, 0, context)  # NOT_FOUND before waiting
        release = self._call(lambda *_: self._hold(worker_id, context), None, 0, context)
        token = self.engine.connected(worker_id)
        # the worker is live while its stream is: when the stream ends (worker gone, link cut and
        # noticed by keepalive, cancelled), the engine stops waiting for it at once
        context.add_callback(lambda: self.engine.disconnected(worker_id, token, "its Rounds stream closed"))
        try:
            yield from self._round_messages(requests, context, worker_id, k, replica)
        finally:
            release()

    def _round_messages(
        self, requests: Iterator[rpc.Received], context: Any, worker_id: str, k: int, replica: int | None
    ) -> Iterator[bytes]:
        while True:
            served = self._serve(worker_id, k, replica, context)
            if served is None:
                return  # the worker went away while waiting
            yield from self._model_messages(served.data, served.form != "snapshot")
            if served.done:
                return
            k, replica = served.round, (None if served.form == "dense" else served.round)
            report = self._next_part(requests)
            if report is None:
                return
            kind, body = report.kind, report.body
            if kind == "resync":  # the one message a worker sends at will, and it costs a broadcast: charged
                self._call(lambda *_: self._charge(context, worker_id), None, 0, context)
                replica = None  # the same round again, as a snapshot
                continue
            rejected = self._call(self._round_report, (worker_id, k, kind, body, requests), report.nbytes, context)
            if rejected is not None:
                msg = pb.RoundsRejected(round=k, reason=rejected).SerializeToString()
                yield from self._counted("Rounds", (stream.field_bytes(rpc.RESPONSE_REJECTED, msg),))
            k += 1

    def _next_part(self, requests: Iterator[rpc.Received]) -> _SizedPart | None:
        """The next message of a Rounds stream (counted) with its size, or None at its end."""
        received = next(requests, None)
        if received is None:
            return None
        self.counter.add("up", "Rounds", received.nbytes)
        return _SizedPart(*received.msg, nbytes=received.nbytes)

    def _serve(self, worker_id: str, k: int, replica: int | None, context: Any) -> Any:
        """The engine's broadcast of round >= k, waiting as long as the worker is connected."""
        while context.is_active():
            remaining = context.time_remaining()  # a thread waits no longer than its caller (deadline)
            wait = 5.0 if remaining is None else min(5.0, max(0.01, remaining - 0.05))
            try:
                return self.engine.serve(worker_id, k, wait, replica)
            except NotReady:
                continue
            except EngineError as exc:
                context.abort(getattr(grpc.StatusCode, exc.status), str(exc))
        return None

    def _model_messages(self, data: bytes, shared: bool = False) -> Iterator[bytes]:
        """A broadcast as RoundsResponse messages: one ``model``, or ``model_piece``s when big
        (``shared``: the round's broadcast, cut into pieces once for every worker)."""
        if len(data) > self.stream_above:
            return self._counted("Rounds", self._pieces(data, rpc.RESPONSE_MODEL_PIECE, shared))
        return self._counted("Rounds", (stream.field_bytes(rpc.RESPONSE_MODEL, data),))

    def _round_report(self, args: tuple[Any, ...], nbytes: int, context: Any) -> str | None:
        """Count one report of a Rounds stream for round ``k`` through the unary calls' code (worker
        and round implied by the stream); the reason it was too late, or None."""
        worker_id, k, kind, body, requests = args
        try:
            if kind == "skip":
                self._skip(worker_id, k, body, nbytes)
            elif kind in ("push", "push_piece"):
                if kind == "push_piece":
                    body, nbytes = self._rest_of_upload(body, nbytes, requests, context)
                upload = codec.WireUpload(body)
                req = upload.request
                if (req.worker_id and req.worker_id != worker_id) or (req.round and req.round != k):
                    raise codec.CodecError(
                        f"Rounds: an upload for worker {req.worker_id!r} round {req.round} on the stream of "
                        f"worker {worker_id!r} in round {k}"
                    )
                req.worker_id, req.round = worker_id, k
                self._push(upload, nbytes, context)
            elif kind == "error":
                raise body
            else:
                raise codec.CodecError(f"Rounds: expected this round's report (skip, push or resync), got `{kind}`")
        except (FailedPrecondition, AlreadyExists) as exc:  # this round's report is refused; the stream goes on
            return str(exc)
        return None

    def _rest_of_upload(
        self, first: stream.Piece, nbytes: int, requests: Iterator[rpc.Received], context: Any
    ) -> tuple[Any, int]:
        """A big upload's pieces, from its first, put back together (checked as PushStream's)."""
        whole = stream.Reassembler(stream.limit_for(self.engine.dim), "Rounds upload")
        whole.add(*first)
        guard = self._idle_guard(context)
        try:
            while not whole.complete:
                part = self._next_part(requests)
                self.watchdog.touch(guard)
                if part is None:
                    raise stream.StreamError("Rounds upload: the stream ended inside an upload")
                if part.kind != "push_piece":
                    raise stream.StreamError(f"Rounds upload: `{part.kind}` inside an upload's pieces")
                whole.add(*part.body)
                nbytes += part.nbytes
        finally:
            self.watchdog.forget(guard)
        return whole.result(), nbytes

    def Register(self, req: pb.RegisterRequest, nbytes: int, context: Any) -> pb.RegisterResponse:
        self._charge(context, req.worker_id)
        self._authorize(context, req.worker_id)
        index, rejoin = self.engine.register_worker(req.worker_id, req.num_samples, req.n_features, req.n_classes)
        reply = pb.RegisterResponse(
            worker_index=index, config=codec.run_config_to_proto(self.engine.config, self.engine.dim)
        )
        if rejoin is not None:  # a restarted worker (or every worker after a resume): what it rebuilds from
            reply.rejoin.CopyFrom(codec.rejoin_to_proto(rejoin.round, rejoin.contribution))
        return reply

    def GetModel(self, req: pb.GetModelRequest, nbytes: int, context: Any) -> bytes:
        self._charge(context, req.worker_id)  # GetModelStream's too
        self._authorize(context, req.worker_id)
        remaining = context.time_remaining() if context is not None else None
        wait = 60.0 if remaining is None else max(0.0, remaining - 0.05)
        replica_round = req.replica_round if req.HasField("replica_round") else None
        release = self._hold(req.worker_id, context)  # a long poll: at most calls_per_worker per id
        try:
            return self.engine.wait_model(req.worker_id, req.round, wait, replica_round)
        finally:
            release()

    def Push(self, req: bytes, nbytes: int, context: Any) -> pb.PushResponse:
        upload = codec.WireUpload(req)  # its request in RAW: dense values not copied
        self._charge(context, upload.request.worker_id)
        return self._push(upload, nbytes, context)

    def _push(self, upload: codec.WireUpload, nbytes: int, context: Any) -> pb.PushResponse:
        req = upload.request
        self._authorize(context, req.worker_id)
        # NOT_FOUND before decoding; NaN and Inf are found by the engine's range check (one pass less)
        payload = upload.payload(self.engine.dim_for(req.worker_id), finite=False)
        smoothness = codec.upload_smoothness(req)
        self.engine.push(req.worker_id, req.round, payload, req.local_loss, smoothness, nbytes)
        return pb.PushResponse(round=req.round)

    def Skip(self, req: pb.SkipRequest, nbytes: int, context: Any) -> pb.SkipResponse:
        self._charge(context, req.worker_id)
        self._authorize(context, req.worker_id)
        self._skip(req.worker_id, req.round, req, nbytes)
        return pb.SkipResponse(round=req.round)

    def Probe(self, req: pb.ProbeRequest, nbytes: int, context: Any) -> pb.ProbeResponse:
        """A link measurement (``psrv fit-cost``, :mod:`psrv.costfit`): charged and authorized like
        any call, answered at once in any phase; the model is not touched."""
        self._charge(context, req.worker_id)
        self._authorize(context, req.worker_id)
        return pb.ProbeResponse(received_bytes=nbytes, max_message_bytes=self.max_message_bytes)

    def _skip(self, worker_id: str, round_: int, req: pb.SkipRequest | pb.RoundsSkip, nbytes: int) -> None:
        loss = req.local_loss if req.HasField("local_loss") else None
        self.engine.skip(worker_id, round_, codec.skip_reason_from_proto(req), loss, nbytes)


class _SizedPart(NamedTuple):
    """A :class:`psrv.rpc.Part` with the size of its message."""

    kind: str
    body: Any
    nbytes: int


def _encode_broadcast(broadcast: Any) -> bytes:
    return codec.broadcast_to_wire(broadcast)


class ParameterServer:
    """An engine, its gRPC servicer and the byte counter they share.

    ``sink`` receives every closed round (see :class:`psrv.metrics.MetricsSink`). ``keep_rows``:
    accumulating rules keep each worker's row of the sum, so restarted workers can rejoin and the
    run can be checkpointed and resumed (:mod:`psrv.checkpoint`; ``--checkpoint-dir`` sets it)."""

    def __init__(
        self,
        config: ServerConfig,
        sink: RoundSink | None = None,
        limits: TransportLimits | None = None,
        keep_rows: bool = False,
    ) -> None:
        self.config = config
        self.counter = ByteCounter()
        self.engine = RoundEngine(config, sink=sink, encode=_encode_broadcast, keep_rows=keep_rows)
        self.servicer = Servicer(self.engine, self.counter, limits=limits)
        self.limits = self.servicer.limits
        self.algorithm = self.engine.algorithm
        #: the gRPC health service :func:`create_server` attached, if any (see :meth:`_health_done`)
        self.health: health.HealthServicer | None = None
        self.max_message_bytes = 0  # the largest message received, set by create_server

    # views of the engine's state
    @property
    def theta(self) -> np.ndarray | None:
        return self.engine.state.theta

    @property
    def records(self) -> Sequence[dict[str, Any]]:
        """The last closed rounds' records (``config.record_tail`` of them); all are in the metrics file."""
        return self.engine.state.records

    @property
    def phase(self) -> str:
        return self.engine.state.phase

    @property
    def round(self) -> int:
        return self.engine.state.round

    @property
    def error(self) -> str | None:
        return self.engine.state.error

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return self.servicer.handlers()

    def run(self) -> dict[str, Any]:
        """Wait for registration, train, serve the final model; the summary with byte totals.
        The health service says NOT_SERVING once the run has ended (done or failed)."""
        try:
            self.engine.run()
        except OSError as exc:  # the sink could not write (a full disk): fail the run for the workers too
            self.engine.fail(f"could not write the run's output: {exc}")
            raise RuntimeError(self.engine.state.error) from exc
        except RuntimeError as exc:  # Ctrl-C inside a wait, where CPython raises this over it
            raise_hidden_interrupt(exc)
            raise
        finally:
            self._health_done()
        return self.summary()

    def _health_done(self) -> None:
        if self.health is not None:
            for name in HEALTH_SERVICES:
                self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def summary(self) -> dict[str, Any]:
        out = self.engine.summary()
        out["bytes_up"] = self.counter.total("up")
        out["bytes_down"] = self.counter.total("down")
        return out

    def wait_registered(self, count: int, timeout: float) -> bool:
        return self.engine.wait_registered(count, timeout)

    def fail(self, reason: str) -> None:
        self.engine.fail(reason)
        self._health_done()


def create_server(
    ps: ParameterServer,
    address: str = "127.0.0.1:0",
    max_message_bytes: int | None = None,
    security: tls.ServerSecurity | None = None,
) -> tuple[grpc.Server, int]:
    """A started gRPC server for ``ps`` and the port it bound (port 0 picks a free one).
    Sets up malloc for big messages first (:func:`psrv.memory.tune_malloc`).

    Limits (README, "Limits"; :class:`psrv.limits.TransportLimits`): a received message may be as
    big as the largest upload of the model (``max_message_bytes``; None: derived from the model's
    dimension, or from ``max_dim`` while the first registration is still to fix it), bigger ones
    are refused by gRPC (RESOURCE_EXHAUSTED) before they are read whole; at most
    ``limits.concurrent`` calls at once; the port is not shared (no SO_REUSEPORT: a second server
    on it fails to bind).

    Besides psrv's service it offers the standard health service (``grpc.health.v1.Health``:
    SERVING while the run registers and trains, NOT_SERVING once it is done or failed) and server
    reflection (``grpc.reflection.v1alpha``, what grpcio-reflection serves), so ``grpcurl`` and ``grpc_health_probe``
    work without the proto.

    ``security``: TLS, mutual TLS and worker tokens (:mod:`psrv.tls`; raises its SecurityError
    for a file it cannot use); None or empty: plaintext, every worker id open to every caller."""
    security = security or tls.ServerSecurity()
    credentials = security.credentials()
    ps.servicer.auth = auth = security.authenticator()
    memory.tune_malloc()
    # the engine's vector reductions gain nothing from BLAS threads, whose spinning takes CPU from workers
    threadpoolctl.threadpool_limits(1, user_api="blas")
    limits, m = ps.limits, ps.config.num_workers
    if max_message_bytes is None:
        max_message_bytes = limits.message_bytes(ps.engine.dim or ps.config.max_dim)
    ps.max_message_bytes = ps.servicer.max_message_bytes = max_message_bytes
    options = [
        ("grpc.max_send_message_length", rpc.MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        *rpc.keepalive_options(server=True),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.threads(m), thread_name_prefix="psrv-server"),
        options=options,
        maximum_concurrent_rpcs=limits.concurrent(m),
        interceptors=tls.interceptors(auth, rpc.SERVICE),
    )
    server.add_generic_rpc_handlers((rpc.generic_handler(ps.handlers(), raw=Servicer.RAW),))
    health_servicer = health.HealthServicer()
    ended = ps.phase in ("done", "failed")
    for name in HEALTH_SERVICES:
        status = health_pb2.HealthCheckResponse.NOT_SERVING if ended else health_pb2.HealthCheckResponse.SERVING
        health_servicer.set(name, status)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    ps.health = health_servicer
    reflection.enable_server_reflection((rpc.SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    server.start()
    return server, port

"""A transparent TCP tap between psrv workers and the server.

Every accepted client connection gets its own upstream connection; bytes are relayed
unchanged in both directions (whatever arrives is written on before it is decoded) and
counted. A copy goes through :class:`psrv.inspect.grpcmsg.ConnectionDecoder`, whose records
(one per gRPC message, one per stream direction without a message, one ``connection`` record
per direction at the end) go to ``sink``; with ``pcap`` the relayed streams are also written
as a packet capture (synthetic Ethernet/IPv4/TCP packets, one logical connection from the
client to the upstream server, handshake to FIN) that ``psrv inspect pcap`` decodes to the
same records.

Times are wall-clock seconds rounded down to the microsecond (the resolution of the pcap).

On TLS runs the tap terminates TLS (:class:`TapTls`): it serves the workers with a certificate they
trust (the server's own, from ``psrv certs``), opens its own TLS connection to the server, and
decodes, logs and captures the plaintext in between. With mutual TLS it asks each worker for its
certificate and presents the server that worker's own (``workers/ID.crt`` of ``psrv certs``),
so the server still sees each worker's identity. The pcap then holds the plaintext (tokens
included): keep it as secret as the keys.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from psrv.inspect.grpcmsg import ConnectionDecoder
from psrv.inspect.http2 import DIRECTIONS
from psrv.inspect.pcapwriter import PcapWriter, TcpFlow

Record = dict[str, Any]
READ_CHUNK = 256 * 1024


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _now_us() -> int:
    return time.time_ns() // 1000


class JsonlSink:
    """Records as JSON lines, flushed after every connection record."""

    def __init__(self, path: str | Path | IO[str]) -> None:
        self._own = not hasattr(path, "write")
        self._f: IO[str] = open(path, "w") if self._own else path  # type: ignore[assignment]
        self.count = 0

    def __call__(self, record: Record) -> None:
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.count += 1
        if record["type"] == "connection":
            self._f.flush()

    def close(self) -> None:
        self._f.flush()
        if self._own:
            self._f.close()


@dataclass(frozen=True)
class TapTls:
    """TLS on the tap's two sides. Workers' side (TLS when ``cert`` is set): the certificate and key
    it serves, and ``client_ca`` to require and check worker certificates. Server's side (TLS
    when ``upstream_ca`` is set): the CA the server's certificate must verify against, the name to
    check it for (default: the upstream host), and ``upstream_client_certs``, a folder of ``ID.crt``
    / ``ID.key``: each connection presents the certificate of the worker whose certificate it got."""

    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None
    upstream_ca: str | None = None
    upstream_client_certs: str | None = None
    upstream_server_name: str | None = None
    _contexts: dict[str | None, ssl.SSLContext] = field(default_factory=dict, compare=False, repr=False)

    def listen_context(self) -> ssl.SSLContext | None:
        if self.cert is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.set_alpn_protocols(["h2"])  # gRPC clients insist on it
        if self.client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.client_ca)
        return ctx

    def upstream_context(self, worker: str | None) -> ssl.SSLContext | None:
        """The client context for a connection of ``worker`` (its certificate's CN; None: none)."""
        if self.upstream_ca is None:
            return None
        if worker not in self._contexts:
            ctx = ssl.create_default_context(cafile=self.upstream_ca)
            ctx.set_alpn_protocols(["h2"])
            if self.upstream_client_certs is not None and worker is not None:
                if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", worker):
                    raise ssl.SSLError(f"a worker certificate for {worker!r}, which is no worker id")
                folder = Path(self.upstream_client_certs)
                ctx.load_cert_chain(folder / f"{worker}.crt", folder / f"{worker}.key")
            self._contexts[worker] = ctx
        return self._contexts[worker]


def _peer_name(writer: asyncio.StreamWriter) -> str | None:
    """The common name of the TLS peer's certificate, if it sent one."""
    cert = writer.get_extra_info("peercert") or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class _Conn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.decoder = ConnectionDecoder(name)
        self.relayed = dict.fromkeys(DIRECTIONS, 0)
        self.flow: TcpFlow | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.broken = False  # the decoder failed (a bug): relay only
        # when the connection ended, as a capture sees it: the first RST, else the last FIN
        self.fin_us: int | None = None
        self.rst_us: int | None = None

    def end_time(self) -> float:
        t = self.rst_us if self.rst_us is not None else self.fin_us
        return (t if t is not None else _now_us()) / 1e6


class Tap:
    """The tap's asyncio server. ``await start()``, then ``port``; ``await close()`` ends it.

    ``relayed`` holds the bytes relayed per direction over all connections (counted by the
    relay itself, independently of the decoder)."""

    def __init__(
        self,
        listen: tuple[str, int],
        upstream: tuple[str, int],
        sink: Callable[[Record], None],
        pcap: str | Path | None = None,
        tls: TapTls | None = None,
    ) -> None:
        self.listen, self.upstream, self.sink = listen, upstream, sink
        self.tls = tls or TapTls()
        self.pcap = PcapWriter(pcap) if pcap else None
        self.relayed = dict.fromkeys(DIRECTIONS, 0)
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._sink_error: str | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.listen[0], self.listen[1], limit=READ_CHUNK, ssl=self.tls.listen_context()
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._idle.set()

    @property
    def active(self) -> int:
        return len(self._tasks)

    async def wait_idle(self) -> None:
        """Until no connection is open."""
        await self._idle.wait()

    async def close(self, grace: float = 2.0) -> None:
        """Stop accepting; give open connections ``grace`` seconds to end, then cut them."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self.pcap is not None:
            self.pcap.close()
            self.pcap = None

    # ------------------------------------------------------------------ relaying
    def _emit(self, records: list[Record]) -> None:
        for r in records:
            try:
                self.sink(r)
            except Exception as exc:  # noqa: BLE001 - logging must never break the relay
                if self._sink_error is None:
                    self._sink_error = str(exc)
                    print(f"psrv inspect tap: cannot log records: {exc}", file=sys.stderr)

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self._idle.clear()
        peer = cwriter.get_extra_info("peername")[:2]
        name = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
        conn = _Conn(name)
        self.connections += 1
        conn.writers = [cwriter]
        connected = False
        try:
            try:
                ctx = self.tls.upstream_context(_peer_name(cwriter))
                name = (self.tls.upstream_server_name or self.upstream[0]) if ctx is not None else None
                ureader, uwriter = await asyncio.open_connection(
                    *self.upstream, limit=READ_CHUNK, ssl=ctx, server_hostname=name
                )
            except OSError as exc:  # ssl.SSLError included
                self._emit([{"type": "error", "time": _now_us() / 1e6, "conn": name, "error": f"upstream: {exc}"}])
                return
            connected = True
            conn.writers.append(uwriter)
            for w in conn.writers:
                sock = w.get_extra_info("socket")
                if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.pcap is not None:
                server = uwriter.get_extra_info("peername")[:2]
                conn.flow = self.pcap.open_flow((peer[0], peer[1]), (server[0], server[1]), _now_us())
            await asyncio.gather(self._pump(conn, "up", creader, uwriter), self._pump(conn, "down", ureader, cwriter))
        finally:
            for w in conn.writers:
                w.close()
            if connected:
                self._emit(conn.decoder.close(conn.end_time()))
                if self.pcap is not None:
                    self.pcap.flush()
            self._done(task)

    def _observe(self, conn: _Conn, direction: str, data: bytes, t_us: int) -> None:
        """Decode a copy; a decoder failure is logged once and never stops the relay."""
        if conn.broken:
            return
        try:
            self._emit(conn.decoder.feed(direction, data, t_us / 1e6))
        except Exception as exc:  # noqa: BLE001
            conn.broken = True
            self._emit([{"type": "error", "time": t_us / 1e6, "conn": conn.name, "error": f"decoder: {exc!r}"}])

    def _done(self, task: asyncio.Task[None] | None) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()

    async def _pump(
        self, conn: _Conn, direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        clean = False
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    clean = True
                    break
                t_us = _now_us()
                writer.write(data)  # relay first, unchanged
                conn.relayed[direction] += len(data)
                self.relayed[direction] += len(data)
                if self.pcap is not None and conn.flow is not None:
                    self.pcap.data(conn.flow, direction, data, t_us)
                self._observe(conn, direction, data, t_us)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if clean and writer.can_write_eof():
                try:
                    writer.write_eof()  # half-close: the other direction may still be talking
                except OSError:
                    clean = False
            elif clean:
                writer.close()  # TLS has no half-close: end the other side's connection as this one ended
            t_us = _now_us()
            if clean:
                conn.fin_us = t_us
            elif conn.rst_us is None:
                conn.rst_us = t_us
            if self.pcap is not None and conn.flow is not None:
                (self.pcap.fin if clean else self.pcap.rst)(conn.flow, direction, t_us)
            if not clean:
                for w in conn.writers:
                    w.transport.abort()


class TapThread:
    """A :class:`Tap` on its own event loop in a background thread (for tests and embedding)."""

    def __init__(
        self,
        upstream: tuple[str, int],
        sink: Callable[[Record], None] | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        pcap: str | Path | None = None,
        tls: TapTls | None = None,
    ) -> None:
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._user_sink = sink
        self.tap = Tap(listen, upstream, self._sink, pcap, tls)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="psrv-tap", daemon=True)

    def _sink(self, record: Record) -> None:
        with self._lock:
            self.records.append(record)
        if self._user_sink is not None:
            self._user_sink(record)

    @property
    def port(self) -> int:
        return self.tap.port

    def start(self) -> TapThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.tap.start(), self._loop).result(timeout=10)
        return self

    def wait_idle(self, timeout: float) -> bool:
        """True once no connection is open (False on timeout)."""
        try:
            asyncio.run_coroutine_threadsafe(self.tap.wait_idle(), self._loop).result(timeout=timeout)
            return True
        except TimeoutError:
            return False

    def close(self, grace: float = 2.0) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.tap.close(grace), self._loop).result(timeout=grace + 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> TapThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


async def run_tap(
    listen: tuple[str, int],
    upstream: tuple[str, int],
    sink: Callable[[Record], None],
    pcap: str | Path | None = None,
    duration: float | None = None,
    on_ready: Callable[[Tap], None] | None = None,
    tls: TapTls | None = None,
) -> Tap:
    """Serve until ``duration`` seconds pass, SIGINT/SIGTERM, or cancellation; then close."""
    import signal

    tap = Tap(listen, upstream, sink, pcap, tls)
    await tap.start()
    if on_ready is not None:
        on_ready(tap)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    try:
        await asyncio.wait_for(stop.wait(), timeout=duration)
    except TimeoutError:
        pass
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await tap.close()
    return tap

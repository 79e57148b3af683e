"""HTTP/2 as it crosses the wire, one connection at a time, with every byte accounted for.

Shared by the tap (bytes as relayed) and the pcap decoder (bytes as reassembled from TCP
segments): feed each direction's bytes in order; once a stream is over (both directions
ended with END_STREAM, or RST_STREAM, or the connection closed) get back its
:class:`StreamPart` per direction (request first), each carrying its gRPC messages
(length-prefixed, reassembled across DATA frames) and the HTTP/2 bytes it cost.

Frames are parsed by ``hyperframe``; header blocks by ``hpack`` (one stateful decoder per
direction, fed every block in order, so the dynamic table stays in step with the encoder).

Byte accounting, per direction (``up`` = client to server)::

    fed == preface + control + late + partial + undecoded
           + sum over stream parts of (frame_headers + hpack + h2_other + sum of (5 + len(message)))

* ``preface``: the 24-byte client connection preface (``up`` only);
* ``control``: whole frames on stream 0 (SETTINGS, PING, GOAWAY, connection WINDOW_UPDATE);
* ``late``: whole frames for a stream that was already over (e.g. a RST_STREAM after both
  END_STREAMs), and DATA/HEADERS after END_STREAM (a protocol error);
* ``partial``: bytes of a frame or gRPC message still incomplete when the stream or the
  connection ended;
* ``undecoded``: bytes after a parse error (the direction is not decoded any further);
* per stream direction: ``frame_headers`` (9 bytes per frame), ``hpack`` (header block
  fragments of HEADERS/CONTINUATION/PUSH_PROMISE), ``h2_other`` (padding, priority fields,
  RST_STREAM/WINDOW_UPDATE/PRIORITY payloads on the stream), then each gRPC message's 5-byte
  prefix and its bytes. A message is charged the HTTP/2 bytes of its stream direction up to the
  frame that completed it; what follows (trailers, an empty END_STREAM DATA frame, and the
  WINDOW_UPDATEs a client sends for a reply after its request ended) goes to the direction's
  last message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PushPromiseFrame,
    RstStreamFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_BYTES = 9
GRPC_PREFIX_BYTES = 5
DIRECTIONS = ("up", "down")

#: HTTP/2 byte categories of a stream direction, in record order
H2_KEYS = ("frame_headers", "hpack", "h2_other")
#: connection-level categories (not part of any stream)
CONNECTION_KEYS = ("preface", "control", "late", "partial", "undecoded")

_PRUNE_AT = 1024  # ended-stream ids kept per direction before pruning below the live floor


class Http2Error(ValueError):
    """The byte stream is not HTTP/2 (or not one we can follow)."""


def other(direction: str) -> str:
    return "down" if direction == "up" else "up"


class FrameParser:
    """One direction's byte stream -> (the client preface, then) frames.

    ``feed`` returns a list of ``(frame, payload_length)``; a preface is reported as
    ``(None, 24)``. Bytes of an incomplete frame stay buffered (:attr:`pending`)."""

    def __init__(self, client: bool) -> None:
        self._need_preface = client
        self._buf = bytearray()
        self._pos = 0

    @property
    def pending(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> list[tuple[Frame | None, int]]:
        buf = self._buf
        buf += data
        out: list[tuple[Frame | None, int]] = []
        if self._need_preface:
            have = bytes(buf[self._pos : self._pos + len(PREFACE)])
            if not PREFACE.startswith(have):
                raise Http2Error(f"expected the HTTP/2 client preface, got {have[:24]!r}")
            if len(have) < len(PREFACE):
                return out
            self._pos += len(PREFACE)
            self._need_preface = False
            out.append((None, len(PREFACE)))
        while len(buf) - self._pos >= FRAME_HEADER_BYTES:
            head = bytes(buf[self._pos : self._pos + FRAME_HEADER_BYTES])
            frame, length = Frame.parse_frame_header(memoryview(head))
            end = self._pos + FRAME_HEADER_BYTES + length
            if len(buf) < end:
                break
            body = bytes(buf[self._pos + FRAME_HEADER_BYTES : end])
            frame.parse_body(memoryview(body))
            out.append((frame, length))
            self._pos = end
        if self._pos and (self._pos == len(buf) or self._pos > 1 << 20):
            del buf[: self._pos]
            self._pos = 0
        return out


@dataclass
class GrpcMessage:
    """One length-prefixed gRPC message and the HTTP/2 bytes charged to it."""

    data: bytes
    compressed: bool
    time: float
    h2: dict[str, int]


@dataclass
class StreamPart:
    """One direction of one HTTP/2 stream, as it ended."""

    direction: str
    stream_id: int
    path: str = ""
    header_blocks: list[list[tuple[str, str]]] = field(default_factory=list)
    messages: list[GrpcMessage] = field(default_factory=list)
    #: HTTP/2 bytes not charged to a message (set only when the part carried no message)
    h2: dict[str, int] = field(default_factory=lambda: dict.fromkeys(H2_KEYS, 0))
    end_time: float = 0.0
    ended: bool = False  # this direction sent END_STREAM (or the stream was reset)
    reset: bool = False  # ended by RST_STREAM
    incomplete: bool = False  # still open when the connection closed
    # gRPC bytes not yet forming a message
    _buf: bytearray = field(default_factory=bytearray, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        """All header blocks merged (later blocks, i.e. trailers, win)."""
        out: dict[str, str] = {}
        for block in self.header_blocks:
            out.update(block)
        return out

    def wire_bytes(self) -> int:
        n = sum(self.h2.values())
        for m in self.messages:
            n += sum(m.h2.values()) + GRPC_PREFIX_BYTES + len(m.data)
        return n


@dataclass
class _Direction:
    parser: FrameParser
    decoder: hpack.Decoder
    acct: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("fed", *CONNECTION_KEYS), 0))
    parts: dict[int, StreamPart] = field(default_factory=dict)
    # header block being continued: (stream id, block so far, END_STREAM seen on the HEADERS frame)
    cont: tuple[int, bytearray, bool] | None = None
    error: str | None = None
    counted: int = 0  # bytes accounted so far (to book the rest as undecoded after an error)


def _new_decoder() -> hpack.Decoder:
    d = hpack.Decoder()
    # a passive observer must follow whatever table size the encoder chose
    d.max_allowed_table_size = 1 << 31
    d.max_header_list_size = 1 << 31
    return d


class H2Connection:
    """Both directions of one HTTP/2 connection (``up`` carries the client preface)."""

    def __init__(self) -> None:
        self.dirs = {
            "up": _Direction(FrameParser(client=True), _new_decoder()),
            "down": _Direction(FrameParser(client=False), _new_decoder()),
        }
        self._paths: dict[int, str] = {}
        self._alive: set[int] = set()  # streams seen and not over
        self._done: set[int] = set()  # streams over (ids <= floor: pruned)
        self._floor = 0
        self._max_seen = 0
        self._out: list[StreamPart] = []
        self.closed = False

    # ------------------------------------------------------------------ input
    def feed(self, direction: str, data: bytes, time: float) -> list[StreamPart]:
        """Bytes that crossed the wire in ``direction``; returns the parts of streams now over."""
        d = self.dirs[direction]
        d.acct["fed"] += len(data)
        if d.error is not None:
            d.acct["undecoded"] += len(data)
            return self._take()
        try:
            for frame, length in d.parser.feed(data):
                if frame is None:
                    d.acct["preface"] += length
                else:
                    self._on_frame(direction, d, frame, length, time)
        except Exception as exc:  # noqa: BLE001 - any parse failure stops decoding this direction
            d.error = f"{type(exc).__name__}: {exc}"
            d.acct["undecoded"] += d.acct["fed"] - self._accounted(d)
        return self._take()

    def close(self, time: float) -> list[StreamPart]:
        """The connection is over: end every open stream (its open directions marked incomplete)."""
        if not self.closed:
            self.closed = True
            for sid in sorted({sid for d in self.dirs.values() for sid in d.parts}):
                for d in self.dirs.values():
                    part = d.parts.get(sid)
                    if part is not None and not part.ended:
                        part.incomplete = True
                        self._half_close(d, part, time)
                self._emit(sid)
            for d in self.dirs.values():
                if d.error is None:
                    d.acct["partial"] += d.parser.pending
        return self._take()

    def accounting(self, direction: str) -> dict[str, Any]:
        """Connection-level byte totals of one direction (see the module docstring)."""
        d = self.dirs[direction]
        return {**d.acct, "error": d.error}

    # ---------------------------------------------------------------- helpers
    def _take(self) -> list[StreamPart]:
        out, self._out = self._out, []
        return out

    def _accounted(self, d: _Direction) -> int:
        n = sum(d.acct[k] for k in CONNECTION_KEYS) + d.counted
        for part in d.parts.values():
            n += part.wire_bytes() + len(part._buf)
        return n

    def _part(self, direction: str, sid: int) -> StreamPart | None:
        d = self.dirs[direction]
        part = d.parts.get(sid)
        if part is not None:
            return part
        if sid in self._done or (sid <= self._floor and sid not in self._alive):
            return None
        part = d.parts[sid] = StreamPart(direction, sid, path=self._paths.get(sid, ""))
        self._alive.add(sid)
        self._max_seen = max(self._max_seen, sid)
        return part

    def _on_frame(self, direction: str, d: _Direction, frame: Frame, length: int, time: float) -> None:
        total = FRAME_HEADER_BYTES + length
        sid = frame.stream_id
        if d.cont is not None and (not isinstance(frame, ContinuationFrame) or frame.stream_id != d.cont[0]):
            raise Http2Error(f"expected CONTINUATION of stream {d.cont[0]}, got {type(frame).__name__}")
        if sid == 0:
            d.acct["control"] += total
            return
        part = self._part(direction, sid)
        carries = isinstance(frame, (DataFrame, HeadersFrame, PushPromiseFrame, ContinuationFrame))
        if part is None or (part.ended and carries):
            d.acct["late"] += total
            if isinstance(frame, (HeadersFrame, PushPromiseFrame, ContinuationFrame)):
                self._header_block(direction, d, None, frame, time)  # keep the hpack state in step
            return
        h2 = part.h2
        h2["frame_headers"] += FRAME_HEADER_BYTES
        if isinstance(frame, DataFrame):
            h2["h2_other"] += length - len(frame.data)  # pad length byte + padding
            self._grpc_bytes(part, frame.data, time)
            if "END_STREAM" in frame.flags:
                self._end(direction, sid, time)
        elif isinstance(frame, (HeadersFrame, PushPromiseFrame, ContinuationFrame)):
            h2["hpack"] += len(frame.data)
            h2["h2_other"] += length - len(frame.data)
            self._header_block(direction, d, part, frame, time)
        elif isinstance(frame, RstStreamFrame):
            h2["h2_other"] += length
            for dd in self.dirs.values():
                p = dd.parts.get(sid)
                if p is not None:
                    p.reset = True
                    if not p.ended:
                        self._half_close(dd, p, time)
            self._emit(sid)
        else:  # WINDOW_UPDATE, PRIORITY, extension frames on the stream
            h2["h2_other"] += length

    def _header_block(self, direction: str, d: _Direction, part: StreamPart | None, frame: Frame, time: float) -> None:
        if isinstance(frame, ContinuationFrame):
            if d.cont is None:
                raise Http2Error(f"CONTINUATION without HEADERS on stream {frame.stream_id}")
            sid, block, end_stream = d.cont
            block += frame.data
        else:
            sid, block, end_stream = frame.stream_id, bytearray(frame.data), "END_STREAM" in frame.flags
            if isinstance(frame, PushPromiseFrame):
                end_stream = False
        if "END_HEADERS" not in frame.flags:
            d.cont = (sid, block, end_stream)
            return
        d.cont = None
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in d.decoder.decode(bytes(block), raw=True)]
        if part is None or isinstance(frame, PushPromiseFrame):
            return
        part.header_blocks.append(headers)
        if direction == "up" and not part.path:
            path = dict(headers).get(":path", "")
            if path:
                part.path = self._paths[sid] = path
        if end_stream:
            self._end(direction, sid, time)

    def _grpc_bytes(self, part: StreamPart, data: bytes, time: float) -> None:
        buf = part._buf
        buf += data
        while len(buf) >= GRPC_PREFIX_BYTES:
            n = int.from_bytes(buf[1:GRPC_PREFIX_BYTES], "big")
            if len(buf) < GRPC_PREFIX_BYTES + n:
                break
            msg = GrpcMessage(bytes(buf[GRPC_PREFIX_BYTES : GRPC_PREFIX_BYTES + n]), bool(buf[0] & 1), time, part.h2)
            part.messages.append(msg)
            part.h2 = dict.fromkeys(H2_KEYS, 0)
            del buf[: GRPC_PREFIX_BYTES + n]

    def _half_close(self, d: _Direction, part: StreamPart, time: float) -> None:
        part.ended = True
        part.end_time = time
        d.acct["partial"] += len(part._buf)
        part._buf = bytearray()

    def _end(self, direction: str, sid: int, time: float) -> None:
        """END_STREAM in ``direction``: the stream is over once the other side has ended too."""
        d = self.dirs[direction]
        self._half_close(d, d.parts[sid], time)
        peer = self.dirs[other(direction)].parts.get(sid)
        if peer is not None and peer.ended:
            self._emit(sid)

    def _emit(self, sid: int) -> None:
        """The stream is over: hand out its parts (request first) and forget it."""
        for d in self.dirs.values():
            part = d.parts.pop(sid, None)
            if part is None:
                continue
            part.path = part.path or self._paths.get(sid, "")
            if part.messages:  # what came after the last message is charged to it
                last = part.messages[-1].h2
                for k in H2_KEYS:
                    last[k] += part.h2[k]
                part.h2 = dict.fromkeys(H2_KEYS, 0)
            d.counted += part.wire_bytes()
            self._out.append(part)
        self._done.add(sid)
        self._alive.discard(sid)
        self._paths.pop(sid, None)
        if len(self._done) > _PRUNE_AT:
            self._floor = max(self._floor, (min(self._alive) - 1) if self._alive else self._max_seen)
            self._done = {s for s in self._done if s > self._floor}

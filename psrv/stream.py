"""Big messages as a stream of pieces (GetModelStream, PushStream; the rules are at the top of
``protos/psrv/v1/psrv.proto``).

A message is serialized once; :func:`pieces` cuts the bytes into the serialized piece messages
(``offset``, ``total_size``, ``data``) that go on the stream, one copy of each slice and no more;
:class:`Reassembler` puts received pieces back together into one buffer of the announced size,
checking every piece, so a bad stream is refused whole before anything parses it.

Why streams: one gRPC message of hundreds of megabytes meets the channel's message cap (and
protobuf's 2 GiB limit), and gRPC holds all of it in its own buffers on both sides, once per
concurrent call; a stream holds a piece. Measured on loopback (``scripts/bench_transport.py
--modes unary,stream``), 1 MiB pieces move a 40 MB message faster than one unary message and faster
than pieces of 256 KiB, 4 MiB or 16 MiB.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "CHUNK_BYTES",
    "STREAM_ABOVE",
    "Field",
    "Piece",
    "Reassembler",
    "Serialized",
    "SharedPieces",
    "StreamError",
    "field_bytes",
    "limit_for",
    "parse_piece",
    "piece_bytes",
    "pieces",
    "read_varint",
    "varint",
    "wire_fields",
]

#: bytes of message data per piece
CHUNK_BYTES = 1 << 20
#: psrv's clients stream a message (or expect a model) of more than this many bytes: below it one
#: unary message was measured faster (16 MB: about 20%), from about 24 MB on streams are as fast or
#: faster (40 MB: 30% on average) and hold less memory
STREAM_ABOVE = 32 << 20
#: protobuf parses no message of 2 GiB or more
MAX_MESSAGE = (1 << 31) - 1

# wire tags of the piece messages' fields (GetModelStreamResponse and PushStreamRequest share them)
_OFFSET, _TOTAL, _DATA = 0x08, 0x10, 0x1A


class StreamError(ValueError):
    """A piece stream that does not make a whole message (a gRPC INVALID_ARGUMENT)."""


class Piece(NamedTuple):
    """A received piece: its fields, ``data`` a view of the received message (no copy)."""

    offset: int
    total_size: int
    data: memoryview


def limit_for(dim: int) -> int:
    """The largest message the server reassembles for a model of ``dim`` parameters: 16 bytes per
    parameter (float64 values plus 64-bit indices) and 1 MiB, at most protobuf's limit."""
    return min(MAX_MESSAGE, 16 * dim + (1 << 20))


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def shares(sizes: Sequence[int], total: int) -> list[int]:
    """The bytes each of several fields of one message of ``total`` bytes is charged: its own
    ``sizes``, the first also the rest (the message's framing), so that they add up to ``total``.
    Used alike by the sender and the receiver of a batch of reports (psrv.hostrounds, worker.host)."""
    out = list(sizes)
    out[0] += max(0, total - sum(out))
    return out


def field_bytes(number: int, *data: bytes | memoryview) -> bytes:
    """A length-delimited field ``number`` whose value is the concatenation of ``data`` (e.g. a
    serialized message put into a oneof of an outer message), with a single copy of the data."""
    size = sum(memoryview(d).nbytes for d in data)
    return b"".join((varint(number << 3 | 2), varint(size), *data))


def piece_bytes(offset: int, total_size: int, *data: bytes | memoryview, within: int = 0) -> bytes:
    """One serialized piece message whose ``data`` is the concatenation of ``data``: byte for byte
    what protobuf's ``SerializeToString`` makes of it (fields in number order, a zero ``offset``
    left out), built with a single copy of the data. ``within``: the piece as field ``within`` of
    an outer message instead (the Rounds stream's ``push_piece`` and ``model_piece``)."""
    size = sum(memoryview(d).nbytes for d in data)
    head = bytearray()
    if offset:
        head += bytes((_OFFSET,)) + varint(offset)
    head += bytes((_TOTAL,)) + varint(total_size) + bytes((_DATA,)) + varint(size)
    return field_bytes(within, head, *data) if within else b"".join((head, *data))


def read_varint(data: memoryview, i: int) -> tuple[int, int]:
    """The varint at ``data[i]`` and the position after it."""
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise StreamError("truncated or overlong varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if value >> 64:
                raise StreamError("varint over 64 bits")
            return value, i
        shift += 7


class Field(NamedTuple):
    """A field of a serialized protobuf message: number, wire type, and positions: where the field
    (its tag) starts, where its value starts (a length-delimited value: after the length) and ends."""

    number: int
    wire: int
    start: int
    value: int
    end: int


def wire_fields(view: memoryview, start: int = 0, end: int | None = None) -> Iterator[Field]:
    """The fields of the message serialized in ``view[start:end]``, in order, read as protobuf does
    (varint, 64-bit, length-delimited and 32-bit values); raises :class:`StreamError` on malformed
    bytes (a truncated or overlong varint, a value past the end, field number 0, groups)."""
    end = len(view) if end is None else end
    i = start
    while i < end:
        key, value = read_varint(view, i)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise StreamError("field number 0")
        if wire == 0:
            _, stop = read_varint(view, value)
        elif wire == 2:
            size, value = read_varint(view, value)
            stop = value + size
        elif wire in (1, 5):
            stop = value + (8 if wire == 1 else 4)
        else:
            raise StreamError(f"wire type {wire}")
        if stop > end:
            raise StreamError("a field runs past the message")
        yield Field(number, wire, i, value, stop)
        i = stop


def parse_piece(message: bytes) -> Piece:
    """A serialized piece message (either piece type), read as protobuf reads it (any field order,
    the last occurrence of a field wins, unknown fields skipped) but without copying ``data``:
    :meth:`Reassembler.add` copies it once, into the whole message. Raises :class:`StreamError` on
    malformed bytes."""
    view = memoryview(message).cast("B")
    offset = total = 0
    data = view[:0]
    try:
        for f in wire_fields(view):
            if f.wire == 0 and f.number in (1, 2):
                value = read_varint(view, f.value)[0]
                offset, total = (value, total) if f.number == 1 else (offset, value)
            elif f.wire == 2 and f.number == 3:
                data = view[f.value : f.end]
    except StreamError as exc:
        raise StreamError(f"malformed piece: {exc}") from None
    return Piece(offset, total, data)


class Serialized:
    """A serialized message held as consecutive buffers, so a big field's bytes (a numpy array's
    memory) need not be copied into one ``bytes`` object: its length, and the message's bytes
    (:meth:`tobytes`, one copy) or pieces (:func:`pieces`, a copy of each piece) when needed."""

    def __init__(self, *parts: bytes | memoryview) -> None:
        self._bytes = parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else None
        self.parts = [memoryview(p).cast("B") for p in parts if len(p)]
        self.nbytes = sum(p.nbytes for p in self.parts)

    def __len__(self) -> int:
        return self.nbytes

    def tobytes(self) -> bytes:
        return self._bytes if self._bytes is not None else b"".join(self.parts)

    def slices(self, chunk: int) -> Iterator[list[memoryview]]:
        """Consecutive runs of ``chunk`` bytes (the last may be shorter), as views of the parts."""
        run: list[memoryview] = []
        room = chunk
        for part in self.parts:
            while part.nbytes:
                take = part[:room]
                run.append(take)
                part, room = part[take.nbytes :], room - take.nbytes
                if not room:
                    yield run
                    run, room = [], chunk
        if run:
            yield run


def pieces(message: bytes | Serialized, chunk: int = CHUNK_BYTES, within: int = 0) -> Iterator[bytes]:
    """The serialized pieces of the serialized ``message``, in order (one piece per ``chunk`` bytes);
    each as field ``within`` of an outer message if that is set (see :func:`piece_bytes`)."""
    whole = message if isinstance(message, Serialized) else Serialized(message)
    if not whole.nbytes:
        raise StreamError("cannot stream an empty message")
    offset = 0
    for run in whole.slices(chunk):
        yield piece_bytes(offset, whole.nbytes, *run, within=within)
        offset += sum(v.nbytes for v in run)


class SharedPieces:
    """The pieces of one message (:func:`pieces`) cut once for the ``readers`` streams that send it:
    a round's broadcast goes to M workers, and cutting it per stream would copy it M times. Each
    :meth:`reader` yields every piece in order; a piece is made when the first reader needs it and
    dropped once ``readers`` readers have taken it, so what is held is the gap between the fastest
    and the slowest reader (nothing once all are done; at most the message while one that was
    expected never comes). A reader beyond ``readers`` cuts its own pieces. Thread-safe: gRPC sends
    each stream from its own thread."""

    def __init__(self, message: bytes | Serialized, readers: int, chunk: int = CHUNK_BYTES, within: int = 0) -> None:
        self.message, self.readers, self.chunk, self.within = message, readers, chunk, within
        self._source: Iterator[bytes] | None = pieces(message, chunk, within)
        self._held: dict[int, list] = {}  # piece index -> [piece, readers that have taken it]
        self._made = 0  # pieces made so far
        self._started = 0  # readers handed out
        self._lock = threading.Lock()

    def reader(self) -> Iterator[bytes]:
        """The message's pieces, in order."""
        with self._lock:
            self._started += 1
            if self._started > self.readers:
                return pieces(self.message, self.chunk, self.within)
        return self._read()

    def _read(self) -> Iterator[bytes]:
        i = 0
        while True:
            with self._lock:
                if i == self._made:
                    piece = next(self._source, None) if self._source is not None else None
                    if piece is None:
                        self._source = None
                        return
                    self._held[i] = [piece, 0]
                    self._made += 1
                held = self._held[i]
                held[1] += 1
                if held[1] >= self.readers:
                    del self._held[i]
            yield held[0]
            i += 1

    @property
    def held(self) -> int:
        """Pieces held now (made and not yet taken by every reader)."""
        return len(self._held)


#: where the bytes of a message's big value go in memory: on a multiple of this many bytes
ALIGN = 64


def _big_value_start(first: memoryview) -> int:
    """Where, in a message whose first bytes are ``first``, its big value starts (a dense upload's
    or model's float values: the innermost length-delimited field that runs past ``first``), or 0
    when that cannot be told. Only a hint for :func:`_aligned_buffer`: a wrong one costs speed."""
    start, end, big = 0, None, 0
    while True:
        i, inner = start, None
        try:
            while i < len(first) and (end is None or i < end):
                key, i = read_varint(first, i)
                if key & 7 != 2:
                    if key & 7 == 0:
                        i = read_varint(first, i)[1]
                    elif key & 7 in (1, 5):
                        i += 8 if key & 7 == 1 else 4
                    else:
                        return big
                    continue
                size, i = read_varint(first, i)
                if end is not None and i + size > end:
                    return big
                if i + size > len(first):
                    inner = (i, i + size)
                    break
                i += size
        except StreamError:
            return big
        if inner is None:
            return big
        (start, end), big = inner, inner[0]


def _aligned_buffer(size: int, value_start: int) -> memoryview:
    """``size`` uninitialized bytes placed so that byte ``value_start`` is on an :data:`ALIGN` boundary:
    numpy reads an unaligned float array about half as fast (checks, casts, sums)."""
    room = np.empty(size + ALIGN, dtype=np.uint8)
    shift = -(room.ctypes.data + value_start) % ALIGN
    return memoryview(room[shift : shift + size])


class Reassembler:
    """Collects the pieces of one message; :meth:`result` is the message's bytes.

    Every problem raises :class:`StreamError` naming it: a ``total_size`` of 0 or above ``limit``,
    pieces that disagree on it, a piece that is empty, is not the next one (missing, repeated or
    reordered) or runs past the end, and (in :meth:`result`) a stream without pieces or one that
    ended early. The buffer is allocated once, at the first piece, and not cleared (a bytearray
    would write zeros over all of it first: a pass over 40 MB per model or upload at d = 1e7); every
    byte of it is written by a piece before :meth:`result` hands it out."""

    def __init__(self, limit: int = MAX_MESSAGE, what: str = "message") -> None:
        self.limit, self.what = limit, what
        self._buf: memoryview | None = None
        self._next = 0
        self.pieces = 0

    def add(self, offset: int, total_size: int, data: bytes | memoryview) -> None:
        what = f"{self.what} stream, piece {self.pieces}"
        if self._buf is None:
            if not 0 < total_size <= self.limit:
                raise StreamError(f"{what}: total_size {total_size} outside [1, {self.limit}]")
            self._buf = _aligned_buffer(total_size, _big_value_start(memoryview(data).cast("B")))
        elif total_size != len(self._buf):
            raise StreamError(f"{what}: total_size {total_size} differs from the first piece's {len(self._buf)}")
        if offset != self._next:
            kind = "repeats or overlaps earlier data" if offset < self._next else "skips data (a piece is missing)"
            raise StreamError(f"{what}: offset {offset}, expected {self._next}: the piece {kind}")
        if not data:
            raise StreamError(f"{what}: empty piece")
        end = offset + len(data)
        if end > len(self._buf):
            raise StreamError(f"{what}: data runs to byte {end}, past total_size {len(self._buf)}")
        self._buf[offset:end] = data
        self._next = end
        self.pieces += 1

    @property
    def complete(self) -> bool:
        """Every byte of the announced message has arrived."""
        return self._buf is not None and self._next == len(self._buf)

    def result(self) -> memoryview:
        """The whole message (a view of the buffer; the buffer is released when the view is)."""
        if self._buf is None:
            raise StreamError(f"{self.what} stream: no pieces")
        if self._next != len(self._buf):
            raise StreamError(
                f"{self.what} stream: ended after {self._next} of {len(self._buf)} bytes (pieces missing)"
            )
        buf, self._buf = self._buf, None
        return buf

"""Packet captures: read them (classic pcap in either byte order and with micro- or
nanosecond timestamps, and pcapng), reassemble TCP streams by sequence number, and decode
psrv's gRPC traffic with the same HTTP/2 parser as the tap; write them (the tap's ``--pcap``);
and take them without tcpdump (:class:`LiveCapture`, a Linux AF_PACKET socket, needs root).

Link types read: Ethernet (with 802.1Q/802.1ad tags), Linux cooked SLL and SLL2, BSD
loopback (NULL, LOOP) and raw IPv4/IPv6. Reassembly follows each direction's sequence
numbers (mod 2^32): retransmitted and overlapping bytes are delivered once, out-of-order
segments wait for the gap to fill, a capture that starts mid-connection starts at the first
segment seen (its HTTP/2 stream is then decodable only if it starts at the preface). IP
fragments and segments cut short by the snap length are not reassembled (counted in the stats).
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from psrv.inspect.grpcmsg import ConnectionDecoder
from psrv.inspect.http2 import PREFACE

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

_MASK = 0xFFFFFFFF
_TCP_FIN, _TCP_SYN, _TCP_RST, _TCP_PSH, _TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

Endpoint = tuple[str, int]


class PcapError(ValueError):
    """Not a capture file we can read."""


@dataclass(frozen=True)
class Packet:
    time: float
    linktype: int
    data: bytes
    orig_len: int


# ---------------------------------------------------------------------------------- reading


def _classic(f: IO[bytes], magic: bytes) -> Iterator[Packet]:
    order = {b"\xd4\xc3\xb2\xa1": "<", b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">", b"\xa1\xb2\x3c\x4d": ">"}[
        magic
    ]
    scale = 1_000_000_000 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1_000_000
    head = f.read(20)
    if len(head) < 20:
        raise PcapError("truncated pcap file header")
    linktype = struct.unpack(order + "HHiIII", head)[5] & 0xFFFF
    rec = struct.Struct(order + "IIII")
    while True:
        h = f.read(16)
        if len(h) < 16:
            return
        sec, frac, incl, orig = rec.unpack(h)
        data = f.read(incl)
        if len(data) < incl:
            return
        yield Packet((sec * scale + frac) / scale, linktype, data, orig)


def _pcapng(f: IO[bytes]) -> Iterator[Packet]:
    order = "<"
    interfaces: list[tuple[int, int, int]] = []  # (linktype, tick base, tick exponent)
    first = True
    while True:
        h = f.read(8)
        if len(h) < 8:
            return
        if h[:4] == b"\x0a\x0d\x0d\x0a":  # section header: learn the byte order first
            bom = f.read(4)
            order = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">" if bom == b"\x1a\x2b\x3c\x4d" else ""
            if not order:
                raise PcapError("pcapng: bad byte-order magic")
            total = struct.unpack(order + "I", h[4:])[0]
            f.read(total - 12)
            interfaces, first = [], False
            continue
        if first:
            raise PcapError("pcapng: no section header block")
        btype, total = struct.unpack(order + "II", h)
        if total < 12:
            raise PcapError("pcapng: bad block length")
        body = f.read(total - 8)
        if len(body) < total - 8:
            return
        body = body[:-4]
        if btype == 1:  # interface description
            linktype = struct.unpack(order + "H", body[:2])[0]
            base, exp = 10, 6
            i = 8
            while i + 4 <= len(body):
                code, length = struct.unpack(order + "HH", body[i : i + 4])
                if code == 0:
                    break
                if code == 9 and length >= 1:  # if_tsresol
                    v = body[i + 4]
                    base, exp = (2, v & 0x7F) if v & 0x80 else (10, v)
                i += 4 + length + (-length % 4)
            interfaces.append((linktype, base, exp))
        elif btype in (6, 2):  # enhanced packet / obsolete packet block
            if btype == 6:
                iface, hi, lo, cap, orig = struct.unpack(order + "IIIII", body[:20])
            else:
                iface, _, hi, lo, cap, orig = struct.unpack(order + "HHIIII", body[:20])
            if iface >= len(interfaces):
                raise PcapError(f"pcapng: packet for undeclared interface {iface}")
            linktype, base, exp = interfaces[iface]
            yield Packet(((hi << 32) | lo) / base**exp, linktype, body[20 : 20 + cap], orig)
        elif btype == 3:  # simple packet block: interface 0, no timestamp
            if not interfaces:
                raise PcapError("pcapng: packet before any interface")
            orig = struct.unpack(order + "I", body[:4])[0]
            yield Packet(0.0, interfaces[0][0], body[4 : 4 + orig], orig)


def read_packets(path: str | Path) -> Iterator[Packet]:
    """Every packet of a classic pcap or pcapng file, in file order."""
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d"):
            yield from _classic(f, magic)
        elif magic == b"\x0a\x0d\x0d\x0a":
            f.seek(0)
            yield from _pcapng(f)
        else:
            raise PcapError(f"{path}: not a pcap or pcapng file (magic {magic.hex()})")


@dataclass(frozen=True)
class Segment:
    src: Endpoint
    dst: Endpoint
    seq: int
    ack: int
    flags: int
    payload: bytes
    truncated: bool = False


def _network(linktype: int, data: bytes) -> tuple[int, bytes] | None:
    """(IP version, IP packet) of a link-layer frame, or None when it is not IP."""
    if linktype == LINKTYPE_ETHERNET:
        i, etype = 14, int.from_bytes(data[12:14], "big") if len(data) >= 14 else 0
        while etype in (0x8100, 0x88A8, 0x9100) and len(data) >= i + 4:
            etype, i = int.from_bytes(data[i + 2 : i + 4], "big"), i + 4
        ip = {0x0800: 4, 0x86DD: 6}.get(etype)
        return (ip, data[i:]) if ip else None
    if linktype == LINKTYPE_LINUX_SLL:
        ip = {0x0800: 4, 0x86DD: 6}.get(int.from_bytes(data[14:16], "big"))
        return (ip, data[16:]) if ip else None
    if linktype == LINKTYPE_LINUX_SLL2:
        ip = {0x0800: 4, 0x86DD: 6}.get(int.from_bytes(data[0:2], "big"))
        return (ip, data[20:]) if ip else None
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        if len(data) < 4:
            return None
        fam = int.from_bytes(data[:4], "big" if linktype == LINKTYPE_LOOP else "little")
        if linktype == LINKTYPE_NULL and fam > 0xFFFF:  # written on a big-endian host
            fam = int.from_bytes(data[:4], "big")
        ip = 4 if fam == 2 else 6 if fam in (10, 24, 28, 30) else None
        return (ip, data[4:]) if ip else None
    if linktype in (LINKTYPE_RAW, 12, 14, LINKTYPE_IPV4, LINKTYPE_IPV6):
        ip = data[0] >> 4 if data else 0
        return (ip, data) if ip in (4, 6) else None
    return None


def parse_tcp(linktype: int, data: bytes, stats: dict[str, int] | None = None) -> Segment | None:
    """The TCP segment in a captured frame (None: not TCP, or an IP fragment)."""
    stats = stats if stats is not None else {}
    net = _network(linktype, data)
    if net is None:
        return None
    version, ip = net
    if version == 4:
        if len(ip) < 20:
            return None
        ihl = (ip[0] & 0x0F) * 4
        total = int.from_bytes(ip[2:4], "big")
        if ip[9] != 6:
            return None
        if int.from_bytes(ip[6:8], "big") & 0x3FFF:  # MF or a fragment offset
            stats["fragments"] = stats.get("fragments", 0) + 1
            return None
        src, dst = str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))
        end = total if total else len(ip)  # 0: TSO-sized packet captured before segmentation
        tcp = ip[ihl:end]
        declared = end - ihl
    elif version == 6:
        if len(ip) < 40:
            return None
        nxt, i = ip[6], 40
        end = 40 + int.from_bytes(ip[4:6], "big")
        while nxt in (0, 43, 60, 51, 44):
            if nxt == 44:
                stats["fragments"] = stats.get("fragments", 0) + 1
                return None
            if len(ip) < i + 2:
                return None
            nxt, i = ip[i], i + ((ip[i + 1] + 2) * 4 if nxt == 51 else (ip[i + 1] + 1) * 8)
        if nxt != 6:
            return None
        src, dst = str(ipaddress.IPv6Address(ip[8:24])), str(ipaddress.IPv6Address(ip[24:40]))
        tcp = ip[i:end]
        declared = end - i
    else:
        return None
    if len(tcp) < 20:
        return None
    sport, dport, seq, ack, off_flags = struct.unpack("!HHIIH", tcp[:14])
    doff = (off_flags >> 12) * 4
    payload = tcp[doff:]
    truncated = len(tcp) < declared
    if truncated:
        stats["truncated"] = stats.get("truncated", 0) + 1
    return Segment((src, sport), (dst, dport), seq, ack, off_flags & 0x3F, payload, truncated)


class _Half:
    """One direction of a TCP connection: bytes in sequence order, each delivered once."""

    def __init__(self) -> None:
        self.next_seq: int | None = None
        self.pending: dict[int, bytes] = {}
        self.fin_seq: int | None = None
        self.delivered = 0
        self.gap = False  # a truncated segment: nothing after it can be delivered

    def _rel(self, seq: int) -> int:
        off = (seq - self.next_seq) & _MASK
        return off - (1 << 32) if off >= 1 << 31 else off

    @property
    def finished(self) -> bool:
        return self.fin_seq is not None and self.next_seq == self.fin_seq

    def add(self, seg: Segment) -> list[bytes]:
        seq = seg.seq
        if seg.flags & _TCP_SYN:
            if self.next_seq is None:
                self.next_seq = (seq + 1) & _MASK
            seq = (seq + 1) & _MASK  # data on a SYN (TCP fast open) follows the SYN's number
        if self.next_seq is None:
            if not seg.payload:
                return []
            self.next_seq = seq
        if seg.flags & _TCP_FIN:
            self.fin_seq = (seq + len(seg.payload)) & _MASK
        if not seg.payload:
            return []
        if seg.truncated:
            self.gap = True
            return []
        if self.gap:
            return []
        out: list[bytes] = []
        off = self._rel(seq)
        if off > 0:
            if len(seg.payload) > len(self.pending.get(seq, b"")):
                self.pending[seq] = seg.payload
            return out
        self._deliver(seg.payload[-off:] if off else seg.payload, out)
        progress = True
        while progress and self.pending:
            progress = False
            for s in list(self.pending):
                off = self._rel(s)
                if off <= 0:
                    data = self.pending.pop(s)
                    if len(data) > -off:
                        self._deliver(data[-off:] if off else data, out)
                        progress = True
        return out

    def _deliver(self, data: bytes, out: list[bytes]) -> None:
        if data:
            out.append(data)
            self.next_seq = (self.next_seq + len(data)) & _MASK
            self.delivered += len(data)


def _conn_name(ep: Endpoint) -> str:
    return f"[{ep[0]}]:{ep[1]}" if ":" in ep[0] else f"{ep[0]}:{ep[1]}"


@dataclass
class _Flow:
    halves: dict[Endpoint, _Half]
    client: Endpoint | None = None
    decoder: ConnectionDecoder | None = None
    ignored: bool = False
    # deliveries held back until we know which side is the client
    held: list[tuple[Endpoint, bytes, float]] = field(default_factory=list)
    first_bytes: dict[Endpoint, bytes] = field(default_factory=dict)
    last_time: float = 0.0


class PcapDecoder:
    """Feed captured packets; get psrv records (the same as the tap writes) per connection.

    ``port``: the server's TCP port; only connections with it are decoded. Without it every
    TCP connection whose client sends the HTTP/2 preface is decoded. ``on_bytes(conn,
    direction, data)`` sees each connection's reassembled byte streams (what the decoder reads)."""

    def __init__(
        self,
        port: int | None = None,
        on_record: Callable[[dict[str, Any]], None] | None = None,
        on_bytes: Callable[[str, str, bytes], None] | None = None,
    ) -> None:
        self.port = port
        self._on_bytes = on_bytes
        self.records: list[dict[str, Any]] = []
        self._emit = on_record or self.records.append
        self._flows: dict[tuple[Endpoint, Endpoint], _Flow] = {}
        self._closed: dict[tuple[Endpoint, Endpoint], dict[Endpoint, int | None]] = {}
        self.stats: dict[str, int] = {"packets": 0, "tcp": 0, "connections": 0, "ignored_connections": 0}

    def feed(self, pkt: Packet) -> None:
        self.stats["packets"] += 1
        seg = parse_tcp(pkt.linktype, pkt.data, self.stats)
        if seg is None:
            return
        if self.port is not None and self.port not in (seg.src[1], seg.dst[1]):
            return
        self.stats["tcp"] += 1
        key = (min(seg.src, seg.dst), max(seg.src, seg.dst))
        flow = self._flows.get(key)
        syn_only = seg.flags & (_TCP_SYN | _TCP_ACK) == _TCP_SYN
        if flow is not None and syn_only and flow.client is not None and seg.src == flow.client:
            half = flow.halves[seg.src]
            if half.next_seq is not None and half.next_seq != (seg.seq + 1) & _MASK:  # port reused
                self._close(key, pkt.time)
                flow = None
        if flow is None:
            if not syn_only and (not seg.payload or self._stale(key, seg)):
                return
            flow = self._flows[key] = _Flow({seg.src: _Half(), seg.dst: _Half()})
            self._closed.pop(key, None)
            if syn_only:
                flow.client = seg.src
            elif self.port is not None and seg.src[1] != seg.dst[1]:
                flow.client = seg.src if seg.dst[1] == self.port else seg.dst
        flow.last_time = pkt.time
        for data in flow.halves[seg.src].add(seg):
            self._deliver(flow, seg.src, data, pkt.time)
        if seg.flags & _TCP_RST or all(h.finished for h in flow.halves.values()):
            self._close(key, pkt.time)

    def finish(self) -> list[dict[str, Any]]:
        """End of the capture: close every connection still open. Returns all records kept."""
        for key in list(self._flows):
            self._close(key, self._flows[key].last_time)
        return self.records

    def _stale(self, key: tuple[Endpoint, Endpoint], seg: Segment) -> bool:
        """A retransmission or late ACK of a connection that already closed."""
        ends = self._closed.get(key)
        if not ends or ends.get(seg.src) is None:
            return False
        off = (seg.seq - ends[seg.src]) & _MASK
        return off == 0 or off >= 1 << 31

    def _deliver(self, flow: _Flow, src: Endpoint, data: bytes, t: float) -> None:
        if flow.ignored:
            return
        if flow.decoder is not None:
            self._feed(flow, src, data, t)
            return
        flow.held.append((src, data, t))
        if len(flow.first_bytes.get(src, b"")) < len(PREFACE):
            flow.first_bytes[src] = (flow.first_bytes.get(src, b"") + data)[: len(PREFACE)]
        if flow.client is None:  # no SYN seen, no port given: the side that sends the preface
            if flow.first_bytes[src] == PREFACE:
                flow.client = src
            else:
                if len(flow.first_bytes) == 2 and not any(PREFACE.startswith(b) for b in flow.first_bytes.values()):
                    self._ignore(flow)
                return
        elif self.port is None:  # client known from its SYN: does it speak HTTP/2?
            first = flow.first_bytes.get(flow.client, b"")
            if not PREFACE.startswith(first):
                self._ignore(flow)
                return
            if len(first) < len(PREFACE):
                return
        flow.decoder = ConnectionDecoder(_conn_name(flow.client))
        self.stats["connections"] += 1
        held, flow.held = flow.held, []
        for s, d, tt in held:
            self._feed(flow, s, d, tt)

    def _ignore(self, flow: _Flow) -> None:
        flow.ignored, flow.held = True, []
        self.stats["ignored_connections"] += 1

    def _feed(self, flow: _Flow, src: Endpoint, data: bytes, t: float) -> None:
        direction = "up" if src == flow.client else "down"
        if self._on_bytes is not None:
            self._on_bytes(flow.decoder.conn, direction, data)
        for r in flow.decoder.feed(direction, data, t):
            self._emit(r)

    def _close(self, key: tuple[Endpoint, Endpoint], t: float) -> None:
        flow = self._flows.pop(key)
        self._closed[key] = {ep: h.next_seq for ep, h in flow.halves.items()}
        if len(self._closed) > 65536:
            self._closed.pop(next(iter(self._closed)))
        if flow.decoder is not None:
            for r in flow.decoder.close(t):
                if any(h.gap or h.pending for h in flow.halves.values()) and r["type"] == "connection":
                    r["error"] = r["error"] or "TCP stream has a gap (lost or truncated segments)"
                self._emit(r)


def decode_pcap(
    path: str | Path,
    port: int | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_bytes: Callable[[str, str, bytes], None] | None = None,
) -> PcapDecoder:
    """Decode a capture file; the returned decoder holds ``records`` (unless ``on_record``
    took them) and ``stats``."""
    dec = PcapDecoder(port, on_record, on_bytes)
    for pkt in read_packets(path):
        dec.feed(pkt)
    dec.finish()
    return dec


# ---------------------------------------------------------------------------------- writing


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    n = int.from_bytes(data, "big")
    s = n % 0xFFFF  # 2^16 = 1 (mod 2^16 - 1): the ones'-complement sum of the 16-bit words
    if s == 0 and n:
        s = 0xFFFF
    return ~s & 0xFFFF


def ip_tcp_packet(
    src: Endpoint, dst: Endpoint, seq: int, ack: int, flags: int, payload: bytes = b"", ident: int = 0
) -> bytes:
    """An IPv4 or IPv6 packet holding one TCP segment, checksums filled in."""
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if s.version != d.version:
        raise ValueError(f"cannot mix {src[0]} and {dst[0]}")
    tcp_len = 20 + len(payload)
    head = struct.pack("!HHIIHHHH", src[1], dst[1], seq & _MASK, ack & _MASK, (5 << 12) | flags, 65535, 0, 0)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, 6, tcp_len)
    else:
        pseudo = s.packed + d.packed + struct.pack("!IxxxB", tcp_len, 6)
    csum = checksum(pseudo + head + payload)
    tcp = head[:16] + struct.pack("!H", csum) + head[18:] + payload
    if s.version == 4:
        iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, ident & 0xFFFF, 0x4000, 64, 6, 0, s.packed, d.packed)
        iph = iph[:10] + struct.pack("!H", checksum(iph)) + iph[12:]
        return iph + tcp
    return struct.pack("!IHBB16s16s", 6 << 28, tcp_len, 6, 64, s.packed, d.packed) + tcp


def ethernet(ip_packet: bytes) -> bytes:
    etype = b"\x08\x00" if ip_packet[0] >> 4 == 4 else b"\x86\xdd"
    return b"\0" * 12 + etype + ip_packet


#: most TCP payload bytes per written segment (an IPv4 packet is at most 65535 bytes)
MAX_SEGMENT = 65535 - 40


@dataclass
class TcpFlow:
    """A connection being written: endpoints and each side's next sequence number."""

    client: Endpoint
    server: Endpoint
    seq: dict[str, int]  # "up"/"down" -> next sequence number

    def ends(self, direction: str) -> tuple[Endpoint, Endpoint]:
        return (self.client, self.server) if direction == "up" else (self.server, self.client)


class PcapWriter:
    """A classic pcap (microsecond timestamps, Ethernet) of TCP byte streams: handshake,
    data in segments of at most :data:`MAX_SEGMENT` bytes with correct sequence and
    acknowledgement numbers, FIN or RST at the end. Thread-safe."""

    def __init__(self, path: str | Path, snaplen: int = 262144) -> None:
        self._f = open(path, "wb")
        self._f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET))
        self._lock = threading.Lock()
        self._ident = 0
        self.packets = 0

    def _packet(self, t_us: int, flow: TcpFlow, direction: str, flags: int, payload: bytes = b"") -> None:
        if self._f.closed:  # a connection still ending after close(): nothing more is written
            return
        src, dst = flow.ends(direction)
        seq = flow.seq[direction]
        ack = flow.seq["down" if direction == "up" else "up"]
        self._ident += 1
        frame = ethernet(ip_tcp_packet(src, dst, seq, ack, flags, payload, self._ident))
        self._f.write(struct.pack("<IIII", t_us // 1_000_000, t_us % 1_000_000, len(frame), len(frame)) + frame)
        self.packets += 1

    def open_flow(self, client: Endpoint, server: Endpoint, t_us: int, isn: tuple[int, int] | None = None) -> TcpFlow:
        isn = isn or ((client[1] * 40503) & _MASK, (client[1] * 2654435761) & _MASK)
        flow = TcpFlow(client, server, {"up": isn[0], "down": 0})
        with self._lock:
            self._packet(t_us, flow, "up", _TCP_SYN)
            flow.seq["up"] = (isn[0] + 1) & _MASK
            flow.seq["down"] = isn[1]
            self._packet(t_us, flow, "down", _TCP_SYN | _TCP_ACK)
            flow.seq["down"] = (isn[1] + 1) & _MASK
            self._packet(t_us, flow, "up", _TCP_ACK)
        return flow

    def data(self, flow: TcpFlow, direction: str, data: bytes, t_us: int) -> None:
        with self._lock:
            for i in range(0, len(data), MAX_SEGMENT):
                chunk = data[i : i + MAX_SEGMENT]
                self._packet(t_us, flow, direction, _TCP_PSH | _TCP_ACK, chunk)
                flow.seq[direction] = (flow.seq[direction] + len(chunk)) & _MASK

    def fin(self, flow: TcpFlow, direction: str, t_us: int) -> None:
        with self._lock:
            self._packet(t_us, flow, direction, _TCP_FIN | _TCP_ACK)
            flow.seq[direction] = (flow.seq[direction] + 1) & _MASK

    def rst(self, flow: TcpFlow, direction: str, t_us: int) -> None:
        with self._lock:
            self._packet(t_us, flow, direction, _TCP_RST | _TCP_ACK)

    def flush(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()


# ---------------------------------------------------------------------------- live capture

_ETH_P_ALL = 0x0003
_PACKET_OUTGOING = 4
_SO_TIMESTAMPNS = 35
_SOL_PACKET, _PACKET_STATISTICS = 263, 6
_SO_RCVBUFFORCE = 33


_SO_ATTACH_FILTER = 26


def _bpf_tcp_ports(ports: set[int]) -> bytes:
    """A classic BPF program keeping TCP segments of ``ports`` (IPv4 without fragments, IPv6
    without extension headers), for a SOCK_DGRAM packet socket (data starts at the IP header):
    the kernel drops everything else before it takes buffer space."""
    prog: list[tuple[int, Any, Any, int]] = []  # (code, jump-if-true label, jump-if-false label, k)
    labels: dict[str, int] = {}

    def label(name: str) -> None:
        labels[name] = len(prog)

    def ports_at(offset: int, indirect: bool) -> None:
        prog.append((0x48 if indirect else 0x28, None, None, offset))  # ldh [x+off] / ldh [off]
        for p in sorted(ports):
            prog.append((0x15, "accept", None, p))  # jeq #p

    prog += [(0x30, None, None, 0), (0x74, None, None, 4)]  # ldb [0]; rsh #4: the IP version
    prog += [(0x15, "v4", None, 4), (0x15, "v6", "drop", 6)]
    label("v4")
    prog += [(0x30, None, None, 9), (0x15, None, "drop", 6)]  # protocol == TCP
    prog += [(0x28, None, None, 6), (0x45, "drop", None, 0x1FFF)]  # not a later fragment
    prog.append((0xB1, None, None, 0))  # ldxb 4*([0]&0xf): the IPv4 header length
    ports_at(0, True)
    ports_at(2, True)
    prog.append((0x06, None, None, 0))
    label("v6")
    prog += [(0x30, None, None, 6), (0x15, None, "drop", 6)]  # next header == TCP
    ports_at(40, False)
    ports_at(42, False)
    prog.append((0x06, None, None, 0))
    label("accept")
    prog.append((0x06, None, None, 262144))
    label("drop")
    prog.append((0x06, None, None, 0))
    out = b""
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if jt else 0
        jf = labels[jf] - i - 1 if jf else 0
        out += struct.pack("HBBI", code, jt, jf, k)
    return out


def _attach_filter(sock: socket.socket, program: bytes) -> None:
    import ctypes

    buf = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


def _sll_header(addr: tuple[Any, ...]) -> bytes:
    _, proto, pkttype, hatype, hwaddr = addr[:5]
    hw = bytes(hwaddr)[:8]
    return struct.pack("!HHH8sH", pkttype, hatype, len(hw), hw.ljust(8, b"\0"), proto)


class LiveCapture:
    """Capture the TCP traffic of some ports on a Linux interface into a classic pcap
    (Linux cooked SLL link type, like ``tcpdump -i any``): a stand-in for tcpdump where
    there is none. Needs root (CAP_NET_RAW). With ``ports`` a BPF filter in the kernel keeps
    only their TCP segments. On ``lo`` each packet is kept once (the outgoing copy is
    dropped, as libpcap does)."""

    def __init__(self, path: str | Path, ports: set[int] | None = None, iface: str = "lo") -> None:
        self.path, self.ports, self.iface = path, ports, iface
        self.packets = 0
        self.drops = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def start(self) -> LiveCapture:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(_ETH_P_ALL))
        if self.ports:
            _attach_filter(sock, _bpf_tcp_ports(self.ports))
        sock.bind((self.iface, 0))
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 64 << 20)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        sock.setblocking(False)
        sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8)  # reset the counters
        self._sock = sock
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, LINKTYPE_LINUX_SLL))
        self._thread = threading.Thread(target=self._loop, name="psrv-capture", daemon=True)
        self._thread.start()
        return self

    def _keep(self, proto: int, pkt: bytes) -> bool:
        if self.ports is None:
            return True
        if proto == 0x0800 and len(pkt) >= 24 and pkt[9] == 6:
            tcp = pkt[(pkt[0] & 0x0F) * 4 :]
        elif proto == 0x86DD and len(pkt) >= 44 and pkt[6] == 6:
            tcp = pkt[40:]
        else:
            return False
        return len(tcp) >= 4 and (
            int.from_bytes(tcp[0:2], "big") in self.ports or int.from_bytes(tcp[2:4], "big") in self.ports
        )

    def _drain(self) -> None:
        sock = self._sock
        while True:
            try:
                pkt, anc, _, addr = sock.recvmsg(262144, 64)
            except BlockingIOError:
                return
            if addr[2] == _PACKET_OUTGOING and self.iface == "lo":
                continue
            if not self._keep(addr[1], pkt):
                continue
            t_ns = time.time_ns()
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(value) >= 16:
                    sec, nsec = struct.unpack("qq", value[:16])
                    t_ns = sec * 1_000_000_000 + nsec
            frame = _sll_header(addr) + pkt
            self._f.write(struct.pack("<IIII", t_ns // 10**9, t_ns % 10**9, len(frame), len(frame)) + frame)
            self.packets += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            select.select([self._sock], [], [], 0.1)
            self._drain()
        self._drain()

    def stop(self) -> dict[str, int]:
        """Stop, write out what is left, close the file; returns packets kept and kernel drops."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self.drops += struct.unpack("II", self._sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8))[1]
            self._sock.close()
            self._sock = None
            self._f.close()
        return {"packets": self.packets, "drops": self.drops}

"""Packet captures decoded into psrv records: every TCP connection of a capture file
(:mod:`psrv.inspect.pcapfile`) is reassembled (:mod:`psrv.inspect.reassembly`) and its two byte
streams go through the same HTTP/2 and gRPC decoder as the tap's, so a capture of a run gives
the records the tap would have written.

Connections: a SYN names the client; a capture that starts mid-connection starts at the first
segment seen (its HTTP/2 stream is then decodable only if it starts at the preface); a 4-tuple
reused with a new initial sequence number is a new connection. IP fragments and segments cut
short by the snap length are not reassembled (counted in the stats).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psrv.inspect.grpcmsg import ConnectionDecoder
from psrv.inspect.http2 import PREFACE
from psrv.inspect.pcapfile import Packet, read_packets
from psrv.inspect.reassembly import HalfStream
from psrv.inspect.tcpip import MASK, TCP_ACK, TCP_RST, TCP_SYN, Endpoint, Segment, parse_tcp


def _conn_name(ep: Endpoint) -> str:
    return f"[{ep[0]}]:{ep[1]}" if ":" in ep[0] else f"{ep[0]}:{ep[1]}"


@dataclass
class _Flow:
    halves: dict[Endpoint, HalfStream]
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
        syn_only = seg.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        if flow is not None and syn_only and flow.client is not None and seg.src == flow.client:
            half = flow.halves[seg.src]
            if half.next_seq is not None and half.next_seq != (seg.seq + 1) & MASK:  # port reused
                self._close(key, pkt.time)
                flow = None
        if flow is None:
            if not syn_only and (not seg.payload or self._stale(key, seg)):
                return
            flow = self._flows[key] = _Flow({seg.src: HalfStream(), seg.dst: HalfStream()})
            self._closed.pop(key, None)
            if syn_only:
                flow.client = seg.src
            elif self.port is not None and seg.src[1] != seg.dst[1]:
                flow.client = seg.src if seg.dst[1] == self.port else seg.dst
        flow.last_time = pkt.time
        for data in flow.halves[seg.src].add(seg):
            self._deliver(flow, seg.src, data, pkt.time)
        if seg.flags & TCP_RST or all(h.finished for h in flow.halves.values()):
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
        off = (seg.seq - ends[seg.src]) & MASK
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

"""Capture files, through dpkt: read classic pcap (either byte order, micro- or nanosecond
timestamps) and pcapng; write classic pcap with exact integer timestamps.

pcapng is walked block by block with dpkt's block classes rather than ``dpkt.pcapng.Reader``,
which gives every packet the link type of the first interface: a file from a capture on
several interfaces (one Interface Description Block each, with its own link type and timestamp
resolution) is read per interface here, as are several sections and simple packet blocks.
A record cut short at the end of a file (a capture still being written) is left out.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import dpkt
from dpkt import pcapng

from psrv.inspect.tcpip import LINKTYPE_ETHERNET

PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


class PcapError(ValueError):
    """Not a capture file we can read."""


@dataclass(frozen=True)
class Packet:
    time: float
    linktype: int
    data: bytes


def read_packets(path: str | Path) -> Iterator[Packet]:
    """Every packet of a classic pcap or pcapng file, in file order."""
    with open(path, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        if magic == PCAPNG_MAGIC:
            yield from _pcapng(f)
            return
        if len(magic) == 4 and int.from_bytes(magic, "big") in dpkt.pcap.MAGIC_TO_PKT_HDR:
            yield from _classic(f)
            return
        raise PcapError(f"{path}: not a pcap or pcapng file (magic {magic.hex()})")


class _Reads:
    """A file whose last read may have come up short (the end of a file still being written)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.short, self.name = f, False, getattr(f, "name", "?")

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.short = len(data) < n
        return data


def _classic(f: IO[bytes]) -> Iterator[Packet]:
    src = _Reads(f)
    try:
        reader = dpkt.pcap.Reader(src)
    except dpkt.NeedData:
        raise PcapError("truncated pcap file header") from None
    linktype = reader.datalink() & 0xFFFF  # the upper bits may carry the FCS length
    try:
        for ts, data in reader:
            if src.short:
                return
            # dpkt's time: an exact Decimal in nanosecond files; in microsecond files the float
            # sec + usec / 1e6, rounded twice (an ulp off for some times under ~3 hours, i.e.
            # relative ones). Rounded once, (sec * 10^6 + usec) / 10^6, as the tap's times are.
            t = float(ts) if isinstance(ts, Decimal) else round(ts * 1_000_000) / 1_000_000
            yield Packet(t, linktype, data)
    except dpkt.NeedData:  # a record header cut short
        return


_SPB = 3  # simple packet block: no dpkt class


def _pcapng(f: IO[bytes]) -> Iterator[Packet]:
    le: bool | None = None
    interfaces: list[tuple[int, int]] = []  # (link type, timestamp ticks per second)
    while True:
        head = f.read(8)
        if len(head) < 8:
            return
        if head[:4] == PCAPNG_MAGIC:  # a section header: learn the byte order first
            bom = f.read(4)
            le = {b"\x4d\x3c\x2b\x1a": True, b"\x1a\x2b\x3c\x4d": False}.get(bom)
            if le is None:
                raise PcapError("pcapng: bad byte-order magic")
            f.read(struct.unpack("<I" if le else ">I", head[4:])[0] - 12)
            interfaces = []
            continue
        if le is None:
            raise PcapError("pcapng: no section header block")
        btype, total = struct.unpack("<II" if le else ">II", head)
        if total < 12:
            raise PcapError("pcapng: bad block length")
        body = f.read(total - 8)
        if len(body) < total - 8:
            return
        if btype == pcapng.PCAPNG_BT_IDB:
            idb = _block(pcapng.InterfaceDescriptionBlockLE if le else pcapng.InterfaceDescriptionBlock, head + body)
            ticks = 10**6
            for opt in idb.opts:
                if opt.code == pcapng.PCAPNG_OPT_IF_TSRESOL and opt.data:
                    v = opt.data[0]
                    ticks = 2 ** (v & 0x7F) if v & 0x80 else 10**v
            interfaces.append((idb.linktype, ticks))
        elif btype in (pcapng.PCAPNG_BT_EPB, pcapng.PCAPNG_BT_PB):
            if btype == pcapng.PCAPNG_BT_EPB:
                cls = pcapng.EnhancedPacketBlockLE if le else pcapng.EnhancedPacketBlock
            else:
                cls = pcapng.PacketBlockLE if le else pcapng.PacketBlock
            pkt = _block(cls, head + body)
            if pkt.iface_id >= len(interfaces):
                raise PcapError(f"pcapng: packet for undeclared interface {pkt.iface_id}")
            linktype, ticks = interfaces[pkt.iface_id]
            yield Packet(((pkt.ts_high << 32) | pkt.ts_low) / ticks, linktype, pkt.pkt_data)
        elif btype == _SPB:  # interface 0, no timestamp
            if not interfaces:
                raise PcapError("pcapng: packet before any interface")
            orig = struct.unpack("<I" if le else ">I", body[:4])[0]
            yield Packet(0.0, interfaces[0][0], body[:-4][4 : 4 + orig])


def _block(cls: type[Any], buf: bytes) -> Any:
    try:
        return cls(buf)
    except (dpkt.UnpackError, UnicodeDecodeError) as exc:
        raise PcapError(f"pcapng: bad {cls.__name__}: {exc}") from None


class PcapFile:
    """A classic pcap being written (dpkt), in this machine's byte order. Timestamps are integer
    ticks -- microseconds, or nanoseconds with ``nano`` -- written exactly (a float of seconds
    since 1970 cannot hold nanoseconds)."""

    def __init__(self, path: str | Path, linktype: int = LINKTYPE_ETHERNET, nano: bool = False, snaplen: int = 262144):
        self._f = open(path, "wb")
        self._w = dpkt.pcap.Writer(self._f, snaplen=snaplen, linktype=linktype, nano=nano)
        self._exp = -9 if nano else -6
        self.packets = 0

    @property
    def closed(self) -> bool:
        return self._f.closed

    def write(self, frame: bytes, ticks: int) -> None:
        self._w.writepkt_time(frame, Decimal(ticks).scaleb(self._exp))
        self.packets += 1

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()

"""TCP/IP packets as bytes: the TCP segment in a captured frame (:func:`parse_tcp`), and
frames built from scratch (:func:`ip_tcp_packet`, :func:`ethernet`, :func:`sll_header`).

Link types read: Ethernet (with 802.1Q/802.1ad tags), Linux cooked SLL and SLL2, BSD
loopback (NULL, LOOP) and raw IPv4/IPv6. IP fragments are not reassembled and a segment cut
short by the snap length is marked ``truncated`` (both counted in ``stats``).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

MASK = 0xFFFFFFFF  # sequence numbers are mod 2^32
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

Endpoint = tuple[str, int]


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
    head = struct.pack("!HHIIHHHH", src[1], dst[1], seq & MASK, ack & MASK, (5 << 12) | flags, 65535, 0, 0)
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
    """An Ethernet frame (zero addresses) around an IP packet."""
    etype = b"\x08\x00" if ip_packet[0] >> 4 == 4 else b"\x86\xdd"
    return b"\0" * 12 + etype + ip_packet


def sll_header(addr: tuple[Any, ...]) -> bytes:
    """The Linux cooked (SLL) header of a packet received on an AF_PACKET socket from ``addr``."""
    _, proto, pkttype, hatype, hwaddr = addr[:5]
    hw = bytes(hwaddr)[:8]
    return struct.pack("!HHH8sH", pkttype, hatype, len(hw), hw.ljust(8, b"\0"), proto)

"""Live capture on Linux (AF_PACKET, needs root): the one capture loop of psrv.

:class:`PacketSocket` reads every frame of one interface -- or, unbound, of every interface of
the network namespace -- with the kernel's receive timestamp (SO_TIMESTAMPNS, so a busy reader
does not skew times), optionally behind a BPF filter, into a callback until told to stop. Two
users: :class:`LiveCapture` (``psrv inspect capture``, a tcpdump stand-in that writes a pcap)
and :func:`psrv.cluster.capture.capture` (every frame on the cluster's bridge, for wire bytes
and upload times).
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from psrv.inspect.pcapfile import PcapFile
from psrv.inspect.tcpip import LINKTYPE_LINUX_SLL, sll_header

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35
_SO_RCVBUFFORCE = 33
_SO_ATTACH_FILTER = 26
_SOL_PACKET, _PACKET_STATISTICS = 263, 6


class Frame(NamedTuple):
    time_ns: int  # the kernel's receive timestamp
    iface: str
    outgoing: bool  # the frame left the interface (PACKET_OUTGOING)
    length: int  # the whole frame's length, also when ``data`` was cut at the snap length
    data: bytes  # its first ``snap`` bytes (from the IP header on with ``cooked``)
    addr: tuple[Any, ...]  # the sockaddr_ll: (iface, protocol, packet type, hardware type, address)

    @property
    def time(self) -> float:
        sec, nsec = divmod(self.time_ns, 1_000_000_000)
        return sec + nsec * 1e-9


class PacketSocket:
    """An AF_PACKET socket: every frame on ``iface`` (None: every interface of this namespace).

    ``cooked``: SOCK_DGRAM, frames start at the network header (the link header is rebuilt
    from the address, :func:`psrv.inspect.tcpip.sll_header`); else SOCK_RAW, with the link
    header. ``snap``: bytes kept per frame (its length is always known). ``bpf``: a classic BPF
    program (:func:`bpf_tcp_ports`) that the kernel runs before the frame takes buffer space."""

    def __init__(self, iface: str | None = None, cooked: bool = False, snap: int = 262144, bpf: bytes | None = None):
        kind = socket.SOCK_DGRAM if cooked else socket.SOCK_RAW
        sock = socket.socket(socket.AF_PACKET, kind, socket.htons(ETH_P_ALL))
        try:
            if bpf:
                _attach_filter(sock, bpf)
            if iface is not None:
                sock.bind((iface, 0))
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 64 << 20)  # root: no drops in bursts
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._buf = bytearray(snap)
        self.drops()  # the kernel's counters start now

    def drain(self) -> Iterator[Frame]:
        """Every frame queued now."""
        buf, snap = self._buf, len(self._buf)
        while True:
            try:
                n, anc, _, addr = self._sock.recvmsg_into([buf], 64, socket.MSG_TRUNC)
            except BlockingIOError:
                return
            t_ns = time.time_ns()
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                    sec, nsec = struct.unpack("qq", value[:16])
                    t_ns = sec * 1_000_000_000 + nsec
            yield Frame(t_ns, addr[0], addr[2] == PACKET_OUTGOING, n, bytes(buf[: min(n, snap)]), addr)

    def run(self, on_frame: Callable[[Frame], None], stop: Callable[[], bool], poll: float = 0.1) -> None:
        """Hand every frame to ``on_frame`` until ``stop()``; then the frames still queued."""
        while not stop():
            try:
                select.select([self._sock], [], [], poll)
            except InterruptedError:
                pass
            for frame in self.drain():
                on_frame(frame)
        for frame in self.drain():
            on_frame(frame)

    def drops(self) -> int:
        """Frames the kernel dropped (buffer full) since the last call."""
        return struct.unpack("II", self._sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8))[1]

    def close(self) -> None:
        self._sock.close()


def bpf_tcp_ports(ports: set[int]) -> bytes:
    """A classic BPF program keeping TCP segments of ``ports`` (IPv4 without fragments, IPv6
    without extension headers), for a cooked packet socket (data starts at the IP header):
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


class LiveCapture:
    """Capture the TCP traffic of some ports on a Linux interface into a classic pcap
    (Linux cooked SLL link type, nanosecond timestamps, like ``tcpdump -i any``): a stand-in
    for tcpdump where there is none. Needs root (CAP_NET_RAW). With ``ports`` a BPF filter in
    the kernel keeps only their TCP segments. On ``lo`` each packet is kept once (the outgoing
    copy is dropped, as libpcap does)."""

    def __init__(self, path: str | Path, ports: set[int] | None = None, iface: str = "lo") -> None:
        self.path, self.ports, self.iface = path, ports, iface
        self.packets = 0
        self.drops = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: PacketSocket | None = None
        self._file: PcapFile | None = None

    def start(self) -> LiveCapture:
        self._sock = PacketSocket(self.iface, cooked=True, bpf=bpf_tcp_ports(self.ports) if self.ports else None)
        self._file = PcapFile(self.path, LINKTYPE_LINUX_SLL, nano=True)
        self._thread = threading.Thread(
            target=self._sock.run, args=(self._write, self._stop.is_set), name="psrv-capture", daemon=True
        )
        self._thread.start()
        return self

    def _keep(self, proto: int, pkt: bytes) -> bool:
        """The port filter again, for frames queued before the BPF filter was attached."""
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

    def _write(self, frame: Frame) -> None:
        if frame.outgoing and self.iface == "lo":
            return
        if not self._keep(frame.addr[1], frame.data):
            return
        self._file.write(sll_header(frame.addr) + frame.data, frame.time_ns)
        self.packets += 1

    def stop(self) -> dict[str, int]:
        """Stop, write out what is left, close the file; returns packets kept and kernel drops."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self.drops += self._sock.drops()
            self._sock.close()
            self._sock = None
            self._file.close()
        return {"packets": self.packets, "drops": self.drops}

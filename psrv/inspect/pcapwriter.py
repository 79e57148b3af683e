"""TCP byte streams written as a packet capture (the tap's ``--pcap``): each connection as
Ethernet/IP/TCP packets from handshake to FIN or RST, with correct sequence and
acknowledgement numbers, so that any pcap reader -- ``psrv inspect pcap``, Wireshark -- sees
the connection the tap relayed."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from psrv.inspect.pcapfile import PcapFile
from psrv.inspect.tcpip import MASK, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, Endpoint, ethernet, ip_tcp_packet

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
        self._file = PcapFile(path, snaplen=snaplen)
        self._lock = threading.Lock()
        self._ident = 0

    @property
    def packets(self) -> int:
        return self._file.packets

    def _packet(self, t_us: int, flow: TcpFlow, direction: str, flags: int, payload: bytes = b"") -> None:
        if self._file.closed:  # a connection still ending after close(): nothing more is written
            return
        src, dst = flow.ends(direction)
        seq = flow.seq[direction]
        ack = flow.seq["down" if direction == "up" else "up"]
        self._ident += 1
        self._file.write(ethernet(ip_tcp_packet(src, dst, seq, ack, flags, payload, self._ident)), t_us)

    def open_flow(self, client: Endpoint, server: Endpoint, t_us: int, isn: tuple[int, int] | None = None) -> TcpFlow:
        isn = isn or ((client[1] * 40503) & MASK, (client[1] * 2654435761) & MASK)
        flow = TcpFlow(client, server, {"up": isn[0], "down": 0})
        with self._lock:
            self._packet(t_us, flow, "up", TCP_SYN)
            flow.seq["up"] = (isn[0] + 1) & MASK
            flow.seq["down"] = isn[1]
            self._packet(t_us, flow, "down", TCP_SYN | TCP_ACK)
            flow.seq["down"] = (isn[1] + 1) & MASK
            self._packet(t_us, flow, "up", TCP_ACK)
        return flow

    def data(self, flow: TcpFlow, direction: str, data: bytes, t_us: int) -> None:
        with self._lock:
            for i in range(0, len(data), MAX_SEGMENT):
                chunk = data[i : i + MAX_SEGMENT]
                self._packet(t_us, flow, direction, TCP_PSH | TCP_ACK, chunk)
                flow.seq[direction] = (flow.seq[direction] + len(chunk)) & MASK

    def fin(self, flow: TcpFlow, direction: str, t_us: int) -> None:
        with self._lock:
            self._packet(t_us, flow, direction, TCP_FIN | TCP_ACK)
            flow.seq[direction] = (flow.seq[direction] + 1) & MASK

    def rst(self, flow: TcpFlow, direction: str, t_us: int) -> None:
        with self._lock:
            self._packet(t_us, flow, direction, TCP_RST | TCP_ACK)

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

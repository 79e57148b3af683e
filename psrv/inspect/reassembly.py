"""TCP reassembly: one direction of a connection, its bytes in sequence order, each delivered once.

Sequence numbers are compared mod 2^32: retransmitted and overlapping bytes are delivered once,
out-of-order segments wait for the gap to fill, a capture that starts mid-connection starts at
the first segment seen. A segment cut short by the snap length is a gap that never fills:
nothing after it is delivered.
"""

from __future__ import annotations

from psrv.inspect.tcpip import MASK, TCP_FIN, TCP_SYN, Segment


class HalfStream:
    """One direction of a TCP connection: bytes in sequence order, each delivered once."""

    def __init__(self) -> None:
        self.next_seq: int | None = None
        self.pending: dict[int, bytes] = {}
        self.fin_seq: int | None = None
        self.delivered = 0
        self.gap = False  # a truncated segment: nothing after it can be delivered

    def _rel(self, seq: int) -> int:
        off = (seq - self.next_seq) & MASK
        return off - (1 << 32) if off >= 1 << 31 else off

    @property
    def finished(self) -> bool:
        return self.fin_seq is not None and self.next_seq == self.fin_seq

    def add(self, seg: Segment) -> list[bytes]:
        """Take one segment of this direction; returns the bytes it makes deliverable, in order."""
        seq = seg.seq
        if seg.flags & TCP_SYN:
            if self.next_seq is None:
                self.next_seq = (seq + 1) & MASK
            seq = (seq + 1) & MASK  # data on a SYN (TCP fast open) follows the SYN's number
        if self.next_seq is None:
            if not seg.payload:
                return []
            self.next_seq = seq
        if seg.flags & TCP_FIN:
            self.fin_seq = (seq + len(seg.payload)) & MASK
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
            self.next_seq = (self.next_seq + len(data)) & MASK
            self.delivered += len(data)

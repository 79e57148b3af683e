"""Wire-level traffic inspection (``psrv inspect``): every gRPC message that crossed the wire
between workers and server, and what each part of it cost.

* :mod:`psrv.inspect.http2` — one HTTP/2 connection, both directions: frames (hyperframe),
  header blocks (hpack), gRPC messages reassembled per stream, every byte accounted for;
* :mod:`psrv.inspect.grpcmsg` — a psrv message's byte split by protobuf field (header,
  indices, values, codes, zstd) and what it says (method, worker, round, payload kind);
  :class:`~psrv.inspect.grpcmsg.ConnectionDecoder` turns a connection's bytes into records;
* :mod:`psrv.inspect.tap` — a transparent TCP proxy that logs those records while relaying;
* :mod:`psrv.inspect.pcap` — the same from a packet capture: TCP connections found,
  reassembled (:mod:`psrv.inspect.reassembly`) and decoded;
* :mod:`psrv.inspect.pcapfile` — capture files read and written (dpkt);
  :mod:`psrv.inspect.tcpip` — frames to TCP segments and back;
  :mod:`psrv.inspect.pcapwriter` — byte streams written as TCP packets (the tap's ``--pcap``);
* :mod:`psrv.inspect.live` — the AF_PACKET capture loop (a tcpdump stand-in, and the cluster's
  frame capture);
* :mod:`psrv.inspect.cli` — the ``inspect`` click group: ``tap``, ``pcap``, ``summary``, ``capture``.

See docs/wireshark.md for opening a capture in Wireshark with psrv's .proto files.
"""

from psrv.inspect.grpcmsg import BYTE_KEYS, PROTO_KEYS, ConnectionDecoder, field_split
from psrv.inspect.http2 import CONNECTION_KEYS, H2_KEYS

__all__ = ["BYTE_KEYS", "CONNECTION_KEYS", "ConnectionDecoder", "H2_KEYS", "PROTO_KEYS", "field_split"]

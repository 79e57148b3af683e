"""True bytes and packets on a host's link: tc qdisc counters, interface counters, and a frame capture.

Which counter is right (measured here, ``python -m psrv.cluster.measure --calibrate``, and in
``tests/test_cluster.py``): with segmentation offload on (the default for veth), TCP hands the device
super-packets of up to 64 KB. The **interface counters** (``ip -s link``) count each super-packet as
one packet with one set of headers, so they undercount packets many times over and bytes by the
per-frame header overhead (about 4.3% at MTU 1500). The **qdisc counters** (``tc -s qdisc``
"Sent") count ``gso_segs`` packets and add the headers of every segment (``qdisc_pkt_len``), i.e.
the frames a real NIC would put on the wire; they match the frame count computed from TCP to within
the handful of control frames (ARP, SYN, FIN). With offload off (:func:`psrv.cluster.netns.set_offload`,
like ``ethtool -K IF tso off gso off gro off``) both agree. So wire bytes are read from the root qdisc
of each direction; interface counters are reported next to them for comparison.

The frame capture (:func:`capture`, an AF_PACKET socket in the hub namespace, kernel timestamps)
is a third, independent count -- per frame, so it also times each upload on the wire
(:func:`upload_bursts`). It runs as ``ip netns exec HUB python -m psrv.cluster.counters capture``.
"""

from __future__ import annotations

import json
import math
import select
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


class CounterError(RuntimeError):
    pass


@dataclass(frozen=True)
class Count:
    bytes: int = 0
    packets: int = 0
    drops: int = 0

    def __sub__(self, other: Count) -> Count:
        return Count(self.bytes - other.bytes, self.packets - other.packets, self.drops - other.drops)


def _json(argv: list[str]) -> Any:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    if proc.returncode != 0:
        raise CounterError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout or "[]")


def _ns(netns: str | None) -> list[str]:
    return ["-n", netns] if netns else []


def qdisc_count(dev: str, netns: str | None = None) -> Count:
    """The root qdisc's "Sent" bytes/packets and its drops (frames, as a NIC would send them)."""
    for q in _json(["tc", *_ns(netns), "-s", "-j", "qdisc", "show", "dev", dev]):
        if q.get("root"):
            return Count(int(q.get("bytes", 0)), int(q.get("packets", 0)), int(q.get("drops", 0)))
    raise CounterError(f"{dev} has no root qdisc")


def link_count(dev: str, netns: str | None = None) -> dict[str, Count]:
    """Interface counters ``{"rx": Count, "tx": Count}`` (super-packets under segmentation offload)."""
    (link,) = _json(["ip", *_ns(netns), "-s", "-j", "link", "show", "dev", dev])
    stats = link["stats64"]
    return {d: Count(int(stats[d]["bytes"]), int(stats[d]["packets"]), int(stats[d]["dropped"])) for d in ("rx", "tx")}


@dataclass(frozen=True)
class Probe:
    """Where one host's traffic is counted: its interface, and the root qdiscs of its two directions."""

    iface: tuple[str, str | None]
    up: tuple[str, str | None]  # qdisc that every frame leaving the host passes
    down: tuple[str, str | None]  # qdisc that every frame entering the host passes

    def read(self) -> dict[str, Count]:
        link = link_count(*self.iface)
        return {
            "wire_tx": qdisc_count(*self.up),
            "wire_rx": qdisc_count(*self.down),
            "iface_tx": link["tx"],
            "iface_rx": link["rx"],
        }


def delta(after: dict[str, Count], before: dict[str, Count]) -> dict[str, dict[str, int]]:
    return {k: asdict(after[k] - before[k]) for k in after}


# ------------------------------------------------------------------------------------------ capture
ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35
PACKET_OUTGOING = 4
SNAP = 128  # enough for Ethernet + IPv4 + TCP headers with options
CAPTURE_FIELDS = ("t", "iface", "outgoing", "length", "frames", "payload")


def parse_frame(head: bytes, length: int, mtu: int = 1500) -> tuple[int, int, int]:
    """``(wire bytes, frames, TCP payload bytes or -1)`` for a captured frame of ``length`` bytes.

    A super-packet (``length`` > MTU + 14, segmentation offload) is counted as the frames it becomes
    on a wire: ``ceil(payload / MSS)`` frames, each with the Ethernet, IP and TCP headers."""
    if len(head) < 34 or head[12:14] != b"\x08\x00":
        return length, 1, -1
    ihl = (head[14] & 0x0F) * 4
    if head[23] != 6 or len(head) < 14 + ihl + 13:
        return length, 1, -1
    doff = (head[14 + ihl + 12] >> 4) * 4
    hdr = 14 + ihl + doff
    payload = length - hdr
    if length <= mtu + 14 or payload <= 0:
        return length, 1, payload
    mss = mtu - ihl - doff
    frames = math.ceil(payload / mss)
    return payload + frames * hdr, frames, payload


def capture(ifaces: Sequence[str], out: str, ready: Any = None) -> dict[str, Any]:
    """Record every frame on ``ifaces`` (in this namespace) until SIGTERM/SIGINT; save to ``out`` (.npz).

    One unbound AF_PACKET socket sees every interface; frames are timestamped by the kernel
    (SO_TIMESTAMPNS), so a busy reader does not skew times. Direction: ``outgoing`` means the frame
    left the interface (for the bridge side of a host's veth: it went *to* the host)."""
    index = {name: i for i, name in enumerate(ifaces)}
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE (root): no drops in bursts
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    rows: list[tuple[float, int, int, int, int, int]] = []
    buf = bytearray(SNAP)
    if ready is not None:
        print("ready", file=ready, flush=True)
    while True:
        try:
            readable, _, _ = select.select([sock], [], [], 0.2)
        except InterruptedError:
            readable = []
        if not readable:
            if stop:
                break
            continue
        while True:
            try:
                n, anc, _, addr = sock.recvmsg_into([buf], 64, socket.MSG_TRUNC | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            i = index.get(addr[0])
            if i is None:
                continue
            t = 0.0
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", data[:16])
                    t = sec + nsec * 1e-9
            wire, frames, payload = parse_frame(bytes(buf[: min(n, SNAP)]), n)
            rows.append((t, i, int(addr[2] == PACKET_OUTGOING), wire, frames, payload))
    sock.close()
    arr = np.array(rows, dtype=np.float64).reshape(-1, len(CAPTURE_FIELDS))
    np.savez(out, ifaces=np.array(list(ifaces)), **{f: arr[:, j] for j, f in enumerate(CAPTURE_FIELDS)})
    return {"frames": len(rows)}


def load_capture(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def capture_totals(cap: dict[str, np.ndarray], iface: str) -> dict[str, int]:
    """Per-host totals from a capture on the bridge side of the host's veth: tx = frames from the host."""
    names = list(cap["ifaces"])
    if iface not in names:
        return {}
    sel = cap["iface"] == names.index(iface)
    tx, rx = sel & (cap["outgoing"] == 0), sel & (cap["outgoing"] == 1)
    return {
        "tx_bytes": int(cap["length"][tx].sum()),
        "tx_packets": int(cap["frames"][tx].sum()),
        "rx_bytes": int(cap["length"][rx].sum()),
        "rx_packets": int(cap["frames"][rx].sum()),
    }


def upload_bursts(
    t: np.ndarray, payload: np.ndarray, wire: np.ndarray, rate: int | None, min_bytes: int = 0
) -> list[dict[str, float]]:
    """Uploads seen on a host's uplink: bursts of data-carrying frames (TCP payload > 0; pure ACKs
    are ignored), split where the line falls silent for longer than max(2 ms, 2.5 frame times).

    A short request that follows the upload after a pause (the next round's model request, sent
    once the server acknowledged) is cut off the end. ``seconds`` runs from the first frame's
    release by the shaper to the end of the last frame at ``rate``: the time the link was busy."""
    order = np.argsort(t)
    t, payload, wire = t[order], payload[order], wire[order]
    keep = payload > 0
    t, payload, wire = t[keep], payload[keep], wire[keep]
    if t.size == 0:
        return []
    frame_s = MTU_FRAME_BITS / rate if rate else 0.0
    gap = max(0.002, 2.5 * frame_s)
    cuts = np.flatnonzero(np.diff(t) > gap) + 1
    out = []
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, t.size], strict=True):
        lo, hi = int(lo), int(hi)
        while hi - lo > 1 and payload[hi - 1] < 300:
            own = wire[hi - 1] * 8 / rate if rate else 0.0
            if t[hi - 1] - t[hi - 2] <= own + 0.0005:
                break
            hi -= 1
        nbytes = int(wire[lo:hi].sum())
        if nbytes < min_bytes:
            continue
        last = wire[hi - 1] * 8 / rate if rate else 0.0
        out.append(
            {
                "start": float(t[lo]),
                "seconds": float(t[hi - 1] - t[lo] + last),
                "wire_bytes": nbytes,
                "payload_bytes": int(payload[lo:hi].sum()),
                "frames": hi - lo,
            }
        )
    return out


MTU_FRAME_BITS = 1514 * 8


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m psrv.cluster.counters")
    sub = ap.add_subparsers(dest="cmd", required=True)
    cap = sub.add_parser("capture", help="record frames on interfaces of this namespace until SIGTERM")
    cap.add_argument("--out", required=True)
    cap.add_argument("ifaces", nargs="+")
    show = sub.add_parser("show", help="print qdisc and interface counters of an interface")
    show.add_argument("dev")
    show.add_argument("--netns")
    args = ap.parse_args(argv)
    if args.cmd == "capture":
        print(json.dumps(capture(args.ifaces, args.out, ready=sys.stdout)), flush=True)
    else:
        out = {"qdisc": asdict(qdisc_count(args.dev, args.netns))}
        out.update({k: asdict(v) for k, v in link_count(args.dev, args.netns).items()})
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

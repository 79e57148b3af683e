"""The cluster's frame capture: every frame on the bridge side of the hosts' veths, with the
kernel's timestamps -- a count of wire bytes independent of the qdisc counters
(:mod:`psrv.cluster.counters`), per frame, so it also times each upload on the wire
(:func:`psrv.cluster.analysis.upload_bursts`).

It runs in the hub namespace, ``ip netns exec HUB python -m psrv.cluster.capture --out F IFACE...``,
on :class:`psrv.inspect.live.PacketSocket` (the capture loop ``psrv inspect capture`` uses too),
until SIGTERM/SIGINT, and saves one row per frame (:data:`CAPTURE_FIELDS`) to an .npz file.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from psrv.inspect.live import Frame, PacketSocket

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

    One unbound socket sees every interface. Direction: ``outgoing`` means the frame left the
    interface (for the bridge side of a host's veth: it went *to* the host)."""
    index = {name: i for i, name in enumerate(ifaces)}
    sock = PacketSocket(snap=SNAP)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    rows: list[tuple[float, int, int, int, int, int]] = []

    def keep(frame: Frame) -> None:
        i = index.get(frame.iface)
        if i is not None:
            wire, frames, payload = parse_frame(frame.data, frame.length)
            rows.append((frame.time, i, int(frame.outgoing), wire, frames, payload))

    if ready is not None:
        print("ready", file=ready, flush=True)
    try:
        sock.run(keep, lambda: bool(stop), poll=0.2)
    finally:
        sock.close()
    arr = np.array(rows, dtype=np.float64).reshape(-1, len(CAPTURE_FIELDS))
    np.savez(out, ifaces=np.array(list(ifaces)), **{f: arr[:, j] for j, f in enumerate(CAPTURE_FIELDS)})
    return {"frames": len(rows)}


def load_capture(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m psrv.cluster.capture", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the .npz file to write")
    ap.add_argument("ifaces", nargs="+")
    args = ap.parse_args(argv)
    print(json.dumps(capture(args.ifaces, args.out, ready=sys.stdout)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""True bytes and packets on a host's link: tc qdisc counters, interface counters, and a frame capture.

Which counter is right (measured here, ``python scripts/cluster_measure.py --calibrate``, and in
``tests/test_cluster.py``): with segmentation offload on (the default for veth), TCP hands the device
super-packets of up to 64 KB. The **interface counters** (``ip -s link``) count each super-packet as
one packet with one set of headers, so they undercount packets many times over and bytes by the
per-frame header overhead (about 4.3% at MTU 1500). The **qdisc counters** (``tc -s qdisc``
"Sent") count ``gso_segs`` packets and add the headers of every segment (``qdisc_pkt_len``), i.e.
the frames a real NIC would put on the wire; they match the frame count computed from TCP to within
the handful of control frames (ARP, SYN, FIN). With offload off (:func:`psrv.cluster.netns.set_offload`,
like ``ethtool -K IF tso off gso off gro off``) both agree. So wire bytes are read from the root qdisc
of each direction; interface counters are reported next to them for comparison.

The frame capture (:mod:`psrv.cluster.capture`, an AF_PACKET socket in the hub namespace, kernel
timestamps) is a third, independent count -- per frame, so it also times each upload on the wire.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


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


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m psrv.cluster.counters")
    sub = ap.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print qdisc and interface counters of an interface")
    show.add_argument("dev")
    show.add_argument("--netns")
    args = ap.parse_args(argv)
    out = {"qdisc": asdict(qdisc_count(args.dev, args.netns))}
    out.update({k: asdict(v) for k, v in link_count(args.dev, args.netns).items()})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

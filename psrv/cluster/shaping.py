"""Bandwidth shaping with tc, for one interface: its egress (uplink) and its ingress (downlink).

This one module shapes links for both ways of running a cluster:

- the namespace cluster (``psrv cluster run``, :mod:`psrv.cluster.run`): by default the uplink is the
  host's ``eth0`` egress and the downlink is the egress of the bridge side of the host's veth
  (``v-<host>`` in the hub namespace) -- shaping a link's far-end egress is the same as shaping
  this end's ingress, and needs no extra kernel module;
- a container (``python -m psrv.cluster.entrypoint``, docker compose), which only sees its own
  ``eth0``: the uplink is ``eth0``'s egress; the downlink is ``eth0``'s ingress, redirected to an
  ``ifb`` device whose egress is shaped (tc cannot queue, hence cannot shape, on ingress).
  ``ip link add type ifb`` loads the ifb module on most distributions; where it is missing
  (:func:`ifb_available` says so) :func:`shape_ingress` raises :class:`ShapingError`
  saying to run ``modprobe ifb`` on the (Docker) host. ``psrv cluster run --shape-at host``
  takes this path in every namespace, which is how it is tested without a Docker engine.

Every shaped or counted interface gets a root qdisc: ``tbf`` (default) or ``htb`` when a rate is
set, a plain ``pfifo`` when not. Without a qdisc (a veth's default is ``noqueue``) nothing counts
frames; with one, ``tc -s qdisc`` "Sent" counts real frames even under segmentation offload (see
:mod:`psrv.cluster.counters`).

tbf parameters: ``burst`` is max(2 full frames, 1 ms at the rate) -- small, so a rate is a rate even
right after an idle period, and a GSO super-packet larger than the burst is cut into frames by tbf
itself; the queue ``limit`` holds max(64 KB, 100 ms at the rate), so a TCP flow fills the link
without local drops.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

QDISCS = ("tbf", "htb")
MTU_FRAME = 1514  # largest Ethernet frame without FCS at MTU 1500, as qdiscs count it


class ShapingError(RuntimeError):
    """tc refused, or a needed facility (tc, ifb) is missing; the message says what to do."""


_UNITS = {
    "": 1,
    "bit": 1,
    "k": 1e3,
    "kbit": 1e3,
    "m": 1e6,
    "mbit": 1e6,
    "g": 1e9,
    "gbit": 1e9,
    "bps": 8,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
}


def parse_rate(text: str | int | float | None) -> int | None:
    """A rate in bit/s from tc's notation: ``10mbit``, ``1Mbit``, ``500kbit``, ``1gbit``, ``100``
    (bit/s); ``mbps`` etc. are *bytes* per second, as in tc. ``none``/``off``/``0``/empty: no
    shaping (None)."""
    if text is None:
        return None
    if isinstance(text, int | float):
        value = float(text)
        return None if value == 0 else _positive(value, str(text))
    s = str(text).strip().lower()
    if s in ("", "none", "off", "0", "unlimited"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)", s)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"bad rate {text!r}: use e.g. 10mbit, 500kbit, 1gbit (or none)")
    return _positive(float(m.group(1)) * _UNITS[m.group(2)], str(text))


def _positive(bps: float, text: str) -> int:
    if not math.isfinite(bps) or bps < 8000:
        raise ValueError(f"bad rate {text!r}: at least 8kbit")
    return int(round(bps))


def format_rate(bps: int | None) -> str:
    if bps is None:
        return "none"
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bps >= scale and bps % scale == 0:
            return f"{bps // int(scale)}{unit}"
    return f"{bps}bit"


def tc(netns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if shutil.which("tc") is None:
        raise ShapingError("tc not found: install iproute2")
    argv = ["tc", *(("-n", netns) if netns else ()), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    if check and proc.returncode != 0:
        raise ShapingError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _ip(netns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(("-n", netns) if netns else ()), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    if check and proc.returncode != 0:
        raise ShapingError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def tbf_params(rate: int) -> tuple[int, int]:
    """(burst, limit) in bytes for a tbf at ``rate`` bit/s (see the module docstring)."""
    per_ms = rate / 8 / 1000
    burst = max(2 * MTU_FRAME, math.ceil(per_ms))
    limit = max(64 * 1024, math.ceil(per_ms * 100)) + burst
    return burst, limit


def egress_commands(dev: str, rate: int | None, qdisc: str = "tbf") -> list[list[str]]:
    """The tc commands (without ``tc [-n NS]``) that give ``dev`` a shaping or counting root qdisc."""
    if qdisc not in QDISCS:
        raise ValueError(f"qdisc must be one of {', '.join(QDISCS)}, got {qdisc!r}")
    if rate is None:
        return [["qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "10000"]]
    burst, limit = tbf_params(rate)
    root = ["qdisc", "replace", "dev", dev, "root"]
    if qdisc == "tbf":
        return [[*root, "tbf", "rate", f"{rate}bit", "burst", str(burst), "limit", str(limit)]]
    cls = ["htb", "rate", f"{rate}bit", "ceil", f"{rate}bit", "burst", str(burst), "cburst", str(burst)]
    return [
        [*root, "handle", "1:", "htb", "default", "1"],
        ["class", "replace", "dev", dev, "parent", "1:", "classid", "1:1", *cls],
        [
            "qdisc",
            "replace",
            "dev",
            dev,
            "parent",
            "1:1",
            "handle",
            "10:",
            "pfifo",
            "limit",
            str(max(100, limit // 1000)),
        ],
    ]


def shape_egress(dev: str, rate: int | None, netns: str | None = None, qdisc: str = "tbf") -> None:
    """Limit what leaves ``dev`` to ``rate`` bit/s (None: no limit, but a counting pfifo)."""
    tc(netns, "qdisc", "del", "dev", dev, "root", check=False)
    for cmd in egress_commands(dev, rate, qdisc):
        tc(netns, *cmd)


def ifb_name(dev: str) -> str:
    return f"ifb{dev}"[:15]


def ifb_available(netns: str | None = None) -> bool:
    """Whether an ifb device can be created here (the ifb module is loaded or loadable)."""
    probe = "psrvifbprobe"
    ok = _ip(netns, "link", "add", probe, "type", "ifb", check=False).returncode == 0
    if ok:
        _ip(netns, "link", "del", probe, check=False)
    return ok


def shape_ingress(dev: str, rate: int | None, netns: str | None = None, qdisc: str = "tbf") -> str:
    """Limit what enters ``dev``: redirect its ingress to an ifb device and shape that device's egress.
    Returns the ifb device's name (its root qdisc counts the downlink's frames)."""
    ifb = ifb_name(dev)
    _ip(netns, "link", "del", ifb, check=False)
    proc = _ip(netns, "link", "add", ifb, "type", "ifb", check=False)
    if proc.returncode != 0:
        raise ShapingError(
            f"cannot shape the downlink of {dev}: no ifb device ({proc.stderr.strip()}). "
            "Load the module on the host (`modprobe ifb`) or leave the downlink rate unset."
        )
    _ip(netns, "link", "set", ifb, "up")
    tc(netns, "qdisc", "del", "dev", dev, "ingress", check=False)
    tc(netns, "qdisc", "add", "dev", dev, "handle", "ffff:", "ingress")
    # u32 "match everything": the matchall classifier is not in every kernel
    tc(netns, "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "all", "prio", "1", "u32", "match", "u32",
       "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb)  # fmt: skip
    shape_egress(ifb, rate, netns, qdisc)
    return ifb


def clear(dev: str, netns: str | None = None) -> None:
    """Remove what :func:`shape_egress` / :func:`shape_ingress` installed on ``dev``."""
    tc(netns, "qdisc", "del", "dev", dev, "root", check=False)
    clear_ingress(dev, netns)


@dataclass(frozen=True)
class Shaped:
    """Where a host's directions are counted: (device, namespace) of the root qdisc that carries them."""

    iface: str
    netns: str | None
    up: tuple[str, str | None]
    down: tuple[str, str | None] | None  # None: the downlink has no qdisc on this side


def shape_interface(dev: str, up: int | None, down: int | None, netns: str | None = None, qdisc: str = "tbf") -> Shaped:
    """Shape (or just count) both directions of ``dev`` from the host's side: egress directly,
    ingress through ifb. This is what a container's entrypoint calls. An unshaped downlink is still
    counted through ifb where ifb exists, and left alone (interface counters only) where it does not."""
    shape_egress(dev, up, netns, qdisc)
    if down is None and not ifb_available(netns):
        clear_ingress(dev, netns)
        return Shaped(dev, netns, (dev, netns), None)
    return Shaped(dev, netns, (dev, netns), (shape_ingress(dev, down, netns, qdisc), netns))


def clear_ingress(dev: str, netns: str | None = None) -> None:
    tc(netns, "qdisc", "del", "dev", dev, "ingress", check=False)
    _ip(netns, "link", "del", ifb_name(dev), check=False)


@dataclass(frozen=True)
class LinkRates:
    up: int | None = None
    down: int | None = None

    def describe(self) -> str:
        if self.up == self.down:
            return format_rate(self.up)
        return f"{format_rate(self.up)}/{format_rate(self.down)}"


def parse_link(text: str) -> LinkRates:
    """``10mbit`` (both directions) or ``UP/DOWN`` such as ``1mbit/10mbit``."""
    up, sep, down = str(text).partition("/")
    u = parse_rate(up)
    return LinkRates(u, parse_rate(down) if sep else u)


ENV_UP, ENV_DOWN, ENV_IFACE, ENV_QDISC = "PSRV_RATE_UP", "PSRV_RATE_DOWN", "PSRV_IFACE", "PSRV_QDISC"


def rates_from_env(env: Mapping[str, str]) -> LinkRates:
    """PSRV_RATE_UP / PSRV_RATE_DOWN (unset or empty: that direction is not shaped)."""
    try:
        return LinkRates(parse_rate(env.get(ENV_UP)), parse_rate(env.get(ENV_DOWN)))
    except ValueError as exc:
        raise ShapingError(f"{ENV_UP}/{ENV_DOWN}: {exc}") from None


def describe_qdiscs(dev: str, netns: str | None = None) -> Sequence[str]:
    return tc(netns, "qdisc", "show", "dev", dev, check=False).stdout.splitlines()

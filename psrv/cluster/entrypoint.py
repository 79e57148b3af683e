"""Container entrypoint: shape this host's link, then run ``psrv start-server`` or ``psrv start-worker``.

    python -m psrv.cluster.entrypoint server [start-server options...]
    python -m psrv.cluster.entrypoint worker [start-worker options...]

Environment:

- ``PSRV_RATE_UP`` / ``PSRV_RATE_DOWN``: this host's uplink / downlink rate in tc notation
  (``10mbit``, ``500kbit``); unset, empty or ``none``: that direction is not shaped (but still counted).
- ``PSRV_IFACE`` (default ``eth0``), ``PSRV_QDISC`` (``tbf`` or ``htb``, default ``tbf``).
- ``PSRV_VERBOSE=1``: run ``psrv -v`` (info logging).
- ``PSRV_EXTRA_ARGS``: more options for the command, split as a shell would (a compose override
  file adds them per service without repeating the command: ``docker-compose.tls.yml``).
- ``PSRV_COUNTERS``: if set, a JSON file to write this host's wire counters to when the run ends
  (bytes/packets through the uplink and downlink qdiscs, and the interface counters; see
  :mod:`psrv.cluster.counters`) and ``elapsed_s``, seconds from before the first reading to after the
  last. Then the command runs as a child that receives SIGTERM/SIGINT forwarded; otherwise this
  process execs it.

Shaping is :func:`psrv.cluster.shaping.shape_interface`, the code the namespace cluster uses
(``psrv cluster run --shape-at host`` runs every host through this entrypoint). It needs
CAP_NET_ADMIN (docker compose: ``cap_add: [NET_ADMIN]``); the downlink needs the ifb module on the
host (``ip link add type ifb`` usually loads it; else ``modprobe ifb`` on the Docker host).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from psrv.cluster import counters, shaping
from psrv.files import atomic_write_json

ROLES = {"server": "start-server", "worker": "start-worker"}


def command(role: str, args: Sequence[str], verbose: bool = False) -> list[str]:
    """The psrv command a role runs: ``python -m psrv [-v] start-server|start-worker ARGS``."""
    if role not in ROLES:
        raise SystemExit(f"usage: python -m psrv.cluster.entrypoint {{server|worker}} [options]; got {role!r}")
    return [sys.executable, "-m", "psrv", *(["-v"] if verbose else []), ROLES[role], *args]


def extra_args(env: Mapping[str, str]) -> list[str]:
    """``PSRV_EXTRA_ARGS``, split as a shell would."""
    return shlex.split(env.get("PSRV_EXTRA_ARGS", ""))


def option_names(args: Sequence[str]) -> list[str]:
    """The options among ``args`` (``--tls-cert``, ...), not their values: what the entrypoint says it
    added from ``PSRV_EXTRA_ARGS`` without printing paths or anything secret a value might hold."""
    return [a.split("=", 1)[0] for a in args if a.startswith("-")]


def apply_shaping(env: Mapping[str, str]) -> tuple[shaping.Shaped, shaping.LinkRates]:
    rates = shaping.rates_from_env(env)
    dev = env.get(shaping.ENV_IFACE) or "eth0"
    qdisc = env.get(shaping.ENV_QDISC) or "tbf"
    if qdisc not in shaping.QDISCS:
        raise shaping.ShapingError(f"{shaping.ENV_QDISC} must be one of {', '.join(shaping.QDISCS)}, got {qdisc!r}")
    return shaping.shape_interface(dev, rates.up, rates.down, None, qdisc), rates


def probe_of(shaped: shaping.Shaped) -> counters.Probe | None:
    if shaped.down is None:
        return None  # no qdisc sees the downlink from this side: only interface counters
    return counters.Probe((shaped.iface, None), shaped.up, shaped.down)


def _read(shaped: shaping.Shaped) -> dict[str, counters.Count]:
    probe = probe_of(shaped)
    if probe is not None:
        return probe.read()
    link = counters.link_count(shaped.iface)
    return {"wire_tx": counters.qdisc_count(*shaped.up), "iface_tx": link["tx"], "iface_rx": link["rx"]}


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    extra = extra_args(env)
    cmd = command(argv[0], [*argv[1:], *extra], verbose=env.get("PSRV_VERBOSE", "") not in ("", "0"))
    try:
        shaped, rates = apply_shaping(env)
    except shaping.ShapingError as exc:
        print(f"psrv entrypoint: {exc}", file=sys.stderr)
        return 2
    added = f"; PSRV_EXTRA_ARGS: {' '.join(option_names(extra))}" if extra else ""
    print(
        f"psrv entrypoint: {shaped.iface} up {shaping.format_rate(rates.up)}, down {shaping.format_rate(rates.down)}"
        f"{added}",
        file=sys.stderr,
        flush=True,
    )
    out = env.get("PSRV_COUNTERS")
    if not out:
        os.execv(cmd[0], cmd)  # no return
    start = time.monotonic()
    before = _read(shaped)
    child = subprocess.Popen(cmd)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    code = child.wait()
    after = _read(shaped)
    elapsed = time.monotonic() - start
    atomic_write_json(
        out,
        {
            "role": argv[0],
            "iface": shaped.iface,
            "rate_up": rates.up,
            "rate_down": rates.down,
            "exit_code": code,
            "elapsed_s": round(elapsed, 3),  # between the two reads: no rate can move more than rate x this
            "delta": counters.delta(after, before),
        },
    )
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


if __name__ == "__main__":
    raise SystemExit(main())

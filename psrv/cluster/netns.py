"""Network namespaces for a cluster on one machine: one namespace per host, joined by a bridge.

Layout (nothing is created in the root namespace: no interface, address or route)::

    <prefix>-hub     bridge br0, and one port v-<host> per host (the bridge side of its veth)
    <prefix>-<host>  lo and eth0 (the host side of the veth), address 10.213.0.x/24

``<prefix>`` is ``psrv-<pid>-<4 hex>``: unique per run, and it names the process that owns it, so
``psrv cluster clean`` can find namespaces whose owner died without cleaning up (SIGKILL).

Cleanup is guaranteed three ways: :class:`Topology` is a context manager whose ``down()`` runs in
``finally``; every live topology is also torn down by an ``atexit`` hook; and
:func:`interrupt_guard` turns SIGTERM/SIGHUP into an exception so ``finally`` blocks run on those
signals as they do on Ctrl-C. Processes started with :meth:`Topology.popen` get
``PR_SET_PDEATHSIG`` = SIGKILL, so they die with the orchestrator even if it is killed outright.
Tearing down kills every process left in the host namespaces, then deletes the namespaces; deleting
a namespace destroys its interfaces (the veth peers and the bridge go with them).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

#: The hosts' subnet. It exists only on the hub's bridge, inside namespaces this module creates.
DEFAULT_SUBNET = "10.213.0"
PREFIX_RE = re.compile(r"^psrv-(\d+)-[0-9a-f]{4}-")


class ClusterError(RuntimeError):
    """The cluster could not be built or run; the message says why and what to do."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP arrived; raised like KeyboardInterrupt so ``finally`` blocks clean up."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def require_root() -> None:
    """Fail clearly unless we may create namespaces (root, or at least CAP_NET_ADMIN + CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        raise ClusterError(
            "psrv cluster needs root: it creates network namespaces, veth links and tc qdiscs. "
            "Run it as root (e.g. `sudo psrv cluster run ...`), or use docker compose instead."
        )
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ClusterError(f"psrv cluster needs iproute2 ({', '.join(missing)} not found on PATH)")


def ip(*args: str, check: bool = True, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; on failure raise :class:`ClusterError` with ip's own message."""
    return _run(["ip", *args], check, timeout)


def _run(argv: Sequence[str], check: bool, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ClusterError(f"{argv[0]} not found: psrv cluster needs iproute2 (ip, tc)") from None
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from None
    if check and proc.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def list_netns() -> list[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(netns: str) -> list[int]:
    out = ip("netns", "pids", netns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


@dataclass(frozen=True)
class Host:
    name: str  # "server", "w0", ...
    netns: str
    ip: str
    iface: str = "eth0"  # inside ``netns``
    peer: str = ""  # the bridge side of the veth, inside the hub namespace


# -------------------------------------------------------------------------------------- live registry
_LIVE: set[Topology] = set()
_LIVE_LOCK = threading.Lock()


def _cleanup_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for topo in live:
        topo.down()


atexit.register(_cleanup_all)


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the orchestrator


class Topology:
    """One namespace per host plus a hub with a bridge. Use as a context manager::

    with Topology(["server", "w0", "w1"]) as topo:
        topo.popen("w0", ["python", "-m", "psrv", "start-worker", ...])
    """

    def __init__(self, hosts: Sequence[str], subnet: str = DEFAULT_SUBNET, prefix: str | None = None) -> None:
        if not hosts or len(set(hosts)) != len(hosts):
            raise ValueError("need distinct host names")
        if len(hosts) > 240:
            raise ValueError("at most 240 hosts fit the /24")
        for name in hosts:
            if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", name):
                raise ValueError(f"host name {name!r}: use 1-12 lowercase letters/digits")
        self.prefix = prefix or f"psrv-{os.getpid()}-{secrets.token_hex(2)}"
        self.hub = f"{self.prefix}-hub"
        self.bridge = "br0"
        self.hosts: dict[str, Host] = {
            name: Host(name, f"{self.prefix}-{name}", f"{subnet}.{10 + i}", "eth0", f"v-{name}")
            for i, name in enumerate(hosts)
        }
        self.procs: list[subprocess.Popen[Any]] = []
        self._made: list[str] = []  # namespaces created, in order
        self._down = False

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> Topology:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        require_root()
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._add_netns(self.hub)
        ip("-n", self.hub, "link", "add", self.bridge, "type", "bridge")
        # forward at once (no STP listening/learning delay) and never age out a learned MAC mid-run
        ip("-n", self.hub, "link", "set", self.bridge, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        ip("-n", self.hub, "link", "set", self.bridge, "up")
        for host in self.hosts.values():
            self._add_netns(host.netns)
            ip(
                "-n",
                self.hub,
                "link",
                "add",
                host.peer,
                "type",
                "veth",
                "peer",
                "name",
                host.iface,
                "netns",
                host.netns,
            )
            ip("-n", self.hub, "link", "set", host.peer, "master", self.bridge)
            ip("-n", self.hub, "link", "set", host.peer, "up")
            ip("-n", host.netns, "link", "set", "lo", "up")
            ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", host.iface)
            ip("-n", host.netns, "link", "set", host.iface, "up")
        for ns in [self.hub, *(h.netns for h in self.hosts.values())]:
            # no IPv6 router solicitations / DAD chatter in the byte counts
            in_netns(ns, _write_sysctl, "net/ipv6/conf/all/disable_ipv6", "1")

    def _add_netns(self, name: str) -> None:
        ip("netns", "add", name)
        self._made.append(name)

    def down(self) -> list[str]:
        """Stop every process and delete every namespace this topology made. Idempotent; never raises.
        Returns what could not be removed (empty when all is gone). A second Ctrl-C or SIGTERM while
        this runs is held back until it is done (then it acts as usual)."""
        with _signals_blocked():
            return self._down_now()

    def _down_now(self) -> list[str]:
        problems: list[str] = []
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.terminate()
        deadline = time.monotonic() + 3.0
        for p in self.procs:
            try:
                p.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=3.0)
        for ns in reversed(self._made):
            try:
                # anything still inside (grandchildren) was started by us: kill it by pid
                for _ in range(20):
                    pids = netns_pids(ns)
                    if not pids:
                        break
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    time.sleep(0.05)
                ip("netns", "del", ns, check=False)
            except ClusterError as exc:
                problems.append(f"{ns}: {exc}")
        left = set(list_netns()) & set(self._made) if self._made else set()
        problems += [f"{ns}: still present" for ns in sorted(left)]
        self._made = [ns for ns in self._made if ns in left]
        self._down = True
        with _LIVE_LOCK:
            _LIVE.discard(self)
        return problems

    # ---------------------------------------------------------------- processes
    def exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host].netns, *argv]

    def popen(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``host``'s namespace (``ip netns exec`` execs it: the pid is the program's).
        Call from the main thread: PR_SET_PDEATHSIG fires when the *thread* that forked exits."""
        kw.setdefault("start_new_session", True)  # Ctrl-C reaches the orchestrator, which stops them in order
        proc = subprocess.Popen(self.exec_argv(host, argv), preexec_fn=_set_pdeathsig, **kw)  # noqa: PLW1509
        self.procs.append(proc)
        return proc

    def hub_popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", self.hub, *argv], preexec_fn=_set_pdeathsig, **kw)  # noqa: PLW1509
        self.procs.append(proc)
        return proc


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _write_sysctl(key: str, value: str) -> None:
    # /proc/sys/net is per network namespace: the opening thread's namespace decides which one we write
    with contextlib.suppress(FileNotFoundError):  # a kernel without IPv6
        with open(f"/proc/sys/{key}", "w") as f:
            f.write(value)


# ------------------------------------------------------------------------------ run code in a namespace
_CLONE_NEWNET = 0x40000000


def in_netns(netns: str | None, fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn(*args)`` in a fresh thread that has joined ``netns`` (None: this namespace).

    setns(2) moves only the calling thread, and the thread ends with the call, so this process's
    own namespace is never changed. Sockets made by ``fn`` belong to ``netns``."""
    if netns is None:
        return fn(*args)
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            with open(f"/run/netns/{netns}") as f:
                if libc.setns(f.fileno(), _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise ClusterError(f"setns({netns}): {os.strerror(err)}")
            result.append(fn(*args))
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    t = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


# ---------------------------------------------------------------------------- segmentation offload
_SIOCETHTOOL = 0x8946
_ETHTOOL = {"tso": (0x1E, 0x1F), "gso": (0x23, 0x24), "gro": (0x2B, 0x2C)}  # (get, set) legacy commands


def _ethtool(dev: str, cmd: int, data: int = 0) -> int:
    value = (ctypes.c_uint32 * 2)(cmd, data)
    ifreq = struct.pack("16sP", dev.encode(), ctypes.addressof(value)).ljust(40, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), _SIOCETHTOOL, ifreq)
    return int(value[1])


def set_offload(dev: str, enabled: bool, netns: str | None = None) -> dict[str, bool]:
    """``ethtool -K DEV tso off gso off gro off`` (or on) without ethtool: the SIOCETHTOOL ioctl.

    With offload on, the stack hands the device 64 KB "super-packets" that are cut into frames later
    (or never, on a veth), so interface counters count one packet and one set of headers for many
    frames. Returns the resulting settings."""

    def apply() -> dict[str, bool]:
        out = {}
        for name, (get, set_) in _ETHTOOL.items():
            try:
                _ethtool(dev, set_, int(enabled))
                out[name] = bool(_ethtool(dev, get))
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        return out

    return in_netns(netns, apply)


def get_offload(dev: str, netns: str | None = None) -> dict[str, bool]:
    return in_netns(netns, lambda: {name: bool(_ethtool(dev, get)) for name, (get, _) in _ETHTOOL.items()})


# ---------------------------------------------------------------------------- signals and stale runs
@contextlib.contextmanager
def interrupt_guard() -> Iterator[None]:
    """While active, SIGTERM and SIGHUP raise :class:`Interrupted` (SIGINT already raises
    KeyboardInterrupt), so cleanup in ``finally`` runs. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_namespaces() -> list[str]:
    """Namespaces named by this module whose owning process no longer exists."""
    out = []
    for ns in list_netns():
        m = PREFIX_RE.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            out.append(ns)
    return out


def remove_namespaces(names: Sequence[str]) -> list[str]:
    """Kill what runs inside and delete each namespace; returns those removed."""
    removed = []
    for ns in names:
        for pid in netns_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if ip("netns", "del", ns, check=False).returncode == 0:
            removed.append(ns)
    return removed

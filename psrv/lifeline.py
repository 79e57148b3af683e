"""A worker process that dies with the process that launched it.

``psrv run`` starts its workers with :data:`PARENT_ENV` set to its own pid; ``start-worker`` then
calls :func:`from_env`, so a launcher that is killed (``kill -9``, out of memory) leaves no worker
running without a parent. Two mechanisms, for speed and portability:

- Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` -- the kernel kills the worker the moment its parent
  exits (set in the worker itself, not in a ``preexec_fn``, which is unsafe once the launcher
  runs gRPC threads);
- everywhere: a daemon thread that ends the process once ``os.getppid()`` is no longer the
  launcher (a dead parent's children are re-parented), within ``poll`` seconds.

Pure standard library; nothing here imports gRPC or torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading

#: the environment variable through which a launcher names itself (its pid) to a worker
PARENT_ENV = "PSRV_PARENT_PID"
PR_SET_PDEATHSIG = 1
#: the exit status of a worker whose launcher is gone (the watcher thread's way out)
ORPHANED = 70


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a worker this process launches: ``env`` (default ours) naming us."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def _pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent: int, poll: float = 1.0) -> None:
    """End this process when process ``parent`` (our launcher) is gone: at once on Linux
    (``PR_SET_PDEATHSIG``), else within ``poll`` seconds (a watcher thread). A parent that is
    already gone ends it now."""
    _pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:  # gone before the line above took effect (or not our parent at all)
        print(f"psrv: the launcher (pid {parent}) is gone; exiting", file=sys.stderr, flush=True)
        os._exit(ORPHANED)

    def watch() -> None:
        while True:
            threading.Event().wait(poll)
            if os.getppid() != parent:
                os._exit(ORPHANED)

    threading.Thread(target=watch, name="psrv-lifeline", daemon=True).start()


def from_env(poll: float = 1.0) -> bool:
    """:func:`die_with_parent` for the pid in :data:`PARENT_ENV`, if set (removed from the
    environment, so it does not reach this process's own children); True if it was set."""
    value = os.environ.pop(PARENT_ENV, "")
    if not value.strip().isdigit():
        return False
    die_with_parent(int(value), poll)
    return True

"""glibc's malloc set up for messages of tens to hundreds of megabytes.

With glibc's defaults every block over the mmap threshold (128 KiB, raised dynamically to at
most 32 MiB) is a fresh ``mmap`` and goes back to the kernel on ``free``, so each 40 MB message,
array or copy of one page-faults all its pages again (about 10,000 faults per 40 MB): psrv
measured a 40 MB round trip 5-7x slower than with the blocks kept. Threads make it worse: every
thread that allocates gets its own arena, whose heaps are at most 64 MiB, so in gRPC's handler
threads a block of that size is an ``mmap`` whatever the threshold.

:func:`tune_malloc` (called by ``psrv start-server``, ``psrv start-worker``, ``psrv run``,
:func:`psrv.server.create_server` and :func:`worker.client.run_worker`) sets, with ``mallopt``:

- ``M_MMAP_THRESHOLD`` = 1 GiB: blocks up to 1 GiB come from the heap and are reused;
- ``M_TRIM_THRESHOLD`` = 2 GiB: free memory at the top of the heap stays (up to 2 GiB);
- ``M_ARENA_MAX`` = 1: every thread allocates from the main heap (the GIL serializes most
  allocations anyway), so the first two hold in gRPC's threads too.

The price is memory that stays with the process after a peak (the heap keeps what it freed);
that is the memory the next round needs again, and it does not grow from round to round. Measured
(docs/results.md, "Big models"): a GD round at d = 1e7 with 4 workers takes half the time it
takes with glibc's defaults; at d = 1e8 a round needs half the CPU and the peak RSS of each
process is 0.9-1.7 GB higher. A variable of glibc's own (``MALLOC_*_`` or a
``glibc.malloc`` tunable in ``GLIBC_TUNABLES``) wins over psrv's value for that setting, and
``PSRV_MALLOC=default`` leaves malloc alone. On a C library without glibc's ``mallopt`` nothing
happens.
"""

from __future__ import annotations

import ctypes
import os
import threading

__all__ = ["SETTINGS", "tune_malloc"]

# mallopt parameters, <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

#: name -> (mallopt parameter, psrv's value, glibc's environment variable, glibc tunable)
SETTINGS: dict[str, tuple[int, int, str, str]] = {
    "mmap_threshold": (M_MMAP_THRESHOLD, 1 << 30, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    "trim_threshold": (M_TRIM_THRESHOLD, 2 << 30, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
    "arena_max": (M_ARENA_MAX, 1, "MALLOC_ARENA_MAX", "glibc.malloc.arena_max"),
}

_lock = threading.Lock()
_applied: dict[str, bool] | None = None


def _mallopt() -> ctypes._CFuncPtr | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl's mallopt does nothing)
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def tune_malloc() -> dict[str, bool]:
    """Apply :data:`SETTINGS` once per process; per setting, whether ``mallopt`` accepted it
    (absent: left alone, see the module docstring). Call it early, before threads start: a thread
    that has already allocated keeps its arena."""
    global _applied
    with _lock:
        if _applied is not None:
            return dict(_applied)
        _applied = {}
        mallopt = _mallopt()
        if mallopt is None or os.environ.get("PSRV_MALLOC", "") == "default":
            return {}
        tunables = os.environ.get("GLIBC_TUNABLES", "")
        for name, (param, value, env, tunable) in SETTINGS.items():
            if env in os.environ or tunable in tunables:
                continue
            _applied[name] = mallopt(param, value) == 1
        return dict(_applied)

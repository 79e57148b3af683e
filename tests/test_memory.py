"""psrv.memory: glibc's malloc keeps big blocks, in every thread, and psrv's processes set it up.

The effect is observed, not assumed: a thread that allocates and frees 40 MB twice page-faults
all of it again the second time under glibc's defaults and (almost) none of it once psrv has set
malloc up. Each check runs in a fresh interpreter, since the settings are per process.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from psrv import memory

ROOT = Path(__file__).resolve().parents[1]

try:
    ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    GLIBC = True
except AttributeError:
    GLIBC = False

needs_glibc = pytest.mark.skipif(not GLIBC, reason="mallopt settings are glibc's")

#: allocate and free 40 MB twice in a new thread; print tune_malloc's answer and the page faults
#: of the second allocation
PROBE = """
import json, resource, sys, threading
from psrv import memory
applied = memory.tune_malloc()
faults = []
def work():
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = bytearray(40_000_000)
        b = bytes(a)
        del a, b
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps({"applied": applied, "faults": faults[1:]}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("PSRV_MALLOC",)}
    clean.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout)


@needs_glibc
def test_mallopt_accepts_every_setting() -> None:
    assert _probe()["applied"] == dict.fromkeys(memory.SETTINGS, True)


@needs_glibc
def test_big_blocks_are_reused_in_threads_once_tuned() -> None:
    pages = 40_000_000 // os.sysconf("SC_PAGE_SIZE")
    default = _probe(PSRV_MALLOC="default")
    tuned = _probe()
    assert default["applied"] == {}
    assert min(default["faults"]) > pages  # both 40 MB blocks fault in again every time
    assert max(tuned["faults"]) < pages // 20, tuned  # reused: (almost) no page faults


@needs_glibc
def test_glibc_variables_win_over_psrv_settings() -> None:
    applied = _probe(MALLOC_ARENA_MAX="4", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")["applied"]
    assert applied == {"mmap_threshold": True}


def test_tune_malloc_is_applied_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(memory, "_applied", None)
    monkeypatch.setattr(memory, "_mallopt", lambda: lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.delenv("PSRV_MALLOC", raising=False)
    for name in memory.SETTINGS.values():
        monkeypatch.delenv(name[2], raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    first = memory.tune_malloc()
    assert memory.tune_malloc() == first == dict.fromkeys(memory.SETTINGS, True)
    assert calls == [(param, value) for param, value, _, _ in memory.SETTINGS.values()]


def test_server_and_worker_start_up_tune_malloc(monkeypatch: pytest.MonkeyPatch) -> None:
    from psrv.server import ParameterServer, ServerConfig, create_server
    from worker.client import WorkerConfig, run_worker

    calls = []

    def record() -> dict[str, bool]:
        calls.append(1)
        raise RuntimeError("tuned")

    monkeypatch.setattr(memory, "tune_malloc", record)
    with pytest.raises(RuntimeError, match="tuned"):
        create_server(ParameterServer(ServerConfig(num_workers=1)))
    with pytest.raises(RuntimeError, match="tuned"):
        run_worker(WorkerConfig(server="127.0.0.1:1", worker_id="w"))
    assert len(calls) == 2

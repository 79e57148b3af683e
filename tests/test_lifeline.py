"""A worker dies with its launcher (psrv.lifeline): the kernel's PR_SET_PDEATHSIG on Linux, and
the getppid watcher thread that works everywhere. Small Python processes, no torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from psrv import lifeline

pytestmark = [pytest.mark.slow, pytest.mark.process]
ROOT = str(Path(__file__).resolve().parents[1])


def gone(pid: int) -> bool:
    """No such process, or a zombie waiting to be reaped by its new parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_gone(pid: int, timeout: float) -> float:
    start = time.monotonic()
    while not gone(pid):
        assert time.monotonic() - start < timeout, f"process {pid} still running {timeout} s after its parent died"
        time.sleep(0.02)
    return time.monotonic() - start


CHILD = """
import sys, time
from psrv import lifeline
if sys.argv[1] == "thread-only":
    lifeline._pdeathsig = lambda sig: False  # as on a system without prctl
lifeline.die_with_parent(int(sys.argv[2]), poll=float(sys.argv[3]))
print("ready", flush=True)
time.sleep(120)
"""

PARENT = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], str(os.getpid()), sys.argv[3]])
print(child.pid, flush=True)
child.wait()
"""


def _parent_with_child(mode: str, poll: float) -> tuple[subprocess.Popen[str], int]:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, mode, str(poll)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    child = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "ready"  # the child armed its lifeline
    return parent, child


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kernel_kills_the_child_when_the_parent_is_killed() -> None:
    parent, child = _parent_with_child("prctl", poll=1000.0)  # the watcher thread would take 1000 s
    try:
        parent.kill()
        parent.wait()
        assert wait_gone(child, 2.0) < 2.0
    finally:
        if not gone(child):
            os.kill(child, signal.SIGKILL)


def test_watcher_thread_ends_the_child_without_prctl() -> None:
    parent, child = _parent_with_child("thread-only", poll=0.1)
    try:
        time.sleep(0.3)
        assert not gone(child)  # alive while its parent is
        parent.kill()
        parent.wait()
        assert wait_gone(child, 3.0) < 3.0
    finally:
        if not gone(child):
            os.kill(child, signal.SIGKILL)


def test_a_launcher_already_gone_ends_the_worker_at_once() -> None:
    code = "from psrv import lifeline; armed = lifeline.from_env(); print('still here', armed)"
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**env, lifeline.PARENT_ENV: "1"}, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == lifeline.ORPHANED and "still here" not in done.stdout
    assert "launcher (pid 1) is gone" in done.stderr
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "still here False"  # not started by psrv run: no-op


def test_child_env_names_this_process() -> None:
    assert lifeline.child_env({"A": "1"}) == {"A": "1", lifeline.PARENT_ENV: str(os.getpid())}

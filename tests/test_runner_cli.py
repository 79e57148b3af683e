"""``psrv run`` when things go wrong: refused before anything starts (one line), a failed algorithm
reported while the others run, Ctrl-C and kill -9 of the launcher (no worker left behind)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from psrv import lifeline, report
from psrv import runner as rn
from psrv.cli import main

PSRV = [sys.executable, "-m", "psrv"]


def children(pid: int) -> list[int]:
    """Direct children of process ``pid`` (all its threads'), zombies excluded."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return [c for c in out if not _gone(c)]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


def _finished(out: Path) -> list[str]:
    try:
        return [r["algorithm"] for r in json.loads((out / "manifest.json").read_text())["runs"]]
    except (OSError, ValueError):
        return []


# ------------------------------------------------------------------ refused before anything starts
def _refused(tmp_path: Path, *args: str) -> str:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--data", "digits", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not out.exists()  # nothing was started or written
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
    return line


def test_rounds_zero_is_a_usage_error(tmp_path: Path) -> None:
    line = _refused(tmp_path, "--rounds", "0")
    assert "--rounds" in line and "1 or more" in line


def test_more_workers_than_training_samples_is_refused(tmp_path: Path) -> None:
    csv = tmp_path / "tiny.csv"
    rows = np.random.default_rng(0).normal(size=(10, 3))
    csv.write_text("".join(f"{a:.3f},{b:.3f},{i % 2}\n" for i, (a, b, _) in enumerate(rows)))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--data", str(csv), "--workers", "9", "--out", str(out)])
    assert result.exit_code == 2 and not out.exists(), result.output
    assert "--workers 9 is more than the 8 training samples" in result.output  # 20% of 10 held out
    assert "--workers 8 or fewer" in result.output


def test_more_workers_than_memory_holds_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rn, "mem_available", lambda: 2**30)  # a machine with 1 GiB free
    line = _refused(tmp_path, "--workers", "300", "--processes", "300")  # one process per worker
    assert "--workers 300 would need about" in line and "1.0 GiB is available" in line
    found = re.search(r"\((\d+) MiB per worker process\).* pass --workers (\d+) or fewer", line)
    per, fit = int(found[1]), int(found[2])
    assert per >= rn.WORKER_FOOTPRINT / 2**20 and fit * per <= 1034 and (fit + 1) * per > 1014  # as many as fit
    assert "--no-memory-check" in line


def test_check_capacity() -> None:
    gib = 2**30
    rn.check_capacity(4, 4, gib, 4 * gib)  # fits exactly
    rn.check_capacity(400, 1000, gib, None)  # memory unknown: only the samples are checked
    with pytest.raises(rn.CapacityError, match="--workers 5 is more than the 4 training samples"):
        rn.check_capacity(5, 4, 1, None)
    with pytest.raises(rn.CapacityError, match=r"about 5\.0 GiB .* pass --workers 4 or fewer"):
        rn.check_capacity(5, 100, gib, 4 * gib + 1)


def test_worker_memory_and_timeouts_grow_with_the_job() -> None:
    assert rn.worker_memory(0, 0) == rn.WORKER_FOOTPRINT
    assert rn.worker_memory(10**8, 10**6) > rn.worker_memory(10**8, 0) > rn.worker_memory(0, 0)
    small, many, big = (
        rn.startup_timeouts(2, 10**6, 100),
        rn.startup_timeouts(20, 10**6, 100),
        rn.startup_timeouts(2, 10**9, 100),
    )
    for k in (0, 1):
        assert small[k] < many[k] and small[k] < big[k]
    assert small[0] >= 60 and small[1] >= 30


def test_mem_available_reads_meminfo() -> None:
    avail = rn.mem_available()
    if Path("/proc/meminfo").exists():
        assert avail is not None and avail > 0
    else:
        assert avail is None


def test_table_shows_status_only_when_something_did_not_finish() -> None:
    done = {"algorithm": "gd", "rounds": 3, "status": "done"}
    assert "status" not in report.table([done])
    failed = {"algorithm": "laq", "rounds": 0, "status": "failed", "error": "x"}
    table = report.table([done, failed])
    assert table.splitlines()[0].split()[-1] == "status" and table.splitlines()[-1].split()[-1] == "failed"


# ------------------------------------------------------------------ with worker processes
@pytest.mark.slow
@pytest.mark.process
def test_a_failed_algorithm_is_reported_and_the_next_one_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    for name in ("gd", "laq"):  # an earlier run's files in a reused --out
        (out / name).mkdir(parents=True)
        (out / name / "metrics.jsonl").write_text('{"round": 0, "stale": true}\n')
        np.save(out / name / "model.npy", np.zeros(3))
    (out / "summary.json").write_text('{"stale": true}')
    real = rn.run_local

    def inject(config: Any, *args: Any, **kw: Any) -> dict[str, Any]:  # gd's worker w1 cannot start
        extra = {1: ("--no-such-option",)} if config.algorithm == "gd" else None
        return real(config, *args, worker_extra=extra, **kw)

    monkeypatch.setattr(rn, "run_local", inject)
    args = ["run", "--algorithm", "gd,laq", "--data", "digits", "--workers", "2", "--rounds", "3"]
    args += ["--round-timeout", "60", "--register-timeout", "600", "--eval-every", "0", "--out", str(out)]
    start = time.monotonic()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert time.monotonic() - start < 300  # the dead worker ended gd's registration wait at once, not after 600 s
    assert "Traceback" not in result.stderr
    errors = [x for x in result.stderr.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: gd failed: worker w1 exited with code 2 before")
    assert "No such option" in errors[0] and "--no-such-option" in errors[0]  # the worker's own words, from its log
    gd, laq = json.loads((out / "summary.json").read_text())
    assert gd["status"] == "failed" and gd["rounds"] == 0 and "worker w1" in gd["error"]
    assert laq["status"] == "done" and laq["rounds"] == 3 and laq["worker_exit_codes"] == [0, 0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["algorithm"] for r in manifest["runs"]] == ["laq"]
    assert [(u["algorithm"], u["status"]) for u in manifest["unfinished"]] == [("gd", "failed")]
    assert not (out / "gd" / "model.npy").exists() and (out / "laq" / "model.npy").exists()
    assert "stale" not in (out / "gd" / "metrics.jsonl").read_text()  # this run's (no round), never the old one
    laq_lines = [json.loads(x) for x in (out / "laq" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in laq_lines] == [0, 1, 2] and all("stale" not in r for r in laq_lines)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert children(os.getpid()) == []  # every worker process of both jobs is gone


@pytest.mark.slow
@pytest.mark.process
def test_registration_timeout_is_one_line_naming_the_missing_workers(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["run", "--algorithm", "gd", "--data", "digits", "--workers", "2", "--rounds", "3"]
    result = CliRunner().invoke(main, [*args, "--register-timeout", "0.3", "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("Error:")]
    assert "registered within 0.3 s" in line and "missing w0, w1" in line and "--register-timeout 0.3" in line
    summary = json.loads((out / "summary.json").read_text())  # one algorithm: one object
    assert summary["status"] == "failed" and summary["error"] in line
    assert children(os.getpid()) == []


@pytest.mark.slow
@pytest.mark.process
def test_ctrl_c_stops_every_worker_quickly_and_keeps_what_finished(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [*PSRV, "run", "--algorithm", "gd,laq", "--data", "digits", "--workers", "2", "--rounds", "400"]
    cmd += ["--round-timeout", "60", "--eval-every", "0", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _finished(out) == ["gd"], 240, "gd to finish")
        _wait_for(lambda: _lines(out / "laq" / "metrics.jsonl") >= 1, 240, "laq's first round")
        workers = children(proc.pid)
        assert len(workers) == 2
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert took < 10, f"exit took {took:.1f} s"  # ~2.5 s measured on 2 loaded cores
    _wait_for(lambda: all(_gone(w) for w in workers), 2, "the workers to be gone")
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("Interrupted (SIGINT)")
    gd, laq = json.loads((out / "summary.json").read_text())
    assert gd["status"] == "done" and gd["rounds"] == 400
    assert laq["status"] == "interrupted" and laq["rounds"] >= 1
    lines = [json.loads(x) for x in (out / "laq" / "metrics.jsonl").read_text().splitlines()]  # whole lines
    assert laq["rounds"] - 1 <= len(lines) <= laq["rounds"]  # a round closed as the signal came may not be logged
    assert _finished(out) == ["gd"] and not (out / "laq" / "model.npy").exists()
    assert "laq" in stdout and "interrupted" in stdout  # the table


@pytest.mark.slow
@pytest.mark.process
def test_workers_die_with_a_killed_launcher(tmp_path: Path) -> None:
    """A stopped worker too (it cannot notice the lost server). Each worker is armed with the
    launcher's pid (psrv.lifeline; tests/test_lifeline.py shows that each of its mechanisms alone
    ends a child whose parent is killed)."""
    out = tmp_path / "out"
    cmd = [*PSRV, "run", "--algorithm", "gd", "--data", "digits", "--workers", "2", "--rounds", "100000"]
    proc = subprocess.Popen([*cmd, "--round-timeout", "60", "--out", str(out)], stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        _wait_for(lambda: _lines(out / "gd" / "metrics.jsonl") >= 1, 240, "the first round")
        workers = children(proc.pid)
        assert len(workers) == 2
        for w in workers:
            environ = Path(f"/proc/{w}/environ").read_bytes().split(b"\0")
            assert f"{lifeline.PARENT_ENV}={proc.pid}".encode() in environ
            os.kill(w, signal.SIGSTOP)  # it cannot notice the lost server and leave by itself
        proc.kill()  # SIGKILL: the launcher cannot clean up
        proc.wait()
        _wait_for(lambda: all(_gone(w) for w in workers), 5, "the workers to die with their launcher")
    finally:
        proc.kill()
        for w in workers:
            if not _gone(w):
                os.kill(w, signal.SIGKILL)

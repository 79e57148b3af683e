"""Checkpoint and resume with real processes: ``start-server --checkpoint-dir`` killed with SIGKILL
and started again with ``--resume`` on the same port, its worker processes (not restarted)
reconnecting by themselves and rejoining; SIGTERM makes a checkpoint and stops the server with a one-line
message; ``psrv run --resume`` goes on after a Ctrl-C."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from psrv.checkpoint import load
from psrv.cli import main
from psrv.options import JobConfig

PSRV = [sys.executable, "-m", "psrv"]
M = 2
LR = ["--lr", "0.1"]
#: LAQ with a smaller xi and 8 bits uploads about half the time on digits (at the defaults it uploads in
#: round 0 and then skips to t_bar), so the resumed run has a lazy rule's state to get right
OPTIONS = {"gd": [], "laq": ["-o", "xi=1e-05", "-o", "bits=8"]}


def _config(algorithm: str, rounds: int = 30) -> object:
    options = {"xi": 1e-05, "bits": 8.0} if algorithm == "laq" else {}
    job = JobConfig(algorithm=algorithm, lr=0.1, options=options, workers=M, rounds=rounds, round_timeout=60, seed=3)
    return job.server_config()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(port: int, job: list[str], *extra: str, log: Path) -> subprocess.Popen:
    args = [*PSRV, "start-server", *job, "--host", "127.0.0.1", "--port", str(port), *extra]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "w"), text=True)


def _worker(port: int, i: int, *extra: str) -> subprocess.Popen:
    args = [*PSRV, "start-worker", "--server", f"127.0.0.1:{port}", "--worker-id", f"w{i}", "--data", "digits",
            "--seed", "3", "--shard", f"{i}/{M}", *extra]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _saved_round(directory: Path) -> int:
    """The round of ``directory``'s checkpoint (read without a job to check it against)."""
    with np.load(directory / "checkpoint.npz", allow_pickle=False) as z:
        return json.loads(z["meta"].tobytes())["round"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait(cond, timeout: float, what: str, poll: float = 0.1) -> None:
    give_up = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def _reference(job: list[str], tmp: Path, algorithm: str) -> dict:
    """An uninterrupted run (``psrv run``, the same shards and seeds), checkpointing at its end."""
    out, ck = tmp / "out", tmp / "ref-ck"
    done = subprocess.run(
        [*PSRV, "run", *job, "--data", "digits", "--out", str(out), "--checkpoint-dir", str(ck),
         "--checkpoint-every", "0", "--eval-every", "0"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert _saved_round(ck / algorithm) == 29  # psrv run --checkpoint-dir: DIR/<algorithm>/
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.parametrize("algorithm", ["gd", "laq"])
def test_kill_9_the_server_and_resume(algorithm: str, tmp_path: Path) -> None:
    """30 rounds, a checkpoint every 5. Once 8 rounds are written, worker w1 is frozen (SIGSTOP), so
    the server waits in a round of 8 or more (a 60 s deadline) with w0's report in, and is killed
    there with SIGKILL. A server started with --resume on the same port continues from its last
    checkpoint; w1 is let go (SIGCONT) and both worker processes -- the same ones, never restarted --
    find the server gone, reconnect by themselves, rejoin (LAQ's from their rows of the sum) and
    finish the run: the metrics file holds rounds 0..29, each once, both workers exit 0, and the
    final loss is within 1% of an uninterrupted run with the same seed (measured: gd equal to the
    last bit; laq within 1e-4 relative)."""
    job = ["--algorithm", algorithm, "--workers", str(M), "--rounds", "30", "--round-timeout", "60", "--seed", "3",
           *LR, *OPTIONS[algorithm]]  # fmt: skip
    reference = _reference(job, tmp_path, algorithm)
    assert reference["rounds"] == 30
    if algorithm == "laq":  # the lazy rule at work: uploads and skips
        assert 10 <= reference["uploads"] <= 50

    port = _free_port()
    ck, metrics, summary = tmp_path / "ck", tmp_path / "metrics.jsonl", tmp_path / "summary.json"
    common = ["--checkpoint-every", "5", "--metrics", str(metrics), "--summary-json", str(summary)]
    server = _server(port, job, "--checkpoint-dir", str(ck), *common, log=tmp_path / "first.log")
    # --retry-for: long enough for the server's restart; the first registration waits for the server too
    workers = [_worker(port, i, "--retry-for", "120", "--connect-timeout", "120") for i in range(M)]
    try:
        _wait(lambda: len(_lines(metrics)) >= 8, 120, "round 8", poll=0.005)  # rounds take ~30 ms
        workers[1].send_signal(signal.SIGSTOP)
        written = -1
        while written != len(_lines(metrics)):  # the rounds w1 had reported close; then the server waits
            written = len(_lines(metrics))
            time.sleep(0.5)
        assert server.poll() is None and 8 <= written < 30
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        saved = load(ck, _config(algorithm)).state.round
        assert saved == 5 * (written // 5) - 1  # the last checkpoint before the kill

        server = _server(port, job, "--resume", str(ck), *common, log=tmp_path / "resumed.log")
        workers[1].send_signal(signal.SIGCONT)
        assert server.wait(timeout=180) == 0, (tmp_path / "resumed.log").read_text()
        codes = [w.wait(timeout=60) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGCONT)
        _stop(server, *workers)
    assert codes == [0] * M
    s = json.loads(summary.read_text())
    records = _lines(metrics)
    assert [r["round"] for r in records] == list(range(30))  # no round twice, none missing
    assert s["rounds"] == 30 and s["rejoins"] == M and s["deadline_misses"] == 0
    assert s["uploads"] == sum(r["uploads"] for r in records)
    assert abs(s["last_round_loss"] - reference["last_round_loss"]) <= 0.01 * abs(reference["last_round_loss"])
    if algorithm == "gd":  # full gradients, no state lost: the resumed run is the same run
        assert s["last_round_loss"] == reference["last_round_loss"]


@pytest.mark.slow
@pytest.mark.process
def test_a_host_of_workers_rejoins_a_resumed_server_without_a_false_mismatch(tmp_path: Path) -> None:
    """LAQ, one worker process hosting 3 logical workers (they share their replicas of the server's
    state), a checkpoint every 2 rounds. The server is killed with SIGKILL after round 8 and resumed
    on the same port: it serves again a round or two the host has already replayed, and closes them
    otherwise (every worker rejoins, and LAQ's rejoin forces an upload). The host reconnects by
    itself, no worker sees its replica disagree with the server (the host does not reuse what it
    made for the first server's closes: before it was made again, 2 of 3 runs of this test saw a
    mismatch in every worker), and the run ends: rounds 0..29 each once, all exit 0."""
    m = 3
    job = ["--algorithm", "laq", "--workers", str(m), "--rounds", "30", "--round-timeout", "60", "--seed", "3",
           "--downlink", "replica", *LR, *OPTIONS["laq"]]  # fmt: skip
    port = _free_port()
    ck, metrics, summary = tmp_path / "ck", tmp_path / "metrics.jsonl", tmp_path / "summary.json"
    common = ["--checkpoint-every", "2", "--metrics", str(metrics), "--summary-json", str(summary)]
    server = _server(port, job, "--checkpoint-dir", str(ck), *common, log=tmp_path / "first.log")
    host = subprocess.Popen(
        [*PSRV, "start-worker", "--server", f"127.0.0.1:{port}", "--data", "digits", "--seed", "3",
         "--shard", f"0-{m - 1}/{m}", "--retry-for", "120", "--connect-timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        _wait(lambda: len(_lines(metrics)) >= 8, 120, "round 8", poll=0.005)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        server = _server(port, job, "--resume", str(ck), *common, log=tmp_path / "resumed.log")
        assert server.wait(timeout=180) == 0, (tmp_path / "resumed.log").read_text()
        out, _ = host.communicate(timeout=60)
    finally:
        _stop(server, host)
    assert host.returncode == 0
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(results) == m and all(r["reconnects"] == 1 for r in results), results
    assert [r["digest_mismatches"] for r in results] == [0] * m, results
    assert [r["round"] for r in _lines(metrics)] == list(range(30))
    assert json.loads(summary.read_text())["rejoins"] == m


@pytest.mark.slow
@pytest.mark.process
def test_sigterm_checkpoints_and_stops(tmp_path: Path) -> None:
    """SIGTERM while training: the server finishes the round in progress, checkpoints it and exits 1
    with one line naming the round and the checkpoint; the checkpoint holds that round and the
    metrics' lines."""
    port = _free_port()
    ck, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    job = ["--algorithm", "gd", "--workers", "1", "--rounds", "100000", "--round-timeout", "60"]
    server = subprocess.Popen(
        [*PSRV, "start-server", *job, "--host", "127.0.0.1", "--port", str(port), "--checkpoint-dir", str(ck),
         "--checkpoint-every", "0", "--metrics", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    worker = subprocess.Popen(
        [*PSRV, "start-worker", "--server", f"127.0.0.1:{port}", "--worker-id", "w0", "--data", "digits"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait(lambda: len(_lines(metrics)) >= 5, 120, "five rounds")
        assert not (ck / "checkpoint.npz").exists()  # --checkpoint-every 0: none yet
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=20)
    finally:
        _stop(server, worker)
    assert server.returncode == 1
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in err and "stopped by SIGTERM after round" in lines[0], err
    k = int(lines[0].split("after round ")[1].split(";")[0])
    ckpt = load(ck, JobConfig(algorithm="gd", workers=1, rounds=100000, round_timeout=60).server_config())
    assert ckpt.state.round == k and ckpt.metrics_lines == k + 1 == len(_lines(metrics))


@pytest.mark.slow
@pytest.mark.process
def test_psrv_run_resumes_after_ctrl_c(tmp_path: Path) -> None:
    """``psrv run --algorithm gd,laq --checkpoint-dir CK`` stopped by SIGINT while laq trains (gd has
    finished), then the same command with ``--resume CK``: gd keeps its summary (not run again), laq
    goes on from its last checkpoint with new workers that rejoin, and its metrics file holds every
    round once; the summary says done for both, with the rounds counted once."""
    out, ck = tmp_path / "out", tmp_path / "ck"
    cmd = [*PSRV, "run", "--algorithm", "gd,laq", "--data", "digits", "--workers", str(M), "--rounds", "100",
           "--round-timeout", "60", "--seed", "3", *LR, "--eval-every", "0", "--out", str(out),
           "--checkpoint-every", "5"]  # fmt: skip
    laq_metrics = out / "laq" / "metrics.jsonl"
    first = subprocess.Popen([*cmd, "--checkpoint-dir", str(ck)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        _wait(lambda: len(_lines(laq_metrics)) >= 12, 240, "laq's round 12", poll=0.01)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
    finally:
        _stop(first)
    assert first.returncode == 130, err
    gd, laq = json.loads((out / "summary.json").read_text())
    assert gd["status"] == "done" and laq["status"] == "interrupted" and laq["rounds"] < 100
    saved = _saved_round(ck / "laq")
    assert 10 <= saved + 1 <= laq["rounds"]
    gd_model = (out / "gd" / "model.npy").read_bytes()

    second = subprocess.run([*cmd, "--resume", str(ck)], capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "gd  finished before (--resume)" in second.stderr
    gd2, laq2 = json.loads((out / "summary.json").read_text())
    assert gd2 == gd and (out / "gd" / "model.npy").read_bytes() == gd_model  # kept, not trained again
    records = _lines(laq_metrics)
    assert [r["round"] for r in records] == list(range(100))  # the rounds before the checkpoint kept, once
    assert laq2["status"] == "done" and laq2["rounds"] == 100 and laq2["rejoins"] == M
    assert laq2["uploads"] == sum(r["uploads"] for r in records)
    assert laq2["worker_exit_codes"] == [0] * M and (out / "laq" / "model.npy").exists()
    assert [r["algorithm"] for r in json.loads((out / "manifest.json").read_text())["runs"]] == ["gd", "laq"]


def test_psrv_run_resume_with_nothing_to_resume_is_refused(tmp_path: Path) -> None:
    """A --resume DIR without checkpoints of these algorithms (a wrong DIR) is refused before anything
    starts or is cleared, rather than starting every algorithm over."""
    out = tmp_path / "out"
    (out / "gd").mkdir(parents=True)
    (out / "gd" / "metrics.jsonl").write_text('{"round": 0}\n')
    result = CliRunner().invoke(main, ["run", "--algorithm", "gd", "--data", "digits", "--rounds", "5", "--out",
                                       str(out), "--resume", str(tmp_path / "nowhere")])  # fmt: skip
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert "--resume: nothing to resume" in line and "checkpoint.npz for gd" in line
    assert "Traceback" not in result.output
    assert (out / "gd" / "metrics.jsonl").read_text() == '{"round": 0}\n'  # nothing cleared

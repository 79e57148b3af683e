"""The commands a user types, run as processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PSRV = [sys.executable, "-m", "psrv"]


@pytest.mark.slow
@pytest.mark.process
def test_run_writes_summary_and_metrics(tmp_path: Path) -> None:
    summary = tmp_path / "s.json"
    cmd = [
        *PSRV,
        "run",
        "--algorithm",
        "laq",
        "--data",
        "digits",
        "--workers",
        "2",
        "--rounds",
        "5",
        "--round-timeout",  # no round may end without a report on a loaded machine: uploads + skips == 10
        "60",
        "--out",
        str(tmp_path / "out"),
        "--summary-json",
        str(summary),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "laq" in done.stdout and "bytes up" in done.stdout
    s = json.loads(summary.read_text())
    for key in (
        "algorithm",
        "rounds",
        "uploads",
        "skips",
        "payload_bits",
        "bytes_up",
        "bytes_down",
        "final_loss",
        "accuracy",
    ):
        assert key in s
    assert s["rounds"] == 5 and s["uploads"] + s["skips"] == 10
    assert len((tmp_path / "out" / "laq" / "metrics.jsonl").read_text().splitlines()) == 5
    png = tmp_path / "out" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    replot = subprocess.run(
        [*PSRV, "plot", str(tmp_path / "out"), "--out", str(tmp_path / "again.png")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert replot.returncode == 0 and (tmp_path / "again.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.process
def test_bad_data_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,0\n3,oops,1\n")
    done = subprocess.run([*PSRV, "run", "--data", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "bad.csv" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run(
        [*PSRV, "run", "--data", str(tmp_path / "missing.npz")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "missing.npz" in done.stderr and "Traceback" not in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.process
def test_separate_server_and_worker_processes(tmp_path: Path) -> None:
    port = _free_port()
    summary = tmp_path / "server.json"
    server = subprocess.Popen(
        [
            *PSRV,
            "start-server",
            "--algorithm",
            "topk-ef",
            "-o",
            "ratio=0.1",
            "--workers",
            "2",
            "--rounds",
            "4",
            "--round-timeout",  # no round may end without a report on a loaded machine: uploads == 8
            "60",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--summary-json",
            str(summary),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    workers = [
        subprocess.Popen(
            [
                *PSRV,
                "start-worker",
                "--server",
                f"127.0.0.1:{port}",
                "--worker-id",
                f"w{i}",
                "--data",
                "digits",
                "--shard",
                f"{i}/2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [w.communicate(timeout=120) for w in workers]
        server.communicate(timeout=60)
    finally:
        for p in [server, *workers]:
            p.kill()
    assert server.returncode == 0 and all(w.returncode == 0 for w in workers), outs
    s = json.loads(summary.read_text())
    assert s["rounds"] == 4 and s["uploads"] == 8
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    # each worker's own count of bytes it sent equals its share of the server's count
    assert sum(r["bytes_up"] for r in reports) == s["bytes_up"]
    assert sum(r["bytes_down"] for r in reports) == s["bytes_down"]


def test_cost_to_reach_a_target() -> None:
    from psrv.report import cost_to_reach, table

    records = [
        {"round": k, "uploads": 2, "payload_bits": 10, "bytes_up": 5, "elapsed": 0.1 * k, "accuracy": acc}
        for k, acc in enumerate([0.5, None, 0.7, 0.9])
    ]
    hit = cost_to_reach(records, "accuracy", 0.7)
    assert hit == {
        "target": 0.7,
        "rounds": 3,
        "uploads": 6,
        "payload_bits": 30,
        "bytes_up": 15,
        "elapsed": pytest.approx(0.2),
    }
    assert cost_to_reach(records, "accuracy", 0.95) is None
    loss = [{**r, "train_loss": 1.0 / (r["round"] + 1)} for r in records]
    assert cost_to_reach(loss, "train_loss", 0.5)["rounds"] == 2
    text = table([{"algorithm": "x", "to_accuracy": hit}, {"algorithm": "y", "to_accuracy": None}])
    assert "rounds to accuracy 0.7" in text.splitlines()[0]

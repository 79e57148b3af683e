"""scripts/soak.py at small numbers: a real server process and worker threads, the figures it prints
and the JSON it writes (the benchmark itself, 32 workers x 1,000 rounds, is run by hand)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.process]

ROOT = Path(__file__).resolve().parents[1]


def test_soak_runs_a_small_job_and_reports_rss_and_fds(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "soak.py"), "--workers", "2", "--rounds", "150", "--every", "0.02"]
    cmd += ["--warmup", "5", "--timeout", "240", "--max-growth", "1000", "--json", str(out), "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, 1), run.stdout + run.stderr  # 1: a target missed on a loaded machine
    result = json.loads(out.read_text())
    assert result["server_exit"] == 0 and not result["timed_out"] and not result["worker_errors"]
    assert result["rounds_closed"] == 150 == len((tmp_path / "metrics.jsonl").read_text().splitlines())
    assert "soak: 2 workers x 150/150 rounds (gd on digits)" in run.stdout
    series = result["series"]
    assert series and all(s["rss_kib"] > 0 and s["fds"] >= 3 for s in series)
    if "rss_growth_pct" in result:  # samples fell while it trained (150 rounds take about a second)
        assert "server RSS" in run.stdout and result["rss_end_mb"] > 0 and result["fds_warm"] > 3
        assert result["warm_round"] >= 5 and result["end_round"] < 150

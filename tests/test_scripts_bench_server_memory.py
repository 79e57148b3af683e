"""scripts/bench_server_memory.py at a small model: one subprocess per row, the table, the JSON, and
the checkout whose psrv it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.process]

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_every_configuration_on_this_checkout(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_server_memory.py"), "--code", f"here={ROOT}"]
    cmd += ["--n-features", "999", "--workers", "2", "3", "--rounds", "2", "--json", str(out)]
    cmd += ["--downlinks", "auto", "dense"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    assert "d = 10,000, 2 rounds" in run.stdout
    rows = json.loads(out.read_text())
    assert [(r["algorithm"], r["downlink"], r["order"], r["workers"]) for r in rows] == [
        (a, dl, o, m) for a in ("laq", "sasg") for dl in ("auto", "dense") for o in ("slot", "reverse") for m in (2, 3)
    ]
    for r in rows:
        assert Path(r["psrv"]) == ROOT and r["dim"] == 10_000 and r["rounds"] == 2
        assert r["uploads"] == 2 * r["workers"] and r["peak_mb"] >= r["baseline_mb"] > 0

"""scripts/bench_changed.py at a tiny size: a row per changed fraction, both ways timed, and the
count it prints is the number of coordinates changed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_tiny_run_times_both_ways(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_changed as bench

    assert bench.main(["--dim", "200000", "--fractions", "0.01,1", "--repeat", "2"]) == 0
    rows = re.findall(r"^\| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \|$", capsys.readouterr().out, re.M)
    assert [r[0] for r in rows] == ["2,000", "200,000"]

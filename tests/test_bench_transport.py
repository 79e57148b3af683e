"""scripts/bench_transport.py end to end at a tiny dimension: psrv's GD round against the raw-TCP
round and the unary/stream transfers run, and report what they measured."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_transport.py"


def _run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--dim", "1e3", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
@pytest.mark.process
def test_gd_round_psrv_against_raw_tcp() -> None:
    text = _run("--workers", "2", "--rounds", "3", "--warmup", "1", "--malloc", "tuned")
    for mode in ("psrv", "raw"):
        m = re.search(rf"{mode}/tuned: median round +([\d.]+) ms, exchange +([\d.]+) ms, CPU +(\d+) ms/round", text)
        assert m, text
        assert 0 < float(m.group(2)) <= float(m.group(1))
    assert re.search(r"malloc=tuned: psrv / raw TCP = [\d.]+ \(round time\)", text), text


@pytest.mark.slow
@pytest.mark.process
def test_transfers_use_the_form_they_name() -> None:
    text = _run("--modes", "unary,stream", "--rounds", "2", "--warmup", "0")
    assert "unary: model" in text and "methods GetModel, Push, Register" in text
    assert "stream: model" in text and "methods GetModelStream, PushStream, Register" in text

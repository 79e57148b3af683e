"""psrv.api: ``psrv.run`` runs a job like ``psrv run`` and returns its summary and records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import psrv

EXAMPLE = "examples/my_model.py:make"
SAME = ("algorithm", "rounds", "uploads", "skips", "payload_bits", "upload_bytes", "bytes_up", "test_samples")


def test_bad_arguments_raise_before_any_worker_starts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown algorithm"):
        psrv.run(task=EXAMPLE, algorithm="nope", out=tmp_path)
    with pytest.raises(ValueError, match="no such file"):
        psrv.run(task="missing.py:make", out=tmp_path)
    with pytest.raises(ValueError, match="brings its own data"):
        psrv.run(task=EXAMPLE, data="digits", out=tmp_path)
    with pytest.raises(ValueError, match="--workers 2000 is more than the 1438 training samples"):
        psrv.run(data="digits", workers=2000, out=tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.process
def test_python_api_returns_the_summary_of_the_cli(tmp_path: Path) -> None:
    args = ["--task", EXAMPLE, "--algorithm", "laq", "--workers", "2", "--rounds", "6", "--lr", "0.5", "--seed", "3"]
    cli_json = tmp_path / "cli.json"
    cmd = [sys.executable, "-m", "psrv", "run", *args, "--out", str(tmp_path / "cli"), "--summary-json", str(cli_json)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    cli = json.loads(cli_json.read_text())
    result = psrv.run(task=EXAMPLE, algorithm="laq", workers=2, rounds=6, lr=0.5, seed=3, eval_every=2)
    api = result.summary
    assert {k: api[k] for k in SAME} == {k: cli[k] for k in SAME} and api["config"] == cli["config"]
    np.testing.assert_array_equal(result.model, np.load(tmp_path / "cli" / "laq" / "model.npy"))  # bit for bit
    # The same θ, evaluated in float32 by two processes: torch's reductions follow the process's
    # thread count (the test process runs torch on one thread), so the last bits may differ.
    assert api["final_loss"] == pytest.approx(cli["final_loss"], rel=1e-6)
    assert api["accuracy"] == pytest.approx(cli["accuracy"], abs=1e-9)
    assert [r["round"] for r in result.records] == list(range(6))
    assert [r["round"] for r in result.records if "accuracy" in r] == [1, 3, 5]
    assert result.model.dtype.name == "float64" and result.model.ndim == 1

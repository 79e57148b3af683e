"""examples/: each example runs (briefly: few rounds, two workers) as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.process]

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, **extra}


def test_cnn_on_the_mnist_digits(tmp_path: Path) -> None:
    env = _env(ROUNDS="2", WORKERS="2", ALGORITHMS="sgd", OUT=str(tmp_path))
    subprocess.run(["bash", "examples/cnn_mnist.sh"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["config"]["server"]["task"] == "cnn"
    assert summary["config"]["data"]["data"] == "mnist"


def test_custom_model_from_a_user_file(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "psrv", "run", "--task", "examples/my_model.py:make", "--algorithm", "gd"]
    cmd += ["--workers", "2", "--rounds", "20", "--lr", "0.5", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=300)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["data"]["data"] == "examples/my_model.py:make"  # the factory's own data
    assert summary["test_samples"] == 200 and summary["accuracy"] > 0.8


def test_python_api_script() -> None:
    cmd = [sys.executable, "examples/api_script.py", "--rounds", "3", "--workers", "2"]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, capture_output=True, text=True, timeout=300).stdout
    assert out.count("test accuracy") == 2 and "laq:" in out

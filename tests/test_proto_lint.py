"""``buf lint`` (buf.yaml: the STANDARD rules and a comment on every service, RPC, message and enum)
finds nothing in protos/. buf comes with the dev extra (``buf-bin``); without it the test skips."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_buf_lint_is_clean() -> None:
    buf = shutil.which("buf")
    if buf is None:
        pytest.skip("buf is not installed (pip install buf-bin)")
    res = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and not res.stdout.strip(), f"buf lint:\n{res.stdout}{res.stderr}"

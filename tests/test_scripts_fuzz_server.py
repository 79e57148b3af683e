"""scripts/fuzz_server.py at a small size: the decoder and a live server, the counts it prints and
writes, and the properties it checks (it exits 0 only when every one held)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.process]

ROOT = Path(__file__).resolve().parents[1]


def test_the_fuzz_script_counts_every_message(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "fuzz_server.py"), "--calls", "40", "--decoder", "50"]
    cmd += ["--algorithms", "gd", "--seed", "1", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    counts = json.loads(out.read_text())
    assert sum(counts["decoder"].values()) == 50
    server = counts["servers"]["gd"]
    assert server["calls"] == 40 and sum(server["statuses"].values()) == 40
    assert server["messages"] >= 40 and counts["messages"] == 50 + server["messages"]
    assert not any(s.endswith(("UNKNOWN", "INTERNAL")) for s in server["statuses"])
    assert f"all: {counts['messages']} hostile messages, 0 crashes, 0 hangs" in run.stdout

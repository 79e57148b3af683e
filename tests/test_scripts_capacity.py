"""scripts/capacity.py: a small run (a real server, the asyncio load generator), its rows, and the
split of a profile into parts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import capacity  # noqa: E402


def test_profile_split_groups_functions_by_part(tmp_path: Path) -> None:
    rows = [
        ["/x/psrv/engine.py:RoundEngine.skip", 2.0, 2.5, 10],
        ["/x/psrv/engine.py:RoundEngine._close_round", 1.0, 1.0, 1],
        ["/site-packages/grpc/_server.py:_send_response", 3.0, 4.0, 10],
        ["builtins:<method 'acquire' of '_thread.lock' objects>", 4.0, 4.0, 40],
        ["builtins:len", 0.0, 0.0, 5],
    ]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(rows))
    parts = capacity.split_profile(path)
    assert parts["engine: skip/push, absorb"] == pytest.approx(0.2)
    assert parts["engine: round close + metrics record"] == pytest.approx(0.1)
    assert parts["gRPC Python (grpc/_server.py, _common, cygrpc calls)"] == pytest.approx(0.3)
    assert parts["threading, queue, locks (incl. GIL hand-offs)"] == pytest.approx(0.4)
    assert sum(parts.values()) == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.process
def test_a_small_run_measures_the_server(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "capacity.py"), "--workers", "3", "--algorithms", "laq", "sasg"]
    cmd += ["--rounds", "8", "--warmup", "3", "--timeout", "240", "--keep", str(tmp_path), "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True, cwd=ROOT)
    assert "server CPU ms" in run.stdout
    rows = json.loads(out.read_text())
    assert [(r["algorithm"], r["workers"], r["dim"]) for r in rows] == [("laq", 3, 7850), ("sasg", 3, 7850)]
    for r in rows:
        assert r["rounds_measured"] == 8 - 1 - 3
        assert r["server_cpu_ms"] > 0 and r["wall_ms"] > 0 and r["loadgen_cpu_ms"] >= 0
        assert 3 <= r["uploads"] <= 3 * 8  # round 0: all three; then a few
        metrics = [json.loads(x) for x in (tmp_path / f"{r['algorithm']}-3-784x10.jsonl").read_text().splitlines()]
        assert len(metrics) == 8 and metrics[0]["uploads"] == 3
        assert sum(m["uploads"] for m in metrics) == r["uploads"]  # every upload the generator sent was absorbed

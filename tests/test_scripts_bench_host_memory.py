"""scripts/bench_host_memory.py at a tiny size: a server and one host process per M, a row each
with the host's and the server's peak RSS and the rounds' median time."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.mark.slow
@pytest.mark.process
def test_tiny_run_gives_a_row_per_worker_count(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_host_memory as bench

    assert bench.main(["--dim", "200", "--workers", "2,1", "--rounds", "3", "--timeout", "300"]) == 0
    text = capsys.readouterr().out
    assert "# dim 200, LAQ, replica downlink, 3 rounds" in text
    rows = re.findall(r"^\| (\d+) \| (\d+) MiB \| (\S+) MiB \| (\d+) MiB \| ([\d.]+) ms \|$", text, re.M)
    assert [r[0] for r in rows] == ["1", "2"], text  # sorted
    assert all(int(host) > 0 and int(server) > 0 for _, host, _, server, _ in rows)
    assert rows[0][2] == "nan" and re.fullmatch(r"-?[\d.]+", rows[1][2])

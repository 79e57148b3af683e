"""scripts/bench_worker_step.py at tiny sizes: the plain step and every psrv step are timed, and the
breakdown adds up to about the whole step."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_tiny_run_reports_plain_psrv_and_the_breakdown(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_worker_step as bench

    argv = ["--models", "cnn,wide", "--width", "16", "--batch", "8", "--repeats", "3", "--warmup", "1"]
    assert bench.main(argv) == 0
    text = capsys.readouterr().out
    assert "command: python scripts/bench_worker_step.py --models cnn,wide" in text
    for model in ("cnn (LeNet-5) on MNIST digits: d = 61,706", "wide (width 16) on synthetic"):
        assert model in text
    assert len(re.findall(r"plain step \(zero_grad, forward, backward, SGD step\): \*\*[\d.]+ ms\*\*", text)) == 2
    for name in ("sgd", "laq", "topk-ef"):
        row = rf"^\| {name} \| ([\d.]+) \| [+-][\d.]+ \| [+-][\d.]+% \|((?: [\d.]+ \|){{6}}) [\d.]+ \| [\d.]+% \|$"
        rows = re.findall(row, text, re.M)
        assert len(rows) == 2, text
        for step, stages in rows:
            assert float(step) > 0 and all(float(s) >= 0 for s in stages.split("|") if s.strip())

"""psrv.bench: one row per compressor (or a skip note), wire sizes close to the formulas."""

from __future__ import annotations

import io

import pytest

from psrv import bench
from psrv.compress import COMPRESSORS, make_compressor


def _buildable() -> list[str]:
    names = []
    for name in sorted(COMPRESSORS):
        try:
            make_compressor(name)
        except Exception:
            continue
        names.append(name)
    return names


def test_bench_prints_a_row_per_compressor_with_sane_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--dims", "1e4", "--repeat", "1"]) == 0
    text = capsys.readouterr().out
    rows = {}
    for line in text.splitlines():
        cells = line.split()
        if len(cells) == 7 and cells[1] == "10000":
            rows[cells[0]] = cells
    for name in COMPRESSORS:
        assert name in rows or f"note: skipped {name}" in text, f"no row and no note for {name}"
    for name in _buildable():
        assert name in rows
    assert "laq(b=3)" in rows
    for name, (_, _, enc, dec, nbytes, formula, ratio) in rows.items():
        assert float(enc) >= 0 and float(dec) >= 0
        assert int(nbytes) > 0 and float(formula) > 0
        assert 0.1 <= float(ratio) <= 2.0, f"{name}: ratio {ratio}"  # < 1: entropy-coded indices
        assert float(ratio) == pytest.approx(int(nbytes) / float(formula), rel=1e-3)
    # the exact top-k and LAQ wire formats carry at most a few header bytes beyond the formula
    assert float(rows["topk"][6]) < 1.1 and float(rows["laq(b=3)"][6]) < 1.01
    targets = [line for line in text.splitlines() if line.startswith("target ")]
    assert len(targets) == 2 and all(line.endswith(("PASS", "FAIL")) for line in targets)


def test_bench_selected_compressors_and_unknown_names() -> None:
    out = io.StringIO()
    rows = bench.run([1000, 2000], 1, ["topk", bench.LAQ_ROW, "no-such-compressor"], "cauchy", out)
    assert [(r[0], r[1]) for r in rows] == [("topk", 1000), ("laq(b=3)", 1000), ("topk", 2000), ("laq(b=3)", 2000)]
    assert "note: skipped no-such-compressor" in out.getvalue()


def test_bench_parses_dims() -> None:
    assert bench._dims("1e6,1e7") == [10**6, 10**7]
    assert bench._dims("1000") == [1000]

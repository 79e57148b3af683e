"""psrv.bench: one row per compressor (or a skip note), wire sizes close to the formulas."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from psrv import bench, codec
from psrv.compress import COMPRESSORS, make_compressor
from psrv.payload import to_dense
from psrv.v1 import psrv_pb2 as pb


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
        assert 0 <= float(enc) < math.inf and 0 <= float(dec) < math.inf  # printed to 0.01 ms: 0.00 can be fine
        assert int(nbytes) > 0 and float(formula) > 0
        assert 0.1 <= float(ratio) <= 2.0, f"{name}: ratio {ratio}"  # < 1: entropy-coded indices
        assert float(ratio) == pytest.approx(int(nbytes) / float(formula), rel=1e-3)
    # the exact top-k and LAQ wire formats carry at most a few header bytes beyond the formula
    assert float(rows["topk"][6]) < 1.1 and float(rows["laq(b=3)"][6]) < 1.01
    targets = [line for line in text.splitlines() if line.startswith("target ")]
    assert len(targets) == 2 and all(line.endswith(("PASS", "FAIL")) for line in targets)


def test_bench_times_real_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the benchmark times is the round trip itself: its encode gives an Upload that decodes to
    the compressed input, its decode rebuilds that vector (x itself for dense; a vector along x for
    the others, along the innovation x - Q_prev for LAQ), and every figure is positive and finite."""
    outputs: list[object] = []  # what each timed function returned: encode, decode, encode, ...
    real = bench.median_ms

    def spy(fn, repeat: int) -> float:
        outputs.append(fn())
        return real(fn, repeat)

    monkeypatch.setattr(bench, "median_ms", spy)
    d = 20_000  # a decoder that mixed up indices or signs would give |cos| ~ 1/sqrt(d) = 0.007
    names = _buildable()
    rows = bench.run([d], 1, [*names, bench.LAQ_ROW], "normal", io.StringIO())
    assert [r[0] for r in rows] == [*names, "laq(b=3)"] and len(outputs) == 2 * len(rows)
    x = bench.make_vector(d, "normal").astype(np.float64)
    for (name, dim, enc, dec, nbytes, formula, ratio), wire, decoded in zip(
        rows, outputs[::2], outputs[1::2], strict=True
    ):
        assert dim == d and 0 < enc < math.inf and 0 < dec < math.inf, name
        assert nbytes > 0 and 0 < formula < math.inf and 0 < ratio < math.inf, name
        assert isinstance(wire, bytes) and isinstance(decoded, np.ndarray) and decoded.shape == (d,), name
        target = x - bench.previous_q(d) if name == "laq(b=3)" else x
        for v in (to_dense(codec.upload_from_proto(pb.PushRequest.FromString(wire), d)), decoded):
            assert np.isfinite(v).all(), name
            cos = v @ target / (np.linalg.norm(v) * np.linalg.norm(target))
            assert cos > 0.05, (name, cos)  # measured: randk 0.09, qsgd 0.19, top-k 0.29, LAQ 0.95
        if name == "dense":
            np.testing.assert_array_equal(decoded, x)


def test_bench_selected_compressors_and_unknown_names() -> None:
    out = io.StringIO()
    rows = bench.run([1000, 2000], 1, ["topk", bench.LAQ_ROW, "no-such-compressor"], "cauchy", out)
    assert [(r[0], r[1]) for r in rows] == [("topk", 1000), ("laq(b=3)", 1000), ("topk", 2000), ("laq(b=3)", 2000)]
    assert "note: skipped no-such-compressor" in out.getvalue()


def test_bench_parses_dims() -> None:
    assert bench._dims("1e6,1e7") == [10**6, 10**7]
    assert bench._dims("1000") == [1000]

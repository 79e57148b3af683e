"""The shipped reproduction configs (experiments/*.toml, docs/reproductions.md) parse and expand.

Fast: ``psrv experiment CONFIG --dry-run`` only (nothing is trained), plus a check that every method's
algorithm accepts its options and compressor, which the dry run's argv check cannot see (algorithm
options are numbers that only the algorithm's factory validates). Running the configs in full takes
minutes each and is documented, not tested."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from psrv.algorithms import make_algorithm
from psrv.cli import main
from psrv.keyvalue import parse_key_values

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "experiments").glob("*.toml"))


def test_the_reproductions_are_shipped() -> None:
    names = {p.stem for p in CONFIGS}
    assert {
        "laq-table2",
        "laq-table3",
        "sasg-table2",
        "cat-figure2",
        "fedavg-noniid",
        "own-model-cnn",
        "own-model-charlm",
    } <= names
    doc = (ROOT / "docs" / "reproductions.md").read_text()
    for name in names:
        assert f"experiments/{name}.toml" in doc, f"docs/reproductions.md does not show how to run {name}"


def _options(*tables: dict) -> dict[str, float]:
    merged: dict[str, object] = {}
    for t in tables:
        merged.update(t.get("option", {}))
    return parse_key_values([f"{k}={v}" for k, v in merged.items()])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_expands_into_runs(path: Path, tmp_path: Path) -> None:
    cfg = tomllib.loads(path.read_text())
    result = CliRunner().invoke(main, ["experiment", str(path), "--dry-run", "--out", str(tmp_path / "exp")])
    assert result.exit_code == 0, result.output
    methods = cfg["method"]
    grid = {k: v for k, v in cfg.get("grid", {}).items() if isinstance(v, list)}
    expected = len(methods) * math.prod(len(v) for v in grid.values())
    assert f"{expected} run(s) into" in result.output
    labels = [m["label"] for m in methods]
    assert len(set(labels)) == len(labels) and cfg.get("baseline", labels[0]) in labels
    for m in methods:
        # each method's run carries its own algorithm, and the stop rule when the config has one
        lines = [ln for ln in result.output.splitlines() if f"--algorithm {m['algorithm']} " in ln]
        assert lines, f"{m['label']}: no run of {m['algorithm']}"
        if cfg.get("stop"):
            assert all("--stop-at" in ln for ln in lines)
        make_algorithm(m["algorithm"], _options(cfg.get("run", {}), m), m.get("compressor", ""))
    assert not list((tmp_path / "exp").glob("runs/*")), "a dry run must not start runs"

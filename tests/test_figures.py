"""psrv.figures: the tables' numbers against hand-computed ones, and the PNGs are real pictures."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from psrv import figures

W = 3  # workers of the synthetic runs


def records(rounds: int, every: list[int], bits: int, scale: float, eval_every: int = 2) -> list[dict[str, Any]]:
    """Made-up metrics: worker w uploads in round k iff k % every[w] == 0; an upload is ``bits``
    formula bits and 10 bytes, a skip 1 byte; 5 bytes down per round; f(θ^{k+1}) = scale·exp(−k/5)
    and accuracy 0.5 + k/100 every ``eval_every`` rounds and at the last."""
    out = []
    for k in range(rounds):
        statuses = ["upload" if k % every[w] == 0 else "lazy_rule" for w in range(W)]
        n = statuses.count("upload")
        r: dict[str, Any] = {
            "round": k,
            "uploads": n,
            "skips": W - n,
            "payload_bits": bits * n,
            "bytes_up": 10 * n + (W - n),
            "bytes_down": 5,
            "loss": scale * math.exp(-(k - 1) / 5),
            "aggregate_norm": scale / (k + 1),
            "step_sq": 0.01,
            "elapsed": 0.1 * (k + 1),
            "workers": [{"id": f"w{w}", "status": s, "bits": bits * (s == "upload")} for w, s in enumerate(statuses)],
        }
        if k % eval_every == eval_every - 1 or k == rounds - 1:
            r["train_loss"] = scale * math.exp(-k / 5)
            r["accuracy"] = 0.5 + k / 100
        out.append(r)
    return out


def write_run(
    exp: Path,
    label: str,
    seed: int,
    recs: list[dict[str, Any]],
    link: str = "loopback",
    fstar: float | None = None,
    stop_round: int | None = None,
    summary: dict[str, Any] | None = None,
) -> Path:
    algorithm = label.lower()
    run_id = f"{label.lower()}__seed{seed}__{link}"
    d = exp / "runs" / run_id
    (d / algorithm).mkdir(parents=True)
    (d / algorithm / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    spec = {"run_id": run_id, "label": label, "algorithm": algorithm, "seed": seed, "link": link, "grid": {}}
    spec |= {"argv": [], "stop": {}, "fstar": fstar}
    (d / "spec.json").write_text(json.dumps(spec))
    s = {
        "algorithm": algorithm,
        "status": "done",
        "rounds": len(recs),
        "stopped_by": "rounds",
        "stop_round": stop_round,
    }
    s |= {"config": {"algorithm_options": {"batch": 0}}, **(summary or {})}
    (d / "summary.json").write_text(json.dumps(s))
    return d


def config(exp: Path, labels: list[str], baseline: str) -> None:
    exp.mkdir(parents=True, exist_ok=True)
    methods = "".join(f'[[method]]\nlabel = "{lb}"\nalgorithm = "{lb.lower()}"\n' for lb in labels)
    (exp / "experiment.toml").write_text(f'name = "synthetic"\nbaseline = "{baseline}"\n{methods}')


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    return {row["method"]: row for row in csv.DictReader(io.StringIO(path.read_text()))}


def image_ok(path: Path, colors: list[str]) -> None:
    """A real PNG: decodes, a sensible size, many distinct colours, not all white, and each of
    ``colors`` (a line's colour) present."""
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500, img.shape
    rgb = np.round(img[..., :3] * 255).astype(np.int64).reshape(-1, 3)
    packed = rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]
    assert len(np.unique(packed)) > 20
    assert (rgb < 250).any(axis=1).mean() > 0.01  # not (almost) all white
    for c in colors:
        want = np.round(np.array(to_rgb(c)) * 255).astype(np.int64)
        assert (np.abs(rgb - want).max(axis=1) <= 3).sum() > 50, f"{c} not drawn in {path.name}"


def build_exp(e: Path) -> Path:
    """Method A (lazy: worker w uploads every (w+1)-th round, 100 bits) and B (all upload, 1000
    bits), two seeds each, 20 rounds; A's seed 1 stopped by a rule at round 13."""
    config(e, ["B", "A"], baseline="B")
    write_run(e, "A", 0, records(20, [1, 2, 3], 100, 1.0))
    write_run(e, "A", 1, records(20, [1, 2, 3], 100, 2.0), stop_round=13, summary={"stopped_by": "loss"})
    write_run(e, "B", 0, records(20, [1, 1, 1], 1000, 1.0))
    write_run(e, "B", 1, records(20, [1, 1, 1], 1000, 3.0))
    return e


@pytest.fixture
def exp(tmp_path: Path) -> Path:
    return build_exp(tmp_path / "exp")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The synthetic experiment, rendered once for the plot tests (plots take a second or two)."""
    e = build_exp(tmp_path_factory.mktemp("rendered") / "exp")
    return e, figures.render(e)


def hand_uploads(rounds: int, every: list[int]) -> int:
    return sum(len(range(0, rounds, e)) for e in every)


def test_table_numbers_are_the_hand_computed_ones(exp: Path) -> None:
    written = figures.write_tables(exp)
    assert exp / "tables" / "summary.csv" in written and exp / "tables" / "summary.md" in written
    rows = read_csv(exp / "tables" / "summary.csv")
    assert list(rows) == ["B", "A"]  # the config's method order
    a0, a1 = hand_uploads(20, [1, 2, 3]), hand_uploads(14, [1, 2, 3])  # 20+10+7, 14+7+5
    assert (a0, a1) == (37, 26)
    a, b = rows["A"], rows["B"]
    assert float(a["uploads"]) == pytest.approx((a0 + a1) / 2)
    assert float(a["uploads_std"]) == pytest.approx(np.std([a0, a1], ddof=1))
    assert float(b["uploads"]) == 60 and b["uploads_std"] == "0.0"
    assert float(a["iterations"]) == (20 + 14) / 2  # the stopped seed counts to its stop round
    assert float(a["payload_bits"]) == pytest.approx(100 * (a0 + a1) / 2)
    assert float(a["bytes_up"]) == pytest.approx((10 * a0 + (60 - a0) + 10 * a1 + (42 - a1)) / 2)
    assert float(a["bytes_down"]) == pytest.approx(5 * (20 + 14) / 2)
    # ratios: mean(A) / mean(B), the baseline is 1
    assert float(a["uploads_ratio"]) == pytest.approx(((a0 + a1) / 2) / 60)
    assert float(a["payload_bits_ratio"]) == pytest.approx((100 * (a0 + a1) / 2) / 60000)
    assert float(a["uploads_ratio"]) < 1 and float(b["uploads_ratio"]) == 1.0
    # accuracy and loss: the last evaluation at or before the stop (rounds 19 and 13)
    assert float(a["accuracy"]) == pytest.approx((0.69 + 0.63) / 2)
    assert float(a["loss"]) == pytest.approx((math.exp(-19 / 5) + 2 * math.exp(-13 / 5)) / 2)
    assert a["stopped_by"] == "loss,rounds"
    md = figures.tables(exp)["summary"]
    assert md == (exp / "tables" / "summary.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| A |"))
    assert f"{((a0 + a1) / 2) / 60:.3g}" in line and f"{31.5:.0f} ± 7.8" in line  # uploads mean ± std


def test_plots_are_real_pictures_with_each_methods_colour(rendered: tuple[Path, list[Path]]) -> None:
    exp, written = rendered
    assert exp / "tables" / "summary.csv" in written
    names = sorted(p.name for p in written if p.suffix == ".png")
    assert names == ["accuracy.png", "gradnorm.png", "loss.png", "uploads_per_worker.png"]
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name in names:  # B is the first method (first colour), A the second
        image_ok(exp / "plots" / name, cycle[:2])


def test_uploads_per_worker_and_series(exp: Path) -> None:
    runs = {(r.label, r.spec["seed"]): r for r in figures.load_runs(exp)}
    assert figures.worker_uploads(runs["A", 0]) == {"w0": 20, "w1": 10, "w2": 7}
    assert figures.worker_uploads(runs["A", 1]) == {"w0": 14, "w1": 7, "w2": 5}  # cut at the stop round
    pts = figures.series(runs["B", 0], "loss")  # train_loss: f(θ^{k+1}) with round k's costs
    at, costs, value = pts[0]
    assert (at, costs["uploads"], costs["payload_bits"], costs["bytes"]) == (2, 6, 6000, 2 * (30 + 5))
    assert value == pytest.approx(math.exp(-1 / 5))
    band = figures.combine([figures.series(runs["A", s], "loss") for s in (0, 1)])
    assert band.x["iteration"] == [2, 4, 6, 8, 10, 12, 14]  # the iterations both seeds reached
    assert band.mean[0] == pytest.approx(1.5 * math.exp(-1 / 5)) and band.lo[0] < band.hi[0]


def test_residual_groups_single_seed_and_missing_fields(tmp_path: Path) -> None:
    """f* in spec -> residual plot; two links -> one figure set per link; one seed, no eval fields,
    a run without metrics, an unfinished run: all handled."""
    e = tmp_path / "exp"
    recs = records(12, [1, 2, 4], 50, 1.0)
    write_run(e, "A", 0, recs, summary={"fstar": 0.001})  # f* solved ("auto"): in the summary
    write_run(e, "A", 0, [{k: v for k, v in r.items() if k not in ("train_loss", "accuracy")} for r in recs], "10mbit")
    d = write_run(e, "C", 0, recs, summary={"uploads": 9, "payload_bits": 900, "rounds": 12}, fstar=0.001)
    (d / "c" / "metrics.jsonl").unlink()  # the table keeps its summary numbers
    u = write_run(e, "Z", 0, recs)
    (u / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    written = figures.render(e)  # no experiment.toml: baseline = the first label
    names = sorted(p.name for p in written)
    assert "loopback__residual.png" in names and "10mbit__loss.png" in names
    assert "loopback__uploads_per_worker.png" in names and "10mbit__accuracy.png" not in names  # no accuracy there
    assert not any("Z" in n or n.startswith("z") for n in names)
    tabs = figures.tables(e)
    assert list(tabs) == ["loopback", "10mbit"]  # loopback first
    rows = read_csv(e / "tables" / "loopback.csv")
    assert set(rows) == {"A", "C"}
    assert float(rows["C"]["uploads"]) == 9 and float(rows["C"]["uploads_ratio"]) == pytest.approx(9 / 21)
    assert float(rows["A"]["residual"]) == pytest.approx(math.exp(-11 / 5) - 0.001)
    assert rows["A"]["uploads_std"] == ""  # one seed: no spread
    lossless = read_csv(e / "tables" / "10mbit.csv")["A"]
    assert lossless["accuracy"] == "" and float(lossless["uploads"]) == 21
    image_ok(e / "plots" / "loopback__residual.png", ["C0"])


def test_empty_experiment_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    assert figures.render(tmp_path) == [] and figures.tables(tmp_path) == {}


@pytest.mark.slow
@pytest.mark.process
def test_real_run_folder(tmp_path: Path) -> None:
    """The real field names: a tiny `psrv run` laid out as an experiment run by hand."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "psrv", "run", "--algorithm", "gd,laq", "--workers", "2", "--rounds", "10"]
    cmd += ["--data", "digits", "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    e = tmp_path / "exp"
    config(e, ["GD", "LAQ"], baseline="GD")
    for summary in json.loads((out / "summary.json").read_text()):
        alg = summary["algorithm"]
        d = e / "runs" / f"{alg}__seed0__loopback"
        d.mkdir(parents=True)
        (d / alg).mkdir()
        (d / alg / "metrics.jsonl").write_bytes((out / alg / "metrics.jsonl").read_bytes())
        (d / "summary.json").write_text(json.dumps(summary | {"stopped_by": "rounds", "stop_round": None}))
        spec = {"run_id": d.name, "label": alg.upper(), "algorithm": alg, "seed": 0, "link": "loopback", "grid": {}}
        (d / "spec.json").write_text(json.dumps(spec | {"fstar": None}))
    written = figures.render(e)
    assert {p.name for p in written} >= {"loss.png", "accuracy.png", "gradnorm.png", "uploads_per_worker.png"}
    rows = read_csv(e / "tables" / "summary.csv")
    summaries = {s["algorithm"].upper(): s for s in json.loads((out / "summary.json").read_text())}
    for lb, s in summaries.items():  # the metrics' sums are the summary's totals
        assert float(rows[lb]["uploads"]) == s["uploads"] and float(rows[lb]["payload_bits"]) == s["payload_bits"]
        assert float(rows[lb]["iterations"]) == s["rounds"] == 10
        assert float(rows[lb]["accuracy"]) == pytest.approx(s["accuracy"])
    assert float(rows["LAQ"]["payload_bits_ratio"]) < 1
    image_ok(e / "plots" / "loss.png", ["C0", "C1"])


def test_a_render_after_the_grid_grew_leaves_no_stale_files(tmp_path: Path) -> None:
    """One link: plain names (loss.png, summary.md). A second link added later: the files are
    named by group, and the first render's plain-named ones are gone, not left showing one group."""
    e = tmp_path / "exp"
    recs = records(12, [1, 2, 4], 50, 1.0)
    write_run(e, "A", 0, recs)
    first = {p.name for p in figures.render(e)}
    assert "loss.png" in first and "summary.md" in first
    write_run(e, "A", 0, recs, "10mbit")
    second = {p.name for p in figures.render(e)}
    on_disk = {p.name for p in (e / "plots").iterdir()} | {p.name for p in (e / "tables").iterdir()}
    assert on_disk == second and "loss.png" not in on_disk and "summary.md" not in on_disk
    assert "10mbit__loss.png" in on_disk and "loopback__loss.png" in on_disk

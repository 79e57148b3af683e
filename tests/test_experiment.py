"""``psrv experiment`` / ``psrv report`` (grid, results store, resume), stopping rules, TensorBoard."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from psrv.cli import main
from psrv.experiment import ConfigError, load, to_toml
from psrv.stopping import StopRule, StopRuleError, parse_stop

SMALL = """
name = "small"
description = "two methods, two \\"seeds\\" \\u00e9"
[run]
data = "digits"
workers = 2
rounds = {rounds}
lr = 0.5
eval_every = 1
register_timeout = 600
[stop]
loss = {loss}
[[method]]
label = "GD"
algorithm = "gd"
[[method]]
label = "LAQ"
algorithm = "laq"
option = {{ bits = 4 }}
[grid]
seeds = [0, 1]
"""


def _config(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _one_line_error(tmp_path: Path, text: str) -> str:
    cfg = _config(tmp_path, text)
    res = CliRunner().invoke(main, ["experiment", str(cfg), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written
    return errors[0]


# ---------------------------------------------------------------------------------- config (fast)
@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[run]\nrounds = 3\n", "no [[method]]"),
        ('[run]\nroundz = 3\n[[method]]\nlabel = "a"\nalgorithm = "gd"\n', "[run].roundz"),
        ('[run]\nrounds = "x"\n[[method]]\nlabel = "a"\nalgorithm = "gd"\n', "'--rounds'"),
        ('[[method]]\nlabel = "a"\nalgorithm = "gd"\nfoo = 2\n', "[[method]] a.foo"),
        ('[[method]]\nlabel = "a"\nalgorithm = "nope"\n', "unknown algorithm 'nope'"),
        ('[[method]]\nlabel = "a"\nalgorithm = "laq"\noption = { bits = "x" }\n', "'--option'"),
        ('[[method]]\nalgorithm = "gd"\n', "needs label"),
        ('[grid]\nseeds = 3\n[[method]]\nlabel = "a"\nalgorithm = "gd"\n', "[grid].seeds"),
        ('[stop]\nloss_residual = 1e-6\n[[method]]\nlabel = "a"\nalgorithm = "gd"\n', "[stop].fstar"),
        ('[stop]\nlos = 1\n[[method]]\nlabel = "a"\nalgorithm = "gd"\n', "[stop].los"),
        ('[run]\nrounds = [1, 2]\n[[method]]\nlabel = "a"\nalgorithm = "gd"\n', "[run].rounds"),
        ('[grid]\nlinks = ["10mbit"]\n[stop]\nloss = 1\n[[method]]\nlabel = "a"\nalgorithm = "gd"\n', "stopping rules"),
        ('[grid]\nlinks = ["10xbit"]\n[[method]]\nlabel = "a"\nalgorithm = "gd"\n', "'--rate'"),
        (
            '[run]\ntask = "mlp"\n[stop]\nloss_residual = 1e-6\nfstar = "auto"\n[[method]]\nlabel = "a"\n'
            'algorithm = "gd"\n',
            "convex tasks",
        ),
    ],
)
def test_bad_configs_fail_in_one_line_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    assert named in _one_line_error(tmp_path, text)


def test_grid_expands_methods_by_seeds_and_settings_and_flags_override(tmp_path: Path) -> None:
    text = SMALL.format(rounds=10, loss=1.0) + "workers = [2, 3]\n"
    exp = load(_config(tmp_path, text), out=str(tmp_path / "o"), rounds=7, seeds="4,5,6", methods="LAQ")
    assert [r.run_id for r in exp.runs] == [f"LAQ__seed{s}__loopback__workers={w}" for s in (4, 5, 6) for w in (2, 3)]
    argv = exp.runs[1].argv
    assert argv[:6] == ["psrv", "run", "--algorithm", "laq", "--seed", "4"]
    # the grid's value comes after [run]'s, so it wins; --rounds overrides the file; -o from the method
    assert argv[argv.index("--rounds") + 1] == "7" and argv[len(argv) - 1 - argv[::-1].index("--workers") + 1] == "3"
    assert ["--option", "bits=4"] == argv[argv.index("--option") : argv.index("--option") + 2]
    assert ["--stop-at", "loss=1.0"] == argv[argv.index("--stop-at") : argv.index("--stop-at") + 2]
    assert tomllib.loads(to_toml(exp.raw)) == exp.raw  # experiment.toml: the resolved config, read back whole
    with pytest.raises(ConfigError, match="--methods: no \\[\\[method\\]\\] labelled 'X'"):
        load(_config(tmp_path, text), methods="X")
    # a shaped link runs psrv cluster run: psrv run's own [run] options (eval_every, register_timeout) stay out
    shaped = load(_config(tmp_path, SMALL.format(rounds=5, loss=1.0).replace("loss = 1.0", "")), links="10mbit/20mbit")
    assert shaped.runs[0].argv[:4] == ["psrv", "cluster", "run", "--algorithm"]
    assert shaped.runs[0].argv[-2:] == ["--rate", "10mbit/20mbit"] and "--eval-every" not in shaped.runs[0].argv
    assert shaped.runs[0].run_id == "GD__seed0__10mbit-20mbit"
    res = CliRunner().invoke(
        main, ["experiment", str(_config(tmp_path, text)), "--dry-run", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 0 and res.output.count("[to run]") == 8 and not (tmp_path / "o").exists()


def test_stop_rules_parse_and_check() -> None:
    assert parse_stop(["loss=0.3", "loss_residual=1e-6", "accuracy=0.9"]) == {
        "loss": 0.3,
        "residual": 1e-6,
        "accuracy": 0.9,
    }
    for bad in ("loss", "speed=1", "loss=abc", "loss=nan"):
        with pytest.raises(StopRuleError):
            parse_stop([bad])
    with pytest.raises(StopRuleError, match="--fstar"):
        StopRule({"residual": 1e-3})
    rule = StopRule({"residual": 1e-3, "accuracy": 0.9}, fstar=0.5)
    assert rule.check({"round": 3, "loss": 0.1}) is None  # no evaluation in this round
    assert rule.check({"train_loss": 0.502, "accuracy": 0.5}) is None
    assert rule.check({"train_loss": 0.5009, "accuracy": 0.5}) == "residual"
    assert rule.check({"train_loss": 0.7, "accuracy": 0.9}) == "accuracy"


def test_stop_at_and_the_cost_to_reach_a_target_stop_at_the_same_round() -> None:
    """--stop-at and the summary's cost to reach a target read a round the same way (one rule:
    psrv.stopping.meets): an accuracy at or above its target, a loss at or below, NaN never."""
    from psrv.report import cost_to_reach

    nan = float("nan")
    losses, accs = [0.9, nan, 0.41, 0.4, 0.39], [0.5, nan, 0.79, 0.8, 0.81]
    records = [
        {"round": k, "uploads": 1, "payload_bits": 8, "bytes_up": 10, "elapsed": k, "train_loss": f, "accuracy": a}
        for k, (f, a) in enumerate(zip(losses, accs, strict=True))
    ]
    for field, key, target in (("train_loss", "loss", 0.4), ("accuracy", "accuracy", 0.8)):
        stops = [r["round"] for r in records if StopRule({key: target}).check(r)]
        assert stops[0] == 3 and cost_to_reach(records, field, target)["rounds"] == 3 + 1


def test_fstar_auto_is_the_minimum_of_the_training_objective() -> None:
    from psrv.options import DataConfig
    from psrv.runner import Evaluator
    from psrv.stopping import solve_fstar

    dc = DataConfig(data="digits")
    ev = Evaluator("logreg", {"l2": 0.01}, dc)
    fstar = solve_fstar("logreg", {"l2": 0.01}, dc, evaluator=ev)
    X, y, n = ev.train.X, ev.train.y, len(ev.train)
    assert fstar < ev.task.loss(np.zeros(ev.task.dim), X, y)
    # strongly convex (l2 0.01): f(θ) - f* >= ||∇f(θ)||² / (2 L) would fail for a f* above the minimum; below
    # it, f* is attained: gradient descent from 0 never gets under it
    theta = np.zeros(ev.task.dim)
    for _ in range(30):
        loss, grad = ev.task.local_loss_grad(theta, X, y, n, 1)
        assert loss >= fstar - 1e-9
        theta -= 1.0 * grad
    assert 0 < ev.task.loss(theta, X, y) - fstar < 0.5


def test_engine_ends_the_job_after_the_round_a_rule_stops() -> None:
    from tests.test_engine import Run, _dense

    class Stopping(Run):
        def round_closed(self, record: dict[str, Any], theta: np.ndarray, final: bool) -> None:
            super().round_closed(record, theta, final)
            if record["round"] == 1:
                self.engine.stop_after_round("loss")

    run = Stopping(M=2, rounds=10)
    d = run.engine.dim
    for k in range(2):
        for m in range(2):
            run.model(f"w{m}", k)
            run.engine.push(f"w{m}", k, _dense(np.ones(d)))
    final = [run.model(f"w{m}", 2) for m in range(2)]
    run.join()
    assert run.error is None and all(b.done for b in final)
    assert [r["round"] for r in run.records] == [0, 1] and run.summary["rounds"] == 2
    assert run.engine.stopped_by == "loss"


# ---------------------------------------------------------------------------------- end to end (processes)
def _metrics(run_dir: Path, algorithm: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / algorithm / "metrics.jsonl").read_text().splitlines()]


def _experiment(cfg: Path, out: Path, *extra: str, **kw: Any) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "psrv", "experiment", str(cfg), "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


@pytest.mark.slow
@pytest.mark.process
def test_small_grid_runs_resumes_after_an_interruption_stops_at_the_target_and_reports(tmp_path: Path) -> None:
    # a loss GD reaches in about 8 rounds of 12 on digits at lr 0.5 (2.20 at round 0, 1.62 at round 8)
    cfg = _config(tmp_path, SMALL.format(rounds=12, loss=1.65))
    out = tmp_path / "exp"
    first = out / "runs" / "GD__seed0__loopback"
    proc = _experiment(cfg, out, process_group=0)
    try:
        deadline = time.monotonic() + 600
        while (
            not (first / "summary.json").exists()
            or json.loads((first / "summary.json").read_text()).get("status") != "done"
        ):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal's whole process group
        said = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, said
    assert "run the same command again to resume" in said
    kept = (first / "summary.json").stat().st_mtime_ns
    # resume: the finished run is skipped, the interrupted one redone, the rest run
    proc = _experiment(cfg, out)
    said = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, said
    assert "GD__seed0__loopback: finished before, skipped (resume)" in said
    assert (first / "summary.json").stat().st_mtime_ns == kept
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == [f"{m}__seed{s}__loopback" for m in ("GD", "LAQ") for s in (0, 1)]
    with open(out / "results.csv") as f:
        table = {r["run_id"]: r for r in csv.DictReader(f)}
    db = sqlite3.connect(out / "results.sqlite")
    cols = "run_id, experiment, rounds, uploads, payload_bits, bytes_up, stopped_by, stop_round, finished_at"
    sql = {r[0]: r for r in db.execute(f"SELECT {cols} FROM runs")}
    db.close()
    assert set(table) == set(sql) == set(runs)
    for run_id in runs:
        summary = json.loads((out / "runs" / run_id / "summary.json").read_text())
        spec = json.loads((out / "runs" / run_id / "spec.json").read_text())
        row, srow = table[run_id], sql[run_id]
        assert summary["status"] == "done" and spec["run_id"] == run_id and row["label"] == spec["label"]
        assert int(row["rounds"]) == summary["rounds"] == srow[2]
        assert int(row["uploads"]) == summary["uploads"] == srow[3]
        assert int(row["payload_bits"]) == summary["payload_bits"] == srow[4]
        assert int(row["bytes_up"]) == summary["bytes_up"] == srow[5]
        assert srow[1] == "small" and srow[8] == summary["finished_at"]
        # the stopping rule: the first evaluated round at or under the target, and no round after it
        records = _metrics(out / "runs" / run_id, spec["algorithm"])
        reached = [r["round"] for r in records if r.get("train_loss") is not None and r["train_loss"] <= 1.65]
        if summary["stopped_by"] == "loss":
            assert summary["stop_round"] == reached[0] == records[-1]["round"] == summary["rounds"] - 1
            assert summary["rounds"] < 12 and summary["worker_exit_codes"] == [0, 0]
        else:
            assert summary["stopped_by"] == "rounds" and not reached and summary["rounds"] == 12
        assert srow[6] == summary["stopped_by"] and srow[7] == summary["stop_round"]
    assert json.loads((first / "summary.json").read_text())["stopped_by"] == "loss"  # GD gets there
    report = (out / "report.md").read_text()
    assert report.startswith("# small") and 'two methods, two "seeds" é' in report
    assert "GD" in report.split("## Tables")[1] and "LAQ" in report.split("## Tables")[1]
    # psrv report re-renders from the saved metrics: nothing reruns
    metrics = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/*/metrics.jsonl")}
    (out / "report.md").unlink()
    res = CliRunner().invoke(main, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "report.md").read_text() == report
    assert {p: p.stat().st_mtime_ns for p in metrics} == metrics


@pytest.mark.slow
@pytest.mark.process
def test_tensorboard_scalars_per_round(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, tb = tmp_path / "run", tmp_path / "tb"
    argv = ["run", "--algorithm", "laq", "--data", "digits", "--workers", "2", "--rounds", "5", "--eval-every", "2",
            "--register-timeout", "600", "--out", str(out), "--tensorboard", str(tb)]  # fmt: skip
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 0, res.output
    ea = EventAccumulator(str(tb / "laq"))
    ea.Reload()
    records = _metrics(out, "laq")
    assert [e.step for e in ea.Scalars("comm/uploads")] == [r["round"] for r in records]
    assert [e.value for e in ea.Scalars("comm/bits")] == pytest.approx([r["payload_bits"] for r in records])
    assert [e.value for e in ea.Scalars("comm/bytes_up_total")] == pytest.approx(
        np.cumsum([r["bytes_up"] for r in records])
    )
    evaluated = [(r["round"], r["train_loss"]) for r in records if "train_loss" in r]
    assert [e.step for e in ea.Scalars("loss/train")] == [k for k, _ in evaluated] == [1, 3, 4]
    assert [e.value for e in ea.Scalars("loss/train")] == pytest.approx([v for _, v in evaluated], rel=1e-6)


def test_tensorboard_missing_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    res = CliRunner().invoke(main, ["run", "--rounds", "1", "--data", "digits", "--tensorboard", str(tmp_path / "tb"),
                                    "--out", str(tmp_path / "o")])  # fmt: skip
    assert res.exit_code == 2 and "psrv[tensorboard]" in res.output and not (tmp_path / "o").exists()

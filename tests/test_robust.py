"""Byzantine-robust aggregation (``--aggregate``; Yin et al., ICML 2018): the math first (median and
trimmed mean against hostile contributions, scale of the sum, the degenerate cases), then which
algorithms take it, then the engine over the wire and a whole run with a byzantine worker."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from click.testing import CliRunner

from psrv import data
from psrv.aggregate import Overflow
from psrv.algorithms import make_algorithm
from psrv.cli import main
from psrv.engine import ServerConfig
from psrv.options import jobs
from psrv.payload import dense, sparse
from psrv.robust import AggregateRule, RobustAggregator, make_aggregator, parse_aggregate, refusal
from psrv.server import ParameterServer
from tests.helpers.threaded import run_in_threads
from tests.test_server import DIM, Harness
from worker.client import load_training_data

F32_MAX = float(np.finfo(np.float32).max)
RULES = ["median", "trimmed-mean:beta=0.25"]


def _aggregate(rule: str, rows: np.ndarray) -> np.ndarray:
    """``total`` of an aggregator for ``rule`` fed ``rows`` (one dense float32 upload per worker)."""
    agg = make_aggregator(parse_aggregate(rule), len(rows), rows.shape[1], "replace")
    for m, row in enumerate(rows):
        agg.add(m, dense(row.astype(np.float32)), F32_MAX)
    agg.settle()
    return agg.total


# ------------------------------------------------------------------------------ the math
@pytest.mark.parametrize("rule", RULES)
def test_huge_contributions_of_a_minority_move_the_robust_rules_little_and_destroy_the_mean(rule: str) -> None:
    """M = 8 workers, f = 2 of them send in-range garbage of magnitude 1e30 (signs random): the sum
    is off by ~1e30; the median and the 25%-trimmed mean stay within the honest values' spread of
    the honest sum (each coordinate lies between honest order statistics)."""
    rng = np.random.default_rng(1)
    m, f, d = 8, 2, 500
    g = rng.standard_normal(d)
    honest = g + 0.1 * rng.standard_normal((m - f, d))
    garbage = 1e30 * np.where(rng.random((f, d)) < 0.5, -1.0, 1.0)
    rows = np.concatenate([honest, garbage]).astype(np.float32).astype(np.float64)
    honest_sum = m * honest.mean(axis=0)
    mean = _aggregate("mean", rows)
    assert np.abs(mean - honest_sum).max() > 1e29
    robust = _aggregate(rule, rows)
    assert np.isfinite(robust).all()
    # every coordinate within M x [min, max] of the honest values (order statistics of a minority attack)
    lo, hi = m * honest.min(axis=0) - 1e-4, m * honest.max(axis=0) + 1e-4
    assert ((robust >= lo) & (robust <= hi)).all()
    assert np.linalg.norm(robust - honest_sum) < 0.2 * np.linalg.norm(honest_sum)


@pytest.mark.parametrize("rule", RULES)
def test_identical_contributions_give_the_sum(rule: str) -> None:
    v = np.random.default_rng(2).standard_normal(300).astype(np.float32).astype(np.float64)
    rows = np.repeat(v[None, :], 5, axis=0)
    assert AggregateRule("median").combine(rows).tobytes() == v.tobytes()  # the median of copies is the copy
    np.testing.assert_allclose(_aggregate(rule, rows), _aggregate("mean", rows), rtol=1e-12, atol=0)


def test_trimmed_mean_with_beta_zero_is_the_mean_and_the_cut_is_floor_beta_k() -> None:
    rows = np.random.default_rng(3).standard_normal((7, 200)).astype(np.float32).astype(np.float64)
    mean = _aggregate("mean", rows)
    np.testing.assert_allclose(_aggregate("trimmed-mean:beta=0", rows), mean, rtol=1e-12, atol=1e-12)
    # beta = 0.2, k = 7: floor(1.4) = 1 value cut at each end, the mean of the middle 5, times M = 7
    expected = 7 * np.sort(rows, axis=0)[1:6].mean(axis=0)
    np.testing.assert_allclose(_aggregate("trimmed-mean:beta=0.2", rows), expected, rtol=1e-12)
    # k even: numpy's median (the mean of the two middle values)
    np.testing.assert_allclose(_aggregate("median", rows[:4]), 4 * np.median(rows[:4], axis=0), rtol=1e-12)


def test_only_stored_contributions_count_and_blocks_agree_with_one_pass() -> None:
    """A worker that never uploaded is left out (median of the others, scaled by M); dimensions past
    one block (``BLOCK``) give the same result as the whole matrix at once."""
    from psrv.aggregate import BLOCK

    d = BLOCK + 123
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((3, d)).astype(np.float32)
    agg = RobustAggregator(4, d, AggregateRule("median"))
    for m in range(3):
        agg.add(m, dense(rows[m]))
    agg.settle()
    assert agg.total.tobytes() == (np.median(rows.astype(np.float64), axis=0) * 4).tobytes()


def test_an_upload_whose_scaled_peak_overflows_is_refused_whole() -> None:
    agg = RobustAggregator(2, 4, AggregateRule("median"))
    agg.add(0, dense(np.ones(4, np.float32)), F32_MAX)
    with pytest.raises(Overflow):
        agg.add(1, dense(np.full(4, 0.75 * F32_MAX, np.float32)), F32_MAX)
    assert agg.payloads[1] is None
    agg.settle()
    assert (agg.total == 2.0).all()


# ------------------------------------------------------------------------------ which algorithms
def test_parse_aggregate() -> None:
    assert parse_aggregate("mean") == AggregateRule("mean")
    assert parse_aggregate("median") == AggregateRule("median")
    assert parse_aggregate("trimmed-mean") == AggregateRule("trimmed-mean", 0.1)
    assert parse_aggregate("trimmed-mean:beta=0.3") == AggregateRule("trimmed-mean", 0.3)
    for bad, words in [
        ("mode", "unknown rule"),
        ("trimmed-mean:beta=0.5", "0 <= beta < 0.5"),
        ("trimmed-mean:beta=nan", "0 <= beta < 0.5"),
        ("median:beta=0.1", "no options"),
        ("trimmed-mean:k=1", "option beta"),
        ("trimmed-mean:beta", "KEY=NUMBER"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_aggregate(bad)


@pytest.mark.parametrize(
    ("name", "compressor", "options", "why"),
    [
        ("laq", "", {}, "accumulates"),
        ("ef21", "", {}, "accumulates"),
        ("riag", "", {}, "accumulates"),
        ("topk-ef", "", {}, "error feedback"),
        ("sasg", "", {}, "error feedback"),
        ("gd", "topk", {"ef": 1}, "error feedback"),
        ("gd", "randk", {}, "sparse uploads"),
        ("gd", "sq", {}, "sparse uploads"),
        ("gd", "", {}, None),
        ("sgd", "qsgd", {}, None),
        ("gd", "fp16", {}, None),
        ("lag-wk", "", {}, None),
        ("lasg", "", {}, None),
        ("lag-ps", "", {}, None),
    ],
)
def test_where_a_robust_rule_applies(name: str, compressor: str, options: dict, why: str | None) -> None:
    algo = make_algorithm(name, options, compressor)
    got = refusal(AggregateRule("median"), algo)
    assert (got is None) == (why is None) and (why is None or why in got)
    assert refusal(AggregateRule("mean"), algo) is None


def test_a_refused_combination_is_a_one_line_usage_error() -> None:
    with pytest.raises(ValueError, match="accumulates"):
        ServerConfig(algorithm="laq", aggregate="median")
    with pytest.raises(ValueError, match="accumulates"):
        jobs(["gd", "laq"], compressor="", lr=0.02, options={}, task="logreg", l2=None, task_options={}, rounds=5,
             workers=2, round_timeout=5.0, seed=0, zstd=False, aggregate="median")  # fmt: skip
    result = CliRunner().invoke(main, ["start-server", "--algorithm", "laq", "--aggregate", "median", "--port", "0"])
    assert result.exit_code == 2, result.output
    assert "accumulates" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["start-server", "--algorithm", "gd", "--aggregate", "mode", "--port", "0"])
    assert result.exit_code == 2 and "unknown rule 'mode'" in result.output


def test_the_job_passes_the_rule_to_the_server_command() -> None:
    (job,) = jobs(["gd"], compressor="", lr=0.02, options={}, task="logreg", l2=None, task_options={}, rounds=5,
                  workers=2, round_timeout=5.0, seed=0, zstd=False, aggregate="trimmed-mean:beta=0.2")  # fmt: skip
    assert job.server_config().aggregate == "trimmed-mean:beta=0.2"
    args = job.argv()
    assert args[args.index("--aggregate") + 1] == "trimmed-mean:beta=0.2"


# ------------------------------------------------------------------------------ over the wire
def test_the_server_steps_along_m_times_the_median(make_harness: Callable[..., Harness]) -> None:
    """Three workers through a real server; w2 uploads in-range garbage (float32 max / 10, below the
    per-value limit of max / M): the model moves by ``lr * 3 * median``, i.e. by the honest values."""
    h = make_harness(algorithm="gd", options={"lr": 0.1}, num_workers=3, aggregate="median")
    for w in ("w0", "w1", "w2"):
        h.register(w)
    h.start()
    theta0 = h.params("w0", 0).astype(np.float64)
    rng = np.random.default_rng(5)
    g0, g1 = rng.standard_normal((2, DIM)).astype(np.float32)
    junk = np.full(DIM, F32_MAX / 10, np.float32)
    h.push("w0", 0, dense(g0))
    h.push("w2", 0, dense(junk))
    h.push("w1", 0, dense(g1))
    theta1 = h.params("w0", 1).astype(np.float64)
    med = np.median(np.stack([g0, g1, junk]).astype(np.float64), axis=0)
    np.testing.assert_allclose(theta1, (theta0 - 0.1 * 3 * med).astype(np.float32), rtol=1e-6)
    assert np.abs(theta1 - theta0).max() < 1.0
    # round 1: w0 and w1 skip (their stored gradients stand), w2 sends garbage again
    h.skip("w0", 1)
    h.skip("w1", 1)
    h.push("w2", 1, dense(-junk))
    theta2 = h.params("w0", 2).astype(np.float64)
    med = np.median(np.stack([g0, g1, -junk]).astype(np.float64), axis=0)
    np.testing.assert_allclose(theta2, (theta1 - 0.1 * 3 * med).astype(np.float32), rtol=1e-6)


def test_sparse_uploads_are_refused_by_kind(make_harness: Callable[..., Harness]) -> None:
    from tests.test_server import Code, expect_status

    h = make_harness(algorithm="gd", num_workers=1, aggregate="median")
    h.register("w0")
    h.start()
    with expect_status(Code.INVALID_ARGUMENT, "sparse"):
        h.push("w0", 0, sparse(DIM, np.arange(3), np.ones(3, np.float32)))


# ------------------------------------------------------------------------------ a whole run
def _run(aggregate: str, byzantine: float, rounds: int = 25) -> tuple[dict, list, ParameterServer]:
    train, _ = load_training_data("digits", 0.2, 0)
    m = 5
    ps = ParameterServer(
        ServerConfig(
            algorithm="gd",
            options={"lr": 0.5},
            num_workers=m,
            rounds=rounds,
            round_timeout=60,
            downlink="replica",
            aggregate=aggregate,
        )
    )
    per_worker = {3: {"byzantine": byzantine}} if byzantine else None
    summary, results = run_in_threads(ps, [data.shard(train, i, m) for i in range(m)], per_worker=per_worker)
    return summary, results, ps


def test_one_byzantine_worker_stops_the_mean_and_not_the_median() -> None:
    """Five workers on digits, worker 3 uploads -20 x its gradient every round. With the mean
    (the sum) the loss rises; with the median it falls as in an honest run. The replicas are
    exact throughout (every round an update, digests agree, final models equal the server's)."""
    losses = {}
    for aggregate, byz in (("mean", 0.0), ("mean", 20.0), ("median", 20.0), ("trimmed-mean:beta=0.2", 20.0)):
        summary, results, ps = _run(aggregate, byz)
        loss = [r["loss"] for r in ps.records]
        losses[aggregate, byz] = loss
        assert summary["deadline_misses"] == 0
        for r in results:
            assert r.digest_mismatches == 0
            assert r.final_params.tobytes() == ps.theta.tobytes()
    honest = losses["mean", 0.0]
    assert honest[-1] < 0.7 * honest[0]
    # the losses reported are the workers' own (the byzantine one reports its true local loss)
    assert losses["mean", 20.0][-1] > 2 * honest[0]  # pushed uphill
    for rule in ("median", "trimmed-mean:beta=0.2"):
        assert losses[rule, 20.0][-1] < 0.8 * honest[0], rule
        assert losses[rule, 20.0][-1] < 1.3 * honest[-1], rule


@pytest.mark.parametrize("name", ["lag-wk", "lag-ps"])
def test_lazy_rules_take_the_median_of_stored_gradients_with_exact_replicas(name: str) -> None:
    """LAG with the median over the stored (possibly stale) gradients: workers skip, the replicas
    replay every round's update bit for bit, and the loss falls."""
    train, _ = load_training_data("digits", 0.2, 0)
    m = 3
    ps = ParameterServer(
        ServerConfig(
            algorithm=name, options={"lr": 0.5}, num_workers=m, rounds=30, round_timeout=60, downlink="replica",
            aggregate="median",
        )
    )  # fmt: skip
    summary, results = run_in_threads(ps, [data.shard(train, i, m) for i in range(m)])
    assert summary["skips"] > 0 and summary["deadline_misses"] == 0
    for r in results:
        assert r.digest_mismatches == 0 and r.final_params.tobytes() == ps.theta.tobytes()
    assert summary["last_round_loss"] < 0.8 * ps.records[0]["loss"]  # (lag-ps: rounds where all computed)

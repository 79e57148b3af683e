"""Compressed downlink (EF21-P): the workers compute at a shared model w that the server moves
towards theta by compressed steps; w stays bit-identical on both sides, the error theta - w
contracts, and training converges with a fraction of the dense broadcast's bytes."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from psrv import data
from psrv.cli import main
from psrv.replica import DownCompressor, parse_compressor_spec
from psrv.server import ParameterServer, ServerConfig
from psrv.tasks import make_task
from tests.helpers.threaded import run_in_threads
from worker.client import load_training_data

TRAIN, _ = load_training_data("digits", 0.2, 0)
TASK = make_task("logreg", TRAIN.n_features, TRAIN.n_classes)
M = 3


def test_spec_parsing_and_errors() -> None:
    assert parse_compressor_spec("topk:ratio=0.05,k=3") == ("topk", {"ratio": 0.05, "k": 3.0})
    assert parse_compressor_spec("dense") == ("dense", {})
    for bad in ["", ":ratio=1", "topk:ratio", "topk:ratio=x"]:
        with pytest.raises(ValueError):
            parse_compressor_spec(bad)
    with pytest.raises(ValueError, match="unknown compressor"):
        DownCompressor("nope")
    with pytest.raises(ValueError):
        ServerConfig(down_compressor="topk:nonsense=1")
    for biased in ("sq", "laq", "threshold:threshold=0.1"):
        with pytest.raises(ValueError, match="not contractive"):
            DownCompressor(biased)


def test_top_k_steps_contract_the_error_deterministically() -> None:
    """w^{k+1} = w^k + topk(theta - w^k): ||theta - w||^2 shrinks by at least (1 - k/d) per step."""
    rng = np.random.default_rng(0)
    d = 1000
    theta, w = rng.standard_normal(d), np.zeros(d)
    down = DownCompressor("topk:ratio=0.05")
    err = float(np.sum((theta - w) ** 2))
    for _ in range(30):
        down.apply(w, down.compress(w, theta, rng))
        new = float(np.sum((theta - w) ** 2))
        assert new <= (1 - 0.05) * err + 1e-12
        err = new
    assert err < 0.3 * float(np.sum(theta**2))


def test_unbiased_steps_are_scaled_into_a_contraction() -> None:
    """rand-k is unbiased with omega = d/k - 1; scaled by 1/(1 + omega) the step contracts in
    expectation: E||theta - w'||^2 <= (1 - 1/(1 + omega)) ||theta - w||^2."""
    rng = np.random.default_rng(1)
    d = 200
    theta = rng.standard_normal(d)
    down = DownCompressor("randk:ratio=0.1")
    delta = 1.0 / (1.0 + down.compressor.compressor_class(d).constant)
    assert down.scale(d) == pytest.approx(delta)
    errs = []
    for _ in range(2000):
        w = np.zeros(d)
        down.apply(w, down.compress(w, theta, rng))
        errs.append(float(np.sum((theta - w) ** 2)))
    assert np.mean(errs) <= (1 - delta) * float(np.sum(theta**2)) * 1.01


def _run(down: str, rounds: int = 150, algorithm: str = "gd") -> tuple[dict, list, ParameterServer]:
    ps = ParameterServer(
        ServerConfig(algorithm=algorithm, options={"lr": 0.1}, num_workers=M, rounds=rounds, down_compressor=down)
    )
    summary, results = run_in_threads(ps, [data.shard(TRAIN, i, M) for i in range(M)])
    return summary, results, ps


@pytest.mark.slow
def test_gd_with_a_top_k_downlink_converges_like_gd_for_a_fraction_of_the_bytes() -> None:
    base, _, ps0 = _run("")
    summary, results, ps = _run("topk:ratio=0.1")
    loss0, loss = TASK.loss(ps0.theta, TRAIN.X, TRAIN.y), TASK.loss(ps.theta, TRAIN.X, TRAIN.y)
    assert loss <= 1.02 * loss0  # within 2% of dense GD after 150 rounds
    assert summary["bytes_down"] < 0.25 * base["bytes_down"]
    assert all((r.snapshots, r.digest_mismatches) == (1, 0) for r in results)  # w bit-identical every round
    assert {rec["downlink"] for rec in ps.records} == {"compressed"}


@pytest.mark.slow
@pytest.mark.parametrize("down", ["randk:ratio=0.2", "stochastic:ratio=0.2", "qsgd:levels=16", "fp16", "bf16"])
def test_every_kind_of_compressor_drives_the_downlink(down: str) -> None:
    _, results, ps = _run(down, rounds=60)
    assert TASK.loss(ps.theta, TRAIN.X, TRAIN.y) < np.log(10) - 0.3  # learned from log(10) at theta = 0
    assert all(r.digest_mismatches == 0 for r in results)


def test_cli_refuses_a_bad_down_compressor() -> None:
    result = CliRunner().invoke(main, ["start-server", "--algorithm", "gd", "--down-compressor", "topk:ratio"])
    assert result.exit_code == 2 and "KEY=NUMBER" in result.output

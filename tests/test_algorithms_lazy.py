"""The lazy family: LAG-WK (Chen et al., NeurIPS 2018), LASG / SASG (Deng et al., arXiv:2112.04088,
eq. 6, eqs. 8-9), SLAQ (Sun et al., NeurIPS 2019, §4).

Two kinds of test, both on "digits" with M = 3 workers:
- in-process: a loop that does exactly what server and workers do (the worker's own minibatch
  oracle ``worker.client._Gradients``, ``Aggregator``, ``StepHistory``, the float32 broadcast),
  with the workers summed in index order, so runs are reproducible to the last bit;
- end to end: a real gRPC server and worker threads. Workers report in whatever order the
  threads run, and the server's running sum ``total += v - stored`` is then added in that
  order, so two e2e runs agree only to rounding (checked with a 1e-9 tolerance), while their
  decisions (who uploads when) must agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from psrv import data
from psrv.aggregate import Aggregator
from psrv.algorithms import ALGORITHMS, RoundInfo, make_algorithm
from psrv.bitpack import index_width
from psrv.compress.topk import topk_indices
from psrv.payload import to_dense
from psrv.server import ParameterServer, ServerConfig
from psrv.tasks import make_task
from psrv.triggers import StepHistory
from tests.helpers.threaded import run_in_threads
from worker.client import _Gradients, load_training_data

M = 3


# ---------------------------------------------------------------------------------- in-process


@dataclass
class Sim:
    theta: np.ndarray
    agg: Aggregator
    states: list[Any]
    evals: list[int]
    uploads: np.ndarray  # (rounds, M) bool
    steps: list[list[dict[str, Any]]] = field(default_factory=list)  # per round, per worker


_DATA: dict[str, Any] = {}


def _shards() -> tuple[list[data.Dataset], Any]:
    if not _DATA:
        train, _ = load_training_data("digits", 0.2, 0)
        _DATA["shards"] = [data.shard(train, i, M) for i in range(M)]
        _DATA["task"] = make_task("logreg", train.n_features, train.n_classes)
    return _DATA["shards"], _DATA["task"]


def simulate(name: str, options: dict[str, float], rounds: int, seed: int = 0, keep: bool = False) -> Sim:
    """What ParameterServer.run + run_worker compute, workers in index order."""
    algo = make_algorithm(name, options)
    shards, task = _shards()
    theta = task.init_params(np.random.default_rng(seed)).astype(np.float64)
    agg = Aggregator(M, task.dim, algo.absorb)
    history = StepHistory(algo.history_depth)
    rngs = [np.random.default_rng([seed, m]) for m in range(M)]
    states = [algo.init(task.dim) for _ in range(M)]
    batch = int(getattr(algo, "batch", 0))
    mb = SimpleNamespace(num_workers=M, total_samples=sum(len(s) for s in shards))
    evals, uploads, steps = [0] * M, np.zeros((rounds, M), dtype=bool), []
    for k in range(rounds):
        broadcast = theta.astype(np.float32)  # ServerConfig.broadcast_dtype default
        row = []
        for m in range(M):
            grads = _Gradients(task, shards[m], mb, batch, rngs[m])
            _, g = grads.loss_grad(broadcast)
            info = RoundInfo(k, M, history.recent(), broadcast, grads.grad_at)
            before = states[m]
            dec = algo.step(before, g, info, rngs[m])
            evals[m] += grads.evals
            states[m] = dec.state
            if dec.payload is not None:
                agg.add(m, dec.payload)
                uploads[k, m] = True
            if keep:
                row.append({"grad": g, "theta": broadcast, "before": before, "dec": dec, "oracle": grads})
        steps.append(row)
        step = -algo.lr * agg.total
        theta += step
        history.push(float(step @ step))
    return Sim(theta, agg, states, evals, uploads, steps)


def _longest_skip_run(uploads: np.ndarray) -> int:
    longest = 0
    for m in range(uploads.shape[1]):
        run = 0
        for up in uploads[:, m]:
            run = 0 if up else run + 1
            longest = max(longest, run)
    return longest


def test_registered_defaults() -> None:
    lag = make_algorithm("lag-wk")
    assert (lag.D, lag.xis[0], lag.t_bar, lag.batch, lag.absorb, lag.payload_kinds) == (
        10,
        0.1,
        100,
        0,
        "replace",
        ("dense",),
    )
    lasg, sasg = make_algorithm("lasg"), make_algorithm("sasg")
    for a in (lasg, sasg):
        assert (a.batch, a.D, a.xis[0], a.t_bar, a.absorb, a.history_depth) == (10, 10, 0.1, 10, "replace", 10)
    assert lasg.payload_kinds == ("dense",) and sasg.payload_kinds == ("sparse",)
    assert sasg.compressor.ratio == 0.01 and sasg.compressor.k_for(650) == 7 and sasg.ef and not lasg.ef
    slaq, laq = make_algorithm("slaq"), make_algorithm("laq")
    assert (slaq.batch, slaq.bits, slaq.lr, slaq.D, slaq.t_bar, slaq.name) == (500, 3, 0.008, 10, 100, "slaq")
    assert slaq.xis == laq.xis == (0.08,) * 10
    assert (laq.batch, laq.bits, laq.lr, laq.name) == (0, 4, 0.02, "laq")  # laq unchanged
    assert make_algorithm("slaq", {"batch": 32, "bits": 8}).batch == 32
    for bad in (
        ("lag-wk", {"ratio": 0.1}, ""),
        ("lag-wk", {}, "topk"),
        ("lasg", {}, "topk"),
        ("lasg", {"ef": 1}, ""),
        ("sasg", {"batch": -1}, ""),
        ("slaq", {"nope": 1}, ""),
        ("lasg", {"batch": 2.5}, ""),
    ):
        with pytest.raises(ValueError):
            make_algorithm(bad[0], bad[1], bad[2])


def test_lag_wk_with_xi_zero_is_gd_exactly() -> None:
    lag = simulate("lag-wk", {"xi": 0.0}, 30)
    gd = simulate("gd", {}, 30)
    assert lag.uploads.all()
    np.testing.assert_array_equal(lag.theta, gd.theta)
    assert lag.evals == [30] * M  # one evaluation per round


def test_lag_wk_compares_against_exactly_what_the_server_stores() -> None:
    sim = simulate("lag-wk", {"lr": 0.5}, 40, keep=True)
    assert M < sim.uploads.sum() < sim.uploads.size  # the default xi = 1/D skips, and uploads again
    assert sim.uploads[0].all()  # round 0: stored 0, empty history -> everyone uploads
    for m in range(M):
        np.testing.assert_array_equal(sim.states[m].last, sim.agg.contribution(m))
    for row in sim.steps:
        for s in row:
            change = s["grad"] - s["before"].last
            assert s["dec"].stats["lhs"] == float(change @ change)
            assert (s["dec"].payload is None) == (s["dec"].stats["lhs"] <= s["dec"].stats["rhs"])  # clock < 100


def test_lasg_with_xi_zero_is_sgd_exactly() -> None:
    assert "sgd" in ALGORITHMS
    lasg = simulate("lasg", {"xi": 0.0, "batch": 10}, 30)
    sgd = simulate("sgd", {"batch": 10}, 30)
    assert lasg.uploads.all()
    np.testing.assert_array_equal(lasg.theta, sgd.theta)
    # the stochastic rule really costs two gradients per round, except round 0 (first upload)
    assert lasg.evals == [2 * 30 - 1] * M and sgd.evals == [30] * M


def test_sasg_with_all_coordinates_and_xi_zero_is_sgd() -> None:
    """k = d: Top_k is the identity, so theta^{k+1} = theta^k - sum_m (alpha g_m + e_m) with
    alpha = lr (the paper's memory is lr * e'). The only memory left is the float32 rounding of
    the sent values, which SASG feeds back and SGD drops, so the two agree to float32 rounding."""
    sasg = simulate("sasg", {"xi": 0.0, "ratio": 1.0, "batch": 10}, 30)
    sgd = simulate("sgd", {"batch": 10}, 30)
    assert sasg.uploads.all() and sasg.evals == [59] * M
    np.testing.assert_allclose(sasg.theta, sgd.theta, rtol=1e-6, atol=1e-8)
    largest = max(np.abs(sasg.agg.contribution(m)).max() for m in range(M))
    for s in sasg.states:
        assert np.abs(s.memory).max() < 1e-6 * max(1.0, largest)  # float32 residue only


def test_sasg_error_feedback_conserves_mass_and_skips_leave_it_alone() -> None:
    options = {"lr": 0.5}  # paper defaults otherwise: batch 10, top-1%, D = 10, xi = 1/D, t_bar = 10
    sim = simulate("sasg", options, 60, keep=True)
    algo = make_algorithm("sasg", options)
    k = algo.compressor.k_for(650)
    ups, skips = int(sim.uploads.sum()), int((~sim.uploads).sum())
    assert ups > M and skips > 0
    sent_sum = np.zeros((M, 650))
    grad_sum = np.zeros((M, 650))
    for row in sim.steps:
        for m, s in enumerate(row):
            before, dec = s["before"], s["dec"]
            if dec.payload is None:
                assert dec.state.memory is before.memory  # e unchanged on a skip
                assert dec.state.theta_hat is before.theta_hat and dec.state.clock == before.clock + 1
                continue
            assert dec.payload.kind == "sparse" and len(dec.payload.indices) == k
            sent = to_dense(dec.payload)
            sent_sum[m] += sent
            grad_sum[m] += s["grad"]
            np.testing.assert_array_equal(dec.state.theta_hat, s["theta"])  # theta_hat = this broadcast
            # the paper's step: Top_k(alpha g + e) with e = alpha e' -- same support, lr * values
            lr = algo.lr
            p = lr * s["grad"] + lr * before.memory
            idx = topk_indices(p, k)
            np.testing.assert_array_equal(np.sort(idx), dec.payload.indices)
            np.testing.assert_allclose(lr * sent[idx], p[idx], rtol=1e-6)
    for m in range(M):
        # sum sent + e' == sum g over uploads (times alpha: sum Top_k(p) + e == sum alpha g)
        np.testing.assert_allclose(sent_sum[m] + sim.states[m].memory, grad_sum[m], rtol=1e-10, atol=1e-12)
        stored = sim.agg.payloads[m]  # the server stores only the sparse contribution, as sent
        assert stored.kind == "sparse" and len(stored.indices) == k and stored.values.dtype == np.float32
        np.testing.assert_array_equal(sim.agg.contribution(m), to_dense(_last_payload(sim, m)))
    assert sim.evals == [2 * 60 - 1] * M


def _last_payload(sim: Sim, m: int):
    return next(row[m]["dec"].payload for row in reversed(sim.steps) if row[m]["dec"].payload is not None)


def test_lasg_evaluates_eq6_on_the_same_minibatch_at_theta_hat() -> None:
    """lhs is ||g(theta^k; xi^k) - g(theta_hat; xi^k)||^2 on THIS round's rows, theta_hat being the
    broadcast theta of the worker's last upload; the decision is lazy_skip(lhs, rhs, clock, t_bar)."""
    _, task = _shards()
    sim = simulate("lasg", {"lr": 0.5, "t_bar": 3}, 40, keep=True)
    assert sim.uploads[0].all() and 0 < sim.uploads.sum() < sim.uploads.size
    forced = by_rule = 0
    for k, row in enumerate(sim.steps):
        for m, s in enumerate(row):
            before, dec, oracle = s["before"], s["dec"], s["oracle"]
            if k == 0:
                assert before.theta_hat is None and dec.payload is not None and "lhs" not in dec.stats
                continue
            last_up = max(j for j in range(k) if sim.uploads[j, m])
            np.testing.assert_array_equal(before.theta_hat, sim.steps[last_up][m]["theta"])
            _, g_hat = task.local_loss_grad(before.theta_hat, oracle.X, oracle.y, oracle.total, M)
            change = s["grad"] - g_hat
            assert dec.stats["lhs"] == float(change @ change)
            wants_skip = dec.stats["lhs"] <= dec.stats["rhs"]
            assert (dec.payload is None) == (wants_skip and before.clock < 3)
            forced += wants_skip and dec.payload is not None
            by_rule += not wants_skip
            if dec.payload is not None:
                np.testing.assert_array_equal(to_dense(dec.payload), s["grad"].astype(np.float32))
    assert forced > 0 and by_rule > 0  # uploads forced by the maximum delay, and uploads by eq. 6


@pytest.mark.parametrize("name", ["lag-wk", "lasg", "sasg", "laq", "slaq"])
def test_max_staleness_in_process(name: str) -> None:
    options = {"xi": 1e6, "t_bar": 3}
    if name == "slaq":
        options["batch"] = 50
    sim = simulate(name, options, 25)
    assert sim.uploads[0].all()
    assert _longest_skip_run(sim.uploads) == 3  # wants to skip always, never more than t_bar in a row


def test_laq_with_xi_zero_still_skips_but_tracks_gd_with_16_bits() -> None:
    """xi = 0 removes the step-history term of (7a) but not 3(||eps||^2 + ||eps_hat||^2): with
    b = 3 workers still skip; with b = 16 the quantization error is ~2^-16 of the radius, LAQ
    uploads every round and stays within the quantization error of GD."""
    coarse = simulate("laq", {"xi": 0.0, "bits": 3}, 60)
    assert (~coarse.uploads).sum() > 0
    fine = simulate("laq", {"xi": 0.0, "bits": 16}, 60)
    gd = simulate("gd", {}, 60)
    assert fine.uploads.all()
    err = np.linalg.norm(fine.theta - gd.theta) / np.linalg.norm(gd.theta)
    assert err < 1e-4
    assert np.linalg.norm(coarse.theta - gd.theta) / np.linalg.norm(gd.theta) > err


def test_slaq_is_laq_on_minibatches() -> None:
    """With b = 16 and xi = 0, SLAQ on batch B tracks SGD on batch B (same worker rngs -> same rows)."""
    slaq = simulate("slaq", {"xi": 0.0, "bits": 16, "batch": 50}, 40)
    sgd = simulate("sgd", {"batch": 50, "lr": 0.008}, 40)
    full = simulate("laq", {"xi": 0.0, "bits": 16, "lr": 0.008}, 40)
    assert slaq.uploads.all() and slaq.evals == [40] * M
    close = np.linalg.norm(slaq.theta - sgd.theta) / np.linalg.norm(sgd.theta)
    assert close < 1e-4 < np.linalg.norm(slaq.theta - full.theta) / np.linalg.norm(full.theta)


# ---------------------------------------------------------------------------------- end to end


def train(algorithm: str, options: dict[str, float], rounds: int, broadcast: str = "float32"):
    config = ServerConfig(
        algorithm=algorithm,
        options=options,
        num_workers=M,
        rounds=rounds,
        round_timeout=20.0,
        broadcast_dtype=broadcast,
    )
    ps = ParameterServer(config)
    full, _ = load_training_data("digits", 0.2, 0)
    summary, results = run_in_threads(ps, [data.shard(full, i, M) for i in range(M)])  # index i <-> shard i
    assert summary["rounds"] == rounds and summary["deadline_misses"] == 0
    assert all(r.rejected == 0 for r in results)
    np.testing.assert_array_equal(results[0].final_params, results[-1].final_params)
    uploads = np.array([[w["status"] == "upload" for w in rec["workers"]] for rec in ps.records])
    return ps, results, uploads


@pytest.mark.parametrize(
    ("lazy", "options", "baseline", "base_options", "evals"),
    [
        ("lag-wk", {"xi": 0.0}, "gd", {}, 1),
        ("lasg", {"xi": 0.0, "batch": 10}, "sgd", {"batch": 10}, 2),
    ],
)
def test_e2e_xi_zero_uploads_every_round_like_baseline(lazy, options, baseline, base_options, evals) -> None:
    R = 12
    ps, results, uploads = train(lazy, options, R, broadcast="float64")
    _, base_results, base_uploads = train(baseline, base_options, R, broadcast="float64")
    assert uploads.all() and base_uploads.all()
    np.testing.assert_allclose(results[0].final_params, base_results[0].final_params, rtol=1e-9, atol=1e-12)
    assert [r.grad_evals for r in results] == [evals * R - (evals - 1)] * M
    assert [r.uploads for r in results] == [R] * M


@pytest.mark.parametrize("name", ["lag-wk", "lasg", "sasg"])
def test_e2e_no_worker_exceeds_max_staleness(name: str) -> None:
    R, t_bar = 14, 3
    ps, results, uploads = train(name, {"xi": 1e6, "t_bar": t_bar}, R)
    assert uploads[0].all()
    assert _longest_skip_run(uploads) == t_bar
    # it wants to skip every round it may: upload exactly every t_bar + 1 rounds
    assert [r.uploads for r in results] == [len(range(0, R, t_bar + 1))] * M
    if name != "lag-wk":
        assert [r.grad_evals for r in results] == [2 * R - 1] * M


def test_e2e_sasg_stores_sparse_contributions() -> None:
    R = 15
    ps, results, uploads = train("sasg", {}, R)
    k = ps.algorithm.compressor.k_for(ps.theta.size)
    assert ps.algorithm.payload_kinds == ("sparse",) and k == 7
    assert 0 < uploads.sum() < uploads.size
    for m in range(M):
        stored = ps.engine.state.aggregator.payloads[m]
        assert stored.kind == "sparse" and len(stored.indices) == k
        assert 0 < np.count_nonzero(ps.engine.state.aggregator.contribution(m)) <= k
    bits = k * (32 + index_width(ps.theta.size))
    for rec in ps.records:
        for w in rec["workers"]:
            assert w["bits"] == (bits if w["status"] == "upload" else 0)
    assert [r.grad_evals for r in results] == [2 * R - 1] * M
    assert sum(r.uploads for r in results) == int(uploads.sum())

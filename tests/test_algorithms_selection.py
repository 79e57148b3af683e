"""Server-side worker selection (RIAG, CIAG: incremental aggregated gradient; LAG-PS) and
minibatch SGD, through the whole stack: a real gRPC server on port 0 and worker threads, as in
tests/test_compress_e2e.py. Exact comparisons between runs are sound: every upload is float32,
so the server's float64 sums of them do not depend on the order uploads arrive in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from psrv import data
from psrv.algorithms import RoundInfo, SelectionView, make_algorithm
from psrv.metrics import MetricsSink
from psrv.payload import Payload, to_dense
from psrv.server import ParameterServer, ServerConfig
from psrv.tasks import make_task
from psrv.triggers import lag_ps_upload, lag_threshold
from tests.helpers.threaded import run_in_threads
from worker.client import load_training_data

TRAIN, _ = load_training_data("digits", 0.2, 0)
TASK = make_task("logreg", TRAIN.n_features, TRAIN.n_classes)


@dataclass
class Run:
    ps: ParameterServer
    results: list  # WorkerResult per thread
    thetas: list[np.ndarray]  # theta^k, k = 0..rounds (float64, as the server holds it)
    shards: list[data.Dataset]  # by server-assigned worker index
    pushed: dict[str, list[Payload]]  # every accepted upload, by worker id

    def statuses(self, index: int) -> list[str]:
        return [rec["workers"][index]["status"] for rec in self.ps.records]

    def uploaders(self, k: int) -> set[int]:
        return {i for i, w in enumerate(self.ps.records[k]["workers"]) if w["status"] == "upload"}


def _train(algorithm: str, options: dict[str, float], num_workers: int, rounds: int, compressor: str = "") -> Run:
    cfg = ServerConfig(
        algorithm=algorithm,
        compressor=compressor,
        options=options,
        num_workers=num_workers,
        rounds=rounds,
        round_timeout=20.0,
    )
    thetas = [TASK.init_params(np.random.default_rng(cfg.seed)).astype(np.float64)]
    # theta^{k+1} after round k
    ps = ParameterServer(cfg, MetricsSink(on_round=lambda rec: thetas.append(ps.theta.copy())))
    pushed: dict[str, list[Payload]] = {f"w{i}": [] for i in range(num_workers)}
    push = ps.engine.push

    def recording_push(worker_id: str, round_: int, payload: Payload, *args, **kw) -> None:
        push(worker_id, round_, payload, *args, **kw)
        pushed[worker_id].append(payload)  # accepted

    ps.engine.push = recording_push
    shards = [data.shard(TRAIN, i, num_workers) for i in range(num_workers)]
    summary, results = run_in_threads(ps, shards)
    assert summary["rounds"] == rounds and summary["deadline_misses"] == 0
    assert all(r.rejected == 0 for r in results)
    return Run(ps, results, thetas, shards, pushed)  # run_in_threads gives worker i the server index i


def _grad(run: Run, index: int, k: int) -> np.ndarray:
    """Worker ``index``'s full gradient at the iterate broadcast in round k (float32 on the wire)."""
    theta = run.thetas[k].astype(np.float32).astype(np.float64)
    shard = run.shards[index]
    total = sum(len(s) for s in run.shards)
    return TASK.local_loss_grad(theta, shard.X, shard.y, total, len(run.shards))[1]


def _uploaded_sums(run: Run) -> list[np.ndarray]:
    """Per worker (by index), the sum of everything it uploaded: its g_m, which the server does not keep."""
    return [np.sum([to_dense(p) for p in run.pushed[f"w{m}"]], axis=0) for m in range(len(run.shards))]


def _check_running_sum(run: Run) -> None:
    """The server keeps sum_m grad f_m(theta_hat_m) (the running-sum form of IAG) alone, not a d x M table."""
    agg = run.ps.engine.state.aggregator
    assert agg.payloads == [] and agg.nbytes == agg.total.nbytes
    sums = _uploaded_sums(run)
    np.testing.assert_allclose(agg.total, np.sum(sums, axis=0), rtol=1e-12, atol=1e-14)
    for m in range(len(run.shards)):
        last = max(k for k, s in enumerate(run.statuses(m)) if s == "upload")
        g = _grad(run, m, last)
        np.testing.assert_allclose(sums[m], g, rtol=0, atol=1e-6 * np.abs(g).max())


def _check_grad_evals(run: Run) -> None:
    """Unselected workers compute nothing: one gradient evaluation per selected round."""
    for r in run.results:
        assert r.grad_evals == run.statuses(r.index).count("upload") == r.uploads


def _view(round_: int, num: int, **kw) -> SelectionView:
    base = dict(
        round=round_,
        theta=np.zeros(3),
        theta_hat=None,
        smoothness=(0.0,) * num,
        staleness=(0,) * num,
        recent_step_sq=(),
    )
    base.update(kw)
    return SelectionView(**base)


# ---------------------------------------------------------------- registration and selection rules


def test_registered_options() -> None:
    assert make_algorithm("sgd").batch == 10
    assert make_algorithm("sgd", {"batch": 32}).batch == 32
    assert make_algorithm("gd").batch == 0 and make_algorithm("gd", {"batch": 7}).batch == 7
    for name in ("riag", "ciag"):
        algo = make_algorithm(name, {"s": 2, "batch": 5})
        assert (algo.s, algo.batch, algo.absorb, algo.payload_kinds) == (2, 5, "accumulate", ("dense",))
        assert make_algorithm(name, {"ratio": 0.1}, "topk").payload_kinds == ("sparse",)
    lag = make_algorithm("lag-ps")
    assert (lag.D, lag.history_depth, lag.xis, lag.t_bar, lag.absorb) == (10, 10, (1.0,) * 10, 100, "replace")
    assert lag.tracks_theta_hat
    for name, options, comp in (
        ("sgd", {"batch": -1}, ""),
        ("riag", {"s": 0}, ""),
        ("lag-ps", {"xi": 1, "bogus": 1}, ""),
        ("lag-ps", {}, "topk"),
    ):
        with pytest.raises(ValueError):
            make_algorithm(name, options, comp)


def test_ciag_and_riag_select() -> None:
    rng = np.random.default_rng(0)
    ciag, riag = make_algorithm("ciag", {"s": 3}), make_algorithm("riag", {"s": 2})
    assert [sorted(ciag.select(_view(k, 4), rng)) for k in range(4)] == [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]]
    assert [sorted(make_algorithm("ciag").select(_view(k, 3), rng)) for k in range(4)] == [[0], [1], [2], [0]]
    picks = [riag.select(_view(k, 5), rng) for k in range(200)]
    assert all(len(p) == 2 and p <= set(range(5)) for p in picks)
    counts = np.bincount([i for p in picks for i in p], minlength=5)
    assert counts.min() > 40  # uniform: 80 expected each
    assert make_algorithm("riag", {"s": 9}).select(_view(0, 3), rng) == {0, 1, 2}  # s > M: everyone


def test_incremental_state_is_what_the_server_adds() -> None:
    algo = make_algorithm("riag")
    rng = np.random.default_rng(1)
    state, server = algo.init(50), np.zeros(50)
    info = RoundInfo(0, 1)
    for k in range(5):
        grad = rng.normal(size=50) * 1e-3
        d = algo.step(state, grad, info, rng)
        if k == 0:  # the first upload is the gradient itself
            np.testing.assert_array_equal(to_dense(d.payload), grad.astype(np.float32))
        server += to_dense(d.payload)
        state = d.state
        np.testing.assert_array_equal(state, server)  # bit for bit: no drift between the copies
        np.testing.assert_allclose(state, grad, rtol=0, atol=1e-6 * np.abs(grad).max())


def test_lag_ps_select_rule() -> None:
    lag = make_algorithm("lag-ps", {"t_bar": 5})
    rng = np.random.default_rng(0)
    theta_hat = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    kw = dict(theta_hat=theta_hat, smoothness=(1.0, 1.0, 0.0, 0.0), recent_step_sq=(0.5e-4,) * 3)
    for k in (0, 1):  # forced: the L_m estimate needs two uploads
        assert lag.select(_view(k, 4, staleness=(0, 0, 0, 0), **kw), rng) == {0, 1, 2, 3}
    threshold = lag_threshold(lag.xis, kw["recent_step_sq"], lag.lr, 4)
    assert 0 < threshold < 1  # worker 1 (L^2 drift = 1) violates; 0 has no drift; 2 and 3 have L = 0
    got = lag.select(_view(2, 4, staleness=(0, 0, 4, 5), **kw), rng)
    want = {
        m for m in range(4) if lag_ps_upload(kw["smoothness"][m], theta_hat[m, 0] ** 2, threshold, (0, 0, 4, 5)[m], 5)
    }
    assert got == want == {1, 3}  # 3: staleness reached t_bar


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("s", [1, 2])
def test_riag_end_to_end(s: int) -> None:
    M, rounds = 4, 20
    run = _train("riag", {"s": s, "lr": 0.05}, M, rounds)
    for k, rec in enumerate(run.ps.records):
        assert rec["uploads"] == s and rec["skips"] == M - s
        assert sorted(w["status"] for w in rec["workers"]) == ["not_selected"] * (M - s) + ["upload"] * s, k
    assert len({frozenset(run.uploaders(k)) for k in range(rounds)}) > 1  # random, not fixed
    assert all("upload" in run.statuses(m) for m in range(M))  # 20 rounds: everyone was picked
    _check_grad_evals(run)
    _check_running_sum(run)


def test_ciag_end_to_end_is_cyclic() -> None:
    M, rounds, s = 3, 10, 2
    run = _train("ciag", {"s": s, "lr": 0.05}, M, rounds)
    for k in range(rounds):
        assert run.uploaders(k) == {(k * s + j) % M for j in range(s)}
        assert run.ps.records[k]["skips"] == M - s
    _check_grad_evals(run)
    _check_running_sum(run)


def test_riag_with_a_compressor() -> None:
    M, rounds = 3, 8
    run = _train("riag", {"s": 2, "ratio": 0.2}, M, rounds, compressor="topk")
    agg = run.ps.engine.state.aggregator
    assert all(rec["uploads"] == 2 for rec in run.ps.records)
    np.testing.assert_allclose(agg.total, np.sum(_uploaded_sums(run), axis=0), rtol=1e-12, atol=1e-14)
    assert agg.payloads == []
    assert sum(rec["payload_bits"] for rec in run.ps.records) < 0.5 * 32 * TASK.dim * 2 * rounds
    _check_grad_evals(run)


def test_lag_ps_end_to_end() -> None:
    M, rounds = 4, 30
    run = _train("lag-ps", {}, M, rounds)
    assert run.uploaders(0) == run.uploaders(1) == set(range(M))
    uploads = sum(rec["uploads"] for rec in run.ps.records)
    assert uploads < M * rounds  # it does skip
    assert TASK.loss(run.thetas[-1], TRAIN.X, TRAIN.y) < TASK.loss(run.thetas[0], TRAIN.X, TRAIN.y)
    assert all(rec["skips"] + rec["uploads"] == M for rec in run.ps.records)
    _check_grad_evals(run)
    # the stored gradient is the one at the iterate of the last upload ("replace")
    for m in range(M):
        last = max(k for k, s in enumerate(run.statuses(m)) if s == "upload")
        agg = run.ps.engine.state.aggregator
        assert agg.payloads[m].kind == "dense" and agg.payloads[m].values.dtype == np.float32  # as sent
        np.testing.assert_array_equal(agg.contribution(m), _grad(run, m, last).astype(np.float32))


def _longest_gap(statuses: list[str]) -> int:
    gap = longest = 0
    for s in statuses:
        gap = gap + 1 if s == "not_selected" else 0
        longest = max(longest, gap)
    return longest


def test_lag_ps_staleness_never_exceeds_t_bar() -> None:
    M, rounds, t_bar = 3, 14, 3
    run = _train("lag-ps", {"xi": 1e9, "t_bar": t_bar}, M, rounds)  # huge threshold: only t_bar selects
    assert run.uploaders(0) == run.uploaders(1) == set(range(M))
    for m in range(M):
        assert _longest_gap(run.statuses(m)) == t_bar
        assert run.statuses(m)[2:] == (["not_selected"] * t_bar + ["upload"]) * 3
    _check_grad_evals(run)


def test_lag_ps_with_xi_zero_is_gd() -> None:
    M, rounds = 3, 12
    lag = _train("lag-ps", {"xi": 0}, M, rounds)
    gd = _train("gd", {}, M, rounds)
    assert all(rec["uploads"] == M for rec in lag.ps.records)
    np.testing.assert_array_equal(lag.ps.theta, gd.ps.theta)
    np.testing.assert_array_equal(lag.results[0].final_params, gd.results[0].final_params)


def test_sgd_full_batch_is_gd() -> None:
    M, rounds = 3, 10
    n_max = max(len(data.shard(TRAIN, i, M)) for i in range(M))  # shard sizes differ by at most 1
    sgd = _train("sgd", {"batch": n_max}, M, rounds)
    gd = _train("gd", {}, M, rounds)
    np.testing.assert_array_equal(sgd.ps.theta, gd.ps.theta)
    assert [r.grad_evals for r in sgd.results] == [rounds] * M


def test_sgd_minibatch_decreases_loss() -> None:
    M, rounds = 3, 30
    run = _train("sgd", {"batch": 10, "lr": 0.1}, M, rounds)
    losses = [TASK.loss(theta, TRAIN.X, TRAIN.y) for theta in run.thetas]
    assert losses[-1] < 0.8 * losses[0]
    full = _train("gd", {"lr": 0.1}, M, 2)
    assert not np.array_equal(run.thetas[1], full.thetas[1])  # it really used minibatches

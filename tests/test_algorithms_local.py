"""Local updates (psrv.algorithms.local): local-sgd (FedAvg), fedavg-m, scaffold, client sampling.

Two kinds of test. Through the whole stack (a real gRPC server and worker threads, as in
tests/test_algorithms_selection.py) on digits: the exact equalities (K = 1 is sgd, beta = 1 is
local-sgd, sample = M is full participation), what sampling does on the wire, compression. And
on linreg-hetero (ten workers whose local least-squares optima differ), the fixed points, driven
by :func:`simulate`, which runs the algorithms' own ``step``/``observe``/``select`` exactly as the
engine and the workers combine them (checked against the real stack in
``test_simulation_matches_the_real_stack``) but without sockets, so hundreds of rounds take a second.
"""

from __future__ import annotations

import numpy as np
import pytest

from psrv import data
from psrv.algorithms import RoundInfo, SelectionView, make_algorithm
from psrv.algorithms.local import Scaffold
from psrv.metrics import MetricsSink
from psrv.payload import Payload, to_dense
from psrv.server import ParameterServer, ServerConfig
from psrv.tasks import make_task
from tests.helpers.threaded import run_in_threads
from worker.client import load_training_data

DIGITS, _ = load_training_data("digits", 0.2, 0)
M_HETERO = 10


def _hetero() -> tuple[data.Dataset, list[data.Dataset]]:
    """linreg-hetero's ten blocks (curvatures 1 .. 112) with block m's targets moved by X_m v_m,
    v_m ~ N(0, I) (seeded): each worker's own least-squares optimum is w* + v_m, far from the others'."""
    base = data.load("linreg-hetero")
    rng = np.random.default_rng(12)
    shards = []
    for m in range(M_HETERO):
        sh = data.shard(base, m, M_HETERO, "contiguous")
        shards.append(data.Dataset(sh.X, sh.y + sh.X @ rng.standard_normal(sh.n_features), 0, "hetero"))
    return data.Dataset(
        np.concatenate([s.X for s in shards]), np.concatenate([s.y for s in shards]), 0, "hetero"
    ), shards


HETERO, SHARDS = _hetero()
LIN = make_task("linreg", HETERO.n_features, 0)


def _x_star() -> np.ndarray:
    X = np.column_stack([HETERO.X, np.ones(len(HETERO))])
    return np.linalg.lstsq(X, HETERO.y, rcond=None)[0]


X_STAR = _x_star()


def _f(theta: np.ndarray) -> float:
    return sum(LIN.local_loss_grad(theta, s.X, s.y, len(HETERO), M_HETERO)[0] for s in SHARDS)


F_STAR = _f(X_STAR)


# ---------------------------------------------------------------- the whole stack


def _train(algorithm: str, options: dict, num_workers: int = 4, rounds: int = 4, compressor: str = "", **cfg):
    config = ServerConfig(
        algorithm=algorithm,
        compressor=compressor,
        options=options,
        num_workers=num_workers,
        rounds=rounds,
        round_timeout=20.0,
        **cfg,
    )
    thetas = []
    ps = ParameterServer(config, MetricsSink(on_round=lambda rec: thetas.append(ps.theta.copy())))
    pushed: dict[int, dict[str, Payload]] = {}
    push = ps.engine.push

    def recording_push(worker_id: str, round_: int, payload: Payload, *args, **kw) -> None:
        push(worker_id, round_, payload, *args, **kw)
        pushed.setdefault(round_, {})[worker_id] = payload

    ps.engine.push = recording_push
    shards = cfg_shards = [data.shard(DIGITS, i, num_workers) for i in range(num_workers)]
    summary, results = run_in_threads(ps, cfg_shards)
    assert summary["rounds"] == rounds and summary["deadline_misses"] == 0
    assert all(r.rejected == 0 for r in results)
    return ps, summary, results, thetas, pushed, shards


def test_local_sgd_with_one_local_step_is_sgd_bit_for_bit() -> None:
    opts = {"lr": 0.1, "batch": 10}
    sgd = _train("sgd", opts)
    local = _train("local-sgd", {**opts, "local_steps": 1})
    np.testing.assert_array_equal(sgd[0].theta, local[0].theta)
    assert sgd[1]["bytes_up"] == local[1]["bytes_up"]
    assert [r.grad_evals for r in local[2]] == [4] * 4  # one gradient per round, as sgd


def test_fedavg_m_with_beta_one_is_local_sgd_and_beta_matters() -> None:
    opts = {"lr": 0.1, "local_steps": 3}
    fedavg = _train("local-sgd", opts)
    beta1 = _train("fedavg-m", {**opts, "beta": 1.0})
    np.testing.assert_array_equal(fedavg[0].theta, beta1[0].theta)
    assert [r.grad_evals for r in fedavg[2]] == [12] * 4  # K = 3 local gradients a round
    half = _train("fedavg-m", {**opts, "beta": 0.5})
    assert not np.array_equal(half[0].theta, fedavg[0].theta)


@pytest.mark.parametrize("algorithm", ["local-sgd", "scaffold"])
def test_sampling_all_workers_is_full_participation(algorithm: str) -> None:
    opts = {"lr": 0.1, "local_steps": 2}
    full = _train(algorithm, opts)
    everyone = _train(algorithm, {**opts, "sample": 4})
    np.testing.assert_array_equal(full[0].theta, everyone[0].theta)


@pytest.mark.parametrize("algorithm", ["local-sgd", "fedavg-m", "scaffold"])
def test_sampling_uploads_s_workers_and_the_step_is_their_round_alone(algorithm: str) -> None:
    lr, M, s, R = 0.1, 4, 2, 5
    ps, summary, results, thetas, pushed, _ = _train(algorithm, {"lr": lr, "local_steps": 2, "sample": s}, M, R)
    for k, rec in enumerate(ps.records):
        statuses = [w["status"] for w in rec["workers"]]
        assert statuses.count("upload") == s and statuses.count("not_selected") == M - s
        assert len(pushed[k]) == s
    # the unsampled compute nothing: K = 2 gradients per sampled round only
    assert sum(r.grad_evals for r in results) == 2 * s * R
    assert summary["uploads"] == s * R
    # theta^{k+1} = theta^k - lr * (the sum of round k's uploads): last round's do not linger
    for k in range(1, R):
        step = sum(to_dense(p) for p in pushed[k].values())
        np.testing.assert_allclose(thetas[k], thetas[k - 1] - lr * step, rtol=0, atol=1e-12)


def test_compressed_deltas_with_error_feedback() -> None:
    opts = {"lr": 0.1, "local_steps": 3}
    dense = _train("local-sgd", opts, rounds=6)
    topk = _train("local-sgd", {**opts, "ratio": 0.1}, compressor="topk", rounds=6)
    algo = make_algorithm("local-sgd", {**opts, "ratio": 0.1}, "topk")
    assert algo.ef and algo.compressor.name == "topk"  # biased compressor: error feedback by default
    assert topk[1]["bytes_up"] < 0.3 * dense[1]["bytes_up"]
    for k in range(1, 6):
        assert all(p.kind == "sparse" for p in topk[4][k].values())
        step = sum(to_dense(p) for p in topk[4][k].values())
        np.testing.assert_allclose(topk[3][k], topk[3][k - 1] - 0.1 * step, rtol=0, atol=1e-12)
    loss0 = DIGITS_LOSS(np.zeros_like(topk[0].theta))
    gain_dense, gain_topk = loss0 - DIGITS_LOSS(dense[0].theta), loss0 - DIGITS_LOSS(topk[0].theta)
    assert 0.3 * gain_dense < gain_topk < gain_dense  # it trains, a little slower than dense


def DIGITS_LOSS(theta: np.ndarray) -> float:  # noqa: N802
    task = make_task("logreg", DIGITS.n_features, DIGITS.n_classes)
    return task.local_loss_grad(theta, DIGITS.X, DIGITS.y, len(DIGITS), 1)[0]


def test_the_aggregate_needing_rules_refuse_a_dense_downlink_and_robust_rules() -> None:
    with pytest.raises(ValueError, match="replica downlink"):
        ServerConfig(algorithm="scaffold", downlink="dense")
    with pytest.raises(ValueError, match="replica downlink"):
        ServerConfig(algorithm="fedavg-m", down_compressor="topk:ratio=0.1")
    with pytest.raises(ValueError, match="aggregate mean"):
        ServerConfig(algorithm="local-sgd", aggregate="median")
    with pytest.raises(ValueError, match="local_steps >= 1"):
        make_algorithm("local-sgd", {"local_steps": 0})
    with pytest.raises(ValueError, match="beta must be in"):
        make_algorithm("fedavg-m", {"beta": 1.5})


# ---------------------------------------------------------------- the fixed points (linreg-hetero)


def simulate(
    name: str,
    options: dict,
    rounds: int,
    seed: int = 0,
    f32: bool = False,
    losses: list | None = None,
    start: tuple | None = None,
    shards: list | None = None,
):
    """The engine's round for a full-batch run on the heterogeneous least squares: select, step (or
    observe), sum the uploads, ``theta -= lr * aggregate``. ``f32``: workers see the model in
    float32, as over the wire. ``start``: (theta, aggregate, states) to start from (default: zeros
    and ``init``); ``shards``: the workers' data (default the ten blocks). Returns the final
    (theta, aggregate, states)."""
    algo = make_algorithm(name, {"batch": 0, **options})
    shards = SHARDS if shards is None else shards
    M, N, d = len(shards), sum(len(sh) for sh in shards), LIN.dim
    if start is None:
        theta, aggregate, states = np.zeros(d), np.zeros(d), [algo.init(d) for _ in range(M)]
    else:
        theta, aggregate, states = start[0].copy(), start[1].copy(), list(start[2])
    server_rng = np.random.default_rng([seed, 7])
    worker_rngs = [np.random.default_rng([seed, m]) for m in range(M)]
    for r in range(rounds):
        view = SelectionView(r, theta, None, (0.0,) * M, (0,) * M, ())
        chosen = algo.select(view, server_rng) if algo.selects else frozenset(range(M))
        x = theta.astype(np.float32) if f32 else theta.copy()
        total = np.zeros(d)
        for m, sh in enumerate(shards):

            def grad(z, sh=sh):
                return LIN.local_loss_grad(z, sh.X, sh.y, N, M)[1]

            info = RoundInfo(r, M, (), x, grad, grad, len(sh) / N, aggregate)
            if m in chosen:
                dec = algo.step(states[m], grad(x), info, worker_rngs[m])
                states[m] = dec.state
                total += to_dense(dec.payload)
            else:
                states[m] = algo.observe(states[m], info)
        theta = theta - algo.lr * total
        aggregate = total
        if losses is not None:
            losses.append(_f(theta))
    return theta, aggregate, states


ETA, K = 0.008, 10  # eta L_max = 0.9 < 2 for every block's mean objective (L_m up to 112.5)
SLOW = {"local_lr": ETA, "local_steps": K, "lr": ETA * K}  # model averaging: gamma = eta K


def _dist(theta: np.ndarray) -> float:
    return float(np.linalg.norm(theta - X_STAR) / np.linalg.norm(X_STAR))


def fedavg_fixed_point(local_lr: float) -> np.ndarray:
    """The fixed point of full-batch FedAvg (K = 10, gamma = 0.08) on the quadratic: its round is an
    affine map x -> T x + b (up to the float32 rounding of the uploads), read off at 0 and the unit
    vectors; the fixed point solves (I - T) x = b."""
    opts = {**SLOW, "local_lr": local_lr}
    d = LIN.dim
    b = simulate("local-sgd", opts, 1)[0]
    T = np.column_stack([simulate("local-sgd", opts, 1, start=(e, np.zeros(d), [None] * M_HETERO))[0] - b
                         for e in np.eye(d)])  # fmt: skip
    return np.linalg.solve(np.eye(d) - T, b)


def test_fedavg_fixed_point_is_biased_scaffold_is_not() -> None:
    d = LIN.dim
    fixed = fedavg_fixed_point(ETA)
    again = simulate("local-sgd", SLOW, 1, start=(fixed, np.zeros(d), [None] * M_HETERO))[0]
    # a fixed point of FedAvg's round (to the float32 rounding of the uploads) ...
    np.testing.assert_allclose(again, fixed, rtol=0, atol=1e-6)
    assert _dist(fixed) > 0.1  # ... far from the global optimum (the local optima differ)
    moved = simulate("local-sgd", SLOW, 1, start=(X_STAR, np.zeros(d), [None] * M_HETERO))[0]
    assert _dist(moved) > 1e-3  # FedAvg leaves the optimum
    # FedAvg from 0 converges to that biased point; SCAFFOLD to the optimum
    fedavg = simulate("local-sgd", SLOW, 300)[0]
    assert np.linalg.norm(fedavg - fixed) < 1e-6 * np.linalg.norm(fixed)
    scaffold, _, states = simulate("scaffold", SLOW, 300)
    assert _dist(scaffold) < 1e-9
    # SCAFFOLD's fixed point: x*, c_m = grad F_m(x*), c = 0 (one more round moves nothing)
    for m, sh in enumerate(SHARDS):
        g = LIN.local_loss_grad(X_STAR, sh.X, sh.y, len(HETERO), M_HETERO)[1] * M_HETERO  # grad F_m = M grad f_m
        np.testing.assert_allclose(states[m].c_m, g, rtol=0, atol=1e-7 * np.linalg.norm(g) + 1e-9)


def test_fedavg_m_fixed_point_is_fedavg_at_local_rate_beta_eta_and_its_bias_shrinks_with_beta() -> None:
    """At a fixed point of FedAvg-M the aggregate g is 0 (x stops moving), so the local direction is
    beta grad F_m: FedAvg-M's fixed point is FedAvg's with local step beta*eta, whose drift, hence
    bias, shrinks with beta (SCAFFOLD removes it at any step). Checked: (FedAvg(beta eta)'s fixed
    point, g = 0) is a fixed point of FedAvg-M's round, and FedAvg-M from 0 converges to it."""
    d = LIN.dim
    bias_fedavg = _dist(fedavg_fixed_point(ETA))
    biases = {}
    for beta in (0.5, 0.1):
        opts = {**SLOW, "beta": beta}
        fixed = fedavg_fixed_point(ETA * beta)
        theta, g, _ = simulate("fedavg-m", opts, 1, start=(fixed, np.zeros(d), [None] * M_HETERO))
        np.testing.assert_allclose(theta, fixed, rtol=0, atol=1e-6)  # float32 uploads
        assert np.linalg.norm(g) < 1e-5
        biases[beta] = _dist(fixed)
    assert biases[0.5] < 0.7 * bias_fedavg and biases[0.1] < 0.2 * bias_fedavg
    theta = simulate("fedavg-m", {**SLOW, "beta": 0.5}, 300)[0]
    assert np.linalg.norm(theta - fedavg_fixed_point(ETA * 0.5)) < 1e-3 * np.linalg.norm(theta)


def test_scaffold_reaches_a_target_loss_in_fewer_rounds_than_fedavg() -> None:
    f_fedavg, f_scaffold = [], []
    simulate("local-sgd", SLOW, 150, losses=f_fedavg)
    simulate("scaffold", SLOW, 150, losses=f_scaffold)
    gap_fedavg = np.array(f_fedavg) - F_STAR
    gap_scaffold = np.array(f_scaffold) - F_STAR
    target = 1e-3 * (_f(np.zeros(LIN.dim)) - F_STAR)
    assert gap_scaffold.min() <= target and not gap_fedavg.min() <= target  # FedAvg stalls above it
    # a target FedAvg does reach (twice its final gap): SCAFFOLD gets there first
    loose = 2 * gap_fedavg[-1]
    assert np.flatnonzero(gap_scaffold <= loose)[0] < np.flatnonzero(gap_fedavg <= loose)[0]


@pytest.mark.parametrize("sample", [0, 5])
def test_scaffold_server_c_is_the_mean_of_the_workers_control_variates(sample: int) -> None:
    """c = sum_m share_m c_m after every round (equal shards here; full participation or sampled)."""
    algo: Scaffold = make_algorithm("scaffold", {**SLOW, "batch": 0, "sample": sample})
    for rounds in (1, 2, 7):
        _, aggregate, states = simulate("scaffold", {**SLOW, "sample": sample}, rounds)
        q = algo.sampled(M_HETERO) / M_HETERO
        # the c every worker will use next round, from the state and the round's aggregate
        info = RoundInfo(rounds, M_HETERO, aggregate=aggregate, share=0.1)
        c_next = [algo.server_c(s, info) for s in states]
        for c in c_next[1:]:
            np.testing.assert_array_equal(c, c_next[0])  # every worker derives the same c
        mean_c_m = sum(s.c_m for s in states) / M_HETERO
        np.testing.assert_allclose(c_next[0], mean_c_m, rtol=1e-9, atol=1e-12)
        if q == 1.0:
            np.testing.assert_array_equal(c_next[0], aggregate)  # full participation: c is the aggregate
    theta, _, _ = simulate("scaffold", {**SLOW, "sample": sample}, 300)
    assert _dist(theta) < 1e-8  # unbiased with sampling too


def test_simulation_matches_the_real_stack() -> None:
    """scaffold with sampling on linreg-hetero through gRPC (c derived from the replica's aggregate,
    the unsampled workers observing) ends where :func:`simulate` does with float32 broadcasts."""
    options = {**SLOW, "batch": 0, "sample": 5}
    config = ServerConfig(
        algorithm="scaffold", task="linreg", options=options, num_workers=M_HETERO, rounds=12, round_timeout=20.0
    )
    ps = ParameterServer(config, MetricsSink())
    summary, results = run_in_threads(ps, SHARDS)
    assert summary["uploads"] == 5 * 12
    assert {rec["downlink"] for rec in ps.records} <= {"update", "snapshot"}
    assert all(r.digest_mismatches == 0 for r in results)
    theta, _, _ = simulate("scaffold", {**SLOW, "sample": 5}, 12, f32=True)
    np.testing.assert_allclose(ps.theta, theta, rtol=1e-5, atol=1e-6)


def test_plot_curves_of_a_sampled_run_use_the_evaluated_loss() -> None:
    """With client sampling no round has every worker's loss: the plot takes the evaluated one."""
    from psrv.plots import curves

    records = [
        {"round": 0, "loss": None, "bytes_up": 10, "elapsed": 0.1},
        {"round": 1, "loss": None, "train_loss": 2.0, "bytes_up": 10, "elapsed": 0.2},
        {"round": 2, "loss": 1.5, "train_loss": 1.6, "bytes_up": 10, "elapsed": 0.3},
    ]
    assert curves(records) == {"round": [1, 2], "loss": [2.0, 1.5], "bytes_up": [20, 30], "elapsed": [0.2, 0.3]}


def test_scaffold_c_stays_the_mean_with_sampling_and_unequal_shards() -> None:
    """SCAFFOLD's unweighted form makes the derived c exact however the shards differ in size:
    shards of 20 .. 110 rows, 3 of 6 sampled per round."""
    cuts = np.cumsum([20, 50, 110, 60, 90])
    shards = [
        data.Dataset(X, y, 0, "uneven") for X, y in zip(np.split(HETERO.X, cuts), np.split(HETERO.y, cuts), strict=True)
    ]
    M = len(shards)
    algo = make_algorithm("scaffold", {**SLOW, "batch": 0, "sample": 3})
    for rounds in (3, 9):
        _, aggregate, states = simulate("scaffold", {**SLOW, "sample": 3}, rounds, shards=shards)
        c = algo.server_c(states[0], RoundInfo(rounds, M, aggregate=aggregate))
        np.testing.assert_allclose(c, sum(s.c_m for s in states) / M, rtol=1e-9, atol=1e-12)


def test_compressed_both_ways_with_sampling() -> None:
    """top-k deltas with error feedback up, EF21-P's compressed model down, half the workers a round."""
    opts = {"lr": 0.1, "local_steps": 3, "ratio": 0.1, "sample": 2}
    ps, summary, results, thetas, pushed, _ = _train(
        "local-sgd", opts, compressor="topk", rounds=6, down_compressor="topk:ratio=0.2"
    )
    assert {rec["downlink"] for rec in ps.records} == {"compressed"}
    assert all(r.digest_mismatches == 0 for r in results)
    assert summary["uploads"] == 2 * 6 and all(len(pushed[k]) == 2 for k in range(6))
    for k in range(1, 6):
        step = sum(to_dense(p) for p in pushed[k].values())
        np.testing.assert_allclose(thetas[k], thetas[k - 1] - 0.1 * step, rtol=0, atol=1e-12)
    assert DIGITS_LOSS(ps.theta) < DIGITS_LOSS(np.zeros_like(ps.theta))

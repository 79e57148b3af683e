"""Server optimizers (psrv.server_opt; Reddi et al., "Adaptive Federated Optimization", ICLR 2021):
the math first (each update against a hand-written reference and against torch.optim), then the
wire (the optimizer's state in snapshots and the digest), then the service (replicas bit-identical
to the server through real gRPC, a mid-run snapshot, convergence), and the options."""

from __future__ import annotations

import collections
import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from psrv import codec, data
from psrv.engine import Broadcast, RoundEngine
from psrv.options import jobs
from psrv.replica import Replica, state_digest, take_step
from psrv.server import ParameterServer, ServerConfig
from psrv.server_opt import SGD, Adam, AdamW, Momentum, OptState, make_server_opt
from psrv.triggers import StepHistory
from tests.helpers.threaded import run_in_threads
from worker.client import load_training_data

D = 40
STEPS = 25


def _gradients(seed: int = 0, steps: int = STEPS) -> list[np.ndarray]:
    """A sequence of pseudo-gradients with zero coordinates (v = 0 there: eps matters) and a
    spread of magnitudes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        g = rng.standard_normal(D) * np.logspace(-3, 1, D)
        g[::7] = 0.0
        out.append(g)
    return out


def _run(opt, grads: list[np.ndarray], theta0: np.ndarray) -> tuple[np.ndarray, list[float]]:
    theta, state, steps = theta0.copy(), opt.init(D), []
    for g in grads:
        step_sq, state = take_step(theta, g, opt, state)
        steps.append(step_sq)
    return theta, steps


# ------------------------------------------------------------------------------ the math
def test_sgd_is_the_plain_step_bit_for_bit() -> None:
    """The default is what psrv always did: ``theta += -lr * total``, ``||step||^2`` from it."""
    theta0 = np.random.default_rng(1).standard_normal(D)
    theta, steps = _run(SGD(0.05), _gradients(), theta0)
    ref = theta0.copy()
    for g, s in zip(_gradients(), steps, strict=True):
        step = -0.05 * g
        ref += step
        assert s == float(step @ step)
    assert theta.tobytes() == ref.tobytes()
    assert SGD(0.05).init(D).empty and SGD(0.05).init(D).digest_arrays() == ()


def test_momentum_matches_the_heavy_ball_reference() -> None:
    lr, beta = 0.01, 0.8
    theta0 = np.random.default_rng(2).standard_normal(D)
    theta, steps = _run(Momentum(lr, momentum=beta), _gradients(), theta0)
    ref, u = theta0.copy(), np.zeros(D)
    for g, s in zip(_gradients(), steps, strict=True):
        u = beta * u + g
        ref = ref - lr * u
        assert s == pytest.approx(lr**2 * float(u @ u), rel=1e-12)
    np.testing.assert_allclose(theta, ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_and_adamw_match_the_hand_written_reference(bias_correction: bool, weight_decay: float) -> None:
    """Kingma & Ba's Adam (with torch's placement of eps), or Reddi et al.'s Algorithm 2 form without
    bias correction; AdamW adds ``-lr * wd * theta`` (Loshchilov & Hutter)."""
    lr, b1, b2, eps = 0.01, 0.9, 0.99, 1e-6
    opt = AdamW(lr, b1, b2, eps, bias_correction, weight_decay=weight_decay)
    theta0 = np.random.default_rng(3).standard_normal(D)
    theta, _ = _run(opt, _gradients(), theta0)
    ref, m, v = theta0.copy(), np.zeros(D), np.zeros(D)
    for t, g in enumerate(_gradients(), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        if bias_correction:
            update = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        else:
            update = m / (np.sqrt(v) + eps)
        ref = ref - lr * update - lr * weight_decay * ref
    np.testing.assert_allclose(theta, ref, rtol=1e-12, atol=1e-14)
    if weight_decay == 0.0:  # adam is adamw without decay, bit for bit
        adam, _ = _run(Adam(lr, b1, b2, eps, bias_correction), _gradients(), theta0)
        assert adam.tobytes() == theta.tobytes()


def _torch_run(make_optimizer, grads: list[np.ndarray], theta0: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    optimizer = make_optimizer([p])
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
    return p.detach().numpy()


def test_each_optimizer_matches_torch_optim() -> None:
    """Where the definitions agree, to float64 rounding: momentum is torch's SGD with momentum and
    dampening 0 (torch's first buffer is g, ours ``beta * 0 + g``: the same); adam is torch's Adam
    (bias correction on, eps added after correcting v); adamw is torch's AdamW (torch multiplies
    theta by ``1 - lr*wd`` before the Adam step, we add ``-lr*wd*theta`` into the step: the same up
    to rounding). torch's Adam has no uncorrected form, so ``bias_correction=0`` (Reddi et al.'s
    Algorithm 2) is checked against the hand-written reference only; torch's ``weight_decay`` of
    SGD and Adam (an L2 term added to g) has no counterpart here (use ``--l2``)."""
    torch = pytest.importorskip("torch")
    grads, theta0 = _gradients(4, 60), np.random.default_rng(4).standard_normal(D)
    cases = [
        (Momentum(0.01, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)),
        (Adam(0.01, 0.9, 0.999, 1e-8), lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.9, 0.999), eps=1e-8)),
        (
            AdamW(0.01, 0.8, 0.99, 1e-6, weight_decay=0.05),
            lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
        ),
    ]
    for opt, make in cases:
        ours, _ = _run(opt, grads, theta0)
        theirs = _torch_run(make, grads, theta0)
        np.testing.assert_allclose(ours, theirs, rtol=1e-11, atol=1e-13, err_msg=opt.name)


def test_update_is_pure_and_bias_powers_are_products() -> None:
    """``update`` changes neither its inputs nor the old state; ``beta^t`` is a product of t factors
    (the same bits on every machine; pow may differ in the last bit between C libraries)."""
    opt = Adam(0.01, beta1=0.7, beta2=0.95)
    state, theta = opt.init(D), np.ones(D)
    for g in _gradients(5, 10):
        before = (state.m.copy(), state.v.copy(), theta.copy(), g.copy())
        step, new = opt.update(g, state, theta)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(before, (state.m, state.v, theta, g), strict=True))
        state = new
    b1 = b2 = 1.0
    for _ in range(10):
        b1, b2 = b1 * 0.7, b2 * 0.95
    assert (state.count, state.beta1_power, state.beta2_power) == (10, b1, b2)
    assert state.beta1_power == pytest.approx(0.7**10, rel=1e-15)


# ------------------------------------------------------------------------------ the wire
def test_the_digest_covers_the_optimizer_state() -> None:
    theta, total = np.random.default_rng(6).standard_normal((2, D))
    opt = Adam(0.01)
    _, state = opt.update(total, opt.init(D), theta)
    d0 = state_digest(theta, total, state)
    assert state_digest(theta, total, OptState()) == state_digest(theta, total)  # sgd: as before
    for arr in (state.m, state.v):
        arr.view(np.uint64)[3] ^= np.uint64(1)
        assert state_digest(theta, total, state) != d0
        arr.view(np.uint64)[3] ^= np.uint64(1)
    assert state_digest(theta, total, OptState(state.count + 1, state.m, state.v, *_powers(state))) != d0
    assert state_digest(theta, total, OptState(state.count, state.m, state.v, 0.5, state.beta2_power)) != d0


def _powers(s: OptState) -> tuple[float, float]:
    return s.beta1_power, s.beta2_power


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_snapshots_carry_the_optimizer_state_exactly(name: str) -> None:
    """A snapshot restores a replica that then steps exactly as the server does; a state of zeros
    (round 0) costs a few bytes; plain SGD adds nothing to a snapshot."""
    opt = make_server_opt(name, 0.01)
    rng = np.random.default_rng(7)
    theta, total = rng.standard_normal((2, D))
    state = opt.init(D)
    zero = codec.broadcast_to_proto(_snap(theta, total, state))
    assert zero.snapshot.HasField("server_opt") and zero.snapshot.server_opt.ByteSize() < 40
    for g in _gradients(7, 5):
        _, state = take_step(theta, g, opt, state)
    msg = codec.broadcast_to_proto(_snap(theta, total, state))
    m = codec.model_from_proto(codec.pb.GetModelResponse.FromString(msg.SerializeToString()), D)
    opt.check_state(m.opt_state, D)
    assert (m.opt_state.count, _powers(m.opt_state)) == (5, _powers(state))
    for a, b in ((m.opt_state.m, state.m), (m.opt_state.v, state.v)):
        assert (a is None and b is None) or a.tobytes() == b.tobytes()
    replica = Replica(3, m.theta, m.total, StepHistory(2), m.opt_state)
    assert replica.digest() == state_digest(theta, total, state)
    _, state = take_step(theta, total, opt, state)
    replica.advance(codec.AggregateChange(dim=D), opt)
    assert replica.theta.tobytes() == theta.tobytes() and replica.digest() == state_digest(theta, total, state)
    plain = codec.broadcast_to_proto(_snap(theta, total, OptState()))
    assert not plain.snapshot.HasField("server_opt")


def _snap(theta: np.ndarray, total: np.ndarray, state: OptState) -> Broadcast:
    return Broadcast(form="snapshot", round=3, total_samples=10, num_workers=2, theta=theta, total=total,
                     opt_state=state, digest=state_digest(theta, total, state))  # fmt: skip


def test_a_state_that_does_not_fit_the_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="needs v"):
        Adam(0.01).check_state(OptState(m=np.zeros(D)), D)
    with pytest.raises(ValueError, match="needs m"):
        Momentum(0.01).check_state(OptState(), D)
    with pytest.raises(ValueError, match="needs m"):
        Momentum(0.01).check_state(OptState(m=np.zeros(D + 1)), D)
    msg = codec.pb.ServerOptState(count=1, beta1_power=1.5, beta2_power=1.0)
    with pytest.raises(codec.CodecError, match="beta powers"):
        codec.opt_state_from_proto(msg, D)


def test_plain_sgd_keeps_the_run_config_bytes() -> None:
    """Runs without --server-opt send the same RunConfig as before server optimizers existed."""
    for spec in ("sgd", "sgd:"):
        assert codec.run_config_to_proto(ServerConfig(server_opt=spec), 10).server_opt == ""
    assert codec.run_config_to_proto(ServerConfig(server_opt="adam:beta2=0.99"), 10).server_opt == "adam:beta2=0.99"


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("adamx", "unknown server optimizer 'adamx'; known: sgd, momentum, adam, adamw"),
        ("adam:momentum=0.9", "adam: unknown option momentum; valid: beta1, beta2, eps, bias_correction"),
        ("adam:weight_decay=0.1", "unknown option weight_decay"),
        ("sgd:momentum=0.9", r"sgd: unknown option momentum; valid: \(none\)"),
        ("adam:lr=0.1", "the step size is --lr"),
        ("adam:beta1=1", r"beta1 must be in \[0, 1\), got 1"),
        ("adam:beta2=-0.1", r"beta2 must be in \[0, 1\)"),
        ("adamw:eps=0", "eps must be > 0"),
        ("adamw:weight_decay=-1", "weight_decay must be >= 0"),
        ("momentum:momentum=1.5", r"momentum must be in \[0, 1\)"),
        ("adam:bias_correction=2", "bias_correction must be 0 or 1"),
        ("adam:beta1", "expected KEY=NUMBER"),
        (":beta1=0.9", "no name"),
    ],
)
def test_bad_server_optimizers_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_server_opt(spec, 0.01)
    with pytest.raises(ValueError, match=message):
        ServerConfig(server_opt=spec)


def test_options_reach_the_optimizer() -> None:
    opt = make_server_opt("adamw:beta1=0.5,beta2=0.9,eps=1e-3,bias_correction=0,weight_decay=0.2", 0.3)
    assert opt == AdamW(0.3, 0.5, 0.9, 1e-3, False, weight_decay=0.2)
    assert make_server_opt("momentum:momentum=0.5", 0.1) == Momentum(0.1, 0.5)
    assert make_server_opt("", 0.1) == SGD(0.1)
    (job,) = jobs(
        ["laq"], "digits", compressor="", lr=0.05, options={}, task=None, l2=None, task_options={}, rounds=3,
        workers=2, round_timeout=1.0, seed=0, zstd=False, server_opt="adam:beta2=0.99",
    )  # fmt: skip
    assert job.server_config().server_opt == "adam:beta2=0.99"
    assert job.argv()[-2:] == ["--server-opt", "adam:beta2=0.99"]
    with pytest.raises(ValueError, match="unknown server optimizer"):
        jobs(["gd"], "digits", compressor="", lr=0.05, options={}, task=None, l2=None, task_options={}, rounds=3,
             workers=2, round_timeout=1.0, seed=0, zstd=False, server_opt="nadam")  # fmt: skip


def test_cli_refuses_a_bad_server_optimizer_before_anything_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "psrv", "run", "--algorithm", "gd", "--server-opt", "adam:beta1=2", "--rounds", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "beta1 must be in [0, 1), got 2" in done.stderr


# ------------------------------------------------------------------------------ the whole stack
TRAIN, TEST = load_training_data("digits", 0.2, 0)
M = 3


def _shards() -> list[data.Dataset]:
    return [data.shard(TRAIN, i, M) for i in range(M)]


_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    ("name", "server_opt"),
    [
        ("laq", "adam:beta2=0.99"),  # the fast loop runs one (about 1 s)
        pytest.param("gd", "adam:beta2=0.99", marks=_SLOW),
        pytest.param("sasg", "adam:beta2=0.99", marks=_SLOW),
        pytest.param("laq", "momentum:momentum=0.9", marks=_SLOW),
        pytest.param("gd", "momentum:momentum=0.9", marks=_SLOW),
        pytest.param("sasg", "momentum:momentum=0.9", marks=_SLOW),
    ],
)
def test_replicas_stay_bit_identical_under_a_server_optimizer(name: str, server_opt: str) -> None:
    """120 rounds of exact updates through real gRPC: the digest (theta, aggregate and the
    optimizer's state) agreed every round, one snapshot each (round 0), and every worker ends on
    the server's model bit for bit."""
    lr = 0.01 if server_opt.startswith("adam") else 0.02
    options = {"lr": lr, "batch": 20} if name == "sasg" else {"lr": lr}
    ps = ParameterServer(
        ServerConfig(algorithm=name, options=options, num_workers=M, rounds=120, round_timeout=60,
                     downlink="replica", server_opt=server_opt)
    )  # fmt: skip
    summary, results = run_in_threads(ps, _shards())
    assert summary["deadline_misses"] == 0 and summary["server_opt"] == server_opt
    assert collections.Counter(r["downlink"] for r in ps.records) == {"update": 120}
    assert ps.engine.state.opt_state.count == 120
    for r in results:
        assert (r.digest_mismatches, r.snapshots) == (0, 1)
        assert r.final_params.tobytes() == ps.theta.tobytes()


def test_a_mid_run_snapshot_restores_the_optimizer_state() -> None:
    """Worker 1's replica is corrupted in round 30: the next digest catches it, it gets a snapshot
    of round 31 (theta, aggregate and Adam's m, v, t) and replays the remaining rounds exactly."""
    ps = ParameterServer(
        ServerConfig(algorithm="laq", options={"lr": 0.01}, num_workers=M, rounds=60, round_timeout=60,
                     downlink="replica", server_opt="adam")
    )  # fmt: skip
    _, results = run_in_threads(ps, _shards(), per_worker={1: {"corrupt_replica_at": 30}})
    assert [(r.digest_mismatches, r.snapshots) for r in results] == [(0, 1), (1, 2), (0, 1)]
    assert all(r.final_params.tobytes() == ps.theta.tobytes() for r in results)


@pytest.mark.slow
def test_dense_and_compressed_downlinks_work_under_adam() -> None:
    """The dense broadcast carries theta (the optimizer stays on the server); EF21-P's compressed
    downlink moves the workers' w towards the server's theta, whatever moved theta."""
    for downlink, down in (("dense", ""), ("auto", "topk:ratio=0.2")):
        ps = ParameterServer(
            ServerConfig(algorithm="gd", options={"lr": 0.01}, num_workers=M, rounds=40, round_timeout=60,
                         downlink=downlink, down_compressor=down, server_opt="adam")
        )  # fmt: skip
        summary, results = run_in_threads(ps, _shards())
        forms = {r["downlink"] for r in ps.records}
        assert forms == ({"dense"} if not down else {"compressed"}), forms
        losses = [r["loss"] for r in ps.records]
        assert losses[-1] < 0.5 * losses[0], (downlink, losses[0], losses[-1])
        assert all(r.digest_mismatches == 0 for r in results)


def test_adam_on_logreg_converges() -> None:
    """gd with a server Adam on the default task (softmax regression with l2 = 0.01, digits): in 100
    rounds at lr 0.02 the loss falls from ln 10 to within 0.3% of the regularised optimum (about
    0.7428; measured 0.7445), where plain GD at the same lr is still at 1.95."""
    final = {}
    for server_opt in ("sgd", "adam"):
        ps = ParameterServer(
            ServerConfig(algorithm="gd", options={"lr": 0.02}, num_workers=M, rounds=100, round_timeout=60,
                         server_opt=server_opt)
        )  # fmt: skip
        run_in_threads(ps, _shards())
        losses = [r["loss"] for r in ps.records]
        assert all(math.isfinite(x) for x in losses)
        final[server_opt] = losses[-1]
    assert final["adam"] < 0.75 and final["sgd"] > 1.5


@pytest.mark.slow
@pytest.mark.process
def test_psrv_run_with_a_server_adam(tmp_path: Path) -> None:
    """The README's command, smaller: the default task and data, gd, a server Adam."""
    summary = tmp_path / "s.json"
    cmd = [sys.executable, "-m", "psrv", "run", "--algorithm", "gd", "--server-opt", "adam", "--lr", "0.01",
           "--data", "digits", "--workers", "2", "--rounds", "60", "--round-timeout", "60", "--out", str(tmp_path),
           "--summary-json", str(summary)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    s = json.loads(summary.read_text())
    assert s["server_opt"] == "adam" and s["rounds"] == 60 and s["accuracy"] > 0.9, s


def test_the_optimizer_state_is_part_of_the_engine_state() -> None:
    """The state a checkpoint saves: EngineState deep-copies with the optimizer's state, apart
    from the live one."""

    engine = RoundEngine(ServerConfig(algorithm="gd", num_workers=1, rounds=1, server_opt="adam"))
    engine.register("w0", 10, 4, 3)
    s = engine.state
    _, s.opt_state = take_step(s.theta, np.ones_like(s.theta), engine.opt, s.opt_state)
    saved = copy.deepcopy(s)
    assert saved.opt_state.count == 1 and saved.opt_state.m.tobytes() == s.opt_state.m.tobytes()
    assert saved.opt_state.m is not s.opt_state.m

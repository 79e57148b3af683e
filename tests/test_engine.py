"""The round engine without sockets: registration, rounds, deadlines, the update, domain errors."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

from psrv.engine import (
    AlreadyExists,
    Broadcast,
    EngineState,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotReady,
    OutOfRange,
    RoundEngine,
    RunAborted,
    ServerConfig,
)
from psrv.payload import Payload


def test_engine_imports_no_grpc_or_protobuf() -> None:
    code = (
        "import sys, psrv.engine, psrv.metrics\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google') or m.startswith('psrv.v1'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _dense(v: np.ndarray) -> Payload:
    return Payload(dim=v.size, kind="dense", values=v.astype(np.float32))


class Run:
    """An engine with ``M`` registered workers and its round loop in a thread."""

    def __init__(self, M: int = 2, rounds: int = 3, **cfg: Any) -> None:
        cfg.setdefault("round_timeout", 10.0)
        cfg.setdefault("done_grace", 0.5)
        cfg.setdefault("start_timeout", 0.0)  # round 0 need not wait for every worker to poll first
        cfg.setdefault("downlink", "dense")  # the tests read theta from plain broadcasts (replicas: test_replica)
        self.records: list[dict[str, Any]] = []
        self.thetas: list[np.ndarray] = []
        self.engine = RoundEngine(ServerConfig(num_workers=M, rounds=rounds, **cfg), sink=self, encode=lambda b: b)
        for m in range(M):
            assert self.engine.register(f"w{m}", 10 + m, 4, 3) == m
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = self.engine.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            self.error = exc

    def round_closed(self, record: dict[str, Any], theta: np.ndarray, final: bool) -> None:
        self.records.append(record)
        self.thetas.append(theta.copy())

    def model(self, worker: str, k: int) -> Broadcast:
        b = self.engine.wait_model(worker, k, timeout=10.0)
        assert isinstance(b, Broadcast)
        return b

    def join(self) -> None:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def test_rounds_apply_the_lazily_aggregated_step() -> None:
    """theta^{k+1} = theta^k - lr * sum_m stored_m, with a skipping worker's stored value reused."""
    lr = 0.5
    run = Run(M=2, rounds=2, algorithm="lag-wk", options={"lr": lr})  # gd keeps no step history
    d = run.engine.dim
    b0 = run.model("w0", 0)
    assert run.model("w1", 0).round == 0 and b0.num_workers == 2 and b0.total_samples == 21
    theta0 = np.array(b0.params, dtype=np.float64)
    g0, g1 = np.linspace(-1, 1, d), np.linspace(2, 3, d)
    run.engine.push("w0", 0, _dense(g0), loss=1.0)
    run.engine.push("w1", 0, _dense(g1), loss=2.0)
    b1 = run.model("w0", 1)
    run.model("w1", 1)
    s0 = g0.astype(np.float32) + g1.astype(np.float32)
    np.testing.assert_allclose(b1.params, theta0 - lr * s0, rtol=1e-6)
    assert b1.recent_step_sq == pytest.approx((float(lr**2 * s0 @ s0),))
    # round 1: w1 skips -> its stored gradient stands in
    g0b = np.full(d, 0.25)
    run.engine.push("w0", 1, _dense(g0b), loss=0.5)
    run.engine.skip("w1", 1, "lazy_rule", loss=0.25)
    final = run.model("w0", 2)
    run.model("w1", 2)
    run.join()
    assert run.error is None and final.done
    expected = theta0 - lr * s0 - lr * (g0b + g1.astype(np.float32))
    np.testing.assert_allclose(run.engine.state.theta, expected, rtol=1e-6)
    r0, r1 = run.records
    assert (r0["uploads"], r0["skips"], r0["loss"]) == (2, 0, 3.0)
    assert (r1["uploads"], r1["skips"], r1["loss"]) == (1, 1, 0.75)
    assert [w["status"] for w in r1["workers"]] == ["upload", "lazy_rule"]
    assert run.summary["uploads"] == 3 and run.summary["rounds"] == 2 and run.summary["dim"] == d


def test_domain_errors_and_nothing_half_applied() -> None:
    run = Run(M=2, rounds=1)
    d = run.engine.dim
    with pytest.raises(InvalidArgument, match="rejoins with 5 samples"):  # a restart, but with other data
        run.engine.register("w0", 5, 4, 3)
    with pytest.raises(NotFound):
        run.engine.wait_model("nobody", 0, 1.0)
    run.model("w0", 0)
    with pytest.raises(OutOfRange):
        run.engine.wait_model("w0", 5, 1.0)
    with pytest.raises(NotFound):
        run.engine.push("nobody", 0, _dense(np.ones(d)))
    with pytest.raises(FailedPrecondition):
        run.engine.push("w0", 1, _dense(np.ones(d)))  # round 1 is not open
    with pytest.raises(InvalidArgument):
        run.engine.push("w0", 0, Payload(dim=d, kind="laq", values=np.ones(d), scale=1.0, bits=2))
    with pytest.raises(InvalidArgument):
        run.engine.push("w0", 0, _dense(np.ones(d)), smoothness=float("nan"))
    with pytest.raises(InvalidArgument, match="dimension"):
        run.engine.push("w0", 0, _dense(np.ones(d + 1)))
    with pytest.raises(InvalidArgument):
        run.engine.skip("w0", 0, "deadline")  # the engine's verdict, never a worker's
    assert not run.engine.state.aggregator.total.any()  # every refusal left the state alone
    run.engine.push("w0", 0, _dense(np.ones(d)))
    with pytest.raises(AlreadyExists):
        run.engine.skip("w0", 0, "lazy_rule")
    run.engine.skip("w1", 0, "lazy_rule")
    run.model("w0", 1)
    run.model("w1", 1)
    run.join()
    assert run.error is None
    with pytest.raises(FailedPrecondition):
        run.engine.register("late", 5, 4, 3)


def test_registration_validates_and_fixes_the_shape() -> None:
    engine = RoundEngine(ServerConfig(num_workers=3))
    for bad in [("", 5, 4, 3), ("a", 0, 4, 3), ("a", 5, 0, 3), ("a", 5, 4, 1)]:
        with pytest.raises(InvalidArgument):
            engine.register(*bad)
    assert engine.state.theta is None
    engine.register("a", 5, 4, 3)
    with pytest.raises(InvalidArgument, match="4 / 3"):
        engine.register("b", 5, 7, 3)
    assert engine.state.phase == "registering" and len(engine.state.workers) == 1


def test_deadline_miss_reuses_the_stored_value_and_stops_waiting() -> None:
    run = Run(M=2, rounds=3, round_timeout=0.3, max_misses=1)
    d = run.engine.dim
    for k in range(3):
        run.model("w0", k)
        run.engine.push("w0", k, _dense(np.ones(d)))
    run.model("w0", 3)
    run.join()
    assert run.error is None
    assert [r["deadline_misses"] for r in run.records] == [1, 1, 1]
    assert run.engine.state.workers["w1"].responsive is False
    assert run.records[2]["round_time"] < 0.25  # after max_misses it is no longer waited for


def test_long_poll_times_out_and_fail_aborts_waiters() -> None:
    engine = RoundEngine(ServerConfig(num_workers=2, rounds=1, register_timeout=5))
    engine.register("w0", 5, 4, 3)
    with pytest.raises(NotReady):
        engine.wait_model("w0", 0, timeout=0.05)
    errors: list[BaseException] = []

    def poll() -> None:
        try:
            engine.wait_model("w0", 0, timeout=10)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=poll)
    t.start()
    engine.fail("operator said stop")
    t.join(timeout=5)
    assert len(errors) == 1 and isinstance(errors[0], RunAborted) and "operator said stop" in str(errors[0])
    with pytest.raises(RuntimeError, match="operator said stop"):
        engine.run()


def test_state_is_one_object_that_copies_whole() -> None:
    run = Run(M=2, rounds=1, algorithm="lag-ps", options={"lr": 0.1})
    d = run.engine.dim
    b = run.model("w0", 0)
    run.model("w1", 0)
    for m in sorted(b.selected or ()):
        run.engine.push(f"w{m}", 0, _dense(np.ones(d)))
    for m in set(range(2)) - set(b.selected or ()):
        run.engine.skip(f"w{m}", 0, "not_selected")
    run.model("w0", 1)
    run.model("w1", 1)
    run.join()
    state = run.engine.state
    assert isinstance(state, EngineState)
    saved = copy.deepcopy(state)
    np.testing.assert_array_equal(saved.theta, state.theta)
    np.testing.assert_array_equal(saved.aggregator.total, state.aggregator.total)
    assert saved.theta_hat is not None and saved.records == state.records
    assert saved.rng.random() == state.rng.random()  # the selection rng's position is part of the state


def _array_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every numpy array reachable from ``obj`` (each counted once)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_array_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple | set | frozenset):
        return sum(_array_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(_array_bytes(v, seen) for v in vars(obj).values())
    return 0


def _train(algorithm: str, M: int, upload: Any, rounds: int = 2, order: Any = None, **cfg: Any) -> Run:
    """Every worker uploads ``upload(k, m, d)`` in every round, in ``order(k)`` (default: slot order)."""
    run = Run(M=M, rounds=rounds, algorithm=algorithm, **cfg)
    d = run.engine.dim
    for k in range(rounds):
        for m in range(M):
            run.model(f"w{m}", k)
        for m in order(k) if order else range(M):
            run.engine.push(f"w{m}", k, upload(k, m, d))
    for m in range(M):
        run.model(f"w{m}", rounds)
    run.join()
    assert run.error is None and all(r["uploads"] == M for r in run.records)
    return run


def test_uploads_are_absorbed_in_slot_order_whatever_the_arrival_order() -> None:
    """Float addition does not commute in rounding: 1 + 1e16 - 1e16 is 0 in slot order, 1 in reverse."""
    values = np.array([1.0, 1e16, -1e16, 3.0], dtype=np.float32)
    expected = np.float64(0.0)
    for v in values:
        expected += np.float64(v)

    def upload(k: int, m: int, d: int) -> Payload:
        return _dense(np.full(d, values[m]))

    thetas = []
    for order in (None, lambda k: [3, 2, 1, 0], lambda k: [2, 0, 3, 1]):
        run = _train("gd", 4, upload, rounds=1, order=order, options={"lr": 1.0})
        thetas.append(run.engine.state.theta)
        theta0 = RoundEngine(run.engine.config)
        theta0.register("w0", 1, 4, 3)
        assert run.engine.state.theta.tobytes() == (theta0.state.theta - expected).tobytes()
    assert thetas[0].tobytes() == thetas[1].tobytes() == thetas[2].tobytes()


def test_an_upload_waits_only_for_the_lower_slots() -> None:
    """Uploads are held (as payloads) until every lower slot has reported, then absorbed at once."""
    run = Run(M=3, rounds=1, algorithm="gd")
    d = run.engine.dim
    for m in range(3):
        run.model(f"w{m}", 0)
    run.engine.push("w2", 0, _dense(np.ones(d)))
    run.engine.push("w1", 0, _dense(np.ones(d)))
    with run.engine._cond:
        assert sorted(run.engine._open.uploads) == [1, 2] and not run.engine.state.aggregator.total.any()
        assert all(isinstance(p, Payload) for p in run.engine._open.uploads.values())
    run.engine.skip("w0", 0, "lazy_rule")  # slot 0 reports: slots 1 and 2 are absorbed
    run.model("w0", 1)
    run.join()
    assert not run.engine._open.uploads
    np.testing.assert_array_equal(run.engine.state.aggregator.total, 2.0)


def test_accumulating_state_is_o_of_d_whatever_m() -> None:
    """LAQ keeps theta and the running sum: the state's arrays do not grow with M. SASG (replace)
    keeps each worker's sparse upload: the state grows by M * k * (4 + 4) bytes, not M * d * 8."""
    from psrv.compress.laq import quantize

    def laq(k: int, m: int, d: int) -> Payload:
        return quantize(np.random.default_rng([k, m]).normal(size=d), np.zeros(d), 4)

    def top(k: int, m: int, d: int) -> Payload:
        idx = np.array([m % d, (m + 5) % d])
        return Payload("sparse", d, values=np.float32([k + 1, -m]), indices=idx)

    sizes: dict[str, list[int]] = {"laq": [], "sasg": []}
    for M in (2, 8):
        for name, upload in (("laq", laq), ("sasg", top)):
            run = _train(name, M, upload)
            state = run.engine.state
            d = run.engine.dim
            # the last close's change is the next broadcast's content (the downlink's exact update):
            # kept apart, and bounded by the whole aggregate's 8d whatever M (relays are dropped above it)
            change = _array_bytes(state.change)
            assert change <= 8 * d + 64 * M
            sizes[name].append(_array_bytes(state) - change)
            assert state.theta_hat is None
            if name == "laq":
                assert state.aggregator.payloads == [] and state.aggregator.nbytes == 8 * d
            else:
                assert state.aggregator.nbytes == 8 * d + M * 2 * (4 + 4)
    assert sizes["laq"][0] == sizes["laq"][1]
    assert sizes["sasg"][1] - sizes["sasg"][0] == (8 - 2) * 2 * (4 + 4)


def test_a_waiting_long_poll_is_woken_by_the_publish_not_by_each_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half the workers report and wait for the next round while the other half report one by one:
    each waiting long poll wakes about once (the publish), not once per later report (O(M^2)
    wake-ups a round at scale; docs/capacity.md)."""
    M, half = 24, 12
    run = Run(M=M, rounds=2, algorithm="gd")
    for m in range(M):
        run.model(f"w{m}", 0)
    wakes: dict[str, int] = {}
    real_wait = threading.Condition.wait

    def counting_wait(self: threading.Condition, timeout: float | None = None) -> bool:
        name = threading.current_thread().name
        wakes[name] = wakes.get(name, 0) + 1
        return real_wait(self, timeout)

    def poll(m: int) -> None:
        run.engine.skip(f"w{m}", 0, "lazy_rule")
        run.engine.wait_model(f"w{m}", 1, timeout=10.0)

    monkeypatch.setattr(threading.Condition, "wait", counting_wait)
    threads = [threading.Thread(target=poll, args=(m,), name=f"poll{m}") for m in range(half)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while sum(wakes.get(f"poll{m}", 0) for m in range(half)) < half and time.monotonic() < deadline:
        time.sleep(0.01)  # until every poll is waiting for round 1
    for m in range(half, M):
        run.engine.skip(f"w{m}", 0, "lazy_rule")
        time.sleep(0.005)  # the waiting polls get the chance to wake (they should not)
    for t in threads:
        t.join(timeout=30)
    monkeypatch.undo()
    for m in range(M):
        run.engine.skip(f"w{m}", 1, "lazy_rule")  # round 1 closes at once, not at its deadline
    for m in range(M):
        run.model(f"w{m}", 2)  # the final broadcast
    run.join()
    waits = sum(n for name, n in wakes.items() if name.startswith("poll"))
    assert run.records[0]["skips"] == M
    assert waits <= 2 * half, f"{waits} waits of {half} long polls while {M - half} reports came in"

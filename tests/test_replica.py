"""Exact delta broadcasts: workers keep a replica of the server's state (theta, aggregate, step
history) that stays bit-identical through every round, checked by a digest in every broadcast; a
corrupted or stale replica is healed by a snapshot; gd keeps the dense broadcast on its own."""

from __future__ import annotations

import collections
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from psrv import codec, data
from psrv.aggregate import BLOCK
from psrv.algorithms import ALGORITHMS, make_algorithm, option_defaults
from psrv.bitpack import index_width, packed_size
from psrv.engine import Broadcast, RoundEngine
from psrv.payload import Payload, dense, to_dense
from psrv.replica import (
    AggregateChange,
    Replica,
    ReplicaShare,
    apply_change,
    changed,
    changed_indices,
    state_digest,
    take_step,
)
from psrv.server import ParameterServer, ServerConfig, create_server
from psrv.server_opt import SGD
from psrv.triggers import StepHistory
from tests.helpers.threaded import run_in_threads
from worker.client import WorkerConfig, load_training_data, run_worker

TRAIN, _ = load_training_data("digits", 0.2, 0)
M = 3


def _shards() -> list[data.Dataset]:
    return [data.shard(TRAIN, i, M) for i in range(M)]


# ------------------------------------------------------------------------------ pure pieces
def test_digest_sees_any_single_bit() -> None:
    rng = np.random.default_rng(0)
    theta, total = rng.standard_normal(1000), rng.standard_normal(1000)
    d0 = state_digest(theta, total)
    for i in (0, 517, 999):
        for arr in (theta, total):
            arr.view(np.uint64)[i] ^= np.uint64(1 << 7)
            assert state_digest(theta, total) != d0
            arr.view(np.uint64)[i] ^= np.uint64(1 << 7)
    assert state_digest(theta, total) == d0 and 0 <= d0 < 2**64


def test_changed_counts_every_block_and_finds_indices_only_up_to_the_limit() -> None:
    """``changed``: the count of coordinates whose bits differ (NaN, -0.0 and all), and their
    indices exactly as ``changed_indices`` finds them while there are at most ``limit``."""
    rng = np.random.default_rng(8)
    d = 3 * BLOCK + 123  # several blocks and a short last one
    before = rng.standard_normal(d)
    for picked in (np.array([], dtype=np.intp), np.array([0, BLOCK - 1, BLOCK, 2 * BLOCK + 5, d - 1]),
                   rng.choice(d, 5000, replace=False), np.arange(d)):  # fmt: skip
        after = before.copy()
        after[picked] += 1.0
        if picked.size > 2:
            after[picked[1]] = np.nan
            after[picked[2]] = -after[picked[2]] if after[picked[2]] else -0.0
        want = changed_indices(before, after)
        assert want.size == picked.size
        for limit in (0, max(picked.size - 1, 0), picked.size, d):
            n, idx = changed(before, after, limit)
            assert n == picked.size
            if picked.size <= limit:
                assert idx is not None and np.array_equal(idx, want)
            else:
                assert idx is None


def test_every_change_form_reproduces_the_new_aggregate_exactly() -> None:
    rng = np.random.default_rng(1)
    d = 300
    before = rng.standard_normal(d)
    payloads = (
        Payload("dense", d, values=rng.standard_normal(d).astype(np.float32)),
        Payload("sparse", d, indices=np.array([3, 50, 299]), values=np.array([1.5, -2.0, 0.25], dtype=np.float32)),
    )
    after = before.copy()
    for p in payloads:
        after += to_dense(p)  # what the server's accumulating aggregator does
    idx = changed_indices(before, after)
    forms = [
        AggregateChange("relay", dim=d, payloads=payloads, workers=(0, 2)),
        AggregateChange("values", dim=d, indices=idx, values=after[idx]),
        AggregateChange("aggregate", dim=d, values=after.copy()),
    ]
    for change in forms:
        msg = codec.pb.StateUpdate()
        codec.change_to_proto(change, msg, zstd=change.kind == "relay")
        decoded = codec.change_from_proto(codec.pb.StateUpdate.FromString(msg.SerializeToString()), d)
        total = before.copy()
        apply_change(total, decoded)
        assert total.tobytes() == after.tobytes(), change.kind
    total = before.copy()
    apply_change(total, AggregateChange(dim=d))
    assert total.tobytes() == before.tobytes()


def test_replica_step_is_the_servers_step() -> None:
    rng = np.random.default_rng(2)
    theta, total = rng.standard_normal(50), rng.standard_normal(50)
    replica = Replica(4, theta.copy(), total.copy(), StepHistory(3))
    change = AggregateChange("values", dim=50, indices=np.array([7]), values=np.array([0.5]))
    replica.advance(change, SGD(0.1))
    total[7] = 0.5
    step_sq, _ = take_step(theta, total, SGD(0.1), replica.opt_state)
    assert replica.round == 5 and replica.theta.tobytes() == theta.tobytes()
    assert replica.history.recent() == (step_sq,)


def test_advanced_is_advance_on_a_copy_and_leaves_the_replica_as_it_was() -> None:
    """The host's shared replicas step by ``advanced`` (a new replica), a worker alone by
    ``advance`` (in place): the same bits, the same digest, and the shared one untouched."""
    rng = np.random.default_rng(5)
    theta, total = rng.standard_normal(64), rng.standard_normal(64)
    history = StepHistory(2)
    history.push(0.25)
    base = Replica(7, theta.copy(), total.copy(), history)
    before = (base.theta.tobytes(), base.total.tobytes(), base.history.recent(), base.digest())
    change = AggregateChange("values", dim=64, indices=np.array([3, 40]), values=np.array([1.0, -2.0]))
    nxt = base.advanced(change, SGD(0.1))
    assert (base.theta.tobytes(), base.total.tobytes(), base.history.recent(), base.digest()) == before
    alone = Replica(7, theta.copy(), total.copy(), history.copy())
    alone.advance(change, SGD(0.1))
    assert nxt.round == alone.round == 8 and nxt.theta.tobytes() == alone.theta.tobytes()
    assert nxt.total.tobytes() == alone.total.tobytes() and nxt.history.recent() == alone.history.recent()
    assert nxt.digest() == alone.digest() == state_digest(alone.theta, alone.total)
    assert not np.shares_memory(nxt.theta, base.theta) and not np.shares_memory(nxt.total, base.total)
    alone.corrupt()  # the cached digest goes with the bit
    assert alone.digest() != nxt.digest()


def test_a_share_makes_each_rounds_replica_once_and_keeps_few() -> None:
    """ReplicaShare: every worker on the same replica gets the same next one, made once, even from
    threads at once; a worker on a copy of its own makes its own; a snapshot equal to a held
    replica is dropped for it; replicas more than KEEP rounds old are let go."""
    rng = np.random.default_rng(6)
    share = ReplicaShare()
    first = share.canonical(Replica(0, rng.standard_normal(32), np.zeros(32), StepHistory(1)))
    same = Replica(0, first.theta.copy(), first.total.copy(), StepHistory(1))
    assert share.canonical(same) is first  # a second worker's snapshot of round 0
    change = AggregateChange("values", dim=32, indices=np.array([1]), values=np.array([0.5]))
    made = []

    def make(base: Replica) -> Replica:
        made.append(base.round)
        return base.advanced(change, SGD(0.1))

    want = first.advanced(change, SGD(0.1)).digest()
    start = threading.Barrier(8)

    def ask() -> Replica:
        start.wait()
        return share.child(first, make, want)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: ask(), range(8)))
    assert len({id(r) for r in got}) == 1 and made == [0] and share.made == 1
    own = first.copy()
    assert share.child(own, make, want) is not got[0] and made == [0, 0]  # a copy of its own: its own next
    assert share.child(own, make, want).theta.tobytes() == got[0].theta.tobytes()  # (the same bits)
    replica = share.canonical(got[0])
    for _ in range(5):
        nxt = replica.advanced(change, SGD(0.1))
        replica = share.canonical(share.child(replica, make, nxt.digest()))
    assert replica.round == 6 and replica.theta.tobytes() == nxt.theta.tobytes()
    assert {k[0] for k in share._held} == {5, 6} and all(b.round == 5 for b, _ in share._children.values())


def test_a_share_makes_again_what_a_resumed_server_closed_otherwise() -> None:
    """A server that resumed from a checkpoint (or restarted) serves rounds the host has seen, and
    may close them otherwise: the share makes the next replica again for the digest the server
    sends (not a digest mismatch), and starts its window again at the earlier round, letting the
    later rounds go."""
    rng = np.random.default_rng(7)
    share = ReplicaShare()
    base = share.canonical(Replica(0, rng.standard_normal(16), np.zeros(16), StepHistory(1)))
    first_run = AggregateChange("values", dim=16, indices=np.array([2]), values=np.array([1.0]))
    replica = base
    for _ in range(6):
        nxt = replica.advanced(first_run, SGD(0.1))
        replica = share.canonical(share.child(replica, lambda b: b.advanced(first_run, SGD(0.1)), nxt.digest()))
    assert replica.round == 6
    # the resumed run: round 0 again (the same snapshot), then another close
    again = share.canonical(Replica(0, base.theta.copy(), base.total.copy(), StepHistory(1)))
    assert again.round == 0 and {k[0] for k in share._held} == {0}  # rounds 1..6 let go
    other = AggregateChange("values", dim=16, indices=np.array([3]), values=np.array([-1.0]))
    want = again.advanced(other, SGD(0.1))
    got = share.child(again, lambda b: b.advanced(other, SGD(0.1)), want.digest())
    assert got.digest() == want.digest() and got.theta.tobytes() == want.theta.tobytes()


def test_a_share_does_not_swap_in_a_held_replica_that_only_the_digest_calls_equal() -> None:
    """The digest (a sum of words) misses two swapped coordinates: a snapshot of the same round and
    digest that differs in its bits is not replaced by the held replica; it is held instead."""
    theta = np.arange(1.0, 9.0)
    share = ReplicaShare()
    held = share.canonical(Replica(3, theta.copy(), np.zeros(8), StepHistory(1)))
    swapped = theta.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    snapshot = Replica(3, swapped, np.zeros(8), StepHistory(1))
    assert snapshot.digest() == held.digest()
    assert share.canonical(snapshot) is snapshot
    assert share.canonical(Replica(3, swapped.copy(), np.zeros(8), StepHistory(1))) is snapshot


def test_snapshots_carry_each_state_vector_in_its_smaller_exact_form() -> None:
    """A state vector that is mostly zero (a model that starts at zero, the aggregate before any
    upload) travels sparse, a dense one dense; both decode to the same float64 bits (a -0.0
    included: the digest reads bit patterns)."""
    rng = np.random.default_rng(3)
    d = 1000
    sparse_theta = np.zeros(d)
    sparse_theta[[4, 500]] = [1.5, -0.0]
    dense_total = rng.standard_normal(d)
    b = Broadcast(form="snapshot", round=3, total_samples=10, num_workers=2, done=False, selected=None,
                  theta=sparse_theta, total=dense_total, recent_step_sq=(0.5,), digest=7)  # fmt: skip
    msg = codec.broadcast_to_proto(b)
    assert msg.snapshot.WhichOneof("theta_form") == "theta_sparse"
    assert msg.snapshot.WhichOneof("aggregate_form") == "aggregate"
    m = codec.model_from_proto(codec.pb.GetModelResponse.FromString(msg.SerializeToString()), d)
    assert m.theta.tobytes() == sparse_theta.tobytes() and m.total.tobytes() == dense_total.tobytes()
    assert state_digest(m.theta, m.total) == state_digest(sparse_theta, dense_total)
    zeros = codec.broadcast_to_proto(Broadcast(form="snapshot", round=0, total_samples=10, num_workers=2, done=False,
                                               selected=None, theta=np.zeros(d), total=np.zeros(d)))  # fmt: skip
    assert zeros.ByteSize() < 40  # not 16 bytes per parameter


def test_bad_broadcasts_are_refused() -> None:
    msg = codec.pb.GetModelResponse(round=1)
    with pytest.raises(codec.CodecError, match="exactly one"):
        codec.model_from_proto(msg, 10)
    msg.snapshot.theta.CopyFrom(codec.tensor_to_proto(np.zeros(10, dtype=np.float32)))
    msg.snapshot.aggregate.CopyFrom(codec.tensor_to_proto(np.zeros(10)))
    with pytest.raises(codec.CodecError, match="float64"):
        codec.model_from_proto(msg, 10)
    bad = codec.pb.StateUpdate()
    bad.values.CopyFrom(codec.payload_to_proto(Payload("sparse", 10, indices=np.array([11]), values=np.ones(1))))
    with pytest.raises(codec.CodecError, match="out of range"):
        codec.change_from_proto(bad, 10)


# ------------------------------------------------------------------------------ the engine
def test_stale_or_missing_replicas_get_a_snapshot() -> None:
    """Once the engine sends updates, a worker whose replica is not of the previous round (it
    joined, fell behind, or lost track) gets the whole state instead."""
    engine = RoundEngine(
        ServerConfig(algorithm="laq", num_workers=1, rounds=4, downlink="replica", start_timeout=0, done_grace=0.2),
        encode=lambda b: b,
    )
    engine.register("w0", 10, 4, 3)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    forms = []
    for k in range(4):
        replica = None if k == 0 else k - 1 if k != 2 else 0  # round 0: none yet; round 2: two behind
        b = engine.wait_model("w0", k, 10.0, replica_round=replica)
        assert isinstance(b, Broadcast)
        forms.append(b.form)
        if b.form in ("update", "snapshot"):
            assert b.digest == state_digest(engine.state.theta, engine.state.aggregator.total)
        engine.skip("w0", k, "lazy_rule")
    engine.wait_model("w0", 4, 10.0, replica_round=3)
    thread.join(timeout=10)
    assert forms == ["snapshot", "update", "snapshot", "update"]
    assert [r["snapshots"] for r in engine.state.records] == [1, 0, 1, 0]


def test_dense_rounds_record_only_the_cost_and_replicas_come_back_exactly() -> None:
    """gd under ``--downlink auto``: round 0's snapshot, round 1's update, then dense. A dense
    round's change is not made (nobody holds a replica of it), only its cost, that of the cheapest
    exact form as before (8 bytes per parameter when every coordinate changes). Once the window's
    rounds are cheap the downlink comes back through a snapshot right after a dense round that
    changed two coordinates; the updates after it are exact (the digest agrees every round)."""
    engine = RoundEngine(
        ServerConfig(algorithm="gd", num_workers=1, rounds=16, start_timeout=0, done_grace=0.2), encode=lambda b: b
    )
    engine.register("w0", 10, 4, 3)
    d, s = engine.dim, engine.state
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    rng = np.random.default_rng(0)
    forms, changes, at_serve = [], [], []
    replica: Replica | None = None
    for k in range(16):
        b = engine.wait_model("w0", k, 10.0, replica_round=None if replica is None else replica.round)
        forms.append(b.form)
        at_serve.append(None if s.change is None else s.change.kind)
        if b.form == "snapshot":
            replica = Replica(k, b.theta.copy(), b.total.copy())
        elif b.form == "update":
            replica.advance(b.change, engine.opt)
            changes.append(b.change)
        else:
            replica = None
        if replica is not None:
            assert replica.digest() == b.digest == state_digest(s.theta, s.aggregator.total)
        if k < 3:
            last = rng.standard_normal(d).astype(np.float32)  # every coordinate changes
        elif k in (9, 10):
            last = last.copy()
            last[[1, 5] if k == 9 else [2, 7]] += 1.0  # two coordinates change
        else:
            engine.skip("w0", k, "lazy_rule")
            continue
        engine.push("w0", k, dense(last))
    engine.wait_model("w0", 16, 10.0)
    thread.join(timeout=10)
    # the window (8 rounds) of 8d, 8d, 8d and small: back to updates once its mean is below 2d
    assert forms == ["snapshot", "update"] + ["dense"] * 8 + ["snapshot"] + ["update"] * 5
    # round 2's close made no change (nor cut one of d coordinates); round 9's neither, round 10 made it whole
    assert at_serve[:5] == ["none", "aggregate", "aggregate", None, "none"]
    assert at_serve[10:12] == ["aggregate", "values"]
    two = 8 * 2 + packed_size(2, index_width(d))
    assert list(s.update_costs) == [0, two, two, 0, 0, 0, 0, 0]  # rounds 8-15
    assert [c.kind for c in changes] == ["aggregate", "values", "none", "none", "none", "none"]
    assert list(changes[1].indices) == [2, 7] and changes[1].values.tolist() == s.aggregator.total[[2, 7]].tolist()


# ------------------------------------------------------------------------------ the whole stack
# every algorithm the parameter server's rounds run (dsgd runs on the gossip mesh: tests/test_mesh.py)
NAMES = sorted(n for n in ALGORITHMS if not getattr(make_algorithm(n), "decentralized", False))
OPTIONS = {"lr": 0.05, "batch": 20}
TAKES_BATCH = {n for n in NAMES if "batch" in option_defaults(n)}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_replicas_stay_bit_identical_for_every_algorithm(name: str) -> None:
    """200 rounds, a snapshot in round 0 and an update in every other: the digest agreed every
    round (no mismatch), each worker needed exactly one snapshot (to start), and every worker's
    final model is the server's, bit for bit."""
    options = OPTIONS if name in TAKES_BATCH else {"lr": 0.05}
    ps = ParameterServer(
        ServerConfig(algorithm=name, options=options, num_workers=M, rounds=200, round_timeout=60, downlink="replica",
                     record_tail=200)  # every round's record kept in memory, for the check below
    )  # fmt: skip
    summary, results = run_in_threads(ps, _shards())
    assert summary["deadline_misses"] == 0
    assert collections.Counter(r["downlink"] for r in ps.records) == {"update": 200}
    for r in results:
        assert (r.digest_mismatches, r.snapshots) == (0, 1)
        assert r.final_params.tobytes() == ps.theta.tobytes()


@pytest.mark.slow
def test_a_corrupted_replica_is_detected_and_healed() -> None:
    ps = ParameterServer(ServerConfig(algorithm="laq", num_workers=M, rounds=60, round_timeout=60, downlink="replica"))
    summary, results = run_in_threads(ps, _shards(), per_worker={1: {"corrupt_replica_at": 30}})
    assert [(r.digest_mismatches, r.snapshots) for r in results] == [(0, 1), (1, 2), (0, 1)]
    assert all(r.final_params.tobytes() == ps.theta.tobytes() for r in results)
    assert sum(rec["snapshots"] for rec in ps.records) == M + 1


@pytest.mark.slow
def test_auto_downlink_keeps_gd_dense_and_makes_laq_cheap() -> None:
    down = {}
    for name in ("gd", "laq"):
        ps = ParameterServer(ServerConfig(algorithm=name, options={"lr": 0.05}, num_workers=M, rounds=80))
        summary, _ = run_in_threads(ps, _shards())
        forms = collections.Counter(r["downlink"] for r in ps.records)
        down[name] = summary["bytes_down"]
        if name == "gd":
            assert forms == {"update": 2, "dense": 78}  # round 0's snapshot and round 1's update, then dense
        else:
            assert forms["update"] >= 75
    assert down["laq"] < 0.1 * down["gd"]


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["stream", "unary"])
@pytest.mark.parametrize("name", ["gd", "lag-wk", "laq", "ef21"])
def test_a_restarted_worker_rejoins_through_a_snapshot(name: str, transport: str) -> None:
    """Worker w1 drops out after 8 rounds (as a crash would); the run goes on without it; a new w1
    registers with the same id and data, rejoins under its index, gets a snapshot and ends on the
    server's final model, bit for bit, like the workers that never left. Accumulating rules (laq,
    ef21) rejoin from their row of the server's sum, which the server keeps with ``keep_rows``."""
    shards = _shards()
    ps = ParameterServer(
        ServerConfig(
            algorithm=name, options={"lr": 0.05}, num_workers=M, rounds=30, round_timeout=1.0, max_misses=1,
            downlink="replica", transport=transport,
        ),
        keep_rows=name in ("laq", "ef21"),
    )  # fmt: skip
    server, port = create_server(ps)
    results: dict[str, Any] = {}

    def work(key: str, i: int, **extra: Any) -> None:
        cfg = WorkerConfig(server=f"127.0.0.1:{port}", worker_id=f"w{i}", rpc_timeout=20, **extra)
        results[key] = run_worker(cfg, shards[i])

    threads = {f"w{i}": threading.Thread(target=work, args=(f"w{i}", i), daemon=True) for i in (0, 2)}
    threads["gone"] = threading.Thread(target=work, args=("gone", 1), kwargs={"leave_after": 8}, daemon=True)
    runner = threading.Thread(target=lambda: results.setdefault("summary", ps.run()), daemon=True)
    try:
        for t in threads.values():
            t.start()
        assert ps.wait_registered(M, timeout=30)
        runner.start()
        threads["gone"].join(timeout=60)
        assert results["gone"].rounds == 8 and results["gone"].final_params is None
        assert 7 <= ps.round < 30, "the run must go on without w1, and not be over yet"
        threads["back"] = threading.Thread(target=work, args=("back", 1), daemon=True)
        threads["back"].start()
        for t in (*threads.values(), runner):
            t.join(timeout=120)
    finally:
        server.stop(grace=None)
    summary, back = results["summary"], results["back"]
    assert summary["rounds"] == 30 and summary["rejoins"] == 1
    assert back.index == results["gone"].index and back.rounds <= 30 - 7
    assert (back.snapshots, back.digest_mismatches) == (1, 0)
    for key in ("w0", "w2", "back"):
        assert results[key].final_params.tobytes() == ps.theta.tobytes(), key

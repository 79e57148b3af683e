"""Checkpoint and resume (psrv.checkpoint): a saved state restores bit for bit and continues exactly
as the run it came from; a corrupt, truncated or mismatched checkpoint is a one-line error; replayed,
stale and future-round uploads leave the model unchanged; rejoin of accumulating rules."""

from __future__ import annotations

import copy
import dataclasses
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from psrv import checkpoint
from psrv.checkpoint import Checkpointer, CheckpointError, load
from psrv.compress.laq import quantize
from psrv.engine import AlreadyExists, Broadcast, EngineState, FailedPrecondition, RoundEngine, ServerConfig
from psrv.payload import Payload, dense, sparse

M = 3

# algorithm, extra config: each exercises another part of the state
CASES = {
    "gd-adam": ("gd", {"server_opt": "adam"}),  # optimizer moments and beta powers
    "topk-ef": ("topk-ef", {"options": {"lr": 0.05, "ratio": 0.25}}),  # stored sparse payloads
    "laq": ("laq", {}),  # accumulating: the running sum and the per-worker rows
    "riag": ("riag", {"options": {"lr": 0.05, "s": 2}}),  # the engine's rng (random selection)
    "lag-ps": ("lag-ps", {"options": {"lr": 0.05, "D": 3}}),  # last-upload iterates, history, smoothness
    "gd-ef21p": ("gd", {"down_compressor": "randk:k=3", "downlink": "auto"}),  # shared model w, rng
}


def _upload(algorithm: str, k: int, m: int, d: int) -> Payload:
    rng = np.random.default_rng([k, m])
    g = rng.normal(size=d)
    if algorithm == "topk-ef":
        idx = np.sort(rng.choice(d, 3, replace=False))
        return sparse(d, idx, g[idx].astype(np.float32))
    if algorithm == "laq":
        return quantize(g, np.zeros(d), 4)
    return dense(g.astype(np.float32))


class _Saving(Checkpointer):
    """Keeps a deep copy of the state each time it saves (taken under the same lock)."""

    def save(self) -> Path:
        path = super().save()
        self.copies = getattr(self, "copies", {})
        self.copies[self.engine.state.round] = self.engine.with_state(copy.deepcopy)
        return path


def _engine(algorithm: str, extra: dict[str, Any], sink: Any, rounds: int = 8) -> RoundEngine:
    cfg = {"round_timeout": 10.0, "done_grace": 0.5, "start_timeout": 0.0, "register_timeout": 0.01,
           "downlink": "dense", **extra}  # fmt: skip
    return RoundEngine(ServerConfig(algorithm=algorithm, num_workers=M, rounds=rounds, **cfg), sink, keep_rows=True)


def _drive(engine: RoundEngine, algorithm: str, start: int, stop: int) -> dict[str, Any]:
    """The engine's run in a thread; M scripted workers report rounds start..stop-1 and fetch the final model."""
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.setdefault("summary", engine.run()), daemon=True)
    thread.start()
    d = engine.dim
    for k in range(start, stop):
        for m in range(M):
            b = engine.wait_model(f"w{m}", k, timeout=10.0)
            assert isinstance(b, Broadcast) and b.round == k
            if b.selected is not None and m not in b.selected:
                engine.skip(f"w{m}", k, "not_selected")
            else:
                engine.push(f"w{m}", k, _upload(algorithm, k, m, d), loss=float(k + m))
    for m in range(M):
        engine.wait_model(f"w{m}", stop, timeout=10.0)
    thread.join(timeout=30)
    assert not thread.is_alive() and "summary" in out
    return out["summary"]


_TIMING = ("round_time", "elapsed", "slowest_wait")


def _same_records(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    strip = [
        {**{k: v for k, v in r.items() if k not in _TIMING}, "workers": [{**w, "latency": 0} for w in r["workers"]]}
        for r in (*a, *b)
    ]
    assert strip[: len(a)] == strip[len(a) :]


def _assert_same_state(x: EngineState, y: EngineState) -> None:
    assert (x.phase, x.round, tuple(x.task_shape), x.downlink, x.rejoins) == (y.phase, y.round, tuple(y.task_shape),
                                                                             y.downlink, y.rejoins)  # fmt: skip
    assert x.workers == y.workers
    for name in ("theta", "theta_hat", "shared_model"):
        a, b = getattr(x, name), getattr(y, name)
        assert (a is None) == (b is None) and (a is None or a.tobytes() == b.tobytes()), name
    ax, ay = x.aggregator, y.aggregator
    assert ax.total.tobytes() == ay.total.tobytes() and ax.bound == ay.bound and ax.peaks == ay.peaks
    assert (ax.rows is None and ay.rows is None) or ax.rows.tobytes() == ay.rows.tobytes()
    for p, q in zip(ax.payloads, ay.payloads, strict=True):
        assert (p is None) == (q is None)
        if p is not None:
            assert (p.kind, p.dim, p.scale, p.bits, p.value_format) == (q.kind, q.dim, q.scale, q.bits, q.value_format)
            for f in ("values", "indices", "codes", "signs"):
                a, b = getattr(p, f), getattr(q, f)
                assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and a.tobytes() == b.tobytes()))
    ox, oy = x.opt_state, y.opt_state
    assert (ox.count, ox.beta1_power, ox.beta2_power) == (oy.count, oy.beta1_power, oy.beta2_power)
    for a, b in ((ox.m, oy.m), (ox.v, oy.v)):
        assert (a is None) == (b is None) and (a is None or a.tobytes() == b.tobytes())
    assert x.history.recent() == y.history.recent()
    assert x.rng.bit_generator.state == y.rng.bit_generator.state
    assert list(x.update_costs) == list(y.update_costs)
    _same_records(list(x.records), list(y.records))
    tx, ty = dataclasses.asdict(x.totals), dataclasses.asdict(y.totals)
    assert {**tx, "elapsed": 0} == {**ty, "elapsed": 0}  # the summary's running totals


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_restored_state_is_the_saved_one_and_continues_the_same(case: str, tmp_path: Path) -> None:
    """Save every 4 rounds of an 8-round run; the state read back from round 3's checkpoint equals the
    state when it was saved (bit for bit: arrays, optimizer, rng, history, records, clocks), and a new
    engine restored from it runs rounds 4..7 to the same final state as the uninterrupted run."""
    algorithm, extra = CASES[case]
    saving = _Saving(tmp_path / "a", every=4)
    whole = _engine(algorithm, extra, saving)
    saving.attach(whole)
    for m in range(M):
        whole.register(f"w{m}", 10 + m, 4, 3)
    summary = _drive(whole, algorithm, 0, 8)
    first = tmp_path / "first"
    # the round-3 checkpoint was overwritten at round 7: save it again from the copy to compare
    (first / checkpoint.FILE).parent.mkdir()
    data = checkpoint.capture(saving.copies[3], whole.config, None, None, 4)
    checkpoint.save(first, data)
    restored = load(first, whole.config)
    _assert_same_state(restored.state, saving.copies[3])
    assert restored.state.round == 3 and len(restored.state.records) == 4

    resumed = _engine(algorithm, extra, None)
    resumed.restore(restored.state)
    again = _drive(resumed, algorithm, 4, 8)
    _assert_same_state(resumed.state, whole.state)
    assert {k: v for k, v in again.items() if k != "wall_time"} == {
        k: v for k, v in summary.items() if k != "wall_time"
    }
    assert [r["round"] for r in resumed.state.records] == list(range(8))  # every round once


def _checkpoint(tmp_path: Path, algorithm: str = "gd") -> tuple[Path, ServerConfig]:
    saving = Checkpointer(tmp_path / "ck", every=2)
    engine = _engine(algorithm, {}, saving, rounds=6)
    saving.attach(engine)
    for m in range(M):
        engine.register(f"w{m}", 10 + m, 4, 3)
    _drive(engine, algorithm, 0, 6)
    cfg = engine.config  # the last save is of the final round, 5: a 10-round run can resume it
    return tmp_path / "ck", ServerConfig(**{**cfg.__dict__, "rounds": 10})


def test_corrupt_truncated_or_mismatched_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    ck, cfg = _checkpoint(tmp_path)
    assert load(ck, cfg).state.round == 5
    good = (ck / checkpoint.FILE).read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = {
        "truncated": (good[: len(good) // 2], "corrupt or truncated"),
        "garbage": (b"\x00" * 100, "corrupt or truncated"),
        "flipped": (good[:-300] + bytes(b ^ 0xFF for b in good[-300:-200]) + good[-200:], "corrupt or truncated"),
    }
    mid = len(good) // 2  # inside an array's bytes: the zip CRC catches it
    cases["bitflip"] = (good[:mid] + bytes([good[mid] ^ 1]) + good[mid + 1 :], "corrupt or truncated")
    for name, (data, message) in cases.items():
        (bad / checkpoint.FILE).write_bytes(data)
        with pytest.raises(CheckpointError, match=message) as info:
            load(bad, cfg)
        assert "\n" not in str(info.value), name
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load(tmp_path / "nowhere", cfg)
    with pytest.raises(CheckpointError, match=r"another job: options .*0\.5"):
        load(ck, ServerConfig(**{**cfg.__dict__, "options": {"lr": 0.5}}))
    with pytest.raises(CheckpointError, match="another job: num_workers"):
        load(ck, ServerConfig(**{**cfg.__dict__, "num_workers": 4}))
    with pytest.raises(CheckpointError, match="nothing is left of a 6-round run"):
        load(ck, ServerConfig(**{**cfg.__dict__, "rounds": 6}))

    # the command line: one line, no traceback, exit 1
    (bad / checkpoint.FILE).write_bytes(good[: len(good) // 3])
    from psrv.cli import main

    args = ["start-server", "--algorithm", "gd", "--workers", str(M), "--rounds", "10", "--port", "0"]
    for resume, message in ((bad, "corrupt or truncated"), (ck, "another job")):
        extra = ["--lr", "0.5"] if resume == ck else []
        result = CliRunner().invoke(main, [*args, *extra, "--resume", str(resume)])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: --resume:") and message in lines[0], result.output


def test_replayed_stale_and_future_uploads_leave_the_model_unchanged(tmp_path: Path) -> None:
    """Round ids make uploads idempotent: an upload is absorbed at most once. A replay of an accepted
    upload (same round), an upload for a closed round, one for a round not open yet, and a replay to a
    server resumed from a checkpoint (before its next round opens) are all refused; the aggregate and
    theta stay as they were, bit for bit."""
    saving = Checkpointer(tmp_path / "r", every=1)
    engine = _engine("laq", {}, saving, rounds=4)
    saving.attach(engine)
    for m in range(M):
        engine.register(f"w{m}", 10 + m, 4, 3)
    thread = threading.Thread(target=lambda: pytest.raises(RuntimeError, engine.run), daemon=True)
    thread.start()
    d = engine.dim
    up = {k: [_upload("laq", k, m, d) for m in range(M)] for k in range(3)}
    for m in range(M):
        engine.wait_model(f"w{m}", 0, 10.0)
        engine.push(f"w{m}", 0, up[0][m])
    engine.wait_model("w0", 1, 10.0)
    engine.push("w0", 1, up[1][0])  # absorbed at once (slot 0)

    def frozen() -> tuple[bytes, bytes, bytes]:
        return engine.with_state(
            lambda s: (s.theta.tobytes(), s.aggregator.total.tobytes(), s.aggregator.rows.tobytes())
        )

    before = frozen()
    for call, error in (
        (lambda: engine.push("w0", 1, up[1][0]), AlreadyExists),  # replayed
        (lambda: engine.push("w0", 1, up[2][0]), AlreadyExists),  # another upload, same round
        (lambda: engine.push("w1", 0, up[0][1]), FailedPrecondition),  # stale: round 0 is closed
        (lambda: engine.push("w1", 2, up[2][1]), FailedPrecondition),  # future: round 2 is not open
        (lambda: engine.skip("w1", 2, "lazy_rule"), FailedPrecondition),
    ):
        with pytest.raises(error):
            call()
        assert frozen() == before
    record_uploads = engine.with_state(lambda s: s.records[0]["uploads"])
    assert record_uploads == M
    engine.fail("test over")
    thread.join(10)

    # a server resumed from round 0's close (saved then): an upload for round 0 replayed to it is refused
    resumed = _engine("laq", {}, None, rounds=4)
    resumed.restore(load(tmp_path / "r", resumed.config).state)
    snap = resumed.with_state(lambda s: (s.theta.tobytes(), s.aggregator.total.tobytes()))
    for m in range(M):
        with pytest.raises(FailedPrecondition, match="round 0 is not open"):
            resumed.push(f"w{m}", 0, up[0][m])
        with pytest.raises(FailedPrecondition, match="round 1 is not open"):
            resumed.push(f"w{m}", 1, up[1][m])  # not published yet
    assert resumed.with_state(lambda s: (s.theta.tobytes(), s.aggregator.total.tobytes())) == snap


@pytest.mark.parametrize("algorithm", ["laq", "ef21", "riag"])
def test_an_accumulating_worker_rejoins_from_its_row_of_the_sum(algorithm: str, make_harness: Any) -> None:
    """Over gRPC: a worker of an accumulating rule that registers again while training is handed its
    row of the server's sum (RegisterResponse.rejoin), which is bit for bit the sum of what the server
    absorbed from it and the reference its state is rebuilt from (LAQ: Q_m, clock forcing an upload;
    EF21, RIAG: g_m). Without rows (no checkpointing) the rejoin is refused, as before."""
    from psrv import codec
    from psrv.algorithms import make_algorithm
    from psrv.payload import to_dense
    from tests.test_server import _req

    opts = {"options": {"lr": 0.05, "s": 2}} if algorithm == "riag" else {}
    h = make_harness(num_workers=2, algorithm=algorithm, rounds=5, **opts)
    h.ps.engine.keep_rows = True  # what --checkpoint-dir sets
    for w in ("w0", "w1"):
        h.register(w)
    h.start()
    d = h.ps.engine.dim
    algo = make_algorithm(algorithm, h.ps.config.options)
    sent = []
    for k in range(2):
        mb = h.model("w0", k)
        h.model("w1", k)
        selected = codec.selected_workers(mb)
        for m, w in enumerate(("w0", "w1")):
            if selected is not None and m not in selected:
                h.skip(w, k, "not_selected")
                continue
            p = _upload({"laq": "laq", "ef21": "topk-ef"}.get(algorithm, "gd"), k, m, d)
            h.push(w, k, p)
            if m == 0:
                sent.append(p)
    h.model("w0", 2)
    expected = np.zeros(d)
    for p in sent:
        expected += to_dense(p)
    reply = h.stub.Register(_req("w0"), timeout=5.0)
    assert reply.worker_index == 0 and reply.HasField("rejoin")
    round_, row = codec.rejoin_from_proto(reply.rejoin, d)
    assert round_ == 2 and row.tobytes() == expected.tobytes()
    state = algo.rejoin(d, row)
    if algorithm == "laq":
        assert state.q_prev.tobytes() == expected.tobytes() and state.clock == algo.t_bar and state.eps_hat_sq == 0
    else:
        assert state.tobytes() == expected.tobytes()
    assert h.ps.summary()["rejoins"] == 1

    plain = make_harness(num_workers=1, algorithm=algorithm, rounds=2, **opts)
    plain.register("w0")
    plain.start()
    plain.model("w0", 0)
    from grpc import RpcError

    with pytest.raises(RpcError, match="--checkpoint-dir"):
        plain.stub.Register(_req("w0"), timeout=5.0)


def test_a_stop_request_checkpoints_the_round_in_progress_then_fails_the_run(tmp_path: Path) -> None:
    """SIGTERM/SIGINT (``Checkpointer.request_stop``): the open round is finished, saved, and the run
    fails with one line naming the round and the checkpoint; the counters are in it."""
    from psrv.metrics import ByteCounter

    saving = Checkpointer(tmp_path / "ck", every=0)
    engine = _engine("gd", {}, saving, rounds=50)
    counter = ByteCounter()
    counter.add("up", "Push", 123)
    counter.add("down", "GetModel", 7)
    saving.attach(engine, counter)
    for m in range(M):
        engine.register(f"w{m}", 10 + m, 4, 3)
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            engine.run()
        except RuntimeError as exc:
            out["error"] = str(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    d = engine.dim
    for k in range(2):
        for m in range(M):
            engine.wait_model(f"w{m}", k, 10.0)
            if k == 1 and m == 1:
                saving.request_stop("SIGTERM")  # mid-round: round 1 is finished first
                assert not (tmp_path / "ck" / checkpoint.FILE).exists()
            engine.push(f"w{m}", k, _upload("gd", k, m, d))
    thread.join(10)
    assert not thread.is_alive()
    assert out["error"].startswith("stopped by SIGTERM after round 1; checkpoint ") and "--resume" in out["error"]
    ck = load(tmp_path / "ck", engine.config)
    assert (
        ck.state.round == 1 and len(ck.state.records) == 2 and ck.state.theta.tobytes() == engine.state.theta.tobytes()
    )
    restored = ByteCounter()
    ck.restore_counter(restored)
    assert restored.entries() == counter.entries() and restored.total("up") == 123
    # a second request, or one while no round is trained, stops at once
    idle = Checkpointer(tmp_path / "idle", every=0)
    idle.attach(_engine("gd", {}, idle))
    idle.request_stop("SIGINT")
    assert idle.engine.state.phase == "failed" and idle.engine.state.error == "terminated by SIGINT"


def test_metrics_are_continued_after_the_checkpointed_lines(tmp_path: Path) -> None:
    """A resumed run's metrics file keeps its first N whole lines (the checkpoint's count), loses what
    followed (rounds trained again, half a line), and is appended to; fewer lines than N is refused."""
    from psrv.files import LineLog, OutputError

    path = tmp_path / "m.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n{"rou')
    log = LineLog(path, keep_lines=2)
    log.write('{"round": 2, "again": true}')
    log.close()
    assert path.read_text() == '{"round": 0}\n{"round": 1}\n{"round": 2, "again": true}\n' and log.lines == 3
    with pytest.raises(OutputError, match="holds 3 whole lines, fewer than the 5"):
        LineLog(path, keep_lines=5)
    assert path.read_text().count("\n") == 3  # refused: untouched
    with pytest.raises(OutputError, match="already exists"):
        LineLog(path)  # without keep_lines an existing file is still refused


@pytest.mark.parametrize("algorithm", ["laq", "ef21", "ciag"])
def test_a_row_of_the_sum_is_the_workers_own_reference_bit_for_bit(algorithm: str) -> None:
    """With ``keep_rows`` the server's row of worker m is the same float64 sum the worker keeps as its
    reference (LAQ's Q_m, EF21's and CIAG's g_m), so handing it back on rejoin loses nothing of it."""
    from psrv.aggregate import Aggregator
    from psrv.algorithms import RoundInfo, make_algorithm

    d, rng = 40, np.random.default_rng(1)
    algo = make_algorithm(algorithm, {"ratio": 0.2} if algorithm == "ef21" else {})
    agg = Aggregator(2, d, algo.absorb, keep_rows=True)
    states = [algo.init(d), algo.init(d)]
    uploads = 0
    for k in range(12):
        for m in range(2):
            grad = rng.normal(size=d) / (k + 1)
            decision = algo.step(states[m], grad, RoundInfo(k, 2, (1e-3,) * 10), rng)
            if decision.payload is not None:
                agg.add(m, decision.payload)
                uploads += 1
            states[m] = decision.state
    assert uploads >= 12
    for m in range(2):
        reference = states[m].q_prev if algorithm == "laq" else states[m]
        assert agg.rows[m].tobytes() == reference.tobytes()
    assert np.allclose(agg.rows.sum(axis=0), agg.total)

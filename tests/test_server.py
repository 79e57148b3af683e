"""A real server on an ephemeral port, driven by hand through a raw counting stub.

Bad input must get the right gRPC status (with a message naming the problem) and
must never reach the model: after every rejected message the model is exactly
what the accepted messages alone produce.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from psrv import bitpack, codec, rpc
from psrv.compress.laq import quantize
from psrv.compress.topk import TopK
from psrv.payload import Payload, dense, sparse, to_dense
from psrv.server import ParameterServer, ServerConfig, create_server
from psrv.v1 import psrv_pb2 as pb

N_FEATURES, N_CLASSES = 4, 3
DIM = (N_FEATURES + 1) * N_CLASSES  # logreg: 15
RPC_TIMEOUT = 5.0
Code = grpc.StatusCode


class Harness:
    """One server + one raw client; the run loop (``ps.run``) in a background thread."""

    def __init__(self, config: ServerConfig, max_message_bytes: int = rpc.MAX_MESSAGE_BYTES) -> None:
        self.ps = ParameterServer(config)
        self.server, self.port = create_server(self.ps, "127.0.0.1:0", max_message_bytes=max_message_bytes)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = rpc.CountingStub(self.channel)
        self.thread: threading.Thread | None = None
        self.summary: dict[str, Any] | None = None
        self.run_error: BaseException | None = None
        self.worker_ids: list[str] = []

    # -------------------------------------------------------------- lifecycle
    def register(
        self, worker_id: str, num_samples: int = 10, n_features: int = N_FEATURES, n_classes: int = N_CLASSES
    ) -> pb.RegisterResponse:
        reply = self.stub.Register(
            pb.RegisterRequest(
                worker_id=worker_id, num_samples=num_samples, n_features=n_features, n_classes=n_classes
            ),
            timeout=RPC_TIMEOUT,
        )
        self.worker_ids.append(worker_id)
        return reply

    def start(self) -> None:
        def target() -> None:
            try:
                self.summary = self.ps.run()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.run_error = exc

        self.thread = threading.Thread(target=target, name="ps-run", daemon=True)
        self.thread.start()

    def finish(self, timeout: float = 15.0) -> None:
        """Let the run end as real workers would: every registered worker skips every round
        still open, then fetches the final model (``run`` waits until all have it)."""
        if self.thread is None:
            return
        give_up = time.monotonic() + timeout
        while self.thread.is_alive() and time.monotonic() < give_up:
            k, phase = self.ps.round, self.ps.phase
            for wid in self.worker_ids:
                try:
                    if phase == "training" and k >= 0:
                        self.skip(wid, k)
                    elif phase == "done":
                        self.model(wid, self.ps.config.rounds)
                except grpc.RpcError:
                    pass  # already reported, or the round moved on
            self.thread.join(0.01)
        self.thread.join(max(0.0, give_up - time.monotonic()))

    def close(self) -> None:
        try:
            self.finish()
        finally:
            self.channel.close()
            self.server.stop(None).wait(5)
        assert self.thread is None or not self.thread.is_alive(), "run loop did not end"

    # -------------------------------------------------------------- calls
    def model(self, worker_id: str, round_: int) -> pb.GetModelResponse:
        return self.stub.GetModel(pb.GetModelRequest(worker_id=worker_id, round=round_), timeout=RPC_TIMEOUT)

    def params(self, worker_id: str, round_: int) -> np.ndarray:
        mb = self.model(worker_id, round_)
        assert mb.round == round_
        return np.array(codec.tensor_from_proto(mb.params, DIM, "model"))

    def push(self, worker_id: str, round_: int, p: Payload, loss: float = 1.0) -> pb.PushResponse:
        return self.stub.Push(codec.upload_to_proto(worker_id, round_, loss, p), timeout=RPC_TIMEOUT)

    def skip(self, worker_id: str, round_: int, reason: str = "lazy_rule") -> pb.SkipResponse:
        return self.stub.Skip(codec.skip_to_proto(worker_id, round_, reason, 1.0), timeout=RPC_TIMEOUT)


def expect_status(code: grpc.StatusCode, *fragments: str) -> Any:
    """Context manager: the call inside fails with ``code`` and details mentioning every fragment."""

    class _Expect:
        def __enter__(self) -> _Expect:
            return self

        def __exit__(self, typ: type | None, exc: BaseException | None, tb: Any) -> bool:
            assert exc is not None, f"expected {code}, but the call succeeded"
            assert isinstance(exc, grpc.RpcError), f"expected an RpcError, got {exc!r}"
            assert exc.code() == code, f"expected {code}, got {exc.code()}: {exc.details()}"
            for fragment in fragments:
                assert fragment in (exc.details() or ""), f"{fragment!r} not in {exc.details()!r}"
            self.error = exc
            return True

    return _Expect()


def _grad(seed: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=dim).astype(np.float32)


def _req(
    worker_id: str = "w", num_samples: int = 10, n_features: int = N_FEATURES, n_classes: int = N_CLASSES
) -> pb.RegisterRequest:
    return pb.RegisterRequest(worker_id=worker_id, num_samples=num_samples, n_features=n_features, n_classes=n_classes)


# ============================================================================ registration


def test_register_reply_carries_run_config(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(algorithm="gd", options={"lr": 0.1}, num_workers=2, seed=7)
    r0, r1 = h.register("a", 10), h.register("b", 30)
    assert (r0.worker_index, r1.worker_index) == (0, 1)
    assert r1.config.algorithm == "gd" and r1.config.task == "logreg"
    assert r1.config.dim == DIM and r1.config.num_workers == 2 and r1.config.seed == 7
    assert dict(r1.config.options) == {"lr": 0.1}


def test_register_validation(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(num_workers=3)
    with expect_status(Code.INVALID_ARGUMENT, "worker_id"):
        h.stub.Register(_req(worker_id=""), timeout=RPC_TIMEOUT)
    with expect_status(Code.INVALID_ARGUMENT, "num_samples"):
        h.stub.Register(_req(num_samples=0), timeout=RPC_TIMEOUT)
    for n_classes in (0, 1):
        with expect_status(Code.INVALID_ARGUMENT, "n_classes"):
            h.stub.Register(_req(n_classes=n_classes), timeout=RPC_TIMEOUT)
    with expect_status(Code.INVALID_ARGUMENT, "n_features"):
        h.stub.Register(_req(n_features=0), timeout=RPC_TIMEOUT)
    assert h.ps.phase == "registering" and h.ps.theta is None  # nothing was registered

    h.register("w0")
    with expect_status(Code.ALREADY_EXISTS, "'w0'", "already registered"):
        h.stub.Register(_req("w0"), timeout=RPC_TIMEOUT)
    with expect_status(Code.INVALID_ARGUMENT, "5 features", "4 / 3"):
        h.stub.Register(_req("w1", n_features=5), timeout=RPC_TIMEOUT)
    with expect_status(Code.INVALID_ARGUMENT, "4 classes"):
        h.stub.Register(_req("w1", n_classes=4), timeout=RPC_TIMEOUT)
    # the rejected registrations left no trace: w1 can still join, and gets index 1
    assert h.register("w1").worker_index == 1
    assert h.ps.theta is not None and h.ps.theta.size == DIM


def test_register_after_run_started(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(num_workers=2)
    h.register("w0")
    h.register("w1")
    h.start()
    h.model("w0", 0)  # round 0 is open: the run has started
    with expect_status(Code.RESOURCE_EXHAUSTED, "registration is closed", "--workers 2"):
        h.stub.Register(_req("late"), timeout=RPC_TIMEOUT)
    # a registered worker that registers again while training has restarted: it rejoins, with its index
    with expect_status(Code.INVALID_ARGUMENT, "rejoins with 11 samples", "registered with 10"):
        h.stub.Register(_req("w0", num_samples=11), timeout=RPC_TIMEOUT)
    assert h.stub.Register(_req("w1"), timeout=RPC_TIMEOUT).worker_index == 1
    assert h.ps.summary()["rejoins"] == 1


def test_accumulating_runs_refuse_a_rejoin(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(num_workers=2, algorithm="laq")
    h.register("w0")
    h.register("w1")
    h.start()
    h.model("w0", 0)
    with expect_status(Code.FAILED_PRECONDITION, "cannot rejoin a laq run", "running sum"):
        h.stub.Register(_req("w0"), timeout=RPC_TIMEOUT)


# ============================================================================ identity and rounds


def test_unknown_worker_is_not_found(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(num_workers=1)
    h.register("w0")
    h.start()
    h.model("w0", 0)
    with expect_status(Code.NOT_FOUND, "'ghost'", "register first"):
        h.model("ghost", 0)
    with expect_status(Code.NOT_FOUND, "'ghost'"):
        h.push("ghost", 0, dense(_grad(0)))
    with expect_status(Code.NOT_FOUND, "'ghost'"):
        h.skip("ghost", 0)
    h.push("w0", 0, dense(_grad(1)))
    h.model("w0", 1)
    assert len(h.ps.records[0]["workers"]) == 1 and h.ps.records[0]["uploads"] == 1


def test_bad_payloads_are_invalid_argument(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(num_workers=1)
    h.register("w0")
    h.start()
    h.model("w0", 0)

    with expect_status(Code.INVALID_ARGUMENT, "14 elements, expected 15"):
        h.push("w0", 0, dense(_grad(0, DIM - 1)))
    nan = _grad(1)
    nan[3] = np.nan
    with expect_status(Code.INVALID_ARGUMENT, "NaN or Inf"):
        h.push("w0", 0, dense(nan))
    for inf in (np.inf, -np.inf):  # a dense upload's values are checked by the engine's range check alone
        with expect_status(Code.INVALID_ARGUMENT, "the payload contains NaN or Inf"):
            h.push("w0", 0, dense(np.where(np.arange(DIM) == 3, inf, _grad(1)).astype(np.float32)))
    with expect_status(Code.INVALID_ARGUMENT, "NaN or Inf"):
        h.push("w0", 0, sparse(DIM, np.array([1, 2]), np.array([1.0, np.inf], dtype=np.float32)))
    # index 15 fits the 4-bit index width of dim 15 but is out of range
    bad_index = pb.PushRequest(
        worker_id="w0",
        round=0,
        local_loss=1.0,
        sparse=pb.SparseTensor(
            dim=DIM,
            nnz=2,
            index_encoding=pb.INDEX_ENCODING_BITPACKED,
            indices=bitpack.pack(np.array([2, 15]), 4),
            value_dtype=pb.DTYPE_FLOAT32,
            values=np.ones(2, np.float32).tobytes(),
        ),
    )
    with expect_status(Code.INVALID_ARGUMENT, "index 15 out of range"):
        h.stub.Push(bad_index, timeout=RPC_TIMEOUT)
    garbage = pb.PushRequest(
        worker_id="w0", round=0, local_loss=1.0, laq=pb.LaqPayload(dim=DIM, radius=1.0, bits=4, codes=b"\x07" * 5)
    )
    with expect_status(Code.INVALID_ARGUMENT, "codes", "5 bytes, expected 8"):
        h.stub.Push(garbage, timeout=RPC_TIMEOUT)
    with expect_status(Code.INVALID_ARGUMENT, "dimension 16, expected 15"):
        h.push("w0", 0, sparse(16, np.array([0]), np.ones(1, np.float32)))
    with expect_status(Code.INVALID_ARGUMENT, "no payload"):
        h.stub.Push(pb.PushRequest(worker_id="w0", round=0, local_loss=1.0), timeout=RPC_TIMEOUT)
    with expect_status(Code.INVALID_ARGUMENT, "local_loss"):
        h.push("w0", 0, dense(_grad(2)), loss=float("nan"))
    with expect_status(Code.INVALID_ARGUMENT, "invalid reason"):
        h.stub.Skip(pb.SkipRequest(worker_id="w0", round=0, reason=3), timeout=RPC_TIMEOUT)  # no such reason
    with expect_status(Code.INVALID_ARGUMENT, "invalid reason"):
        h.stub.Skip(pb.SkipRequest(worker_id="w0", round=0), timeout=RPC_TIMEOUT)

    # none of that counted as the worker's report for round 0: a good push is still accepted
    assert h.push("w0", 0, dense(_grad(3))).round == 0
    np.testing.assert_allclose(h.params("w0", 1), -0.02 * _grad(3), rtol=1e-6)  # gd's default lr
    rec = h.ps.records[0]
    assert rec["workers"] == [
        {
            "id": "w0",
            "status": "upload",
            "bits": 32 * DIM,
            "bytes": rec["bytes_up"],
            "latency": rec["workers"][0]["latency"],
        }
    ]


def test_round_checks(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(num_workers=2)
    h.register("w0")
    h.register("w1")
    h.start()
    h.model("w0", 0)
    with expect_status(Code.FAILED_PRECONDITION, "round 1 is not open", "current round 0"):
        h.push("w0", 1, dense(_grad(0)))
    with expect_status(Code.FAILED_PRECONDITION, "round 7 is not open"):
        h.skip("w0", 7)
    h.push("w0", 0, dense(_grad(1)))
    with expect_status(Code.ALREADY_EXISTS, "'w0' already reported for round 0"):
        h.push("w0", 0, dense(_grad(2)))
    with expect_status(Code.ALREADY_EXISTS, "already reported"):
        h.skip("w0", 0)
    h.skip("w1", 0)
    h.model("w1", 1)
    with expect_status(Code.FAILED_PRECONDITION, "round 0 is not open", "current round 1"):
        h.push("w1", 0, dense(_grad(3)))
    with expect_status(Code.OUT_OF_RANGE, "ahead of the server"):
        h.model("w1", 5)
    assert h.ps.records[0]["uploads"] == 1 and h.ps.records[0]["skips"] == 1


def test_message_over_server_max_is_resource_exhausted(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(num_workers=2, max_message_bytes=1024)
    h.register("w0")
    up_before = h.ps.counter.total("up")
    with expect_status(Code.RESOURCE_EXHAUSTED, "larger than max"):
        h.stub.Register(_req("x" * 2000), timeout=RPC_TIMEOUT)
    # rejected by gRPC before the handler: the server neither counted nor registered it
    assert h.ps.counter.total("up") == up_before
    assert h.register("w1").worker_index == 1
    h.start()
    h.model("w0", 0)
    big = dense(np.ones(400, dtype=np.float32))  # 1600 bytes of data
    with expect_status(Code.RESOURCE_EXHAUSTED):
        h.push("w0", 0, big)
    assert h.push("w0", 0, dense(_grad(0))).round == 0  # small messages still work


# ============================================================================ the model


def test_bad_messages_do_not_touch_the_model(make_harness: Callable[..., Harness]) -> None:
    lr = 0.1
    h = make_harness(algorithm="gd", options={"lr": lr}, num_workers=2)
    h.register("w0")
    h.register("w1")
    h.start()
    theta0 = h.params("w0", 0)
    np.testing.assert_array_equal(theta0, np.zeros(DIM))  # logreg starts at zero
    np.testing.assert_array_equal(h.params("w1", 0), theta0)
    g1, g2 = _grad(11), _grad(12)

    with expect_status(Code.INVALID_ARGUMENT):
        h.push("w0", 0, dense(np.concatenate([g1, g1[:1]])))  # wrong dimension
    poisoned = g1.copy()
    poisoned[0] = np.nan
    with expect_status(Code.INVALID_ARGUMENT):
        h.push("w0", 0, dense(poisoned))
    h.push("w0", 0, dense(g1))
    with expect_status(Code.ALREADY_EXISTS):
        h.push("w0", 0, dense(100 * g1))  # a valid second report must not replace the first
    with expect_status(Code.INVALID_ARGUMENT):
        h.stub.Push(
            pb.PushRequest(
                worker_id="w1",
                round=0,
                local_loss=0.0,
                sparse=pb.SparseTensor(
                    dim=DIM,
                    nnz=1,
                    index_encoding=pb.INDEX_ENCODING_BITPACKED,
                    indices=bitpack.pack(np.array([15]), 4),
                    value_dtype=pb.DTYPE_FLOAT32,
                    values=np.ones(1, np.float32).tobytes(),
                ),
            ),
            timeout=RPC_TIMEOUT,
        )
    with expect_status(Code.INVALID_ARGUMENT):
        h.stub.Push(
            pb.PushRequest(
                worker_id="w1",
                round=0,
                local_loss=0.0,
                laq=pb.LaqPayload(dim=DIM, radius=1e3, bits=8, codes=b"\xff" * 3),
            ),
            timeout=RPC_TIMEOUT,
        )
    with expect_status(Code.FAILED_PRECONDITION):
        h.push("w1", 1, dense(-g2))  # future round
    with expect_status(Code.NOT_FOUND):
        h.push("intruder", 0, dense(g2 * 7))
    h.push("w1", 0, dense(g2))

    theta1 = h.params("w0", 1)
    with expect_status(Code.FAILED_PRECONDITION):
        h.push("w1", 0, dense(g2 * 3))  # too late for round 0
    expected = (theta0 - lr * (g1.astype(np.float64) + g2.astype(np.float64))).astype(np.float32)
    np.testing.assert_allclose(theta1, expected, rtol=1e-6, atol=1e-7)
    rec = h.ps.records[0]
    assert (rec["uploads"], rec["skips"], rec["deadline_misses"]) == (2, 0, 0)
    assert rec["payload_bits"] == 2 * 32 * DIM
    assert [w["status"] for w in rec["workers"]] == ["upload", "upload"]


@pytest.mark.slow  # waits out two deadlines
def test_silent_worker_hits_deadline_then_is_no_longer_waited_for(make_harness: Callable[..., Harness]) -> None:
    timeout = 2.0  # long enough for the live worker's calls on a loaded machine
    h = make_harness(num_workers=2, rounds=4, round_timeout=timeout, max_misses=2)
    h.register("live")
    h.register("dead")
    h.start()
    for k in range(4):
        h.model("live", k)
        h.push("live", k, dense(_grad(k)))
    final = h.model("live", 4)
    assert final.done and h.ps.phase == "done"  # the run went on without "dead"

    recs = h.ps.records
    assert [r["deadline_misses"] for r in recs] == [1, 1, 1, 1]
    for r in recs:
        by_id = {w["id"]: w for w in r["workers"]}  # records list workers in worker-id order
        assert by_id["dead"]["status"] == "deadline" and by_id["dead"]["latency"] is None
        assert by_id["live"]["status"] == "upload"
    # rounds 0 and 1 wait out the deadline; after max_misses=2 misses nobody waits for "dead"
    assert recs[0]["round_time"] >= 0.9 * timeout and recs[1]["round_time"] >= 0.9 * timeout
    assert recs[2]["round_time"] < 0.5 * timeout and recs[3]["round_time"] < 0.5 * timeout
    h.finish()
    assert h.run_error is None and h.summary is not None
    assert (h.summary["rounds"], h.summary["deadline_misses"], h.summary["uploads"]) == (4, 4, 4)


@pytest.mark.slow  # waits out two deadlines
def test_silent_worker_that_returns_is_waited_for_again(make_harness: Callable[..., Harness]) -> None:
    timeout = 2.0  # long enough for the live worker's calls on a loaded machine
    h = make_harness(num_workers=2, rounds=3, round_timeout=timeout, max_misses=1)
    h.register("a")
    h.register("b")
    h.start()
    h.model("a", 0)
    h.push("a", 0, dense(_grad(0)))  # b misses round 0 -> no longer waited for
    h.model("b", 1)
    h.skip("b", 1)  # b is back...
    h.push("a", 1, dense(_grad(1)))
    h.model("a", 2)
    h.push("a", 2, dense(_grad(2)))
    assert h.model("a", 3).done
    recs = h.ps.records
    assert [r["workers"][1]["status"] for r in recs] == ["deadline", "lazy_rule", "deadline"]
    assert recs[0]["round_time"] >= 0.9 * timeout
    assert recs[1]["round_time"] < 0.5 * timeout
    assert recs[2]["round_time"] >= 0.9 * timeout  # ...so round 2 waited for it again


def test_laq_accumulates_innovations(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(algorithm="laq", options={"lr": 0.05, "bits": 4}, num_workers=2)
    h.register("w0")
    h.register("w1")
    h.start()
    rng = np.random.default_rng(5)
    theta0 = h.params("w0", 0)
    p0 = quantize(rng.normal(size=DIM), np.zeros(DIM), 4)
    h.push("w0", 0, p0)
    h.skip("w1", 0)
    theta1 = h.params("w0", 1)
    v0 = to_dense(codec.laq_from_proto(codec.payload_to_proto(p0), DIM))
    p1 = quantize(rng.normal(size=DIM), v0, 4)
    h.push("w0", 1, p1)
    h.skip("w1", 1)
    theta2 = h.params("w0", 2)
    v1 = to_dense(codec.laq_from_proto(codec.payload_to_proto(p1), DIM))
    assert np.abs(v1).max() > 0 and np.abs(v0).max() > 0

    agg = h.ps.engine.state.aggregator
    # total = sum of the stored Q_m (eq. 4): w's Q = v0 + v1, the other's 0; LAQ keeps the sum alone
    np.testing.assert_allclose(agg.total, v0 + v1, rtol=0, atol=1e-12)
    assert agg.payloads == []
    # theta^{k+1} = theta^k - lr * total
    np.testing.assert_allclose(theta1, (theta0 - 0.05 * v0).astype(np.float32), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(theta2, (theta1 - 0.05 * (v0 + v1)).astype(np.float32), rtol=1e-6, atol=1e-6)


# ============================================================================ byte accounting


def test_client_and_server_count_the_same_bytes(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(num_workers=2, rounds=2)
    sent: list[int] = []
    got: list[int] = []

    def call(method: str, msg: Any, ok: bool = True) -> None:
        sent.append(msg.ByteSize())
        try:
            reply = getattr(h.stub, method)(msg, timeout=RPC_TIMEOUT)
        except grpc.RpcError:
            assert not ok
            return
        assert ok
        got.append(reply.ByteSize())

    call("Register", _req("w0"))
    call("Register", _req("w0"), ok=False)  # rejected in the handler: counted up, nothing down
    call("Register", _req("w1", num_samples=20))
    h.worker_ids += ["w0", "w1"]
    h.start()
    call("GetModel", pb.GetModelRequest(worker_id="w0", round=0))
    call("GetModel", pb.GetModelRequest(worker_id="w1", round=0))
    call("Push", codec.upload_to_proto("w0", 0, 0.5, dense(_grad(0))))
    call("Push", codec.upload_to_proto("w1", 0, 0.5, dense(_grad(0, DIM + 1))), ok=False)
    call("Push", codec.upload_to_proto("w1", 0, 0.5, dense(_grad(1))))
    call("GetModel", pb.GetModelRequest(worker_id="w0", round=1))
    call("Skip", codec.skip_to_proto("w0", 1, "lazy_rule", 0.25))
    call("Skip", codec.skip_to_proto("ghost", 1, "lazy_rule", 0.25), ok=False)

    c_up, c_down = h.stub.counter.total("up"), h.stub.counter.total("down")
    assert c_up == sum(sent) and c_down == sum(got)
    assert h.ps.counter.total("up") == c_up
    assert h.ps.counter.total("down") == c_down
    for (direction, method), n in h.stub.counter.bytes.items():
        assert h.ps.counter.bytes[direction, method] == n, (direction, method)
    # the round record charges the round's accepted uploads and its broadcasts
    rec = h.ps.records[0]
    assert rec["bytes_up"] == sent[5] + sent[7]
    assert rec["bytes_down"] == got[2] + got[3]


# ============================================================================ shutdown


def test_fail_aborts_waiting_calls_and_rejects_reports(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(num_workers=1, rounds=1)  # round 0 must not end on its own before fail()
    h.register("w0")
    h.start()
    h.model("w0", 0)
    waiter_result: list[BaseException] = []

    def long_poll() -> None:
        try:
            h.model("w0", 1)
        except grpc.RpcError as exc:
            waiter_result.append(exc)

    waiter = threading.Thread(target=long_poll)
    waiter.start()
    give_up = time.monotonic() + RPC_TIMEOUT
    while h.ps.counter.messages["up", "GetModel"] < 2 and time.monotonic() < give_up:
        time.sleep(0.005)  # until the long poll is waiting inside the server
    h.ps.fail("operator said stop")
    waiter.join(RPC_TIMEOUT)
    assert not waiter.is_alive()
    assert waiter_result and waiter_result[0].code() == Code.ABORTED
    assert "operator said stop" in waiter_result[0].details()
    with expect_status(Code.FAILED_PRECONDITION, "server is failed"):
        h.push("w0", 0, dense(_grad(0)))


def test_fail_stops_the_round_loop_promptly(make_harness: Callable[..., Harness]) -> None:
    timeout = 10.0  # fail() must end the round long before its deadline, however busy the machine
    h = make_harness(num_workers=1, rounds=2, round_timeout=timeout)
    h.register("w0")
    h.start()
    h.model("w0", 0)
    h.ps.fail("terminated")
    h.thread.join(0.5 * timeout)
    try:
        assert not h.thread.is_alive(), "run() still going after fail()"
    finally:
        h.finish()  # don't leak the thread either way
    assert h.ps.phase == "failed", f"phase {h.ps.phase!r} after fail()"


def test_payload_kind_the_algorithm_cannot_absorb_is_rejected(make_harness: Callable[..., Harness]) -> None:
    """A well-formed LAQ innovation sent to a gd server would be stored as a gradient."""
    h = make_harness(num_workers=1, rounds=1)
    h.register("w0")
    h.start()
    h.model("w0", 0)
    with expect_status(Code.INVALID_ARGUMENT, "gd does not take laq payloads"):
        h.push("w0", 0, quantize(_grad(1), np.zeros(DIM), 3))
    with expect_status(Code.INVALID_ARGUMENT, "gd does not take sparse payloads"):  # gd here sends dense
        h.push("w0", 0, TopK(ratio=0.5).compress(_grad(1)))
    assert not h.ps.engine.state.aggregator.total.any()


def test_ctrl_c_that_cpython_hides_behind_a_lock_error_is_still_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPython: a KeyboardInterrupt inside ``Condition.wait`` can leave the lock released, and the
    ``with`` block then raises "cannot release un-acquired lock" over it (seen once in CI: a Ctrl-C'd
    ``psrv run`` ended "laq failed" with exit 1, not interrupted with 130). The server's run raises
    the interrupt; any other RuntimeError stays what it is."""
    ps = ParameterServer(ServerConfig(num_workers=1, rounds=1))

    def hidden() -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("cannot release un-acquired lock") from None  # __context__ kept

    monkeypatch.setattr(ps.engine, "run", hidden)
    with pytest.raises(KeyboardInterrupt):
        ps.run()

    def failed() -> None:
        raise RuntimeError("only 0 of 1 workers registered")

    monkeypatch.setattr(ps.engine, "run", failed)
    with pytest.raises(RuntimeError, match="only 0 of 1"):
        ps.run()

"""No upload may poison the model (issue 11): a hostile client built from the proto alone, against
a real server. Finite values the model's dtype cannot hold are refused with INVALID_ARGUMENT naming
the limit; an upload that would take the aggregate past the dtype's max is rejected (not absorbed)
and the model is exactly what the honest uploads alone produce; ``clip_norm`` bounds an upload's
effect; a model the dtype cannot hold is never published."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from psrv import bitpack
from psrv.aggregate import Aggregator, Overflow, clip, payload_peak
from psrv.compress.laq import quantize
from psrv.engine import RoundEngine, ServerConfig
from psrv.payload import Payload, dense, sparse, to_dense
from psrv.v1 import psrv_pb2 as pb
from tests.test_server import DIM, RPC_TIMEOUT, Code, Harness, _grad, expect_status

F32_MAX = float(np.finfo(np.float32).max)


def _sparse_f64(worker: str, round_: int, index: int, value: float) -> pb.PushRequest:
    """What a client generated from the proto alone can send: a FLOAT64 sparse upload."""
    return pb.PushRequest(
        worker_id=worker,
        round=round_,
        local_loss=0.0,
        sparse=pb.SparseTensor(
            dim=DIM,
            nnz=1,
            index_encoding=pb.INDEX_ENCODING_BITPACKED,
            indices=bitpack.pack(np.array([index]), 4),
            value_dtype=pb.DTYPE_FLOAT64,
            values=np.array([value], "<f8").tobytes(),
        ),
    )


def _gd(make: Callable[..., Harness], algorithm: str = "gd", **config: object) -> Harness:
    options = {"lr": 0.1, **({"ratio": 1.0} if algorithm == "topk-ef" else {})}
    h = make(algorithm=algorithm, options=options, num_workers=2, **config)
    h.register("w0")
    h.register("w1")
    h.start()
    return h


def test_a_finite_float64_value_of_1e300_is_refused_and_the_model_stays_the_honest_one(
    make_harness: Callable[..., Harness],
) -> None:
    h = _gd(make_harness, "topk-ef")
    theta0 = h.params("w0", 0)
    g0, g1 = _grad(1), _grad(2)
    with expect_status(Code.INVALID_ARGUMENT, "1e+300", "float32 max", "2 workers"):
        h.stub.Push(_sparse_f64("w1", 0, 3, -1e300), timeout=RPC_TIMEOUT)
    with expect_status(Code.INVALID_ARGUMENT, "NaN or Inf"):  # non-finite values: refused, as before
        h.stub.Push(_sparse_f64("w1", 0, 3, float("inf")), timeout=RPC_TIMEOUT)
    bad = g1.copy()
    bad[0] = np.nan
    with expect_status(Code.INVALID_ARGUMENT, "NaN or Inf"):
        h.push("w1", 0, sparse(DIM, np.arange(DIM), bad))
    h.push("w0", 0, sparse(DIM, np.arange(DIM), g0))
    h.push("w1", 0, sparse(DIM, np.arange(DIM), g1))  # the refused uploads left no report behind
    theta1 = h.params("w0", 1)
    expected = (theta0 - 0.1 * (g0.astype(np.float64) + g1.astype(np.float64))).astype(np.float32)
    np.testing.assert_allclose(theta1, expected, rtol=1e-6, atol=1e-7)
    assert np.isfinite(theta1).all()


def test_float32_values_near_its_max_are_refused_every_time(make_harness: Callable[..., Harness]) -> None:
    h = _gd(make_harness, rounds=3)
    theta = h.params("w0", 0).astype(np.float64)
    for k in range(3):
        g0, g1 = _grad(10 + k), _grad(20 + k)
        for _ in range(3):  # 3e38 is finite float32, but two of them overflow it
            with expect_status(Code.INVALID_ARGUMENT, "exceeds the limit"):
                h.push("w1", k, dense(np.full(DIM, 3e38, np.float32)))
        h.push("w1", k, dense(g1))
        h.push("w0", k, dense(g0))
        got = h.params("w0", k + 1)
        theta = theta - 0.1 * (g0.astype(np.float64) + g1.astype(np.float64))
        np.testing.assert_allclose(got, theta.astype(np.float32), rtol=1e-5, atol=1e-6)
        assert np.isfinite(got).all()
    assert all(r["rejected"] == 0 and r["uploads"] == 2 for r in h.ps.records)


def _laq_run(make: Callable[..., Harness]) -> tuple[Harness, np.ndarray]:
    """LAQ accumulates innovations: values within the per-upload limit can add up past the dtype's
    max over rounds. The aggregate is set near the max, as such a history would leave it."""
    h = make(algorithm="laq", options={"lr": 0.01, "bits": 4}, num_workers=2)
    h.register("w0")
    h.register("w1")
    h.start()
    h.params("w0", 0)
    agg = h.ps.engine.state.aggregator
    agg.total[:] = 0.9 * F32_MAX
    agg.retighten()
    return h, agg.total.copy()


def _huge_laq() -> Payload:
    return Payload("laq", DIM, codes=np.full(DIM, 15, np.uint8), scale=1e38, bits=4)  # +1e38 everywhere


def test_an_upload_that_overflows_the_aggregate_is_rejected_in_its_own_call(
    make_harness: Callable[..., Harness],
) -> None:
    h, before = _laq_run(make_harness)
    honest = quantize(-np.ones(DIM), np.zeros(DIM), 4)
    h.push("w0", 0, honest)
    with expect_status(Code.INVALID_ARGUMENT, "rejected", "w1", "beyond"):
        h.push("w1", 0, _huge_laq())
    # the rejection was its report: the round closes (in the engine's own thread: waited for here, as
    # a push before the close is refused as ALREADY_EXISTS, one after it as FAILED_PRECONDITION)
    theta1 = h.params("w0", 1)
    with expect_status(Code.FAILED_PRECONDITION):
        h.push("w1", 0, honest)
    agg = h.ps.engine.state.aggregator
    np.testing.assert_array_equal(agg.total, before + to_dense(honest))  # the honest upload alone
    assert np.isfinite(theta1).all()
    rec = h.ps.records[0]
    assert (rec["uploads"], rec["rejected"]) == (1, 1)
    assert [w["status"] for w in rec["workers"]] == ["upload", "rejected"]


def test_an_upload_absorbed_in_a_later_call_is_rejected_there_and_recorded(
    make_harness: Callable[..., Harness],
) -> None:
    h, before = _laq_run(make_harness)
    honest = quantize(-np.ones(DIM), np.zeros(DIM), 4)
    h.push("w1", 0, _huge_laq())  # held behind slot 0: accepted for now, absorbed later
    h.push("w0", 0, honest)  # absorbs slot 0, then slot 1, which is rejected: w0's call is not failed
    np.testing.assert_array_equal(h.ps.engine.state.aggregator.total, before + to_dense(honest))
    assert np.isfinite(h.params("w0", 1)).all()
    assert [w["status"] for w in h.ps.records[0]["workers"]] == ["upload", "rejected"]


def test_the_aggregator_refuses_an_overflow_whole() -> None:
    for absorb in ("replace", "accumulate"):
        agg = Aggregator(2, 5, absorb)
        agg.add(0, dense(np.array([1.0, 2, 3, 4, 5])), limit=10.0)
        kept = agg.total.copy()
        with pytest.raises(Overflow):
            agg.add(1, dense(np.array([0.0, 0, 0, 0, 9.5])), limit=10.0)
        with pytest.raises(Overflow):
            agg.add(1, sparse(5, np.array([1, 4]), np.array([1.0, 6.0])), limit=10.0)
        np.testing.assert_array_equal(agg.total, kept)
        if absorb == "replace":
            assert agg.payloads[1] is None


def test_a_model_the_dtype_cannot_hold_is_never_published() -> None:
    engine = RoundEngine(ServerConfig(algorithm="gd", options={"lr": 1.0}, num_workers=1, rounds=1))
    engine.register("w0", 10, 4, 3)
    engine.state.theta[:] = -0.9 * F32_MAX  # where a long hostile history could have taken it
    with engine._cond:
        engine._publish(0)
    engine.push("w0", 0, dense(np.full(DIM, 0.5 * F32_MAX, np.float32)))
    with engine._cond, pytest.raises(RuntimeError, match="not published"):
        engine._close_round(0, 0.0)
    assert engine.state.phase == "failed"


def test_clip_norm_bounds_an_uploads_effect(make_harness: Callable[..., Harness]) -> None:
    h = _gd(make_harness, clip_norm=1.0)
    theta0 = h.params("w0", 0).astype(np.float64)
    g = _grad(3)
    small = g / np.linalg.norm(g) * 0.5
    h.push("w0", 0, dense(1e6 * g))  # clipped to norm 1
    h.push("w1", 0, dense(small.astype(np.float32)))  # within the bound: unchanged
    theta1 = h.params("w0", 1).astype(np.float64)
    expected = theta0 - 0.1 * (g / np.linalg.norm(g) + small)
    np.testing.assert_allclose(theta1, expected, rtol=1e-5, atol=1e-6)
    assert h.ps.records[0]["payload_bits"] == 2 * 32 * DIM  # what was sent


def test_clip_scales_every_kind_to_the_bound() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=50)
    kinds = [
        dense(v.astype(np.float32)),
        sparse(50, np.array([1, 7, 9]), np.array([3.0, -4.0, 12.0])),
        quantize(v, np.zeros(50), 4),
    ]
    for p in kinds:
        c = 0.5 * float(np.linalg.norm(to_dense(p)))
        clipped = clip(p, c)
        assert float(np.linalg.norm(to_dense(clipped))) == pytest.approx(c, rel=1e-5)
        np.testing.assert_allclose(to_dense(clipped), to_dense(p) * 0.5, rtol=1e-5, atol=1e-7)
        assert clip(p, 1e9) is p
    assert payload_peak(dense(np.array([1.0, -7.0]))) == 7.0


def test_clip_norm_is_a_job_option() -> None:
    from click.testing import CliRunner

    from psrv.cli import main
    from psrv.options import JobConfig, jobs

    (job,) = jobs(
        ["gd"], None, compressor="", lr=0.1, options={}, task="logreg", l2=None, task_options={}, rounds=2,
        workers=2, round_timeout=5.0, seed=0, zstd=False, clip_norm=2.5,
    )  # fmt: skip
    assert job.server_config().clip_norm == 2.5
    argv = job.argv()
    assert argv[argv.index("--clip-norm") + 1] == "2.5"
    assert "--clip-norm" not in JobConfig().argv()  # default runs unchanged
    with pytest.raises(ValueError, match="clip_norm"):
        ServerConfig(clip_norm=float("nan"))
    assert "--clip-norm" in CliRunner().invoke(main, ["start-server", "--help"]).output


def test_a_huge_upload_on_a_rounds_stream_ends_it_with_invalid_argument(
    make_harness: Callable[..., Harness],
) -> None:
    from psrv import codec, stream
    from tests.test_rounds_stream import _raw_rounds

    h = make_harness(algorithm="gd", num_workers=2, rounds=1)
    h.register("w0")
    h.register("w1")
    h.start()
    opened = pb.RoundsRequest(open=pb.RoundsOpen(worker_id="w0")).SerializeToString()
    huge = stream.field_bytes(3, codec.upload_to_wire("", 0, 1.0, dense(np.full(DIM, 3e38, np.float32))).tobytes())
    with expect_status(Code.INVALID_ARGUMENT, "exceeds the limit", "float32 max"):
        _raw_rounds(h, [opened, huge])
    assert h.ps.round == 0 and not h.ps.engine._open.reports and not h.ps.theta.any()

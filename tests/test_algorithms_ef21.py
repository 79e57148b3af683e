"""EF21 (Richtárik, Sokolov, Fatkhullin, NeurIPS 2021): worker state, server state, contraction."""

from __future__ import annotations

import math

import numpy as np
import pytest

import psrv.algorithms.ef21  # noqa: F401  (registers "ef21")
from psrv import codec
from psrv.aggregate import Aggregator
from psrv.algorithms import RoundInfo, make_algorithm
from psrv.payload import to_dense
from psrv.v1 import psrv_pb2 as pb


def test_state_converges_geometrically_to_a_fixed_gradient() -> None:
    rng = np.random.default_rng(0)
    d, k = 1000, 50
    v = rng.normal(size=d) * rng.exponential(size=d)
    algo = make_algorithm("ef21", {"k": k})  # default compressor: top-k
    assert algo.compressor.name == "topk"
    g = algo.init(d)
    assert not g.any()
    factor = math.sqrt(1 - k / d)  # EF21: ||g' - grad||^2 <= (1 - delta) ||g - grad||^2, delta = k/d
    err = np.linalg.norm(g - v)
    for t in range(120):
        dec = algo.step(g, v, RoundInfo(t, 1), rng)
        sent = to_dense(dec.payload)
        # what goes out is C(grad - g_m), the compressed difference, and g_m moves by exactly that
        diff = v - g
        keep = np.argsort(np.abs(diff))[::-1][:k]
        expected = np.zeros(d)
        expected[keep] = diff[keep].astype(np.float32)
        if err > 0:
            np.testing.assert_array_equal(sent[keep], expected[keep])
            assert np.count_nonzero(sent) <= k
        np.testing.assert_array_equal(dec.state, g + sent)
        new_err = np.linalg.norm(dec.state - v)
        assert new_err <= factor * err * (1 + 1e-9) + 1e-300
        assert dec.stats["distortion_sq"] == pytest.approx(new_err**2, rel=1e-12, abs=1e-300)
        g, err = dec.state, new_err
    assert err <= 1e-12 * np.linalg.norm(v)


def test_server_store_equals_worker_state_exactly_over_the_wire() -> None:
    M, d, rounds = 3, 400, 40
    for compressor, options in (("topk", {"ratio": 0.05}), ("dense", {}), ("bf16", {}), ("qsgd", {"levels": 64.0})):
        rng = np.random.default_rng(1)
        algo = make_algorithm("ef21", {"lr": 0.1, **options}, compressor)
        assert algo.absorb == "accumulate" and "laq" not in algo.payload_kinds
        agg = Aggregator(M, d, algo.absorb)
        server = np.zeros((M, d))  # what the server's per-worker copy would be (it keeps only the sum)
        states = [algo.init(d) for _ in range(M)]
        grads = [rng.normal(size=d) for _ in range(M)]
        for k in range(rounds):
            for m in range(M):
                grads[m] = grads[m] + 0.1 * rng.normal(size=d)  # gradients drift as the model moves
                dec = algo.step(states[m], grads[m], RoundInfo(k, M), rng)
                assert dec.payload.kind in algo.payload_kinds
                data = codec.upload_to_proto(f"w{m}", k, 0.0, dec.payload).SerializeToString()
                received = codec.upload_from_proto(pb.PushRequest.FromString(data), d)
                agg.add(m, received)
                server[m] += to_dense(received)
                states[m] = dec.state
        for m in range(M):
            np.testing.assert_array_equal(server[m], states[m])
        np.testing.assert_allclose(agg.total, np.sum(states, axis=0), rtol=0, atol=1e-9)
        # and the estimates track the drifting gradients
        assert max(np.linalg.norm(states[m] - grads[m]) / np.linalg.norm(grads[m]) for m in range(M)) < 0.5


def test_dense_sends_the_full_difference_and_matches_after_one_step() -> None:
    rng = np.random.default_rng(2)
    d = 257
    algo = make_algorithm("ef21", {}, "dense")
    g = algo.init(d)
    grad = rng.normal(size=d).astype(np.float32).astype(np.float64)  # what a float32 payload carries exactly
    dec = algo.step(g, grad, RoundInfo(0, 1), rng)
    np.testing.assert_array_equal(to_dense(dec.payload), grad)
    np.testing.assert_array_equal(dec.state, grad)
    assert dec.stats["distortion_sq"] == 0.0
    g = dec.state
    for k in range(1, 4):
        grad = grad + rng.normal(size=d)
        dec = algo.step(g, grad, RoundInfo(k, 1), rng)
        np.testing.assert_array_equal(to_dense(dec.payload), (grad - g).astype(np.float32))
        np.testing.assert_allclose(dec.state, grad, rtol=0, atol=2.0**-23 * np.abs(grad - g).max())
        g = dec.state


def test_options_and_compressor_checks() -> None:
    algo = make_algorithm("ef21", {"lr": 0.5, "ratio": 0.2, "k": 3.0})
    assert algo.lr == 0.5 and algo.compressor.k == 3 and algo.history_depth == 0
    with pytest.raises(ValueError):
        make_algorithm("ef21", {"lr": 0.0})
    with pytest.raises(ValueError):
        make_algorithm("ef21", {"bogus": 1.0})
    # an unbiased compressor with omega >= 1 is not contractive: refused when the dimension is known
    with pytest.raises(ValueError, match="contractive"):
        make_algorithm("ef21", {"levels": 4.0}, "qsgd").init(1000)
    with pytest.raises(ValueError, match="contractive"):
        make_algorithm("ef21", {"ratio": 0.1}, "randk").init(1000)
    make_algorithm("ef21", {"ratio": 0.9}, "randk").init(1000)  # omega = 1/9: contractive, delta = 8/9

"""LAQ from the math of Sun et al., NeurIPS 2019: quantizer eqs. 5-6, rule (7a)/(7b), aggregation eq. 4."""

from __future__ import annotations

import numpy as np
import pytest

from psrv.aggregate import Aggregator
from psrv.algorithms import RoundInfo, make_algorithm
from psrv.compress.laq import quantize
from psrv.payload import laq_innovation, payload_bits, to_dense
from psrv.triggers import StepHistory, laq_skip


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
def test_quantization_error_within_tau_R(bits: int) -> None:
    rng = np.random.default_rng(bits)
    g = rng.standard_t(3, size=5000)
    q_prev = rng.normal(size=5000) * 0.5
    p = quantize(g, q_prev, bits)
    tau = 1 / (2**bits - 1)
    true_radius = np.max(np.abs(g - q_prev))
    assert true_radius <= p.scale <= np.nextafter(np.float32(true_radius), np.float32(np.inf))
    q_new = q_prev + to_dense(p)
    assert np.max(np.abs(g - q_new)) <= tau * p.scale * (1 + 1e-12)
    assert p.codes.min() >= 0 and p.codes.max() <= 2**bits - 1
    assert payload_bits(p) == 32 + bits * 5000


def test_innovation_is_eq6_and_codes_are_eq5() -> None:
    rng = np.random.default_rng(0)
    g, q_prev, bits = rng.normal(size=100), rng.normal(size=100), 3
    p = quantize(g, q_prev, bits)
    tau, r = 1 / 7, p.scale
    np.testing.assert_array_equal(p.codes, np.floor((g - q_prev + r) / (2 * tau * r) + 0.5))
    np.testing.assert_allclose(laq_innovation(p), 2 * tau * r * p.codes - r, rtol=0, atol=1e-15)


def test_zero_innovation_sends_nothing_new() -> None:
    g = np.arange(10.0)
    p = quantize(g, g.copy(), 3)
    assert p.scale == 0 and not to_dense(p).any()


def test_skip_rule_is_7a_and_clock_7b() -> None:
    xi, steps, lr, M = (0.08,) * 10, (1.0, 2.0, 3.0), 0.5, 4
    rhs = (0.08 * 6.0) / (lr**2 * M**2) + 3 * (0.01 + 0.02)
    t = laq_skip(rhs, xi, steps, lr, M, 0.01, 0.02, clock=0, t_bar=5)
    assert t.rhs == pytest.approx(rhs) and t.skip
    assert not laq_skip(rhs * 1.001, xi, steps, lr, M, 0.01, 0.02, clock=0, t_bar=5).skip
    assert not laq_skip(0.0, xi, steps, lr, M, 0.01, 0.02, clock=5, t_bar=5).skip  # staleness forces upload


def test_step_history_keeps_last_D_most_recent_first() -> None:
    h = StepHistory(3)
    for v in [1, 2, 3, 4]:
        h.push(v)
    assert h.recent() == (4.0, 3.0, 2.0)
    assert StepHistory(0).recent() == ()


def test_worker_never_exceeds_max_staleness_and_server_sum_matches() -> None:
    """Constant gradients make every innovation tiny: LAQ skips until t_bar forces an upload.
    The server's running aggregate equals the sum of the workers' own copies Q_m (eq. 4), and the
    server keeps nothing per worker (LAQ accumulates: the sum alone)."""
    algo = make_algorithm("laq", {"t_bar": 4, "bits": 3})
    rng = np.random.default_rng(1)
    M, d = 3, 50
    grads = [rng.normal(size=d) for _ in range(M)]
    agg = Aggregator(M, d, algo.absorb)
    states = [algo.init(d) for _ in range(M)]
    history = StepHistory(algo.history_depth)
    theta = np.zeros(d)
    longest_run = [0] * M
    for k in range(40):
        for m in range(M):
            g = grads[m] + 1e-3 * np.sin(k + m)  # slowly varying gradient
            dec = algo.step(states[m], g, RoundInfo(k, M, history.recent()), rng)
            states[m] = dec.state
            if dec.payload is not None:
                agg.add(m, dec.payload)
            longest_run[m] = max(longest_run[m], states[m].clock)
        step = -algo.lr * agg.total
        theta += step
        history.push(float(step @ step))
    assert max(longest_run) == 4  # skipped, but never more than t_bar rounds in a row
    np.testing.assert_allclose(agg.total, np.sum([s.q_prev for s in states], axis=0), rtol=1e-12, atol=1e-12)
    assert agg.payloads == [] and agg.nbytes == agg.total.nbytes


def test_shared_lag_rules() -> None:
    from psrv.triggers import lag_ps_upload, lag_threshold, lazy_skip, may_skip

    th = lag_threshold((0.1, 0.1), (4.0, 2.0), lr=0.5, num_workers=2)
    assert th == pytest.approx(0.1 * 6.0 / (0.25 * 4))
    assert lazy_skip(th, th, clock=0, t_bar=3) and not lazy_skip(th * 1.01, th, 0, 3)
    assert not lazy_skip(0.0, th, clock=3, t_bar=3)  # staleness forces the upload
    assert may_skip(2, 3) and not may_skip(3, 3)
    assert lag_ps_upload(2.0, th / 3.9, th, clock=0, t_bar=5)  # 4 * th/3.9 > th
    assert not lag_ps_upload(2.0, th / 4.1, th, clock=0, t_bar=5)
    assert lag_ps_upload(0.0, 0.0, th, clock=5, t_bar=5)

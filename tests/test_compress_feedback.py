"""psrv.compress.feedback: error feedback (Stich et al., NeurIPS 2018) around top-k (Aji & Heafield, EMNLP 2017)."""

from __future__ import annotations

import numpy as np

from psrv.algorithms import RoundInfo, make_algorithm
from psrv.compress import make_compressor
from psrv.compress.feedback import ef_step, init_memory
from psrv.payload import to_dense


def test_error_feedback_step_conserves_mass() -> None:
    rng = np.random.default_rng(1)
    c = make_compressor("topk", ratio=0.05)
    memory = rng.normal(size=1000)
    x = rng.normal(size=1000)
    sent, new_memory = ef_step(c, memory, x, rng)
    np.testing.assert_allclose(to_dense(sent) + new_memory, x + memory, rtol=0, atol=1e-12)


def test_error_feedback_loses_nothing_over_many_rounds() -> None:
    rng = np.random.default_rng(2)
    algo = make_algorithm("topk-ef", {"ratio": 0.01})
    state = algo.init(2000)
    inputs, sent = np.zeros(2000), np.zeros(2000)
    for k in range(200):
        g = rng.normal(size=2000)
        dec = algo.step(state, g, RoundInfo(k, 1), rng)
        state = dec.state
        inputs += g
        sent += to_dense(dec.payload)
    np.testing.assert_allclose(sent + state, inputs, rtol=0, atol=1e-9)
    assert np.abs(state).max() > 0  # something really was held back


def test_memory_starts_at_zero() -> None:
    assert not init_memory(5).any()

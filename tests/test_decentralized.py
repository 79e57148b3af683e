"""DSGD's math (psrv.decentralized): topologies, Metropolis-Hastings weights, spectral gaps, and the
adapt-then-combine step against parallel SGD. Pure numpy."""

from __future__ import annotations

import numpy as np
import pytest

from psrv import decentralized as dc
from psrv.keyvalue import NAMED_VALUES

SIZES = (1, 2, 3, 5, 8, 9, 12, 16, 17)


@pytest.mark.parametrize("topology", dc.TOPOLOGIES)
@pytest.mark.parametrize("n", SIZES)
def test_metropolis_hastings_symmetric_doubly_stochastic(topology: str, n: int) -> None:
    adj = dc.neighbours(topology, n)
    W = dc.mixing_matrix(topology, n)
    np.testing.assert_allclose(W, W.T, atol=0)
    np.testing.assert_allclose(W.sum(axis=0), 1.0, atol=1e-14)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-14)
    assert (W >= 0).all() and (np.diag(W) > 0).all()  # nonnegative with self-loops: aperiodic
    for i in range(n):  # weights exactly on the edges
        assert set(np.flatnonzero(W[i])) - {i} == set(adj[i])
        assert i not in adj[i]
    if n > 1:  # connected: a single eigenvalue 1
        assert dc.spectral_gap(W) > 1e-9


def test_degrees() -> None:
    n = 16
    assert all(len(a) == 2 for a in dc.neighbours("ring", n))
    assert all(len(a) == 4 for a in dc.neighbours("torus", n))  # 4 x 4
    assert all(len(a) == 7 for a in dc.neighbours("exponential", n))  # +-1, +-2, +-4, 8
    assert all(len(a) == n - 1 for a in dc.neighbours("full", n))
    assert dc.neighbours("torus", 7) == dc.neighbours("ring", 7)  # a prime: 1 x 7


@pytest.mark.parametrize("n", (9, 16, 32, 64))
def test_spectral_gap_ordering(n: int) -> None:
    gaps = [dc.spectral_gap(dc.mixing_matrix(t, n)) for t in dc.TOPOLOGIES]
    assert gaps[0] < gaps[1] < gaps[2] < gaps[3]
    assert gaps[3] == pytest.approx(1.0)  # 11^T/n: one step reaches consensus


def test_full_is_uniform() -> None:
    np.testing.assert_allclose(dc.mixing_matrix("full", 6), np.full((6, 6), 1 / 6), atol=1e-15)


def test_ring_weights_are_one_third() -> None:
    W = dc.mixing_matrix("ring", 5)
    np.testing.assert_allclose([W[0, 1], W[0, 4], W[0, 0]], 1 / 3, atol=1e-15)


def test_topology_names() -> None:
    assert dc.topology_name(0) == "ring" and dc.topology_name(2.0) == "exponential"
    assert dc.topology_name("torus") == "torus"
    for bad in (4, 1.5, -1, "star"):
        with pytest.raises(ValueError, match="unknown topology"):
            dc.topology_name(bad)
    assert NAMED_VALUES["topology"] == dc.TOPOLOGIES  # the -o parser's names are these


def _least_squares(n: int, d: int, rows: int, seed: int):
    """Node i: f_i(x) = ||A_i x - b_i||^2 / (2 rows), each with its own optimum (heterogeneous)."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, rows, d))
    b = rng.normal(size=(n, rows)) + 3.0 * rng.normal(size=(n, 1))

    def grad(i: int, x: np.ndarray, g_rng: np.random.Generator, batch: int = 4) -> np.ndarray:
        pick = g_rng.choice(rows, batch, replace=False)
        Ai, bi = A[i, pick], b[i, pick]
        return Ai.T @ (Ai @ x - bi) / batch

    return A, b, grad


def test_full_topology_equals_parallel_sgd() -> None:
    n, d, lr, rounds = 6, 5, 0.05, 60
    _, _, grad = _least_squares(n, d, 20, seed=1)
    x0 = np.random.default_rng(2).normal(size=d)
    X, dist = dc.simulate(dc.mixing_matrix("full", n), x0, grad, lr, rounds, np.random.default_rng(3))
    rng, x = np.random.default_rng(3), x0.copy()  # parallel SGD: the same draws, in the same order
    for _ in range(rounds):
        x = x - lr / n * sum(grad(i, x, rng) for i in range(n))
    np.testing.assert_allclose(X, np.repeat(x[None], n, axis=0), rtol=0, atol=1e-12)
    assert max(dist) < 1e-24
    assert np.linalg.norm(x - x0) > 0.1  # it moved


def test_ring_is_not_parallel_sgd() -> None:
    n, d = 6, 5
    _, _, grad = _least_squares(n, d, 20, seed=1)
    X, dist = dc.simulate(dc.mixing_matrix("ring", n), np.zeros(d), grad, 0.05, 20, np.random.default_rng(3))
    assert dist[-1] > 1e-4  # heterogeneous nodes disagree on a ring


def test_consensus_distance_shrinks_as_gap_grows() -> None:
    """DSGD on heterogeneous least squares (same n, step, seed): the consensus distance ends smaller
    and averages smaller as the spectral gap grows (ring < torus < exponential), and pure gossip
    (no gradient) contracts it by (1 - gap)^2 per step at most."""
    n, d, lr, rounds = 16, 8, 0.02, 200
    _, _, grad = _least_squares(n, d, 30, seed=4)
    ends, means = [], []
    for topology in ("ring", "torus", "exponential"):
        W = dc.mixing_matrix(topology, n)
        _, dist = dc.simulate(W, np.zeros(d), grad, lr, rounds, np.random.default_rng(5))
        ends.append(np.mean(dist[-50:]))
        means.append(np.mean(dist))
        # gossip alone
        X = np.random.default_rng(6).normal(size=(n, d))
        before = dc.consensus_distance(X)
        after = dc.consensus_distance(dc.combine(W, X))
        assert after <= (1 - dc.spectral_gap(W)) ** 2 * before * (1 + 1e-12)
    assert ends[0] > ends[1] > ends[2] > 0
    assert means[0] > means[1] > means[2]


def test_consensus_distance() -> None:
    X = np.array([[0.0, 0.0], [2.0, 0.0]])
    assert dc.consensus_distance(X) == pytest.approx(1.0)

"""Rand-k and stochastic sparsification (Khirirat et al., arXiv:2003.06377, eq. 4 and Appendix F;
the unbiasedness/variance lemma of Wang et al., ATOMO, NeurIPS 2018).

Statistical checks use N seeded draws and a 5-sigma tolerance computed from the
known distribution of Q (Bernoulli per coordinate, or a uniform k-subset for rand-k),
so they are deterministic and fail if a scale, probability or the sampling is wrong.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from psrv import codec
from psrv.algorithms import RoundInfo, make_algorithm
from psrv.compress import make_compressor
from psrv.compress.stochastic import (
    optimal_probabilities,
    uniform_probabilities,
    variance_bound,
    variance_factor,
)
from psrv.payload import payload_bits, to_dense
from psrv.v1 import psrv_pb2 as pb

N_DRAWS = 20_000


def skewed(d: int, seed: int) -> np.ndarray:
    """Heavy-tailed vector with a few exact zeros (so p* has saturated, small and zero entries)."""
    v = np.random.default_rng(seed).standard_cauchy(d)
    v[[1, 7]] = 0.0
    return v


def draws(c, v: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([to_dense(c.compress(v, rng)) for _ in range(n)])


def reference_p_star(g: np.ndarray, T: float) -> np.ndarray:
    """The p* algorithm (ATOMO, Wang et al. 2018, Algorithm 1, as cited by Khirirat et al., Appendix F), written
    as a plain loop: saturate, re-solve, repeat."""
    a = np.abs(g)
    sat = np.zeros(a.size, dtype=bool)
    while True:
        lam = a[~sat].sum() / (T - sat.sum())
        new = a > lam
        if (new == sat).all():
            break
        sat = new
    return np.where(sat, 1.0, a / lam)


# ---------------------------------------------------------------------------------------- p*


@pytest.mark.parametrize("T", [1, 2.5, 7, 13, 29.9])
def test_p_star_sums_to_budget_and_water_fills(T: float) -> None:
    v = skewed(40, seed=3)
    p = optimal_probabilities(v, T)
    assert p.sum() == pytest.approx(T, rel=1e-9)
    on = v != 0
    assert np.all(p[~on] == 0.0)
    assert np.all((p[on] > 0) & (p[on] <= 1))
    sat = p == 1.0
    # saturation is exactly a set of largest magnitudes; the rest are proportional to |v|
    if sat.any() and (~sat & on).any():
        assert np.abs(v[sat]).min() > np.abs(v[~sat & on]).max()
    ratio = p[~sat & on] / np.abs(v[~sat & on])
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)
    np.testing.assert_allclose(p, reference_p_star(v, T), rtol=1e-12, atol=0)


def test_p_star_saturates_on_heavy_tails() -> None:
    v = skewed(40, seed=3)
    p = optimal_probabilities(v, 13)
    n_sat = int((p == 1.0).sum())
    assert 1 <= n_sat < 13
    order = np.argsort(-np.abs(v))
    assert set(np.flatnonzero(p == 1.0)) == set(order[:n_sat])


def test_p_star_budget_at_least_support_sends_everything() -> None:
    v = skewed(40, seed=4)
    p = optimal_probabilities(v, 38)  # 38 nonzeros
    np.testing.assert_array_equal(p, (v != 0).astype(float))
    assert variance_bound(v, p) == 0.0
    c = make_compressor("stochastic", k=38)
    np.testing.assert_array_equal(to_dense(c.compress(v, np.random.default_rng(0))), v.astype(np.float32))


def test_p_star_beats_uniform_on_skewed_and_ties_on_constant_magnitude() -> None:
    d, T = 200, 20
    for v in (skewed(d, seed=5), np.random.default_rng(6).exponential(size=d) ** 3):
        assert variance_bound(v, optimal_probabilities(v, T)) < 0.5 * variance_bound(v, uniform_probabilities(d, T))
    flat = 0.7 * np.where(np.random.default_rng(7).random(d) < 0.5, -1.0, 1.0)
    np.testing.assert_allclose(optimal_probabilities(flat, T), uniform_probabilities(d, T), rtol=1e-12)
    assert variance_bound(flat, optimal_probabilities(flat, T)) == pytest.approx(
        variance_bound(flat, uniform_probabilities(d, T)), rel=1e-12
    )


def test_p_star_is_a_minimiser() -> None:
    """Any other feasible p (sum T, 0 < p <= 1) has at least p*'s variance; uniform bounds it (Khirirat et al.,
    Lemma 5)."""
    v, T = skewed(50, seed=8), 10.0
    p = optimal_probabilities(v, T)
    best = variance_bound(v, p)
    rng = np.random.default_rng(9)
    for _ in range(200):
        w = np.where(v != 0, rng.uniform(0.05, 1.0, v.size), 0.0)
        q = T * w / w.sum()  # feasible: max is about 0.4 here
        assert q.max() <= 1.0
        t = rng.uniform(0.0, 1.0) ** 4  # mostly small steps away from p*
        assert variance_bound(v, (1 - t) * p + t * q) >= best * (1 - 1e-12)
    assert best <= (v.size / T - 1) * (v @ v)


def test_uniform_probabilities() -> None:
    np.testing.assert_array_equal(uniform_probabilities(8, 2), np.full(8, 0.25))
    np.testing.assert_array_equal(uniform_probabilities(8, 20), np.ones(8))
    with pytest.raises(ValueError):
        uniform_probabilities(8, 0)
    with pytest.raises(ValueError):
        optimal_probabilities(np.ones(8), 0)


# ------------------------------------------------------------------------- unbiasedness


def cases(d: int):
    """(name, compressor, keep probabilities p) for each scheme on a d-vector."""
    k = d // 5
    return [
        ("randk", make_compressor("randk", k=k), lambda v: np.full(v.size, k / v.size)),
        ("uniform", make_compressor("stochastic", k=k, optimal=0.0), lambda v: uniform_probabilities(v.size, k)),
        ("p*", make_compressor("stochastic", k=k), lambda v: optimal_probabilities(v, k)),
    ]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_unbiased(which: int) -> None:
    d = 30
    v = skewed(d, seed=10)
    name, c, probs = cases(d)[which]
    p = probs(v)
    x = draws(c, v, N_DRAWS, seed=11)
    var = np.where(p > 0, (1 - p) / np.where(p > 0, p, 1) * v**2, 0.0)  # Var Q_j, same for a k-subset
    tol = 5 * np.sqrt(var / N_DRAWS) + 1e-6 * np.abs(v)
    err = np.abs(x.mean(axis=0) - v)
    assert np.all(err <= tol), (name, np.max(err / tol))
    assert np.all(x[:, v == 0] == 0)


# ---------------------------------------------------------------------------------- variance


def sq_error_std(v: np.ndarray, p: np.ndarray) -> float:
    """Std of ||Q(v) - v||^2 under independent Bernoulli(p_j): sum_j v_j^4 Var[(xi_j/p_j - 1)^2]."""
    on = p > 0
    q, w = p[on], v[on] ** 4
    mean = (1 - q) / q
    second = (1 - q) ** 4 / q**3 + (1 - q)
    return float(np.sqrt(np.sum(w * (second - mean**2))))


@pytest.mark.parametrize("which", [1, 2])
def test_stochastic_variance_matches_formula(which: int) -> None:
    d = 30
    v = np.random.default_rng(12).exponential(size=d) * np.sign(np.random.default_rng(13).normal(size=d))
    _, c, probs = cases(d)[which]
    p = probs(v)
    x = draws(c, v, N_DRAWS, seed=14)
    emp = np.mean(np.sum((x - v) ** 2, axis=1))
    exact = variance_bound(v, p)
    tol = 5 * sq_error_std(v, p) / math.sqrt(N_DRAWS) + 1e-5 * exact
    assert abs(emp - exact) <= tol
    lemma = variance_factor(v, p) * (v @ v)  # the variance lemma (ii); equality for uniform p
    assert exact <= lemma * (1 + 1e-12)
    assert emp <= lemma + tol
    assert exact <= c.compressor_class(d).constant * (v @ v) * (1 + 1e-12)


def test_randk_variance_is_d_over_k_minus_one() -> None:
    d, k = 30, 6
    v = np.random.default_rng(15).normal(size=d)
    c = make_compressor("randk", k=k)
    x = draws(c, v, N_DRAWS, seed=16)
    sq = np.sum((x - v) ** 2, axis=1)
    omega = d / k - 1
    assert c.compressor_class(d).constant == pytest.approx(omega)
    # ||Q - v||^2 = ||v||^2 + sum_{j in S} a_j, a_j = ((d/k - 1)^2 - 1) v_j^2, S a uniform k-subset
    a = ((d / k - 1) ** 2 - 1) * v**2
    std = math.sqrt(k * (d - k) / d * a.var(ddof=1))
    assert abs(sq.mean() - omega * (v @ v)) <= 5 * std / math.sqrt(N_DRAWS)
    assert variance_bound(v, np.full(d, k / d)) == pytest.approx(omega * (v @ v), rel=1e-12)


# ------------------------------------------------------------------------------ support sizes


@pytest.mark.parametrize("d,ratio", [(10, 0.5), (1000, 0.01), (1_000_003, 1e-4), (50, 1.0)])
def test_randk_sends_exactly_k_distinct_sorted(d: int, ratio: float) -> None:
    rng = np.random.default_rng(17)
    v = rng.normal(size=d)
    c = make_compressor("randk", ratio=ratio)
    k = max(1, math.ceil(ratio * d))
    for _ in range(5):
        p = c.compress(v, rng)
        assert p.kind == "sparse" and p.indices.dtype == np.int64 and p.values.dtype == np.float32
        assert len(p.indices) == k and np.all(np.diff(p.indices) > 0)
        assert 0 <= p.indices[0] and p.indices[-1] < d
        np.testing.assert_array_equal(p.values, (v[p.indices] * (d / k)).astype(np.float32))


def test_randk_is_uniform_over_coordinates() -> None:
    d, k, n = 20, 3, 20_000
    rng = np.random.default_rng(18)
    c = make_compressor("randk", k=k)
    counts = np.zeros(d)
    for _ in range(n):
        counts[c.compress(np.ones(d), rng).indices] += 1
    q = k / d
    assert np.all(np.abs(counts - n * q) <= 5 * math.sqrt(n * q * (1 - q)))


@pytest.mark.parametrize("optimal", [0.0, 1.0])
def test_stochastic_nnz_mean_is_budget(optimal: float) -> None:
    d, T, n = 500, 25, 2000
    v = np.random.default_rng(19).standard_cauchy(d)
    c = make_compressor("stochastic", k=T, optimal=optimal)
    p = c.probabilities(v)
    rng = np.random.default_rng(20)
    nnz = np.array([len(c.compress(v, rng).indices) for _ in range(n)])
    assert abs(nnz.mean() - T) <= 5 * math.sqrt(np.sum(p * (1 - p)) / n)
    q = c.compress(v, rng)
    assert q.indices.dtype == np.int64 and q.values.dtype == np.float32 and np.all(np.diff(q.indices) > 0)


def test_large_vector_stays_fast_and_exact_in_budget() -> None:
    d = 2_000_000
    v = np.random.default_rng(21).standard_cauchy(d)
    for optimal in (0.0, 1.0):
        c = make_compressor("stochastic", ratio=1e-3, optimal=optimal)
        nnz = len(c.compress(v, np.random.default_rng(22)).indices)
        assert abs(nnz - 2000) <= 5 * math.sqrt(2000)
    assert optimal_probabilities(v, 2000).sum() == pytest.approx(2000, rel=1e-9)


# --------------------------------------------------------------------------------- wire and API


@pytest.mark.parametrize(
    "name,opts",
    [("randk", {"ratio": 0.05}), ("stochastic", {"ratio": 0.05}), ("stochastic", {"ratio": 0.05, "optimal": 0.0})],
)
@pytest.mark.parametrize("d", [1000, 1024])
def test_wire_round_trip_and_bits(name: str, opts: dict, d: int) -> None:
    v = np.random.default_rng(23).standard_cauchy(d)
    p = make_compressor(name, **opts).compress(v, np.random.default_rng(24))
    msg = pb.Upload.FromString(codec.upload_to_proto("w", 0, 0.0, p).SerializeToString())
    back = codec.upload_from_proto(msg, d)
    np.testing.assert_array_equal(to_dense(back), to_dense(p))
    np.testing.assert_array_equal(back.values, p.values)
    assert payload_bits(p) == len(p.indices) * (32 + math.ceil(math.log2(d)))


def test_compressor_classes_and_options() -> None:
    assert make_compressor("randk", ratio=0.1).compressor_class(1000).kind == "unbiased"
    assert make_compressor("randk", ratio=0.1).compressor_class(1000).constant == pytest.approx(9.0)
    for opt in (0.0, 1.0):
        cls = make_compressor("stochastic", k=50.0, optimal=opt).compressor_class(1000)
        assert cls.kind == "unbiased" and cls.constant == pytest.approx(19.0)
    for bad in ({"ratio": 0.0}, {"ratio": 1.5}, {"k": -1}, {"k": 2.5}, {"colour": 1.0}):
        with pytest.raises(ValueError):
            make_compressor("randk", **bad)
    with pytest.raises(ValueError):
        make_compressor("stochastic", optimal=0.5)


def test_same_seed_same_payload() -> None:
    v = skewed(300, seed=25)
    for name in ("randk", "stochastic"):
        c = make_compressor(name, ratio=0.1)
        a, b = c.compress(v, np.random.default_rng(26)), c.compress(v, np.random.default_rng(26))
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.values, b.values)


@pytest.mark.parametrize("compressor,opts", [("randk", {}), ("stochastic", {}), ("stochastic", {"optimal": 0.0})])
def test_usable_through_gd(compressor: str, opts: dict) -> None:
    d = 400
    algo = make_algorithm("gd", {"ratio": 0.1, **opts}, compressor)
    state = algo.init(d)
    rng = np.random.default_rng(27)
    total = np.zeros(d)
    g = rng.normal(size=d)
    for k in range(50):
        dec = algo.step(state, g, RoundInfo(k, 1), rng)
        state = dec.state
        assert dec.payload is not None and dec.payload.kind == "sparse" and dec.payload.kind in algo.payload_kinds
        assert 0 < len(dec.payload.indices) < d
        total += to_dense(dec.payload)
    assert np.corrcoef(total / 50, g)[0, 1] > 0.5  # unbiased: the running mean points along g

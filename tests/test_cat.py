"""CAT (Khirirat, Magnússon, Aytekin, Johansson, AAAI 2021, arXiv:2003.06377): sizes, cost models,
the certified scan against brute force, Lemma 2, the Alistarh et al. baseline and the compressors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from psrv import cat, codec, keyvalue, payload
from psrv.cat import BASES, CostModel, alistarh_T, encoded_bytes, payload_size, tune, tune_brute
from psrv.compress import make_compressor
from psrv.compress.feedback import ef_step, init_memory
from psrv.compress.sq import SQ, beta
from psrv.compress.stochastic import Stochastic, optimal_probabilities

MODELS = [
    CostModel("payload"),
    CostModel("affine", c0=2000.0, c1=1.0),
    CostModel("packet", c0=64 * 8.0, c1=576 * 8.0, p_max_bytes=512),  # the paper's Experiment 2 (in bits)
    CostModel("packet", c0=64 * 8.0, c1=128 * 8.0, p_max_bytes=128),  # Figure 1 / Appendix I
    CostModel("affine", c0=300.0, c1=1.0, size="wire_bytes"),
    CostModel("packet", c0=64.0, c1=128.0, p_max_bytes=128, size="wire_bytes"),
]


def _vectors(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    d = int(rng.integers(40, 700))
    return [
        rng.standard_normal(d),  # flat
        rng.standard_t(1.2, d),  # heavy tails
        rng.standard_normal(d) * np.exp(-np.arange(d) / 20.0),  # a few dominant entries
        np.concatenate([[10.0], np.ones(d)]) * rng.choice([-1, 1], d + 1),  # S+Q's non-quasi-concave case
    ]


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("model", range(len(MODELS)))
def test_scan_equals_brute_force(base: str, model: int) -> None:
    cost = MODELS[model]
    for seed in range(3):
        for g in _vectors(seed):
            fast, slow = tune(g, cost, base), tune_brute(g, cost, base)
            # the same T, or a tie: with no saturated entry omega(T) = T ||g||^2/||g||_1^2 is linear in T,
            # so under the payload model every small T has the same ratio
            assert fast.efficiency == pytest.approx(slow.efficiency, rel=1e-12), (base, cost, g.size, fast, slow)
            assert fast.T == slow.T or base == "stochastic", (base, cost, g.size, fast, slow)
            assert fast.cost == float(cost.cost(cat._kind(base), g.size, fast.T))


def test_scan_does_less_work_than_brute_force() -> None:
    g = np.random.default_rng(0).standard_t(2, 20_000)
    t = tune(g, CostModel("packet", c0=512.0, c1=4608.0, p_max_bytes=512), "topk")
    assert t.evaluated < 20 and t.T > 1


def test_sq_first_drop_would_be_wrong() -> None:
    """beta(1) > beta(2) but the optimum under a large overhead is the whole support (module doc)."""
    g = np.concatenate([[10.0], np.ones(1000)])
    assert beta(g, 1) > beta(g, 2) and beta(g, 1000) > 0.9
    assert tune(g, CostModel("affine", c0=1e5, c1=1.0), "sq").T == 1001


@pytest.mark.parametrize("base", ["topk", "stochastic"])
def test_packet_optimum_is_a_multiple_of_the_capacity(base: str) -> None:
    """Proposition 1: d = 1024, an entry is 32 + 10 = 42 bits; P_max = 84 bytes = 672 bits = 16 entries."""
    rng = np.random.default_rng(3)
    cost = CostModel("packet", c0=100.0, c1=672.0, p_max_bytes=84)
    for scale in (1.0, 30.0, 200.0):
        g = rng.standard_normal(1024) * np.exp(-np.arange(1024) / scale)
        T = tune(g, cost, base).T
        assert T % 16 == 0 or T == 1024, T
    # and in wire bytes (bit-planes come in whole bytes): T* ends a run of equal packet counts
    cost = CostModel("packet", c0=64.0, c1=128.0, p_max_bytes=128, size="wire_bytes")
    for scale in (5.0, 50.0):
        g = rng.standard_normal(1024) * np.exp(-np.arange(1024) / scale)
        T = tune(g, cost, base).T
        assert T == 1024 or cost.cost("sparse", 1024, T + 1) > cost.cost("sparse", 1024, T)


def test_alpha_increasing_concave_and_above_T_over_d() -> None:
    """Lemma 2 on the test vectors."""
    for seed in range(3):
        for g in _vectors(seed):
            d = g.size
            a = np.array([cat.alpha(g, T) for T in range(0, d + 1)])
            assert np.all(np.diff(a) >= -1e-15)
            assert np.all(np.diff(a, 2) <= 1e-12)
            assert a[-1] == pytest.approx(1.0)
            assert np.all(a[1:] >= np.arange(1, d + 1) / d - 1e-12)


def test_omega_matches_the_stochastic_compressor() -> None:
    g = np.random.default_rng(4).standard_t(2, 300)
    for T in (1, 5, 40, 299):
        p = optimal_probabilities(g, T)
        on = p > 0
        expect = float(g @ g) / float(np.sum(g[on] ** 2 / p[on]))
        assert cat.omega(g, T) == pytest.approx(expect, rel=1e-12)
        assert cat.omega(g, T) >= T / g.size - 1e-12  # Lemma 5


@pytest.mark.parametrize("dim", [7, 100, 1000, 70_000])
def test_sizes_equal_the_encoded_payload(dim: int) -> None:
    """P(T) in wire bytes is the codec's bit-packed size; encoded_bytes is exact for any payload."""
    rng = np.random.default_rng(dim)
    for T in sorted({min(dim, t) for t in (1, 2, 8, 9, 130, 3000)} | {dim}):
        for idx in (np.sort(rng.choice(dim, T, replace=False)), np.arange(T)):
            sp = payload.sparse(dim, idx.astype(np.int64), rng.standard_normal(T).astype(np.float32))
            ss = payload.Payload("sign_sparse", dim, indices=idx.astype(np.int64), signs=rng.random(T) < 0.5, scale=1.5)
            for p in (sp, ss):
                wire = len(codec.payload_to_proto(p).SerializeToString())
                assert encoded_bytes(p) == wire
                bound = int(payload_size(p.kind, dim, T, "wire_bytes"))
                assert bound >= wire
                encoding, _ = codec.encode_indices(p.indices, dim)
                if encoding == codec.pb.INDEX_ENCODING_BITPACKED:
                    assert bound == wire
                assert int(payload_size(p.kind, dim, T, "payload_bits")) == payload.payload_bits(p)


def test_alistarh_rule() -> None:
    g = np.array([3.0, -4.0, 0.0, 1.0])  # ||g|| = 5.099: 4 < 5.099 <= 4 + 3
    assert alistarh_T(g) == 2
    g = np.ones(100)  # ||g|| = 10: the 10 largest reach it
    assert alistarh_T(g) == 10
    rng = np.random.default_rng(0)
    for _ in range(20):
        g = rng.standard_t(2, 200)
        T = alistarh_T(g)
        s = np.sort(np.abs(g))[::-1]
        assert s[:T].sum() >= np.linalg.norm(g) * (1 - 1e-12) and (T == 1 or s[: T - 1].sum() < np.linalg.norm(g))


def test_cost_file_expands_to_options(tmp_path) -> None:
    f = tmp_path / "fit.json"
    f.write_text(
        json.dumps(
            {
                "model": "packet",
                "c0": 0.002,
                "c1": 0.0011,
                "p_max_bytes": 1448,
                "unit": "s",
                "size": "wire_bytes",
                "r2": 0.99,
            }
        )
    )
    opts = keyvalue.parse_key_values(["base=sq", f"cost_file={f}", "every=5"])
    assert opts == {"base": 1.0, "cost": 2.0, "c0": 0.002, "c1": 0.0011, "p_max": 1448.0, "size": 1.0, "every": 5.0}
    comp = make_compressor("cat", **opts)
    assert comp.model == CostModel("packet", 0.002, 0.0011, 1448.0, "wire_bytes") and comp.payload_kind == "sign_sparse"
    assert keyvalue.parse_key_values([f"sasg.cost_file={f}"])["sasg.cost"] == 2.0
    with pytest.raises(ValueError, match="cannot read cost model file"):
        keyvalue.parse_key_values([f"cost_file={tmp_path / 'missing.json'}"])
    f.write_text(json.dumps({"model": "packet", "c0": 1, "c1": 1}))
    with pytest.raises(ValueError, match="p_max_bytes"):
        keyvalue.parse_key_values([f"cost_file={f}"])


def test_named_option_tables_match() -> None:
    assert keyvalue.NAMED_VALUES["base"] == cat.BASES
    assert keyvalue.NAMED_VALUES["cost"] == cat.COST_MODELS
    assert keyvalue.NAMED_VALUES["size"] == cat.SIZE_UNITS


def test_bad_options_are_clear() -> None:
    with pytest.raises(ValueError, match="packet cost model needs p_max"):
        make_compressor("cat", cost=2.0, p_max=0.0)
    with pytest.raises(ValueError, match="cat base must be one of"):
        make_compressor("cat", base=7.0)
    with pytest.raises(ValueError, match="C\\(1\\) = .* <= 0"):
        make_compressor("cat", cost=1.0, c0=-1e6, c1=1.0).compress(np.ones(10), np.random.default_rng(0))
    with pytest.raises(ValueError, match="alistarh: base must be topk or sq"):
        make_compressor("alistarh", base=2.0)


def test_cat_compressor_sends_the_tuned_T_and_the_hybrid_mode_reuses_it() -> None:
    rng = np.random.default_rng(0)
    cost = dict(cost=2.0, c0=512.0, c1=4608.0, p_max=512.0)
    comp = make_compressor("cat", **cost)
    g = rng.standard_t(2, 5000)
    p = comp.compress(g, rng)
    T = tune(g, CostModel("packet", 512.0, 4608.0, 512.0), "topk").T
    assert p.kind == "sparse" and len(p.indices) == T
    np.testing.assert_array_equal(np.sort(np.argsort(-np.abs(g))[:T]), p.indices)
    assert comp.state.last_cost == float(CostModel("packet", 512.0, 4608.0, 512.0).cost("sparse", 5000, T))
    sq = make_compressor("cat", base=1.0, **cost).compress(g, rng)
    assert sq.kind == "sign_sparse" and len(sq.indices) == tune(g, CostModel("packet", 512.0, 4608.0, 512.0), "sq").T
    hybrid = make_compressor("cat", every=3.0, **cost)
    Ts = [len(hybrid.compress(rng.standard_t(2, 5000) * (10.0**i), rng).indices) for i in range(7)]
    assert Ts[0] == Ts[1] == Ts[2] and Ts[3] == Ts[4] == Ts[5] and hybrid.state.history == Ts
    al = make_compressor("alistarh", base=1.0)
    assert len(al.compress(g, rng).indices) == alistarh_T(g)


def test_cat_with_error_feedback_conserves_mass() -> None:
    rng = np.random.default_rng(1)
    comp = make_compressor("cat", cost=1.0, c0=3000.0, c1=1.0)
    mem = init_memory(300)
    total_in, total_sent = np.zeros(300), np.zeros(300)
    for _ in range(5):
        g = rng.standard_normal(300)
        sent, mem = ef_step(comp, mem, g, rng)
        total_in += g
        total_sent += payload.to_dense(sent)
        assert 1 < len(sent.indices) < 300
    np.testing.assert_allclose(total_sent + mem, total_in, atol=1e-5)


def test_stochastic_base_is_unbiased_at_the_tuned_budget() -> None:
    rng = np.random.default_rng(2)
    g = rng.standard_t(2, 200)
    comp = make_compressor("cat", base=2.0, cost=1.0, c0=2000.0, c1=1.0, every=1e9)  # tuned once
    T = tune(g, comp.model, "stochastic").T
    mean = np.mean([payload.to_dense(comp.compress(g, rng)) for _ in range(3000)], axis=0)
    assert np.abs(mean - g).max() < 0.2 * np.abs(g).max()
    assert math.isclose(optimal_probabilities(g, T).sum(), T, rel_tol=1e-9)
    assert Stochastic(k=T).budget_for(200) == T and SQ(k=T).k_for(200) == T


def test_cat_in_a_lazy_run_with_error_feedback() -> None:
    """sasg (lazy skip rule, top-k with error feedback) with a CAT-tuned upload: the skip rule still
    applies, each upload's size follows its own T, and the model learns."""
    from psrv import data
    from psrv.server import ParameterServer, ServerConfig
    from tests.helpers.threaded import run_in_threads
    from worker.client import load_training_data

    M = 2
    config = ServerConfig(
        algorithm="sasg",
        compressor="cat",
        options={"lr": 0.2, "cost": 1.0, "c0": 3000.0, "c1": 1.0},
        num_workers=M,
        rounds=12,
        round_timeout=20.0,
    )
    train, _ = load_training_data("digits", 0.2, 0)
    ps = ParameterServer(config)
    summary, results = run_in_threads(ps, [data.shard(train, i, M) for i in range(M)])
    assert summary["skips"] > 0 and summary["uploads"] > 0
    assert summary["uploads"] + summary["skips"] == M * 12
    assert summary["last_round_loss"] < np.log(10) - 0.1
    entry_bits = 32 + 10  # d = 650: ceil(log2 650) = 10 index bits + a float32 value
    bits = [w["bits"] for r in ps.engine.state.records for w in r["workers"] if w["status"] == "upload"]
    assert all(b % entry_bits == 0 for b in bits) and len(set(bits)) > 1, bits


def test_sq_payload_takes_the_step_of_eq9() -> None:
    """lr * Q' = gamma_eq9 * Q_T(g) with lr = 1/L: gamma = sqrt(beta(T)) / (sqrt(T) L) (Lemma 3)."""
    g = np.random.default_rng(5).standard_t(2, 400)
    comp = make_compressor("cat", base=1.0)
    p = comp.compress(g, np.random.default_rng(0))
    T = len(p.indices)
    q = payload.to_dense(SQ(k=T).compress(g, np.random.default_rng(0)))
    np.testing.assert_allclose(payload.to_dense(p), math.sqrt(beta(g, T)) / math.sqrt(T) * q, rtol=1e-6)
    plain = make_compressor("cat", base=1.0, eq9=0.0).compress(g, np.random.default_rng(0))
    np.testing.assert_allclose(payload.to_dense(plain), q)

"""The server's store of contributions (``psrv.aggregate``): the running sum is exactly what dense
float64 rows per worker would give, while the memory is the sum alone (accumulate) or the payloads
as received (replace)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from psrv import payload
from psrv.aggregate import BLOCK, Aggregator, compact, decode_block, payload_nbytes, peak_abs
from psrv.algorithms import ALGORITHMS, make_algorithm
from psrv.compress import make_compressor
from psrv.compress.laq import quantize
from psrv.payload import Payload, to_dense


class DenseRows:
    """The reference: one float64 row per worker (what psrv kept before), the same update."""

    def __init__(self, num_workers: int, dim: int, absorb: str) -> None:
        self.absorb = absorb
        self.stored = np.zeros((num_workers, dim))
        self.total = np.zeros(dim)

    def add(self, worker: int, vector: np.ndarray) -> None:
        if self.absorb == "replace":
            self.total += vector - self.stored[worker]
            self.stored[worker] = vector
        else:
            self.total += vector
            self.stored[worker] += vector


def _random_payload(kind: str, d: int, rng: np.random.Generator) -> Payload:
    x = rng.normal(size=d) * rng.choice([1e-3, 1.0, 1e3])
    k = int(rng.integers(0, d // 4 + 1))
    if kind == "dense":
        return payload.dense(x.astype((np.float32, np.float64, np.float16)[int(rng.integers(3))]))
    if kind == "bf16":
        return Payload("dense", d, values=payload.to_bfloat16(x.astype(np.float32)), value_format="bfloat16")
    if kind == "sparse":
        idx = np.sort(rng.choice(d, k, replace=False))
        return payload.sparse(d, idx, x[idx].astype(np.float32))
    if kind == "sign_sparse":
        idx = np.sort(rng.choice(d, k, replace=False)).astype(np.int64)
        return Payload("sign_sparse", d, indices=idx, signs=x[idx] < 0, scale=float(abs(x[0])))
    if kind == "laq":
        return quantize(x, np.zeros(d), int(rng.integers(1, 17)))
    if kind == "qsgd":
        return make_compressor("qsgd", levels=float(rng.choice([3, 255, 300]))).compress(x, rng)
    raise AssertionError(kind)


KINDS = ("dense", "bf16", "sparse", "sign_sparse", "laq", "qsgd")


@pytest.mark.parametrize("kind", KINDS)
def test_decode_block_and_compact_keep_the_vector(kind: str) -> None:
    rng = np.random.default_rng(3)
    d = 2 * BLOCK + 123
    for _ in range(3):
        p = _random_payload(kind, d, rng)
        full = to_dense(p)
        for start, stop in ((0, d), (0, BLOCK), (BLOCK, 2 * BLOCK), (2 * BLOCK, d), (5, 6)):
            np.testing.assert_array_equal(decode_block(p, start, stop), full[start:stop])
        small = compact(p)
        assert to_dense(small).tobytes() == full.tobytes()
        assert payload_nbytes(small) <= payload_nbytes(p)


@pytest.mark.parametrize("absorb", ["replace", "accumulate"])
@pytest.mark.parametrize("kinds", [(k,) for k in KINDS] + [KINDS])
def test_running_sum_is_bit_identical_to_dense_rows(absorb: str, kinds: tuple[str, ...]) -> None:
    """Every kind alone, and kinds mixed (old and new of different kinds), with and without a
    previous upload; including d not a multiple of the decoding block."""
    rng = np.random.default_rng(len(kinds) + len(absorb))
    M, d = 4, BLOCK + 77
    agg, ref = Aggregator(M, d, absorb), DenseRows(M, d, absorb)
    for _ in range(25):
        for m in range(M):
            if rng.random() < 0.6:
                p = _random_payload(str(rng.choice(kinds)), d, rng)
                agg.add(m, p)
                ref.add(m, to_dense(p))
        assert agg.total.tobytes() == ref.total.tobytes()
    if absorb == "replace":
        for m in range(M):
            np.testing.assert_array_equal(agg.contribution(m), ref.stored[m])
    else:
        assert agg.payloads == [] and agg.nbytes == 8 * d
        with pytest.raises(ValueError, match="running sum only"):
            agg.contribution(0)


REPLACE = sorted(n for n in ALGORITHMS if make_algorithm(n).absorb == "replace")
ACCUMULATE = sorted(n for n in ALGORITHMS if make_algorithm(n).absorb == "accumulate")


def test_the_two_lists_cover_the_algorithms() -> None:
    assert {"gd", "sgd", "topk-ef", "lag-wk", "lasg", "sasg", "lag-ps"} <= set(REPLACE)
    assert {"laq", "slaq", "ef21", "riag", "ciag"} <= set(ACCUMULATE)


def _upload(name: str, d: int, rng: np.random.Generator) -> Payload:
    """A payload of the kind algorithm ``name`` uploads, from its own compressor."""
    algo = make_algorithm(name)
    x = rng.normal(size=d)
    if algo.compressor is not None:
        return algo.compressor.compress(x, rng)
    assert algo.payload_kinds == ("dense",)
    return payload.dense(x.astype(np.float32))


@pytest.mark.parametrize("name", REPLACE)
def test_replace_running_sum_equals_the_stored_contributions(name: str) -> None:
    """After many random rounds, total = sum_m decode(stored_m), and each stored payload is the
    worker's last upload, kept in the kind it was sent in."""
    rng = np.random.default_rng(11)
    M, d = 6, 3000
    agg, ref = Aggregator(M, d, "replace"), DenseRows(M, d, "replace")
    last: dict[int, Payload] = {}
    for _ in range(60):
        for m in range(M):
            if rng.random() < 0.5:
                p = _upload(name, d, rng)
                agg.add(m, p)
                ref.add(m, to_dense(p))
                last[m] = p
    decoded = [agg.contribution(m) for m in range(M)]
    np.testing.assert_allclose(agg.total, np.sum(decoded, axis=0), rtol=1e-12, atol=1e-12)
    assert agg.total.tobytes() == ref.total.tobytes()
    for m in range(M):
        assert agg.payloads[m].kind == last[m].kind
        np.testing.assert_array_equal(decoded[m], to_dense(last[m]))


@pytest.mark.parametrize("name", ACCUMULATE)
def test_accumulate_keeps_no_per_worker_vector(name: str) -> None:
    """Whatever M, the aggregator's arrays are the d-vector ``total`` alone."""
    rng = np.random.default_rng(5)
    d = 500
    sizes = []
    for M in (1, 16):
        agg = Aggregator(M, d, make_algorithm(name).absorb)
        for m in range(M):
            p = quantize(rng.normal(size=d), np.zeros(d), 4) if name in ("laq", "slaq") else _upload(name, d, rng)
            agg.add(m, p)
        arrays = [v for v in vars(agg).values() if isinstance(v, np.ndarray)]
        assert agg.payloads == [] and sum(a.nbytes for a in arrays) == agg.nbytes == 8 * d
        sizes.append(agg.nbytes)
    assert sizes[0] == sizes[1]


def _traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_at_64_workers_and_a_million_coordinates() -> None:
    """M = 64, d = 1e6: M x d float64 rows would be 512 MB. A top-1% sparse store (replace) holds
    ``total`` and 64 * 1e4 * (4 + 4) bytes of payloads; the accumulating store holds ``total`` alone."""
    M, d, k = 64, 1_000_000, 10_000
    rows = M * d * 8
    rng = np.random.default_rng(0)
    first = payload.sparse(d, np.sort(rng.choice(d, k, replace=False)), rng.normal(size=k).astype(np.float32))
    sparse = [payload.sparse(d, first.indices, (m + 1) * first.values) for m in range(M)]
    made: dict[str, Aggregator] = {}

    def fill(absorb: str, uploads: list[Payload]) -> None:
        made[absorb] = agg = Aggregator(M, d, absorb)
        for _ in range(2):  # the second pass replaces: old and new supports
            for m in range(M):
                agg.add(m, uploads[m])

    peak = _traced_peak(lambda: fill("replace", sparse))
    assert made["replace"].nbytes == 8 * d + M * k * (4 + 4)  # values as sent, indices narrowed to uint32
    bound = 8 * d + M * k * 4 + (4 << 20)  # total, the narrowed indices, temporaries
    assert peak < bound < rows // 20

    laq = quantize(rng.normal(size=d), np.zeros(d), 4)  # 1 MB of codes, absorbed 128 times
    peak = _traced_peak(lambda: fill("accumulate", [laq] * M))
    assert made["accumulate"].nbytes == 8 * d
    bound = 8 * d + (4 << 20)  # total and one decoding block
    assert peak < bound < rows // 40


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_peak_abs_is_max_abs_aligned_or_not(dtype: type) -> None:
    """The two-reduction path (aligned floats) and the block path (anything else) give max |x|
    exactly, NaN when any value is NaN, inf for an infinity of either sign, 0.0 for zeros of either sign."""
    rng = np.random.default_rng(0)
    cases = [
        rng.standard_normal(3 * BLOCK + 5),
        -np.abs(rng.standard_normal(1000)) - 1.0,  # all negative: the peak is -min
        np.array([-0.0, 0.0, -0.0]),
        np.array([1.0, np.nan, -3.0]),
        np.array([1.0, -np.inf, 2.0]),
        np.array([np.inf, 2.0]),
    ]
    for x in cases:
        x = x.astype(dtype)
        raw = bytearray(x.nbytes + 1)
        unaligned = np.frombuffer(raw, dtype=dtype, count=x.size, offset=1)
        unaligned[:] = x
        assert x.flags.aligned and not unaligned.flags.aligned
        expected = float(np.abs(x).max())
        for y in (x, unaligned):
            got = peak_abs(y)
            assert (got != got and expected != expected) or (got == expected and str(got) != "-0.0"), (x, got)
    assert peak_abs(np.zeros(0)) == 0.0

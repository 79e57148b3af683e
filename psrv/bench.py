"""Compressor micro-benchmark: time, wire size and formula size of every compressor.

    python -m psrv.bench [--dims 1e6,1e7] [--repeat 7] [--compressors topk,laq,...]

For every compressor registered in :data:`psrv.compress.COMPRESSORS` (built with its
default options; one that fails to build or run is skipped with a note) plus ``laq``
(:func:`psrv.compress.laq.quantize`, b = 3, against a random float64 previous Q, the
dtype the LAQ algorithm keeps), and every dimension d, on a seeded float32 vector
with standard normal entries (``--dist cauchy`` for heavy tails), it prints:

- ``enc ms``: median of compress + :func:`psrv.codec.upload_to_proto` + ``SerializeToString``;
- ``dec ms``: median of ``pb.PushRequest.FromString`` + :func:`psrv.codec.upload_from_proto`
  + :func:`psrv.payload.to_dense`;
- ``bytes``: the serialized PushRequest; ``formula B``: :func:`psrv.payload.payload_bits` / 8;
  ``ratio``: bytes / formula bytes (the PushRequest's few header bytes included).

Each timing is warmed up once and is the median of ``--repeat`` runs
(``time.perf_counter``). Then the two kernel targets alone, at ``--target-dim``
(default 1e7), with PASS/FAIL: exact top-1% compress only (20 ms) and LAQ quantize +
:func:`psrv.bitpack.pack` at b = 3 (30 ms).

It sets glibc's malloc up as psrv's server and worker do (:func:`psrv.memory.tune_malloc`):
otherwise every 10-80 MB temporary comes back as fresh mmap pages whose page faults dominate
the timings. ``PSRV_MALLOC=default`` measures with glibc's defaults.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

import numpy as np

from psrv import bitpack, codec, memory
from psrv.compress import COMPRESSORS, make_compressor
from psrv.compress.laq import quantize
from psrv.payload import Payload, payload_bits, to_dense
from psrv.v1 import psrv_pb2 as pb

LAQ_BITS = 3
LAQ_ROW = "laq-innovation"  # the innovation quantizer as the LAQ algorithm uses it
TOPK_TARGET_MS = 20.0
LAQ_TARGET_MS = 30.0

HEADER = ("compressor", "d", "enc ms", "dec ms", "bytes", "formula B", "ratio")


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn`` in milliseconds over ``repeat`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _dim(text: str) -> int:
    value = float(text)
    if not (value >= 1 and value == int(value)):
        raise argparse.ArgumentTypeError(f"bad dimension {text!r}")
    return int(value)


def _dims(text: str) -> list[int]:
    return [_dim(t) for t in text.split(",") if t.strip()]


def make_vector(dim: int, dist: str, seed: int = 0) -> np.ndarray:
    """The seeded float32 benchmark vector: standard normal or standard Cauchy."""
    rng = np.random.default_rng(seed)
    x = rng.standard_cauchy(dim) if dist == "cauchy" else rng.standard_normal(dim)
    return x.astype(np.float32)


def previous_q(dim: int, seed: int = 1) -> np.ndarray:
    """LAQ's previous Q: random float64 (the dtype :mod:`psrv.algorithms.laq` holds)."""
    return np.random.default_rng(seed).standard_normal(dim) * 0.5


def _row(name: str, x: np.ndarray, compress: Callable[[], Payload], repeat: int) -> tuple:
    dim = x.size

    def encode() -> bytes:
        return codec.upload_to_proto("bench", 0, 0.0, compress()).SerializeToString()

    enc_ms = median_ms(encode, repeat)
    wire = encode()
    p = compress()

    def decode() -> np.ndarray:
        return to_dense(codec.upload_from_proto(pb.PushRequest.FromString(wire), dim))

    dec_ms = median_ms(decode, repeat)
    formula = payload_bits(p) / 8
    return (name, dim, enc_ms, dec_ms, len(wire), formula, len(wire) / formula if formula else float("nan"))


def _print_table(rows: Sequence[tuple], out: TextIO) -> None:
    print(
        f"{HEADER[0]:<16} {HEADER[1]:>10} {HEADER[2]:>9} {HEADER[3]:>9} {HEADER[4]:>12} {HEADER[5]:>12} {HEADER[6]:>7}",
        file=out,
    )
    for name, dim, enc, dec, nbytes, formula, ratio in rows:
        print(f"{name:<16} {dim:>10} {enc:>9.2f} {dec:>9.2f} {nbytes:>12} {formula:>12.1f} {ratio:>7.4f}", file=out)


def targets(dim: int, repeat: int, out: TextIO) -> dict[str, float]:
    """Median ms of the two kernel targets at ``dim`` (PASS/FAIL printed against the goals)."""
    x = make_vector(dim, "normal")
    topk = make_compressor("topk", ratio=0.01)
    rng = np.random.default_rng(2)
    topk_ms = median_ms(lambda: topk.compress(x, rng), repeat)
    q_prev = previous_q(dim)
    laq_ms = median_ms(lambda: bitpack.pack(quantize(x, q_prev, LAQ_BITS).codes, LAQ_BITS), repeat)
    for label, ms, goal in (
        (f"top-1% compress only, d={dim}", topk_ms, TOPK_TARGET_MS),
        (f"LAQ quantize+pack b={LAQ_BITS}, d={dim}", laq_ms, LAQ_TARGET_MS),
    ):
        verdict = "PASS" if ms <= goal else "FAIL"
        print(f"target {label}: median {ms:.2f} ms (goal <= {goal:.0f} ms) {verdict}", file=out)
    return {"topk_ms": topk_ms, "laq_ms": laq_ms}


#: Options for compressors that have no sensible default: |x| >= 2.576 keeps about 1% of a
#: standard normal vector, comparable with the 1% of topk/randk/stochastic/sq.
BENCH_OPTIONS: dict[str, dict[str, float]] = {
    "threshold": {"threshold": 2.576},
    "threshold-mem": {"threshold": 2.576},
}


def run(dims: Sequence[int], repeat: int, names: Sequence[str], dist: str, out: TextIO) -> list[tuple]:
    """Benchmark ``names`` (registry names and/or ``laq``) at every d; prints and returns the rows."""
    built: dict[str, object] = {}
    for name in names:
        if name == LAQ_ROW:
            built[name] = None
            continue
        try:
            built[name] = make_compressor(name, **BENCH_OPTIONS.get(name, {}))
        except Exception as exc:  # other engineers' compressors: note and go on
            print(f"note: skipped {name}: cannot build with default options ({exc})", file=out)
    rows = []
    for dim in dims:
        x = make_vector(dim, dist)
        for name, comp in built.items():
            if comp is None:
                q_prev = previous_q(dim)
                rows.append(_row(f"laq(b={LAQ_BITS})", x, lambda q=q_prev, v=x: quantize(v, q, LAQ_BITS), repeat))
                continue
            rng = np.random.default_rng(3)
            try:
                rows.append(_row(name, x, lambda c=comp, r=rng, v=x: c.compress(v, r), repeat))
            except Exception as exc:
                print(f"note: skipped {name} at d={dim}: {type(exc).__name__}: {exc}", file=out)
    _print_table(rows, out)
    return rows


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    parser = argparse.ArgumentParser(prog="python -m psrv.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=_dims, default=[10**6, 10**7], help="comma-separated, e.g. 1e6,1e7")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per median (after one warm-up)")
    parser.add_argument("--compressors", default="", help="comma-separated names (default: all registered + laq)")
    parser.add_argument("--dist", choices=("normal", "cauchy"), default="normal", help="entries of the vector")
    parser.add_argument("--target-dim", type=_dim, default=10**7, help="d of the two kernel targets")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.compressors.split(",") if n.strip()] or [*sorted(COMPRESSORS), LAQ_ROW]
    if not memory.tune_malloc():
        print(
            "note: malloc left at its defaults (PSRV_MALLOC=default or not glibc): timings include page faults",
            file=out,
        )
    print(
        f"vector: seeded float32, {args.dist} entries; laq: b={LAQ_BITS} against a random float64 previous Q; "
        f"medians of {args.repeat} runs after 1 warm-up",
        file=out,
    )
    run(args.dims, args.repeat, names, args.dist, out)
    targets(args.target_dim, args.repeat, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

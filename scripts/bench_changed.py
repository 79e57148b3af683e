"""The engine's costing pass over the aggregate: one pass (``psrv.replica.changed``: count, and keep
the indices while at most d/32) against the two it made before (count block by block, then
``changed_indices`` again when the change is sparse enough to send as values).

    python scripts/bench_changed.py --dim 1e7 --fractions 0.001,0.01,1 --repeat 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's psrv

import numpy as np  # noqa: E402

from psrv.aggregate import BLOCK  # noqa: E402
from psrv.replica import changed, changed_indices  # noqa: E402


def two_passes(before: np.ndarray, after: np.ndarray, limit: int) -> tuple[int, np.ndarray | None]:
    b, a = before.view("<u8"), after.view("<u8")
    n = sum(int(np.count_nonzero(b[i : i + BLOCK] != a[i : i + BLOCK])) for i in range(0, b.size, BLOCK))
    return n, changed_indices(before, after) if n <= limit else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=float, default=1e7)
    ap.add_argument("--fractions", default="0.001,0.01,1", help="comma list: the share of coordinates changed")
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args(argv)
    d = int(args.dim)
    rng = np.random.default_rng(0)
    before = rng.standard_normal(d)
    print(f"# d = {d:,}, medians of {args.repeat}, ms")
    print("| changed | two passes | one pass |")
    print("| ---: | ---: | ---: |")
    for frac in (float(f) for f in args.fractions.split(",")):
        after = before.copy()
        after[rng.choice(d, int(d * frac), replace=False)] += 1.0
        times: dict[str, list[float]] = {"two": [], "one": []}
        for _ in range(args.repeat):
            for name, fn in (("two", two_passes), ("one", changed)):
                start = time.perf_counter()
                n, _ = fn(before, after, d // 32)
                times[name].append(time.perf_counter() - start)
        print(f"| {n:,} | {statistics.median(times['two']) * 1e3:.1f} | {statistics.median(times['one']) * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

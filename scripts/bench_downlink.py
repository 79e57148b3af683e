"""Total message bytes (uplink + downlink) of LAQ against GD, in one run per data set: the default
task (MNIST logistic regression, 10 workers, 500 rounds) and scikit-learn's breast-cancer data
(d = 62, 5 workers, 300 rounds). Worker processes on loopback, through ``psrv.runner.run_local``.

    python scripts/bench_downlink.py [--rounds-scale 1.0] [--out psrv-out/bench-downlink]

Prints per run: bytes up, bytes down, total, the downlink forms used, and LAQ/GD ratios.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's psrv

from psrv.options import DataConfig  # noqa: E402
from psrv.runner import run_local  # noqa: E402
from psrv.server import ServerConfig  # noqa: E402

CASES = {
    "mnist": dict(data=DataConfig(data="mnist"), workers=10, rounds=500, lr=0.02),
    "breast_cancer": dict(data=DataConfig(data="breast_cancer"), workers=5, rounds=300, lr=0.02),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds-scale", type=float, default=1.0)
    ap.add_argument("--downlink", default="auto", choices=["auto", "dense", "replica"])
    ap.add_argument("--out", default="psrv-out/bench-downlink")
    args = ap.parse_args()
    rows = []
    for case, c in CASES.items():
        got = {}
        for alg in ("gd", "laq"):
            cfg = ServerConfig(
                algorithm=alg,
                options={"lr": c["lr"]},
                num_workers=c["workers"],
                rounds=max(1, int(c["rounds"] * args.rounds_scale)),
                round_timeout=60.0,
                downlink=args.downlink,
            )
            folder = Path(args.out) / case / alg
            s = run_local(cfg, c["data"], folder)
            forms = collections.Counter(json.loads(line)["downlink"] for line in (folder / "metrics.jsonl").open())
            got[alg] = s
            rows.append((case, alg, s["bytes_up"], s["bytes_down"], s["bytes_up"] + s["bytes_down"],
                         s["final_loss"], dict(forms)))  # fmt: skip
        gd, laq = got["gd"], got["laq"]
        rows.append(
            (case, "laq/gd", laq["bytes_up"] / gd["bytes_up"], laq["bytes_down"] / gd["bytes_down"],
             (laq["bytes_up"] + laq["bytes_down"]) / (gd["bytes_up"] + gd["bytes_down"]), None, None)
        )  # fmt: skip
    print(
        f"{'data':>14} {'run':>7} {'bytes up':>14} {'bytes down':>14} {'total':>14} {'final loss':>10}  downlink forms"
    )
    for case, alg, up, down, total, loss, forms in rows:
        if alg == "laq/gd":
            print(f"{case:>14} {alg:>7} {up:>14.4f} {down:>14.4f} {total:>14.4f}")
        else:
            print(f"{case:>14} {alg:>7} {up:>14,d} {down:>14,d} {total:>14,d} {loss:>10.6f}  {forms}")


if __name__ == "__main__":
    main()

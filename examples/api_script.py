"""psrv from Python: run jobs, get summaries and per-round records back (``psrv.run``).

python examples/api_script.py               # gd vs laq on the model in examples/my_model.py
python examples/api_script.py --rounds 5    # quicker
"""

from __future__ import annotations

import argparse

import psrv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    for algorithm in ("gd", "laq"):
        result = psrv.run(
            task="examples/my_model.py:make",  # your own torch model and data (a TorchSpec factory)
            algorithm=algorithm,
            workers=args.workers,
            rounds=args.rounds,
            lr=0.5,
            eval_every=10,
        )
        s = result.summary
        curve = [(r["round"], round(r["accuracy"], 3)) for r in result.records if "accuracy" in r]
        print(f"{algorithm:>4}: uploads {s['uploads']:4d}  bytes up {s['bytes_up']:9,d}  "
              f"final loss {s['final_loss']:.4f}  test accuracy {s['accuracy']:.3f}")  # fmt: skip
        print(f"      accuracy by round: {curve}")


if __name__ == "__main__":
    main()

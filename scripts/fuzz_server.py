"""Fuzz psrv's decoders and a live server with hostile messages, and print what they answered.

    python scripts/fuzz_server.py                       # 10,000 uploads, 3 x 4,000 server calls
    python scripts/fuzz_server.py --calls 500 --decoder 1000 --algorithms gd --seed 3

The messages come from the hypothesis strategies of ``tests/helpers/fuzz.py`` (random bytes,
hostile field values, mutated valid messages; see there). Two parts:

- decoder: ``--decoder`` serialized uploads through both of psrv's upload decoders (the wire fast
  path and protobuf's parse): each is refused with CodecError or decoded into a valid payload, the
  same by both.
- server: for each of ``--algorithms``, a live server (port 0) in the middle of round 0 gets
  ``--calls`` hostile calls on every method (unary, streamed, the Rounds stream). Every call must
  end with an expected status (never UNKNOWN or INTERNAL) within its deadline; afterwards the model
  and the aggregate must be bit-identical to before, and the honest workers must finish the run on
  exactly the model of a run that was never fuzzed.

Prints the count per method and status and the totals; exits 1 (with the failing example, shrunk
by hypothesis) when a property fails. ``--json`` writes the counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from tests.helpers import fuzz  # noqa: E402


def _settings(n: int) -> settings:
    return settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck))


def fuzz_decoder(n: int, dim: int, rng_seed: int) -> Counter:
    counts: Counter = Counter()

    @seed(rng_seed)
    @_settings(n)
    @given(fuzz.push_bytes(dim))
    def one(data: bytes) -> None:
        counts["decoded" if fuzz.check_upload_decoders(data, dim) else "refused"] += 1

    one()
    return counts


def fuzz_server(algorithm: str, n: int, rng_seed: int, aggregate: str = "mean") -> fuzz.HostileClient:
    reference = fuzz.Target(algorithm, aggregate=aggregate)
    try:
        expected = reference.finish()
    finally:
        reference.close()
    target = fuzz.Target(algorithm, aggregate=aggregate)
    try:
        before = target.state()
        client = fuzz.HostileClient(target.channel)

        @seed(rng_seed)
        @_settings(n)
        @given(fuzz.hostile_call(target.dim))
        def one(call: tuple[str, list[bytes]]) -> None:
            client.send(*call)

        one()
        assert target.state() == before, "the fuzzed calls changed the model or the aggregate"
        assert target.finish().tobytes() == expected.tobytes(), "the run ended on another model"
    finally:
        target.close()
    return client


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=4000, help="hostile calls per server (default 4000)")
    ap.add_argument("--decoder", type=int, default=10_000, help="uploads to the decoders (default 10000)")
    ap.add_argument("--algorithms", default="gd,laq,topk-ef", help="one live server each (default gd,laq,topk-ef)")
    ap.add_argument("--aggregate", default="mean", help="the servers' --aggregate rule (default mean)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the counts here")
    args = ap.parse_args()
    dim = (fuzz.N_FEATURES + 1) * fuzz.N_CLASSES
    out: dict = {"seed": args.seed, "dim": dim, "servers": {}}
    total_messages = 0
    if args.decoder:
        started = time.monotonic()
        counts = fuzz_decoder(args.decoder, dim, args.seed)
        took = time.monotonic() - started
        print(f"decoder: {sum(counts.values())} uploads in {took:.0f} s: {dict(counts)}; 0 crashes")
        out["decoder"] = dict(counts)
        total_messages += sum(counts.values())
    for algorithm in filter(None, args.algorithms.split(",")):
        started = time.monotonic()
        client = fuzz_server(algorithm, args.calls, args.seed, args.aggregate)
        took = time.monotonic() - started
        calls = sum(client.counts.values())
        print(f"\nserver ({algorithm}): {client.messages} messages in {calls} calls, {took:.0f} s")
        print(client.table())
        print("0 crashes, 0 hangs; model and aggregate bit-identical; the run then ended on the unfuzzed model")
        out["servers"][algorithm] = {
            "calls": calls,
            "messages": client.messages,
            "statuses": {f"{m} {s}": n for (m, s), n in sorted(client.counts.items())},
        }
        total_messages += client.messages
    print(f"\nall: {total_messages} hostile messages, 0 crashes, 0 hangs")
    out["messages"] = total_messages
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

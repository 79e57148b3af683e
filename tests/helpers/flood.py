"""A hostile client that floods a server with short unary calls naming ids it does not know
(``python -m tests.helpers.flood PORT SECONDS [THREADS]``): GetModel, Skip, Register and Push from
a thread pool, as fast as the server answers, until its stdin closes or SECONDS have passed. Prints
one JSON line when it starts (``{"started": true}``) and one at its end: the calls made, a count
per status code, and one RESOURCE_EXHAUSTED message. Bounded in time: it stops by itself."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter

import grpc

from psrv import rpc
from psrv.v1 import psrv_pb2 as pb


def flood(port: int, seconds: float, threads: int = 4, stop: threading.Event | None = None) -> dict[str, object]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    calls = {
        "GetModel": (channel.unary_unary(f"/{rpc.SERVICE}/GetModel"), pb.GetModelRequest),
        "Skip": (channel.unary_unary(f"/{rpc.SERVICE}/Skip"), pb.SkipRequest),
        "Register": (channel.unary_unary(f"/{rpc.SERVICE}/Register"), pb.RegisterRequest),
        "Push": (channel.unary_unary(f"/{rpc.SERVICE}/Push"), pb.PushRequest),
    }
    codes: Counter[str] = Counter()
    sample: list[str] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds
    stop = stop or threading.Event()

    def hammer(t: int) -> None:
        n = 0
        while time.monotonic() < end and not stop.is_set():
            name = ("GetModel", "Skip", "Register", "Push")[n % 4]
            call, message = calls[name]
            request = message(worker_id=f"intruder-{t}-{n}").SerializeToString()
            n += 1
            try:
                call(request, timeout=2.0)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
                if code == "RESOURCE_EXHAUSTED" and not sample:
                    sample.append(exc.details() or "")
            with lock:
                codes[code] += 1

    workers = [threading.Thread(target=hammer, args=(t,), daemon=True) for t in range(threads)]
    print(json.dumps({"started": True}), flush=True)
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + 10)
    channel.close()
    return {"calls": sum(codes.values()), "codes": dict(codes), "sample": sample[0] if sample else ""}


if __name__ == "__main__":
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    closed = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), closed.set()), daemon=True).start()
    print(json.dumps(flood(port, seconds, int(sys.argv[3]) if len(sys.argv) > 3 else 4, closed)), flush=True)

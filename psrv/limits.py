"""The gRPC server's limits on its callers (README, "Limits"): message size derived from the model's
dimension, concurrent calls in all and per worker id, calls per second per caller, and how long a
stream may stall inside an upload. Each refusal is RESOURCE_EXHAUSTED with a message naming the limit
and the flag that raises it (the message-size and total-call limits are enforced by gRPC itself,
which words its own message).

No gRPC here: :mod:`psrv.server` applies these; the engine's own limits (the task's shape,
``--max-dim``, ``--worker-ids``, ``--max-id-bytes``) live in :class:`psrv.engine.ServerConfig`.
"""

from __future__ import annotations

import ipaddress
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from psrv import stream

#: Default: long-lived calls (GetModel, GetModelStream, PushStream, Rounds) one worker id may hold at once.
CALLS_PER_WORKER = 4
#: Default: such calls that callers without a registered id may hold at once, all together.
ANONYMOUS_CALLS = 16
#: Default: seconds an upload's stream may wait for its next piece before it is ended.
STREAM_IDLE_TIMEOUT = 60.0
#: Default: calls per second one worker id may start (a token bucket's rate). A worker makes one
#: call per run on the stream transport and two per round on the unary one; a fast loopback run
#: (2 workers, a 650-parameter model) makes about 500 a second, and a round trip of a Python gRPC
#: call (>= ~0.1 ms) caps any worker near 5,000 -- this is above what a worker can reach.
CALL_RATE = 10_000.0
#: Default: calls per second that callers without a registered (or configured) worker id may start
#: from one host, together: registrations, and calls naming ids the server does not know.
ANONYMOUS_CALL_RATE = 100.0
#: Default: calls a bucket holds (what a caller may start at once after being quiet).
CALL_BURST = 1000
#: Buckets kept at most (the oldest idle ones go first): bounded memory however many callers come.
MAX_BUCKETS = 10_000


@dataclass(frozen=True)
class TransportLimits:
    """``max_message_bytes`` 0: :func:`message_limit` of the model's dimension; ``max_concurrent_calls``
    0: :meth:`threads` x 2 (gRPC refuses calls beyond it instead of queueing them without bound)."""

    max_message_bytes: int = 0
    calls_per_worker: int = CALLS_PER_WORKER
    anonymous_calls: int = ANONYMOUS_CALLS
    max_concurrent_calls: int = 0
    stream_idle_timeout: float = STREAM_IDLE_TIMEOUT
    call_rate: float = CALL_RATE  # 0: no rate limit per worker id
    anonymous_call_rate: float = ANONYMOUS_CALL_RATE  # 0: no rate limit for anonymous callers
    call_burst: int = CALL_BURST

    def __post_init__(self) -> None:
        if self.max_message_bytes < 0 or self.max_concurrent_calls < 0:
            raise ValueError("max_message_bytes and max_concurrent_calls must be >= 0 (0: derived)")
        if self.call_rate < 0 or self.anonymous_call_rate < 0 or self.call_burst < 1:
            raise ValueError("need call rates >= 0 (0: unlimited) and call_burst >= 1")
        if self.calls_per_worker < 1 or self.anonymous_calls < 1 or not self.stream_idle_timeout > 0:
            raise ValueError("need calls_per_worker >= 1, anonymous_calls >= 1, stream_idle_timeout > 0")

    def threads(self, num_workers: int) -> int:
        """Server threads: every worker's calls and the anonymous budget can run at once, plus a few
        for short calls (Register, Push, Skip, health)."""
        return self.calls_per_worker * num_workers + self.anonymous_calls + 8

    def concurrent(self, num_workers: int) -> int:
        return self.max_concurrent_calls or 2 * self.threads(num_workers)

    def message_bytes(self, dim: int) -> int:
        return self.max_message_bytes or message_limit(dim)


def message_limit(dim: int) -> int:
    """The largest gRPC message the server receives for a model of ``dim`` parameters: the largest
    upload it could accept whole (:func:`psrv.stream.limit_for`: 16 bytes per parameter and 1 MiB)."""
    return stream.limit_for(dim)


class CallLimiter:
    """Counts the long-lived calls in flight per worker id; a registered id may hold
    ``per_worker``, every other caller shares ``anonymous``. Thread-safe."""

    def __init__(self, per_worker: int, anonymous: int) -> None:
        self.per_worker, self.anonymous = per_worker, anonymous
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}

    def acquire(self, key: str | None) -> Callable[[], None]:
        """Take one call for ``key`` (a registered worker id, or None for any other caller); returns
        its release (idempotent). Raises :class:`LimitExceeded` naming the flag when over the limit."""
        slot = "" if key is None else "w:" + key
        top = self.anonymous if key is None else self.per_worker
        with self._lock:
            held = self._held.get(slot, 0)
            if held >= top:
                if key is None:
                    raise LimitExceeded(
                        f"{held} calls from callers without a registered worker id are in progress, the limit "
                        "(--max-anonymous-calls)",
                        CALLS_RETRY_AFTER,
                    )
                raise LimitExceeded(
                    f"worker {key!r} has {held} calls in progress, the limit (--max-calls-per-worker)",
                    CALLS_RETRY_AFTER,
                )
            self._held[slot] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self._held[slot] - 1
                if left:
                    self._held[slot] = left
                else:
                    del self._held[slot]

        return release

    def held(self, key: str | None) -> int:
        with self._lock:
            return self._held.get("" if key is None else "w:" + key, 0)


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; a call takes one (the token bucket of
    J. Turner, "New directions in communications (or which way to the information age?)", IEEE
    Communications Magazine 24(10), 1986). Not thread-safe: :class:`RateLimiter` locks."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.last = rate, float(burst), float(burst), now

    def refill(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        return self.tokens

    def take(self, now: float) -> bool:
        if self.refill(now) < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def full(self, now: float) -> bool:
        """Refilled to ``burst``: the same as a new bucket, so it can be forgotten."""
        return self.tokens + max(0.0, now - self.last) * self.rate >= self.burst


class RateLimiter:
    """Calls per second per caller: one :class:`TokenBucket` per key, a worker id's at ``rate``,
    an anonymous caller's (a key starting with ``ANONYMOUS``) at ``anonymous_rate`` with
    ``anonymous_burst`` (a rate of 0: not limited). At most ``max_buckets`` are kept: a new key
    first forgets the least recently used buckets that have refilled (forgetting them changes
    nothing), then, over the cap, the least recently used at all. Thread-safe."""

    ANONYMOUS = "anonymous"

    def __init__(
        self,
        rate: float,
        burst: int,
        anonymous_rate: float,
        anonymous_burst: int | None = None,
        max_buckets: int = MAX_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst, self.anonymous_rate = rate, burst, anonymous_rate
        self.anonymous_burst = burst if anonymous_burst is None else anonymous_burst
        self.max_buckets, self.clock = max_buckets, clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[tuple[str, ...], TokenBucket] = OrderedDict()

    def take(self, key: tuple[str, ...], who: str) -> None:
        """One call for ``key`` (``who`` names the caller in the refusal); raises
        :class:`LimitExceeded` naming the flags when its bucket is empty."""
        anonymous = key[0] == self.ANONYMOUS
        rate = self.anonymous_rate if anonymous else self.rate
        if rate <= 0:
            return
        with self._lock:
            now = self.clock()
            bucket = self._buckets.get(key)
            if bucket is None:
                self._evict(now)
                bucket = self._buckets[key] = TokenBucket(rate, self.anonymous_burst if anonymous else self.burst, now)
            else:
                self._buckets.move_to_end(key)
            if bucket.take(now):
                return
            wait = (1.0 - bucket.tokens) / rate  # until its next token
        flag = "--max-anonymous-call-rate" if anonymous else "--max-call-rate"
        raise LimitExceeded(
            f"{who} started more than {rate:g} calls per second (after a burst of {bucket.burst:g}), "
            f"the limit ({flag}, --call-burst)",
            wait,
        )

    def _evict(self, now: float) -> None:
        while self._buckets:
            key, oldest = next(iter(self._buckets.items()))
            if len(self._buckets) < self.max_buckets and not oldest.full(now):
                return
            del self._buckets[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)


def host_of(peer: str) -> str:
    """The host part of a gRPC peer (``ipv4:10.0.0.2:5000`` -> ``10.0.0.2``); an IPv6 address is
    reduced to its /64 (one machine usually holds a whole /64); anything else is kept whole."""
    kind, _, rest = urllib.parse.unquote(peer or "").partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]") if rest.startswith("[") else rest
        try:
            address = ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            return host
        if address.is_loopback or address.ipv4_mapped is not None:
            return str(address.ipv4_mapped or address)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return peer or "?"


class LimitExceeded(Exception):
    """Over one of the server's limits: RESOURCE_EXHAUSTED with this message. ``retry_after``
    (seconds) for a limit that passes (calls in progress, calls per second): the server sends it as
    gRPC's retry pushback (trailing metadata ``grpc-retry-pushback-ms``), which tells a worker to
    back off and try again; None for one that does not pass (an id, a size, the worker slots)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


#: a call refused for a limit that passes waits this long before its next try, where the server cannot tell
CALLS_RETRY_AFTER = 0.1


class Watchdog:
    """Calls ``on_timeout`` of a watched stream that has not been :meth:`touch`-ed for its timeout.
    One thread for every stream (started when first needed); it wakes once per ``tick`` seconds."""

    def __init__(self, tick: float = 0.5) -> None:
        self.tick = tick
        self._lock = threading.Lock()
        self._deadlines: dict[int, tuple[float, float, Callable[[], None]]] = {}
        self._next = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def watch(self, timeout: float, on_timeout: Callable[[], None]) -> int:
        with self._lock:
            key = self._next
            self._next += 1
            self._deadlines[key] = (time.monotonic() + timeout, timeout, on_timeout)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="psrv-stream-watchdog", daemon=True)
                self._thread.start()
        return key

    def touch(self, key: int) -> None:
        with self._lock:
            entry = self._deadlines.get(key)
            if entry is not None:
                self._deadlines[key] = (time.monotonic() + entry[1], entry[1], entry[2])

    def forget(self, key: int) -> None:
        with self._lock:
            self._deadlines.pop(key, None)

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            with self._lock:
                due = [k for k, (deadline, *_) in self._deadlines.items() if deadline <= now]
                expired = [self._deadlines.pop(k)[2] for k in due]
            for on_timeout in expired:
                on_timeout()

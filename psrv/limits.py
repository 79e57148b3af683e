"""The gRPC server's limits on its callers (README, "Limits"): message size derived from the model's
dimension, concurrent calls in all and per worker id, and how long a stream may stall inside an
upload. Each refusal is RESOURCE_EXHAUSTED with a message naming the limit and the flag that raises
it (the message-size and total-call limits are enforced by gRPC itself, which words its own message).

No gRPC here: :mod:`psrv.server` applies these; the engine's own limits (the task's shape,
``--max-dim``, ``--worker-ids``, ``--max-id-bytes``) live in :class:`psrv.engine.ServerConfig`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from psrv import stream

#: Default: long-lived calls (GetModel, GetModelStream, PushStream, Rounds) one worker id may hold at once.
CALLS_PER_WORKER = 4
#: Default: such calls that callers without a registered id may hold at once, all together.
ANONYMOUS_CALLS = 16
#: Default: seconds an upload's stream may wait for its next piece before it is ended.
STREAM_IDLE_TIMEOUT = 60.0


@dataclass(frozen=True)
class TransportLimits:
    """``max_message_bytes`` 0: :func:`message_limit` of the model's dimension; ``max_concurrent_calls``
    0: :meth:`threads` x 2 (gRPC refuses calls beyond it instead of queueing them without bound)."""

    max_message_bytes: int = 0
    calls_per_worker: int = CALLS_PER_WORKER
    anonymous_calls: int = ANONYMOUS_CALLS
    max_concurrent_calls: int = 0
    stream_idle_timeout: float = STREAM_IDLE_TIMEOUT

    def __post_init__(self) -> None:
        if self.max_message_bytes < 0 or self.max_concurrent_calls < 0:
            raise ValueError("max_message_bytes and max_concurrent_calls must be >= 0 (0: derived)")
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
                        "(--max-anonymous-calls)"
                    )
                raise LimitExceeded(f"worker {key!r} has {held} calls in progress, the limit (--max-calls-per-worker)")
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


class LimitExceeded(Exception):
    """Over one of the server's limits: RESOURCE_EXHAUSTED with this message."""


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

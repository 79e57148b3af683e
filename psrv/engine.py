"""The round engine: registration, synchronous rounds, deadlines, aggregation, the model update
and server-side selection. Pure: no gRPC, no protobuf (a test checks the import graph), so it is
tested without sockets and any transport can sit in front of it (``psrv.server`` is the gRPC one).

Round k: publish theta^k; collect one upload or skip notice per registered worker until all
responsive workers have reported or the round deadline passes; a worker that misses the deadline
is recorded as a ``deadline`` skip and contributes its stored (stale) value, exactly like a lazy
skip; update ``theta^{k+1} = theta^k - alpha * sum_m stored_m`` (the lazily aggregated gradient
step of LAG, Chen et al., NeurIPS 2018, and of LAQ, Sun et al., NeurIPS 2019, eq. 4), or the
server optimizer's step along that sum (``--server-opt``, :mod:`psrv.server_opt`; Reddi et al.,
ICLR 2021); hand the round's record to the metrics sink. A worker that misses ``max_misses``
deadlines in a row stops being waited for until it reports again (a report too late for its round
counts), so a dead worker costs the run at most ``max_misses`` deadlines, then nothing. A transport
that holds one connection per worker (the Rounds stream) says when it ends
(:meth:`RoundEngine.disconnected`): that worker stops being waited for at once. Fewer than
``min_workers`` live (responsive) workers: the round waits up to ``quorum_wait`` seconds for
rejoins, then the run fails naming who is gone and why.

Errors are domain errors (:class:`EngineError` subclasses, each naming the status a transport
should report); the engine never half-applies a rejected report.

Everything that defines the run between two rounds lives in one :class:`EngineState`, so the
run can be saved and restored whole; the open round's bookkeeping (reports so far, timers, who
has fetched the model) is kept apart in :class:`_OpenRound`.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

import numpy as np

from psrv.aggregate import Aggregator, Overflow, add_payload, clip, compact, payload_nbytes, payload_peak, peak_abs
from psrv.algorithms import Algorithm, SelectionView, make_algorithm
from psrv.bitpack import index_width, packed_size
from psrv.payload import Payload, payload_bits, to_dense
from psrv.replica import AggregateChange, DownCompressor, changed, changed_indices, state_digest, take_step
from psrv.robust import make_aggregator, parse_aggregate, refusal
from psrv.server_opt import OptState, make_server_opt
from psrv.tasks import make_task
from psrv.triggers import StepHistory

log = logging.getLogger("psrv.engine")

#: How the model reaches the workers: a plain dense broadcast, exact updates of replicas, or chosen per round.
DOWNLINKS = ("auto", "dense", "replica")
TRANSPORTS = ("stream", "unary")
#: Rounds of update costs the ``auto`` downlink averages over.
COST_WINDOW = 8

_EMPTY = np.zeros(0)

#: Why a worker did not upload in a round. ``deadline`` is set by the engine only.
SKIP_REASONS = ("lazy_rule", "not_selected")


# ---------------------------------------------------------------------------------- errors
class EngineError(Exception):
    """A request the engine refuses; ``status`` names the matching gRPC status code."""

    status = "INTERNAL"


class InvalidArgument(EngineError):
    status = "INVALID_ARGUMENT"


class NotFound(EngineError):
    status = "NOT_FOUND"


class AlreadyExists(EngineError):
    status = "ALREADY_EXISTS"


class FailedPrecondition(EngineError):
    """The request is well formed but arrives at the wrong time (closed round, closed registration)."""

    status = "FAILED_PRECONDITION"


class OutOfRange(EngineError):
    status = "OUT_OF_RANGE"


class PermissionDenied(EngineError):
    """A caller that is not one of the run's configured identities (``--worker-ids``)."""

    status = "PERMISSION_DENIED"


class ResourceExhausted(EngineError):
    """A request beyond one of the server's limits; the message names the limit and its flag."""

    status = "RESOURCE_EXHAUSTED"


class RunAborted(EngineError):
    """The run failed; every waiting request gives up with the reason."""

    status = "ABORTED"


class NotReady(EngineError):
    """A long poll ran out of time before the round it waits for started."""

    status = "DEADLINE_EXCEEDED"


# ---------------------------------------------------------------------------------- config
#: Default bound on the model's dimension when the first registration fixes the shape (``--max-dim``).
MAX_DIM = 10_000_000
#: Default bound on a worker id's length in UTF-8 bytes (``--max-id-bytes``).
MAX_ID_BYTES = 128
#: Default number of closed rounds' records kept in memory (every record goes to the sink).
RECORD_TAIL = 128
#: Workers refused at registration that are remembered for the run's error message.
_REFUSED_KEPT = 16


@dataclass(frozen=True)
class ServerConfig:
    algorithm: str = "gd"
    compressor: str = ""
    options: dict[str, float] = field(default_factory=dict)
    task: str = "logreg"
    task_options: dict[str, float] = field(default_factory=dict)
    num_workers: int = 10
    rounds: int = 100
    round_timeout: float = 10.0
    register_timeout: float = 120.0
    max_misses: int = 3
    done_grace: float = 10.0  # seconds to wait for workers to fetch the final model
    start_timeout: float = 30.0  # at most this long, round 0 waits for every worker to ask for the model
    seed: int = 0
    broadcast_dtype: str = "float32"
    zstd: bool = False  # workers zstd-compress a payload when that makes it smaller
    downlink: str = "auto"  # "dense" | "replica" | "auto" (see RoundEngine._choose_downlink)
    down_compressor: str = ""  # "NAME[:KEY=VALUE,...]": EF21-P's compressed downlink (psrv.replica.DownCompressor)
    transport: str = "stream"  # how workers are told to run rounds: "stream" (one Rounds stream each) | "unary"
    server_opt: str = "sgd"  # "NAME[:KEY=VALUE,...]": the server optimizer (psrv.server_opt), step size options["lr"]
    clip_norm: float = 0.0  # > 0: each upload's decoded vector is scaled down to this L2 norm at most (see push)
    # the server owns the job (README, "Limits"): the task's shape (n_features, n_classes) from the server's
    # configuration (None: the first registration fixes it, within max_dim), and who may take a worker slot
    task_shape: tuple[int, int] | None = None
    max_dim: int = MAX_DIM  # the largest model (parameters) a registration may make the server allocate
    worker_ids: tuple[str, ...] = ()  # the ids that may register (empty: any id, up to num_workers)
    max_id_bytes: int = MAX_ID_BYTES
    record_tail: int = RECORD_TAIL  # closed rounds' records kept in memory; totals are kept apart
    min_workers: int = 1  # fewer live workers than this (for quorum_wait seconds) fail the run; 0: never
    quorum_wait: float | None = None  # seconds to wait for rejoins below min_workers; None: 2 x round_timeout
    aggregate: str = "mean"  # "mean" (the sum) | "median" | "trimmed-mean[:beta=B]" (psrv.robust)

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.downlink not in DOWNLINKS:
            raise ValueError(f"downlink must be one of {', '.join(DOWNLINKS)}, got {self.downlink!r}")
        if self.num_workers < 1 or self.rounds < 0 or self.round_timeout <= 0 or self.max_misses < 1:
            raise ValueError("need num_workers >= 1, rounds >= 0, round_timeout > 0, max_misses >= 1")
        if not 0 <= self.min_workers <= self.num_workers:
            raise ValueError(f"--min-workers must be in 0..--workers ({self.num_workers}), got {self.min_workers}")
        if self.quorum_wait is not None and not (math.isfinite(self.quorum_wait) and self.quorum_wait >= 0):
            raise ValueError(f"--quorum-wait must be finite and >= 0 seconds, got {self.quorum_wait!r}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            raise ValueError(f"clip_norm must be finite and >= 0 (0: off), got {self.clip_norm!r}")
        if self.broadcast_dtype not in ("float32", "float64"):
            raise ValueError(f"broadcast_dtype must be float32 or float64, got {self.broadcast_dtype!r}")
        self._check_limits()
        algorithm = make_algorithm(self.algorithm, self.options, self.compressor)  # fail early on bad options
        make_server_opt(self.server_opt, algorithm.lr)  # ValueError on a bad name, option or value
        why = refusal(parse_aggregate(self.aggregate), algorithm)  # ValueError on a bad rule
        if why:
            raise ValueError(why)
        if algorithm.round_only and parse_aggregate(self.aggregate).robust:
            raise ValueError(f"--aggregate {self.aggregate} cannot run with {self.algorithm}, whose aggregate is the "
                             "sampled workers' uploads of the round alone; use --aggregate mean")  # fmt: skip
        if algorithm.needs_aggregate and (self.downlink == "dense" or self.down_compressor):
            raise ValueError(f"{self.algorithm} needs the exact replica downlink (its workers use the server's "
                             "aggregate); drop --downlink dense / --down-compressor")  # fmt: skip
        if self.down_compressor:
            DownCompressor(self.down_compressor)  # ValueError on a bad name or option

    def _check_limits(self) -> None:
        if self.max_dim < 1 or self.max_id_bytes < 1 or self.record_tail < 1:
            raise ValueError("need max_dim >= 1, max_id_bytes >= 1, record_tail >= 1")
        if self.task_shape is not None:
            f, c = self.task_shape
            if f < 1 or c == 1 or c < 0:
                raise ValueError(f"shape needs n_features >= 1 and n_classes >= 2 (or 0 for regression), got {f},{c}")
        ids = self.worker_ids
        if ids:
            if len(set(ids)) != len(ids) or not all(ids):
                raise ValueError("worker ids must be distinct and not empty")
            if len(ids) < self.num_workers:
                raise ValueError(
                    f"{len(ids)} worker ids for {self.num_workers} workers: give one id per worker at least"
                )
            long = [i for i in ids if len(i.encode()) > self.max_id_bytes]
            if long:
                top = self.max_id_bytes
                raise ValueError(f"worker id {long[0][:40]!r}... is longer than {top} bytes (--max-id-bytes)")


# ---------------------------------------------------------------------------------- state
def raise_hidden_interrupt(exc: BaseException) -> None:
    """Raise the KeyboardInterrupt that ``exc`` stands in for, if it does. In CPython a
    KeyboardInterrupt (Ctrl-C; SIGTERM too where ``psrv run`` maps it) that lands inside
    ``threading.Condition.wait`` can leave the condition's lock released, and the ``with`` block
    around the wait then raises ``RuntimeError("cannot release un-acquired lock")`` in its place,
    the interrupt only its ``__context__``: a run waiting for its rounds in the main thread would
    end as failed instead of interrupted."""
    seen = exc.__context__
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            raise seen
        seen = seen.__context__


def natural_key(worker_id: str) -> tuple[Any, ...]:
    """Sort key that puts ``w2`` before ``w10``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", worker_id))


@dataclass
class WorkerState:
    """``index``: the order of registration, which the worker is told and the wire uses (selection).
    ``slot``: the worker's place in worker-id order, fixed when registration completes; the engine
    keeps rows, sums contributions and lists workers in slot order, so a run does not depend on
    the order in which workers happened to register."""

    worker_id: str
    index: int
    num_samples: int
    slot: int = -1
    smoothness: float = 0.0
    responsive: bool = True
    misses: int = 0
    last_upload: int = -1  # round of the last accepted upload
    gone: str = ""  # why it is not responsive (its stream closed, missed deadlines); "" while it is


@dataclass
class Report:
    status: str  # "upload" | "lazy_rule" | "not_selected" | "deadline" | "rejected" (its upload was not absorbed)
    kind: str = ""
    bits: int = 0
    nbytes: int = 0
    loss: float | None = None
    latency: float | None = None


@dataclass(frozen=True)
class Broadcast:
    """What a worker receives at the start of a round (and once more when training ends), in one of
    three forms: ``dense`` (``params``: theta^k in the broadcast dtype, and the step history),
    ``update`` (``change``: how the aggregate changed at the last close, for workers whose replica
    is of the previous round) or ``snapshot`` (``theta``, ``total``, the server optimizer's state
    ``opt_state`` and the history: the whole replicated state). ``digest`` (update, snapshot) is
    :func:`psrv.replica.state_digest`."""

    round: int
    total_samples: int
    num_workers: int
    form: str = "dense"
    params: np.ndarray | None = None
    recent_step_sq: tuple[float, ...] = ()
    done: bool = False
    selected: tuple[int, ...] | None = None  # None: every worker computes
    change: AggregateChange | None = None
    step: Payload | None = None  # form "compressed": EF21-P's model step C(theta^k - w^{k-1})
    theta: np.ndarray | None = None
    total: np.ndarray | None = None
    digest: int = 0
    zstd: bool = False  # relayed payloads are zstd-compressed where that is smaller
    opt_state: OptState | None = None  # form "snapshot": the server optimizer's state (None: a compressed downlink)


@dataclass
class RunTotals:
    """Running totals over every closed round: what the summary needs, so the rounds' records need
    not stay in memory (they stream to the sink; a bounded tail is kept)."""

    rounds: int = 0
    uploads: int = 0
    skips: int = 0
    deadline_misses: int = 0
    payload_bits: int = 0
    bytes_up: int = 0
    last_loss: float | None = None
    elapsed: float = 0.0

    def add(self, record: dict[str, Any]) -> None:
        self.rounds += 1
        for key in ("uploads", "skips", "deadline_misses", "payload_bits", "bytes_up"):
            setattr(self, key, getattr(self, key) + record[key])
        if record["loss"] is not None:
            self.last_loss = record["loss"]
        self.elapsed = record["elapsed"]


@dataclass
class EngineState:
    """The whole run between two rounds: what a checkpoint has to hold."""

    phase: str = "registering"  # -> "training" -> "done" (or "failed")
    error: str | None = None
    round: int = -1
    task_shape: tuple[int, int] | None = None
    workers: dict[str, WorkerState] = field(default_factory=dict)
    theta: np.ndarray | None = None
    aggregator: Aggregator | None = None
    opt_state: OptState = field(
        default_factory=OptState
    )  # the server optimizer's (psrv.server_opt), after the last close
    history: StepHistory = field(default_factory=lambda: StepHistory(0))
    theta_hat: np.ndarray | None = None  # (M, d) float64 iterate of each worker's last upload (lag-ps' selection)
    rng: np.random.Generator = field(default_factory=np.random.default_rng)  # server-side selection only
    records: deque[dict[str, Any]] = field(default_factory=deque)  # the last closed rounds' (config.record_tail)
    totals: RunTotals = field(default_factory=lambda: RunTotals())  # over every closed round
    downlink: str = "dense"  # the form of the broadcasts now: "dense", "replica" or "compressed"
    shared_model: np.ndarray | None = None  # w: the model workers compute at, with a compressed downlink
    change: AggregateChange | None = field(default_factory=AggregateChange)  # of the last close; None after a dense one
    update_costs: deque[int] = field(default_factory=lambda: deque(maxlen=COST_WINDOW))  # bytes, last rounds
    rejoins: int = 0  # registrations of known workers while training (restarted workers)


@dataclass(frozen=True)
class Rejoin:
    """What a worker that registers again while training is handed back: the round it joins at and,
    for accumulating rules, its stored contribution (the server's row for it: the sum of every
    upload absorbed from it), from which it rebuilds its algorithm state (``Algorithm.rejoin``)."""

    round: int
    contribution: np.ndarray | None = None


class Registered(NamedTuple):
    """The result of :meth:`RoundEngine.register_worker`: the worker's index, and what a rejoining
    worker needs (None for a first registration)."""

    index: int
    rejoin: Rejoin | None = None


class Served(NamedTuple):
    """What :meth:`RoundEngine.serve` handed a worker: the (encoded) broadcast, its round, its form
    (dense, update, compressed or snapshot) and whether it is the final one."""

    data: Any
    round: int
    form: str
    done: bool


@dataclass
class _OpenRound:
    """Bookkeeping of the round in progress; not part of the saved state."""

    broadcast: Broadcast | None = None
    encoded: Any = None  # the transport's encoding of ``broadcast``, made once per round
    selected: frozenset[int] | None = None
    reports: dict[int, Report] = field(default_factory=dict)  # by slot
    uploads: dict[int, Payload] = field(default_factory=dict)  # by slot, as received; absorbed in slot order
    peaks: dict[int, float] = field(default_factory=dict)  # by slot: max |value| of the held uploads
    rejected: dict[int, str] = field(default_factory=dict)  # slot -> why its upload was not absorbed
    absorbed: int = 0  # slots below this have reported and their uploads are absorbed
    before: np.ndarray | None = None  # the aggregate before this round's first absorption
    relayed: list[tuple[int, Payload]] | None = field(default_factory=list)  # absorbed (slot, payload); None: too big
    relay_bytes: int = 0  # their size as received
    relay_memory: int = 0  # and as held
    down: dict[int, int] = field(default_factory=dict)  # model bytes served per worker slot
    snapshot: Any = None  # the transport's encoding of this round's snapshot, made when first asked for
    snapshots: int = 0  # snapshots served this round
    started: float = 0.0
    by_slot: dict[int, WorkerState] | None = None  # the workers by slot, made when first needed this round
    waiting_for: WorkerState | None = None  # a live worker that had not reported at the last look


class RoundSink(Protocol):
    """Receives every closed round (``psrv.metrics.MetricsSink`` writes JSONL and evaluates).

    May add fields to ``record``; its time is not counted as training time."""

    def round_closed(self, record: dict[str, Any], theta: np.ndarray, final: bool) -> None: ...


# ---------------------------------------------------------------------------------- engine
class RoundEngine:
    """Registration and synchronous rounds. Thread-safe: one condition guards all state.

    ``encode(broadcast)`` (optional) is called once per published round, with the lock held;
    ``wait_model`` returns its result, and the length of it (when it has one) is booked as the
    bytes served to that worker in that round."""

    def __init__(
        self,
        config: ServerConfig,
        sink: RoundSink | None = None,
        encode: Callable[[Broadcast], Any] | None = None,
        keep_rows: bool = False,
    ) -> None:
        self.config = config
        #: accumulating rules keep one float64 row per worker (psrv.aggregate): rejoin and resume need them
        self.keep_rows = keep_rows
        self.resumed = False  # the state came from a checkpoint (restore)
        self.algorithm: Algorithm = make_algorithm(config.algorithm, config.options, config.compressor)
        self.opt = make_server_opt(config.server_opt, self.algorithm.lr)
        self.state = EngineState(
            history=StepHistory(self.algorithm.history_depth),
            rng=np.random.default_rng([config.seed, 7]),
            records=deque(maxlen=config.record_tail),
        )
        self._down = DownCompressor(config.down_compressor) if config.down_compressor else None
        # exact updates can go out: only then is each round's change worked out (a copy of the aggregate)
        self._updates_possible = self._down is None and config.downlink != "dense"
        self._dtype_max = float(np.finfo(np.dtype(config.broadcast_dtype)).max)  # what the model can hold
        self._sink = sink
        self._encode = encode or (lambda b: b)
        self._cond = threading.Condition()
        # what a worker waiting for a broadcast waits on (same lock): woken when a round is published or
        # the phase changes (:meth:`_wake`), not by every report -- with M streams waiting, a wake-up per
        # report would be M^2 per round (docs/scale.md)
        self._published = threading.Condition(self._cond._lock)  # type: ignore[attr-defined]
        self._open = _OpenRound()
        self._ready: set[str] = set()  # workers that have asked for a model: warmed up
        self._done_served: set[str] = set()
        self.refused: dict[str, str] = {}  # worker id -> why its registration was refused (the first few)
        self._allowed = frozenset(config.worker_ids)
        if config.task_shape is not None:  # the server owns the shape: the model exists before anyone registers
            try:
                self._init_model(tuple(config.task_shape), bounded=False)  # the operator's choice: no --max-dim
            except EngineError as exc:
                raise ValueError(str(exc)) from None
        self._connections: dict[str, int] = {}  # worker -> the number of its current connection (see connected)
        self.stopped_by: str | None = None  # a stopping rule that ended the job early (stop_after_round)

    # ------------------------------------------------------------------ views
    @property
    def dim(self) -> int:
        return 0 if self.state.theta is None else int(self.state.theta.size)

    def dim_for(self, worker_id: str) -> int:
        """The model's dimension, for a registered worker (``NotFound`` otherwise)."""
        with self._cond:
            self.worker(worker_id)
            return self.dim

    def worker(self, worker_id: str) -> WorkerState:
        w = self.state.workers.get(worker_id)
        if w is None:
            raise NotFound(f"unknown worker {worker_id!r}; register first")
        return w

    # ------------------------------------------------------------------ requests
    def register(self, worker_id: str, num_samples: int, n_features: int, n_classes: int) -> int:
        """Admit a worker; returns its index. The model's shape is the server's (``task_shape``);
        without one, the first registration fixes it, within ``max_dim`` parameters. Only the
        configured ``worker_ids`` (when given) take slots; nothing is allocated for a refused one."""
        return self.register_worker(worker_id, num_samples, n_features, n_classes).index

    def register_worker(self, worker_id: str, num_samples: int, n_features: int, n_classes: int) -> Registered:
        """:meth:`register`, with what a rejoining worker is handed back (:class:`Rejoin`)."""
        self._check_id(worker_id)
        if num_samples < 1 or n_features < 1 or n_classes == 1 or n_classes < 0:
            raise InvalidArgument(
                "registration needs num_samples >= 1, n_features >= 1, n_classes >= 2 (or 0 for regression)"
            )
        s = self.state
        with self._cond:
            if worker_id in s.workers and s.phase == "training":
                w = s.workers[worker_id]
                return Registered(self._rejoin(w, num_samples, (n_features, n_classes)), self._rejoin_info(w))
            if worker_id in s.workers:
                raise AlreadyExists(f"worker {worker_id!r} is already registered")
            if s.phase == "training":
                n = self.config.num_workers
                raise ResourceExhausted(f"registration is closed: all {n} worker slots are taken (--workers {n})")
            if s.phase != "registering":
                raise FailedPrecondition(f"registration is closed (server is {s.phase})")
            shape = (n_features, n_classes)
            if s.task_shape is None:
                try:
                    self._init_model(shape)
                except EngineError as exc:
                    self._refuse(worker_id, str(exc))
                    raise
            elif shape != s.task_shape:
                why = (
                    f"worker {worker_id!r} refused: its data has {shape[0]} features / {shape[1]} classes; "
                    f"the run has {s.task_shape[0]} / {s.task_shape[1]}"
                )
                self._refuse(worker_id, why)
                raise InvalidArgument(why)
            index = len(s.workers)
            s.workers[worker_id] = WorkerState(worker_id, index, num_samples)
            log.info("registered %s as worker %d (%d samples)", worker_id, index, num_samples)
            if len(s.workers) == self.config.num_workers:
                for slot, ws in enumerate(sorted(s.workers.values(), key=lambda x: natural_key(x.worker_id))):
                    ws.slot = slot
                s.phase = "training"
            self._wake()
            return Registered(index)

    def _rejoin(self, w: WorkerState, num_samples: int, shape: tuple[int, int]) -> int:
        """A registered worker registers again while training (it restarted): it keeps its index
        and slot, and its first model is a snapshot (it holds no replica). Its stored
        contribution stands until it reports again, as if it had skipped. Lock held.

        Accumulating algorithms (LAQ, SLAQ, EF21, RIAG, CIAG): the worker's own state (its last
        quantized gradient, its EF21 estimate, ...) is part of the server's running sum, so it is
        handed its row of the sum back (:meth:`_rejoin_info`) and rebuilds its state from it
        (``Algorithm.rejoin``). Refused (FAILED_PRECONDITION) when the server keeps no rows
        (``keep_rows`` off: O(d) memory, no checkpoint). Refused (INVALID_ARGUMENT) with other data
        than before.
        Who may register as whom is not checked here (no credentials yet)."""
        s = self.state
        if shape != s.task_shape or num_samples != w.num_samples:
            raise InvalidArgument(
                f"worker {w.worker_id!r} rejoins with {num_samples} samples of {shape[0]} features / {shape[1]} "
                f"classes; it registered with {w.num_samples} of {s.task_shape[0]} / {s.task_shape[1]}"
            )
        if s.aggregator.absorb == "accumulate" and s.aggregator.rows is None:
            raise FailedPrecondition(
                f"worker {w.worker_id!r} cannot rejoin a {self.config.algorithm} run: its lost state is part of "
                "the server's running sum (accumulating rule) and the server keeps no per-worker sums to hand "
                "back (start the server with --checkpoint-dir to keep them)"
            )
        w.responsive, w.misses, w.gone = True, 0, ""
        s.rejoins += 1
        log.warning("worker %s rejoined as %d (round %d); it gets a snapshot", w.worker_id, w.index, s.round)
        self._wake()
        return w.index

    def _check_id(self, worker_id: str) -> None:
        """A worker id the run may take: not empty, at most ``max_id_bytes``, one of ``worker_ids``."""
        if not worker_id:
            raise InvalidArgument("worker_id must not be empty")
        size, top = len(worker_id.encode()), self.config.max_id_bytes
        if size > top:
            raise ResourceExhausted(f"worker id of {size} bytes exceeds the limit of {top} bytes (--max-id-bytes)")
        if self._allowed and worker_id not in self._allowed:
            raise PermissionDenied(f"worker id {worker_id!r} is not one of this run's ids (start-server --worker-ids)")

    def _refuse(self, worker_id: str, why: str) -> None:
        """Log a refused registration and keep it (the first few) for the run's error message."""
        log.warning("registration refused: %s", why)
        if worker_id in self.refused or len(self.refused) < _REFUSED_KEPT:
            self.refused[worker_id] = why

    def _rejoin_info(self, w: WorkerState) -> Rejoin:
        """The round a rejoining worker joins at and, for accumulating rules, its row of the sum
        (including an upload of this round not absorbed yet: it will be). Lock held."""
        agg = self.state.aggregator
        if agg.rows is None:
            return Rejoin(self.state.round)
        row = agg.contribution(w.slot)
        held = self._open.uploads.get(w.slot)
        if held is not None:
            add_payload(row, held)
        return Rejoin(self.state.round, row)

    def _init_model(self, shape: tuple[int, int], bounded: bool = True) -> None:
        """Make the model for ``shape``. ``bounded`` (a shape a registration brings): refuse
        (RESOURCE_EXHAUSTED) one of more than ``max_dim`` parameters before allocating it, the shape
        first (F x C), then the task's own size."""
        cfg, s = self.config, self.state
        top = cfg.max_dim if bounded else math.inf
        if shape[0] * max(shape[1], 1) > top:
            raise ResourceExhausted(
                f"a model for {shape[0]} features x {shape[1]} classes exceeds the limit of {top} parameters "
                "(--max-dim)"
            )
        try:
            task = make_task(cfg.task, *shape, **cfg.task_options)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if task.dim > top:
            raise ResourceExhausted(
                f"the {cfg.task} model for {shape[0]} features x {shape[1]} classes has {task.dim} parameters, "
                f"more than the limit of {top} (--max-dim)"
            )
        s.task_shape = shape
        s.theta = task.init_params(np.random.default_rng(cfg.seed)).astype(np.float64)
        s.aggregator = make_aggregator(
            parse_aggregate(cfg.aggregate), cfg.num_workers, s.theta.size, self.algorithm.absorb, self.keep_rows
        )
        s.opt_state = self.opt.init(s.theta.size)
        if self._down is not None:
            s.shared_model = s.theta.copy()  # w^{-1} = theta^0: every worker starts from it (a snapshot)
        if self.algorithm.tracks_theta_hat:
            s.theta_hat = np.repeat(s.theta[None, :], cfg.num_workers, axis=0)

    def wait_model(self, worker_id: str, round_: int, timeout: float, replica_round: int | None = None) -> Any:
        """Long poll: the (encoded) broadcast of the first round >= ``round_``. While the downlink
        sends updates, a worker whose replica is not of the previous round (``replica_round``; None:
        it holds none) gets a snapshot instead."""
        return self.serve(worker_id, round_, timeout, replica_round).data

    def serve(
        self, worker_id: str, round_: int, timeout: float, replica_round: int | None = None, count: bool = True
    ) -> Served:
        """:meth:`wait_model`, saying what was served: a transport that keeps one stream per worker
        learns the worker's replica round from it (``form`` dense: none; else ``round``). ``count``
        False: the bytes are not booked to the worker's downlink (a broadcast that several workers
        of one host share is booked once, :meth:`count_down`)."""
        s = self.state
        with self._cond:
            w = self.worker(worker_id)
            self._ready.add(w.worker_id)
            self._cond.notify_all()
            if s.phase in ("training", "registering") and round_ > s.round + 1 and s.round >= 0:
                raise OutOfRange(f"round {round_} is ahead of the server (round {s.round})")
            ready = self._published.wait_for(  # a restored engine has no open round until the next one is published
                lambda: s.phase in ("done", "failed") or (s.round >= round_ and self._open.broadcast is not None),
                timeout=timeout,
            )
            if s.phase == "failed":
                raise RunAborted(f"run failed: {s.error}")
            if not ready:
                raise NotReady(f"round {round_} not started yet")
            data = self._open.encoded
            b = self._open.broadcast
            form = b.form
            if form in ("update", "compressed") and replica_round != b.round - 1:
                data, form = self._snapshot(), "snapshot"
                self._open.snapshots += 1
            if s.phase == "done":
                self._done_served.add(w.worker_id)
                self._cond.notify_all()
            elif count:
                self._open.down[w.slot] = self._open.down.get(w.slot, 0) + _size(data)
            return Served(data, b.round, form, b.done)

    def count_down(self, worker_id: str, round_: int, nbytes: int) -> None:
        """Book ``nbytes`` sent down in round ``round_`` to ``worker_id`` (while that round is open)."""
        with self._cond:
            b = self._open.broadcast
            if self.state.phase == "training" and b is not None and b.round == round_:
                slot = self.worker(worker_id).slot
                self._open.down[slot] = self._open.down.get(slot, 0) + nbytes

    def connected(self, worker_id: str) -> int:
        """A worker opened its one connection (a Rounds stream): it is live again; returns the
        connection's number, for :meth:`disconnected`. ``NotFound`` for an unknown worker."""
        with self._cond:
            w = self.worker(worker_id)
            token = self._connections.get(worker_id, 0) + 1
            self._connections[worker_id] = token
            w.responsive, w.misses, w.gone = True, 0, ""
            self._cond.notify_all()
            return token

    def disconnected(self, worker_id: str, token: int, why: str) -> None:
        """Connection ``token`` of a worker ended (``why``): unless the worker has connected again
        since, or the run is over, it is not waited for from now on (no deadline to wait out)."""
        with self._cond:
            w = self.state.workers.get(worker_id)
            if w is None or self._connections.get(worker_id) != token or self.state.phase in ("done", "failed"):
                return
            if w.responsive:
                w.responsive, w.gone = False, why
                log.warning("worker %s: %s (round %d); no longer waiting for it", worker_id, why, self.state.round)
            self._cond.notify_all()

    def _check_round(self, w: WorkerState, round_: int) -> None:
        s = self.state
        if s.phase != "training":
            raise FailedPrecondition(f"not accepting reports: server is {s.phase}")
        if round_ != s.round or self._open.broadcast is None or self._open.broadcast.round != round_:
            if round_ < s.round and not w.responsive:
                # a report too late is still a sign of life: wait for this worker again from the next
                # round on (else a worker that is no longer waited for, its reports always arriving
                # after the others', could never catch up); it is not absorbed
                w.responsive, w.misses, w.gone = True, 0, ""
                log.warning("worker %s is back (a late report for round %d); waiting for it again", w.worker_id, round_)
                self._cond.notify_all()
            raise FailedPrecondition(f"round {round_} is not open (current round {s.round})")
        if w.slot in self._open.reports:
            raise AlreadyExists(f"worker {w.worker_id!r} already reported for round {round_}")

    def _accept(self, w: WorkerState, report: Report) -> None:
        report.latency = time.monotonic() - self._open.started
        self._open.reports[w.slot] = report
        w.responsive, w.misses, w.gone = True, 0, ""
        self._cond.notify_all()

    def push(
        self,
        worker_id: str,
        round_: int,
        payload: Payload,
        loss: float | None = None,
        smoothness: float | None = None,
        nbytes: int = 0,
    ) -> None:
        """Absorb one upload (a decoded, validated payload of this run's dimension). The engine keeps
        ``payload`` as it is (its arrays must not change afterwards) until it is absorbed: in slot
        order, as soon as every lower slot has reported (at the latest when the round closes).

        Hostile uploads (README, "Hostile uploads"): a value beyond ``finfo(broadcast_dtype).max /
        num_workers`` is refused here (INVALID_ARGUMENT); an upload that would take the aggregate
        past the dtype's max is rejected when absorbed (its report becomes ``rejected``; this call
        fails with INVALID_ARGUMENT when it is the one that absorbs it). ``clip_norm`` > 0 scales the
        upload to that L2 norm at most (meant for gradient uploads; for accumulating rules it clips
        the innovation, which changes the algorithm)."""
        dim = self.dim_for(worker_id)
        if payload.dim != dim:  # absorbed later, maybe in another worker's call: refuse it now
            raise InvalidArgument(f"payload of dimension {payload.dim}, the model has {dim}")
        if smoothness is not None and not (math.isfinite(smoothness) and smoothness >= 0):
            raise InvalidArgument("smoothness must be finite and >= 0")
        if payload.kind not in self.algorithm.payload_kinds:
            raise InvalidArgument(f"{self.config.algorithm} does not take {payload.kind} payloads")
        peak = self._check_range(payload)  # outside the lock: O(d)
        bits = payload_bits(payload)  # as sent
        if self.config.clip_norm > 0:
            payload = clip(payload, self.config.clip_norm)
            peak = payload_peak(payload)
        payload = compact(payload)  # held as received, integer arrays narrowed (outside the lock)
        # the secant estimate of L_m needs the gradient dense: decoded outside the lock, O(d)
        vector = to_dense(payload) if self.algorithm.tracks_theta_hat else None
        s = self.state
        with self._cond:
            w = self.worker(worker_id)
            self._check_round(w, round_)
            if self._open.selected is not None and w.slot not in self._open.selected:
                raise FailedPrecondition(f"worker {w.worker_id!r} is not selected in round {round_}")
            if smoothness is not None:
                w.smoothness = max(w.smoothness, smoothness)
            if s.theta_hat is not None:
                self._estimate_smoothness(w, vector)
            self._open.uploads[w.slot] = payload
            self._open.peaks[w.slot] = peak
            self._accept(w, Report("upload", payload.kind, bits, nbytes, loss))
            self._absorb_reported()
            if w.slot in self._open.rejected:  # absorbed (and refused) in this call: the worker is told
                raise InvalidArgument(self._open.rejected[w.slot])

    def _value_limit(self) -> tuple[float, str]:
        """The largest magnitude an upload's value may have, and why: the model's dtype must hold the
        sum of every worker's value (``finfo(broadcast_dtype).max / num_workers``)."""
        dtype, m, top = np.dtype(self.config.broadcast_dtype), self.config.num_workers, self._dtype_max
        return top / m, f"{dtype.name} max {top:.4g} / {m} workers"

    def _check_range(self, payload: Payload) -> float:
        """INVALID_ARGUMENT for an upload with a value the model's dtype could not hold (finite
        values of 1e300 in FLOAT64, or float32 values near its max that sum past it)."""
        limit, why = self._value_limit()
        peak = payload_peak(payload)
        if not math.isfinite(peak):  # NaN propagates to the peak, an infinity is one
            raise InvalidArgument("upload: the payload contains NaN or Inf")
        if not peak <= limit:
            raise InvalidArgument(
                f"upload value of magnitude {peak:.4g} exceeds the limit {limit:.4g} ({why}): the model cannot hold it"
            )
        return peak

    def skip(self, worker_id: str, round_: int, reason: str, loss: float | None = None, nbytes: int = 0) -> None:
        """Record a skip notice: the worker's stored contribution stands in for it."""
        if reason not in SKIP_REASONS:
            raise InvalidArgument(f"skip notice: invalid reason {reason!r}")
        with self._cond:
            w = self.worker(worker_id)
            self._check_round(w, round_)
            self._accept(w, Report(reason, nbytes=nbytes, loss=loss))
            self._absorb_reported()

    def _absorb_reported(self) -> None:
        """Absorb the round's uploads in slot order (a fixed summation order: same seed, same bits),
        each as soon as every lower slot has reported, so at most the uploads waiting behind a slot
        that has not reported yet are held. Call with the lock held."""
        o, s = self._open, self.state
        agg = s.aggregator
        while o.absorbed in o.reports:
            upload = o.uploads.pop(o.absorbed, None)
            if upload is not None and self._updates_possible and o.before is None:
                o.before = agg.total.copy()  # to find what changed (the downlink's exact update)
            if upload is not None:
                try:
                    # refused whole, or absorbed
                    agg.add(o.absorbed, upload, self._dtype_max, o.peaks.pop(o.absorbed, None))
                except Overflow as exc:
                    self._reject(o.absorbed, str(exc))
                    upload = None
                else:
                    w = self._worker_at(o.absorbed)
                    w.last_upload = s.round
                    if s.theta_hat is not None:
                        s.theta_hat[w.slot] = s.theta  # theta is the round's until the close
            if upload is not None and self._updates_possible:
                if o.relayed is not None and agg.absorb == "accumulate":
                    # kept for relaying while that could be the cheapest update (below the aggregate's 8d)
                    o.relay_bytes += o.reports[o.absorbed].nbytes
                    o.relay_memory += payload_nbytes(upload)
                    o.relayed.append((o.absorbed, upload))
                    if max(o.relay_bytes, o.relay_memory) > 8 * agg.total.size:
                        o.relayed = None
            o.absorbed += 1

    def _reject(self, slot: int, why: str) -> None:
        """An upload that would make the aggregate overflow the model's dtype: not absorbed; its
        report becomes ``rejected`` and the worker's stored contribution stands, as for a skip."""
        w = self._worker_at(slot)
        msg = f"upload of worker {w.worker_id!r} in round {self.state.round} rejected: {why} (the model's dtype max)"
        log.warning("%s", msg)
        self._open.reports[slot].status = "rejected"
        self._open.rejected[slot] = msg

    # ------------------------------------------------------------------ rounds
    def _publish(self, round_: int, done: bool = False) -> None:
        """Open round ``round_`` (or the final broadcast). Call with the lock held."""
        s = self.state
        selected = None if done else self._select(round_)
        by_slot = {w.slot: w.index for w in s.workers.values()}
        if not done:  # the final broadcast keeps the form, so replicas end exactly on the final model
            s.downlink = self._choose_downlink(round_)
        common = dict(
            round=round_,
            total_samples=sum(w.num_samples for w in s.workers.values()),
            num_workers=len(s.workers),
            done=done,
            selected=None if selected is None else tuple(sorted(by_slot[m] for m in selected)),  # wire: indices
        )
        if self._down is not None and not done:
            s.downlink = "compressed"
            step = self._down.compress(s.shared_model, s.theta, s.rng)
            self._down.apply(s.shared_model, step)
            broadcast = Broadcast(
                form="compressed",
                step=step,
                recent_step_sq=s.history.recent(),
                digest=state_digest(s.shared_model, _EMPTY),
                zstd=self.config.zstd,
                **common,
            )
        elif s.downlink == "replica" and not (done and self._down is not None):
            if s.change is None:  # the last round went dense: every worker gets a snapshot; exact all the same
                s.change = AggregateChange("aggregate", dim=s.theta.size, values=s.aggregator.total.copy())
            broadcast = Broadcast(
                form="update", change=s.change, digest=state_digest(s.theta, s.aggregator.total, s.opt_state),
                zstd=self.config.zstd, **common,
            )  # fmt: skip
        else:
            broadcast = Broadcast(
                params=s.theta.astype(self.config.broadcast_dtype), recent_step_sq=s.history.recent(), **common
            )
        self._open = _OpenRound(broadcast, self._encode(broadcast), selected, started=time.monotonic())
        s.round = round_
        self._wake()

    def _snapshot(self) -> Any:
        """This round's whole replicated state, encoded once per round when first asked for. Lock held."""
        if self._open.snapshot is None:
            s, b = self.state, self._open.broadcast
            compressed = b.form == "compressed"  # the replica is w alone
            # the aggregate as the round opened: uploads absorbed since then belong to the next update
            total = s.aggregator.total if self._open.before is None else self._open.before
            snap = replace(
                b,
                form="snapshot",
                change=None,
                step=None,
                theta=s.shared_model if compressed else s.theta,
                total=None if compressed else total,
                opt_state=None if compressed else s.opt_state,  # changes only at a close, as theta does
                recent_step_sq=s.history.recent(),
            )
            self._open.snapshot = self._encode(snap)
        return self._open.snapshot

    def _choose_downlink(self, round_: int) -> str:
        """``dense`` or ``replica`` for this round. ``auto``: replicas from round 0 (a snapshot for
        everyone) while the recent updates (mean of the last ``COST_WINDOW`` rounds' cheapest exact
        form, in bytes) cost less than a dense broadcast, judged on a full window unless two rounds
        cost twice as much; from dense, switch back once the window's updates plus a snapshot (16 bytes
        per parameter) cost less than the window's dense broadcasts. So gd, whose aggregate changes
        densely every round, goes dense after round 1, and a lazy rule whose first rounds upload
        much stays on updates instead of paying a snapshot to come back."""
        s, mode = self.state, self.config.downlink
        if self.algorithm.needs_aggregate:  # FedAvg-M, SCAFFOLD: workers need the exact aggregate
            return "replica"
        if mode != "auto":
            return "replica" if mode == "replica" else "dense"
        if not s.update_costs:  # round 0: nobody holds a replica, so replicas start from a snapshot
            return "replica" if self._updates_possible else "dense"
        dense = s.theta.size * np.dtype(self.config.broadcast_dtype).itemsize
        mean = sum(s.update_costs) / len(s.update_costs)
        if s.downlink == "replica":
            # leaving costs a snapshot to come back: leave on a full window's evidence, or after two
            # rounds that cost twice a dense broadcast on average (gd: every coordinate changes, 8
            # bytes each; not LAQ, whose round 0 has every worker upload and whose next rounds skip)
            n = len(s.update_costs)
            leave = mean > dense and (n == COST_WINDOW or (n >= 2 and mean >= 2 * dense))
            return "dense" if leave else "replica"
        window = COST_WINDOW
        return "replica" if mean * window + 16 * s.theta.size < dense * window else "dense"

    def _record_change(self, before: np.ndarray | None, ordered: list[WorkerState]) -> None:
        """The cheapest exact form of how the aggregate changed at this close, and its cost."""
        s, d = self.state, self.state.theta.size
        if before is None:
            s.change = AggregateChange(dim=d)
            s.update_costs.append(0)
            return
        # the costs first, then only the cheapest form is made (the first of equal costs, as before): a
        # dense change's "values" would be d indices and a gather of d values, 16d bytes made for nothing
        candidates: list[tuple[int, str]] = []
        relayed = self._open.relayed
        if s.aggregator.absorb == "accumulate" and relayed is not None:
            candidates.append((self._open.relay_bytes, "relay"))
        total = s.aggregator.total
        # the changed coordinates are found in the costing pass while few enough for "values" to be
        # clearly cheapest (d/32 of them: under a twentieth of "aggregate"'s 8d bytes); past that only
        # counted, and found again in the rare case that "values" still wins
        n, idx = changed(before, total, d // 32)
        values_cost = 8 * n + packed_size(n, index_width(d))
        candidates.append((values_cost, "values"))
        if values_cost > 8 * d:
            candidates.append((8 * d, "aggregate"))
        cost, kind = min(candidates, key=lambda c: c[0])
        s.update_costs.append(cost)
        if self._open.broadcast is not None and self._open.broadcast.form == "dense":
            # nobody holds a replica of a round broadcast dense (a worker drops its replica on a dense
            # model), so the next round's update would go to no one: not made (:meth:`_publish`)
            s.change = None
        elif kind == "relay":
            by_slot = {w.slot: w for w in ordered}
            s.change = AggregateChange(
                "relay",
                dim=d,
                payloads=tuple(p for _, p in relayed),
                workers=tuple(by_slot[m].index for m, _ in relayed),
            )
        elif kind == "values":
            idx = changed_indices(before, total) if idx is None else idx
            s.change = AggregateChange("values", dim=d, indices=idx, values=total[idx].copy())
        else:
            s.change = AggregateChange("aggregate", dim=d, values=total.copy())

    def _estimate_smoothness(self, w: WorkerState, vector: np.ndarray) -> None:
        """Secant estimate of L_m from two uploads of full gradients at different iterates:
        ``||g_m(theta^k) - g_m(theta_hat)|| / ||theta^k - theta_hat||``, keeping the largest seen
        (for server-side selection; workers also report an upper bound with their first upload).
        ``g_m(theta_hat)`` is the worker's stored upload, decoded (dense float32 as sent: exact)."""
        s = self.state
        if s.aggregator.absorb != "replace" or w.last_upload < 0:
            return
        dtheta = float(np.linalg.norm(s.theta - s.theta_hat[w.slot]))
        if dtheta > 0:
            dgrad = float(np.linalg.norm(vector - s.aggregator.contribution(w.slot)))
            w.smoothness = max(w.smoothness, dgrad / dtheta)

    def _select(self, round_: int) -> frozenset[int] | None:
        """Server-side worker selection, for algorithms that have it (RIAG, CIAG, LAG-PS)."""
        if not self.algorithm.selects:
            return None
        s = self.state
        workers = self._ordered()
        view = SelectionView(
            round=round_,
            theta=s.theta,
            theta_hat=s.theta_hat,
            smoothness=tuple(w.smoothness for w in workers),
            staleness=tuple(round_ - w.last_upload - 1 if w.last_upload >= 0 else round_ for w in workers),
            recent_step_sq=s.history.recent(),
        )
        return frozenset(self.algorithm.select(view, s.rng))

    def _worker_at(self, slot: int) -> WorkerState:
        if self._open.by_slot is None:  # once a round, not a scan of the workers per upload
            self._open.by_slot = {w.slot: w for w in self.state.workers.values()}
        return self._open.by_slot[slot]

    def _ordered(self) -> list[WorkerState]:
        return sorted(self.state.workers.values(), key=lambda w: w.slot)

    def _wake(self) -> None:
        """Wake every waiter: those of :attr:`_cond` and the workers waiting for a broadcast. Lock held."""
        self._cond.notify_all()
        self._published.notify_all()

    def _all_reported(self) -> bool:
        o = self._open
        w = o.waiting_for  # a live worker that had not reported at the last look: O(1) while it still has not
        if w is not None and w.responsive and w.slot not in o.reports:
            return False
        waiting = [w for w in self.state.workers.values() if w.responsive]
        late = [w for w in waiting if w.slot not in o.reports]
        o.waiting_for = late[-1] if late else None
        return bool(waiting) and not late

    def _short(self) -> bool:
        """Fewer live (responsive) workers than ``min_workers``."""
        need = self.config.min_workers
        for w in self.state.workers.values():  # stops at the min_workers-th live one, not O(M) every wake-up
            need -= w.responsive
            if need <= 0:
                return False
        return need > 0

    def _wait_round(self, k: int) -> None:
        """Wait until every live worker has reported round ``k`` or its deadline has passed; below
        ``min_workers`` live workers, wait for rejoins first (:meth:`_await_quorum`), after which the
        round gets a whole deadline again. Lock held."""
        cfg, s = self.config, self.state
        deadline = time.monotonic() + cfg.round_timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            self._cond.wait_for(lambda: self._all_reported() or s.phase == "failed" or self._short(), timeout=left)
            if s.phase == "failed" or self._all_reported() or not self._short():
                return
            self._await_quorum(k)
            deadline = max(deadline, time.monotonic() + cfg.round_timeout)

    def _await_quorum(self, k: int) -> None:
        """Below ``min_workers`` live workers: wait up to ``quorum_wait`` seconds for enough to come
        back (rejoin, reconnect or report), else fail the run naming who is gone. Lock held."""
        cfg, s = self.config, self.state
        wait = 2 * cfg.round_timeout if cfg.quorum_wait is None else cfg.quorum_wait
        log.warning("round %d: fewer than %d live workers; waiting up to %g s for rejoins", k, cfg.min_workers, wait)
        if self._cond.wait_for(lambda: not self._short() or s.phase == "failed", timeout=wait):
            return
        live = sum(w.responsive for w in s.workers.values())
        gone = ", ".join(f"{w.worker_id} ({w.gone or 'not responding'})" for w in self._ordered() if not w.responsive)
        s.phase = "failed"
        s.error = (
            f"round {k}: only {live} of {len(s.workers)} workers are live, below --min-workers {cfg.min_workers}, "
            f"after waiting {wait:g} s (--quorum-wait) for rejoins; gone: {gone}"
        )
        log.error("%s", s.error)
        self._wake()

    def _raise_if_failed(self) -> None:
        if self.state.phase == "failed":
            raise RuntimeError(self.state.error)

    def run(self) -> dict[str, Any]:
        """Wait for registration, train ``rounds`` rounds, return the summary.

        Raises ``RuntimeError`` when registration does not complete or the run is failed."""
        cfg, s = self.config, self.state
        with self._cond:
            if not self._cond.wait_for(lambda: s.phase != "registering", timeout=cfg.register_timeout):
                refused = "".join(f"; {why}" for why in self.refused.values())
                s.phase, s.error = (
                    "failed",
                    f"only {len(s.workers)} of {cfg.num_workers} workers registered within {cfg.register_timeout:g} s"
                    f"{refused}",
                )
                self._wake()
            self._raise_if_failed()
            # round 0's deadline starts once every worker has asked for the model, i.e. has finished
            # its start-up, so a slow start is not mistaken for a missed round (bounded wait); after
            # a resume the workers have to come back first: as long as registration would wait
            self._cond.wait_for(
                lambda: len(self._ready) >= len(s.workers) or s.phase == "failed",
                timeout=cfg.register_timeout if self.resumed else cfg.start_timeout,
            )
            first = s.round + 1  # 0, or the round after a restored checkpoint's
        started = time.monotonic() - s.totals.elapsed  # a resumed run goes on from its training time
        last = cfg.rounds
        for k in range(first, cfg.rounds):
            with self._cond:
                self._publish(k)
                self._wait_round(k)
                self._raise_if_failed()
                record = self._close_round(k, started)
                s.records.append(record)  # a bounded tail (config.record_tail): records stream to the sink
                s.totals.add(record)
            if self._sink is not None:
                t0 = time.monotonic()
                self._sink.round_closed(record, s.theta, k == cfg.rounds - 1)
                started += time.monotonic() - t0  # evaluation and logging are not training time
            if self.stopped_by is not None:  # a stopping rule was met in this round (the sink asked)
                last = k + 1
                break
        with self._cond:
            s.phase = "done"
            self._publish(last, done=True)
            # serve the final model to every worker before summing up
            responsive = {w.worker_id for w in s.workers.values() if w.responsive}
            self._cond.wait_for(lambda: responsive <= self._done_served, timeout=cfg.done_grace)
        return self.summary()

    def _close_round(self, k: int, started: float) -> dict[str, Any]:
        s, now = self.state, time.monotonic()
        reports = self._open.reports
        ordered = self._ordered()
        for w in ordered:
            if w.slot not in reports:
                reports[w.slot] = Report("deadline")
                w.misses += 1
                if w.misses >= self.config.max_misses and w.responsive:
                    w.responsive, w.gone = False, f"missed {w.misses} deadlines in a row"
                    log.warning("worker %s missed %d deadlines; no longer waiting for it", w.worker_id, w.misses)
        self._absorb_reported()  # every slot has reported now: the rest, in slot order
        if self.algorithm.round_only:  # the aggregate is this round's uploads alone (client sampling)
            if self._open.before is None and self._updates_possible:
                self._open.before = s.aggregator.total.copy()
            for w in ordered:
                if reports[w.slot].status != "upload":
                    s.aggregator.forget(w.slot)
        s.aggregator.settle()  # a robust rule (--aggregate) computes the round's aggregate now
        self._record_change(self._open.before, ordered)
        self._open.before = self._open.relayed = None
        step_sq, s.opt_state = take_step(s.theta, s.aggregator.total, self.opt, s.opt_state)  # what every replica does
        self._check_model(k)
        s.history.push(step_sq)
        got = [reports[w.slot] for w in ordered]
        losses = [r.loss for r in got if r.loss is not None]
        return {
            "round": k,
            "uploads": sum(r.status == "upload" for r in got),
            "skips": sum(r.status in SKIP_REASONS for r in got),
            "deadline_misses": sum(r.status == "deadline" for r in got),
            "rejected": sum(r.status == "rejected" for r in got),
            "payload_bits": sum(r.bits for r in got),
            "bytes_up": sum(r.nbytes for r in got),
            "bytes_down": sum(self._open.down.values()),
            "downlink": self._open.broadcast.form,
            "snapshots": self._open.snapshots,
            "loss": math.fsum(losses) if len(losses) == len(got) else None,
            "aggregate_norm": float(np.linalg.norm(s.aggregator.total)),
            "step_sq": step_sq,
            "round_time": now - self._open.started,
            "slowest_wait": max((r.latency for r in got if r.latency is not None), default=None),
            "elapsed": now - started,
            "workers": [
                {"id": w.worker_id, "status": r.status, "bits": r.bits, "bytes": r.nbytes, "latency": r.latency}
                for w, r in zip(ordered, got, strict=True)
            ],
        }

    def _check_model(self, k: int) -> None:
        """The last line of defence: a model the broadcast dtype cannot hold is never published.
        Every upload was range-checked and the aggregate is kept within the dtype's max, so only a
        run whose steps add up past it (or a server optimizer's state gone bad) gets here; the run
        fails with the reason (every waiting call gets ABORTED). Lock held; O(d) time, no copy."""
        s = self.state
        top = self._dtype_max
        if not peak_abs(s.theta) <= top:  # NaN fails too
            s.phase = "failed"
            s.error = (
                f"round {k}: the model left the {self.config.broadcast_dtype} range (|theta| > {top:.4g} or NaN); "
                "it is not published"
            )
            self._wake()
            raise RuntimeError(s.error)

    def summary(self) -> dict[str, Any]:
        """Totals over the rounds so far (the transport adds the bytes it counted)."""
        t, cfg = self.state.totals, self.config
        return {
            "algorithm": cfg.algorithm,
            "compressor": self.algorithm.compressor_name,
            "options": dict(cfg.options),
            "server_opt": cfg.server_opt,
            "zstd": cfg.zstd,
            "workers": cfg.num_workers,
            "dim": self.dim,
            "rounds": t.rounds,
            "uploads": t.uploads,
            "skips": t.skips,
            "deadline_misses": t.deadline_misses,
            "rejoins": self.state.rejoins,
            "payload_bits": t.payload_bits,
            "upload_bytes": t.bytes_up,
            "last_round_loss": t.last_loss,
            "wall_time": t.elapsed,
        }

    def with_state(self, fn: Callable[[EngineState], Any]) -> Any:
        """``fn(state)`` with the lock held (a checkpoint reads the state whole, between two rounds)."""
        with self._cond:
            return fn(self.state)

    @property
    def round_open(self) -> bool:
        """A round is being trained (published and not closed), so a stop can wait for its close."""
        with self._cond:
            return self.state.phase == "training" and self._open.broadcast is not None

    def restore(self, state: EngineState) -> None:
        """Continue from a saved state (:mod:`psrv.checkpoint`): a run between two rounds, whose
        workers are known. Registration is skipped; :meth:`run` waits (``register_timeout``) for the
        workers to come back -- each registers again and rejoins (:meth:`_rejoin`) -- and goes on at
        the round after ``state.round``. Call before :meth:`run`, with no request served yet."""
        if state.phase != "training" or state.theta is None or state.aggregator is None:
            raise ValueError(f"a checkpoint of a {state.phase} run cannot be resumed")
        if state.aggregator.absorb != self.algorithm.absorb:
            raise ValueError(f"the checkpoint's aggregate is {state.aggregator.absorb}, {self.config.algorithm} needs "
                             f"{self.algorithm.absorb}")  # fmt: skip
        with self._cond:
            self.state = state
            self.resumed = True
            self._open = _OpenRound()  # no round open: reports for state.round are refused
            self._wake()

    def wait_registered(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` workers have registered (False on timeout)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.state.workers) >= count, timeout=timeout)

    def stop_after_round(self, reason: str) -> None:
        """End the job cleanly after the round being closed (called from the sink's ``round_closed``):
        the final model is served as after the last round and the workers exit 0. ``reason`` (e.g.
        "loss_residual") is kept in :attr:`stopped_by`."""
        self.stopped_by = reason

    def fail(self, reason: str) -> None:
        """Abort the run: waiting requests and the round loop give up with ``reason``."""
        with self._cond:
            self.state.phase, self.state.error = "failed", reason
            self._wake()


def _size(encoded: Any) -> int:
    try:
        return len(encoded)
    except TypeError:
        return 0

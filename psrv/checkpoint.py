"""Checkpoint and resume: the server's whole state between two rounds, saved to one file and
restored bit for bit (``psrv start-server --checkpoint-dir DIR --checkpoint-every N``, ``--resume DIR``).

What is saved (everything :class:`psrv.engine.EngineState` holds, and what the transport adds):
the model theta, the round, the task shape, the aggregate and the stored per-worker contributions
(replace rules: each worker's last upload as it arrived; accumulating rules: each worker's row of
the running sum, which is why a checkpointing server keeps rows, :mod:`psrv.aggregate`), every
worker's registration and clocks (:class:`psrv.engine.WorkerState`: index, slot, samples, misses,
responsive, last upload, smoothness), LAG-PS's last-upload iterates, the server optimizer's state,
the step-norm history, the engine's random generator (its bit generator's state), the downlink's
state (form, recent update costs, EF21-P's shared model), the summary's running totals and the
tail of round records kept in memory, the byte counters, the number of whole lines in the metrics
file, and the run's
:class:`~psrv.engine.ServerConfig` (a resume with another job is refused).

Format: ``DIR/checkpoint.npz``, an uncompressed numpy ``.npz`` (a zip with a CRC per member) of
plain arrays, with everything that is not an array as one JSON document in its ``meta`` member
(``format``, ``version``); read with ``allow_pickle=False``, so no object is ever unpickled. Written
whole or not at all (:func:`psrv.files.atomic_write_bytes`: temp file, fsync, rename), so a crash
while saving leaves the previous checkpoint. A missing, truncated, corrupt or mismatched file is a
:class:`CheckpointError` with a one-line message.

What a resume does not restore exactly: the change of the aggregate at the last close (the next
round's update for workers holding a replica) is restored as the whole aggregate, which is the
same update in another form; and no worker holds a replica after a restart, so all get a snapshot.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from psrv.engine import COST_WINDOW, EngineState, RoundEngine, RunTotals, ServerConfig, WorkerState
from psrv.files import atomic_write_bytes
from psrv.metrics import ByteCounter
from psrv.payload import Payload
from psrv.replica import AggregateChange
from psrv.robust import make_aggregator, parse_aggregate
from psrv.server_opt import OptState
from psrv.triggers import StepHistory

__all__ = ["FILE", "MAY_CHANGE", "Checkpoint", "CheckpointError", "Checkpointer", "capture", "load", "save"]

FORMAT = "psrv-checkpoint"
VERSION = 1
FILE = "checkpoint.npz"
#: ServerConfig fields a resumed run may set otherwise (how long to wait, how long to train); the
#: others define the training and must match the checkpoint's
MAY_CHANGE = ("rounds", "round_timeout", "register_timeout", "max_misses", "done_grace", "start_timeout")
_PAYLOAD_ARRAYS = ("values", "indices", "codes", "signs")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit this run (one-line message)."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the engine's state and what the transport and the metrics file need."""

    state: EngineState
    config: dict[str, Any]
    counter: list[list[Any]]  # [direction, method, bytes, messages]
    metrics_lines: int | None  # whole lines of the metrics file (None: the run wrote none)
    every: int
    path: Path

    def restore_counter(self, counter: ByteCounter) -> None:
        counter.restore(self.counter)


# ------------------------------------------------------------------------------------ save
def capture(
    s: EngineState, config: ServerConfig, counter: ByteCounter | None, metrics_lines: int | None, every: int
) -> bytes:
    """The bytes of ``DIR/checkpoint.npz`` for state ``s`` (call with the engine's lock held:
    :meth:`psrv.engine.RoundEngine.with_state`)."""
    if s.theta is None or s.aggregator is None:
        raise CheckpointError("nothing to checkpoint before registration completes")
    agg = s.aggregator
    arrays: dict[str, np.ndarray] = {"theta": s.theta, "total": agg.total}
    payloads: list[dict[str, Any] | None] = []
    for m, p in enumerate(agg.payloads):
        if p is None:
            payloads.append(None)
            continue
        payloads.append(
            {"kind": p.kind, "dim": p.dim, "scale": p.scale, "bits": p.bits, "value_format": p.value_format}
        )
        for name in _PAYLOAD_ARRAYS:
            a = getattr(p, name)
            if a is not None:
                arrays[f"payload{m}.{name}"] = a
    optional = {"rows": agg.rows, "theta_hat": s.theta_hat, "shared_model": s.shared_model,
                "opt_m": s.opt_state.m, "opt_v": s.opt_state.v}  # fmt: skip
    arrays.update({k: v for k, v in optional.items() if v is not None})
    counts = [] if counter is None else counter.entries()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": dataclasses.asdict(config),
        "phase": s.phase,
        "round": s.round,
        "task_shape": list(s.task_shape),
        "workers": [dataclasses.asdict(w) for w in s.workers.values()],
        "aggregator": {"absorb": agg.absorb, "bound": agg.bound, "peaks": agg.peaks, "payloads": payloads},
        "opt_state": {
            "count": s.opt_state.count,
            "beta1_power": s.opt_state.beta1_power,
            "beta2_power": s.opt_state.beta2_power,
        },  # fmt: skip
        "history": list(s.history.recent()),
        "history_depth": s.history._steps.maxlen or 0,
        "rng": s.rng.bit_generator.state,
        "records": list(s.records),  # the tail kept in memory (every record is in the metrics file)
        "totals": dataclasses.asdict(s.totals),
        "downlink": s.downlink,
        "update_costs": list(s.update_costs),
        "rejoins": s.rejoins,
        "counter": counts,
        "metrics_lines": metrics_lines,
        "every": every,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def save(directory: str | Path, data: bytes) -> Path:
    """Write a captured checkpoint to ``directory/checkpoint.npz`` atomically."""
    return atomic_write_bytes(Path(directory) / FILE, data)


# ------------------------------------------------------------------------------------ load
def load(directory: str | Path, config: ServerConfig) -> Checkpoint:
    """Read ``directory/checkpoint.npz`` and check it against this run's ``config``;
    :class:`CheckpointError` (one line) when it is missing, unreadable, of another format or
    version, made for another job, or inconsistent."""
    path = Path(directory)
    if path.suffix != ".npz":
        path = path / FILE
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {str(path)!r}") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a readable psrv checkpoint (corrupt or truncated: {exc})"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a psrv checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r} is a version {meta.get('version')} checkpoint; this psrv reads {VERSION}")
    _check_config(path, meta["config"], config)
    try:
        state = _state(meta, arrays, config)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(
            f"{str(path)!r} is an inconsistent psrv checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if state.round + 1 >= config.rounds:
        raise CheckpointError(
            f"{str(path)!r} is of round {state.round}: nothing is left of a {config.rounds}-round run (raise --rounds)"
        )
    return Checkpoint(state, meta["config"], meta["counter"], meta["metrics_lines"], int(meta["every"]), path)


def _check_config(path: Path, saved: dict[str, Any], config: ServerConfig) -> None:
    now = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples and numbers as the checkpoint has them
    diffs = [
        f"{k} {saved.get(k)!r} (checkpoint) vs {now.get(k)!r} (now)"
        for k in sorted(set(saved) | set(now))
        if k not in MAY_CHANGE and saved.get(k) != now.get(k)
    ]
    if diffs:
        raise CheckpointError(
            f"{str(path)!r} was made by another job: {'; '.join(diffs)}; resume with the checkpointed run's job options"
        )


def _state(meta: dict[str, Any], arrays: dict[str, np.ndarray], config: ServerConfig) -> EngineState:
    theta = _f64(arrays["theta"], "theta")
    d = theta.size
    workers = {w["worker_id"]: WorkerState(**w) for w in meta["workers"]}
    if len(workers) != config.num_workers or sorted(w.slot for w in workers.values()) != list(range(len(workers))):
        raise CheckpointError(
            f"the checkpoint holds {len(workers)} workers with slots; the run has {config.num_workers}"
        )
    a = meta["aggregator"]
    rule = parse_aggregate(config.aggregate)  # the same rule (the config check compared it): mean or robust
    agg = make_aggregator(rule, config.num_workers, d, a["absorb"], keep_rows="rows" in arrays)
    agg.total[:] = _f64(arrays["total"], "total", d)
    agg.bound = float(a["bound"])
    if agg.rows is not None:
        agg.rows[:] = _f64(arrays["rows"], "rows", (config.num_workers, d))
    if agg.absorb == "replace":
        if len(a["payloads"]) != config.num_workers or len(a["peaks"]) != config.num_workers:
            raise CheckpointError("the checkpoint's stored contributions do not match the number of workers")
        agg.peaks = [float(x) for x in a["peaks"]]
        agg.payloads = [None if p is None else _payload(m, p, arrays, d) for m, p in enumerate(a["payloads"])]
    o = meta["opt_state"]
    opt_state = OptState(int(o["count"]), arrays.get("opt_m"), arrays.get("opt_v"),
                         float(o["beta1_power"]), float(o["beta2_power"]))  # fmt: skip
    history = StepHistory(int(meta["history_depth"]))
    for step_sq in reversed(meta["history"]):
        history.push(step_sq)
    rng = np.random.default_rng()
    if meta["rng"].get("bit_generator") != type(rng.bit_generator).__name__:
        raise CheckpointError(f"the checkpoint's random generator is {meta['rng'].get('bit_generator')}")
    rng.bit_generator.state = meta["rng"]
    theta_hat = arrays.get("theta_hat")
    shared = arrays.get("shared_model")
    return EngineState(
        phase=meta["phase"],
        round=int(meta["round"]),
        task_shape=tuple(meta["task_shape"]),
        workers=workers,
        theta=theta,
        aggregator=agg,
        opt_state=opt_state,
        history=history,
        theta_hat=None if theta_hat is None else _f64(theta_hat, "theta_hat", (config.num_workers, d)),
        rng=rng,
        records=deque(meta["records"], maxlen=config.record_tail),
        totals=RunTotals(**meta["totals"]),
        downlink=meta["downlink"],
        shared_model=None if shared is None else _f64(shared, "shared_model", d),
        change=AggregateChange("aggregate", dim=d, values=agg.total.copy()),  # the last close's, as a whole
        update_costs=deque((int(c) for c in meta["update_costs"]), maxlen=COST_WINDOW),
        rejoins=int(meta["rejoins"]),
    )


def _f64(a: np.ndarray, what: str, shape: int | tuple[int, ...] | None = None) -> np.ndarray:
    want = (shape,) if isinstance(shape, int) else shape
    if a.dtype != np.float64 or (want is not None and a.shape != want) or (want is None and a.ndim != 1):
        raise CheckpointError(
            f"the checkpoint's {what} is {a.dtype}{list(a.shape)}, expected float64{list(want or [])}"
        )
    return np.array(a)  # writable, owned


def _payload(m: int, p: dict[str, Any], arrays: dict[str, np.ndarray], d: int) -> Payload:
    if int(p["dim"]) != d:
        raise CheckpointError(f"the checkpoint's stored contribution of slot {m} has dimension {p['dim']}, not {d}")
    parts = {name: arrays.get(f"payload{m}.{name}") for name in _PAYLOAD_ARRAYS}
    return Payload(p["kind"], d, scale=float(p["scale"]), bits=int(p["bits"]), value_format=p["value_format"], **parts)


# ------------------------------------------------------------------------------------ the sink
class Checkpointer:
    """A round sink (:class:`psrv.engine.RoundSink`) in front of the metrics sink: after each
    closed round has been written, it saves a checkpoint every ``every`` rounds, after the last
    round, and at the first close after :meth:`request_stop` (SIGTERM/SIGINT), then fails the run
    with a message saying where the checkpoint is. ``attach`` the engine before the run starts."""

    def __init__(self, directory: str | Path, every: int, inner: Any = None) -> None:
        self.dir, self.every, self.inner = Path(directory), max(0, int(every)), inner
        self.engine: RoundEngine | None = None
        self.counter: ByteCounter | None = None
        self.stop_reason: str | None = None
        self.saved_round = -1

    def attach(self, engine: RoundEngine, counter: ByteCounter | None = None) -> None:
        self.engine, self.counter = engine, counter

    @property
    def path(self) -> Path:
        return self.dir / FILE

    def round_closed(self, record: dict[str, Any], theta: np.ndarray, final: bool) -> None:
        if self.inner is not None:
            self.inner.round_closed(record, theta, final)
        k = record["round"]
        if final or self.stop_reason is not None or (self.every and (k + 1) % self.every == 0):
            self.save()
        if self.stop_reason is not None and not final:
            self.engine.fail(
                f"stopped by {self.stop_reason} after round {k}; checkpoint {str(self.path)!r} (continue with "
                f"--resume {str(self.dir)!r})"
            )

    def save(self) -> Path:
        """Capture the engine's state (lock held) and write it (outside the lock)."""
        lines = getattr(self.inner, "lines", None)
        data = self.engine.with_state(lambda s: capture(s, self.engine.config, self.counter, lines, self.every))
        path = save(self.dir, data)
        self.saved_round = self.engine.state.round
        return path

    def request_stop(self, reason: str) -> None:
        """Stop at the next round's close, after checkpointing it; at once when no round is being
        trained (registration, or a resumed server waiting for its workers: nothing new to save)."""
        if self.engine is None:
            raise RuntimeError("attach an engine first")
        if self.stop_reason is not None or not self.engine.round_open:
            self.engine.fail(f"terminated by {reason}")
            return
        self.stop_reason = reason


def checkpointed_server(
    config: ServerConfig,
    sink: Any,
    directory: str | Path | None,
    every: int,
    resume: Checkpoint | None = None,
    limits: Any = None,
) -> tuple[Any, Checkpointer | None]:
    """A :class:`~psrv.server.ParameterServer` that saves its state to ``directory`` every
    ``every`` rounds (None: no checkpoints; accumulating rules then keep no per-worker rows) and
    continues ``resume`` (a loaded checkpoint) when given: the server and its
    :class:`Checkpointer` (None without a directory). ``sink`` gets every closed round either way."""
    from psrv.server import ParameterServer  # the transport, only for the runs that build one

    checkpointer = None if directory is None else Checkpointer(directory, every, sink)
    ps = ParameterServer(config, checkpointer or sink, limits, keep_rows=checkpointer is not None)
    if checkpointer is not None:
        checkpointer.attach(ps.engine, ps.counter)
    if resume is not None:
        ps.engine.restore(resume.state)
        resume.restore_counter(ps.counter)
    return ps, checkpointer

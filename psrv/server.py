"""The parameter server: synchronous rounds over gRPC (``psrv start-server``).

Round k: publish theta^k; collect one upload or skip notice per registered worker
until all responsive workers have reported or the round deadline passes; a worker
that misses the deadline is recorded as a DEADLINE skip and contributes its stored
(stale) value, exactly like a lazy skip; update theta^{k+1} = theta^k - alpha * total
(Sun et al., NeurIPS 2019, eq. 4); record metrics. A worker that misses ``max_misses`` deadlines in
a row stops being waited for until it reports again, so a dead worker costs the
run at most ``max_misses`` deadlines, then nothing (while no worker at all is
responsive, every round waits for its deadline).

The servicer is thin: it decodes (``psrv.codec``), checks identity and round,
and hands vectors to the core (``psrv.aggregate``). Errors become gRPC statuses.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from psrv import codec, rpc
from psrv.aggregate import Aggregator
from psrv.algorithms import SelectionView, make_algorithm
from psrv.payload import payload_bits, to_dense
from psrv.tasks import make_task
from psrv.triggers import StepHistory
from psrv.v1 import psrv_pb2 as pb

log = logging.getLogger("psrv.server")


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

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.rounds < 0 or self.round_timeout <= 0 or self.max_misses < 1:
            raise ValueError("need num_workers >= 1, rounds >= 0, round_timeout > 0, max_misses >= 1")
        if self.broadcast_dtype not in ("float32", "float64"):
            raise ValueError(f"broadcast_dtype must be float32 or float64, got {self.broadcast_dtype!r}")
        make_algorithm(self.algorithm, self.options, self.compressor)  # fail early on bad options


@dataclass
class _Worker:
    worker_id: str
    index: int
    num_samples: int
    smoothness: float = 0.0
    responsive: bool = True
    misses: int = 0
    last_upload: int = -1  # round of the last accepted upload


@dataclass
class _Report:
    status: str  # "upload" | "lazy_rule" | "not_selected" | "deadline"
    kind: str = ""
    bits: int = 0
    nbytes: int = 0
    loss: float | None = None
    latency: float | None = None


class Abort(Exception):
    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


class ParameterServer:
    """Round state and the gRPC handlers. All state is guarded by one lock."""

    def __init__(
        self,
        config: ServerConfig,
        metrics_path: str | Path | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        evaluator: Callable[[np.ndarray], dict[str, float]] | None = None,
        eval_every: int = 1,
    ) -> None:
        """``evaluator(theta)`` (embedded runs only: a real server holds no data) adds fields to
        every ``eval_every``-th round's record and to the last; its time is excluded from
        ``elapsed``."""
        self.config = config
        self.algorithm = make_algorithm(config.algorithm, config.options, config.compressor)
        self.counter = rpc.ByteCounter()
        self._cond = threading.Condition()
        self._workers: dict[str, _Worker] = {}
        self._task_shape: tuple[int, int] | None = None
        self.phase = "registering"  # -> "training" -> "done" (or "failed")
        self.error: str | None = None
        self.round = -1
        self._reports: dict[int, _Report] = {}
        self._round_started = 0.0
        self._broadcast = b""
        self._down_this_round: dict[int, int] = {}
        self.theta: np.ndarray | None = None
        self.aggregator: Aggregator | None = None
        self.history = StepHistory(self.algorithm.history_depth)
        self._rng = np.random.default_rng([config.seed, 7])  # server-side selection only
        self._selected: frozenset[int] | None = None
        self._theta_hat: np.ndarray | None = None  # iterate of each worker's last upload, if the rule needs it
        self.records: list[dict[str, Any]] = []
        self._metrics_file = open(metrics_path, "w") if metrics_path else None
        self._on_round = on_round
        self._evaluator, self._eval_every = evaluator, max(1, eval_every)
        self._done_served: set[str] = set()
        self._ready: set[str] = set()  # workers that have asked for a model: warmed up

    # ------------------------------------------------------------------ handlers
    def handlers(self) -> dict[str, Callable[[rpc.Received, grpc.ServicerContext], bytes]]:
        return {name: self._wrap(name, getattr(self, f"_on_{name}")) for name in rpc.METHODS}

    def _wrap(self, name: str, fn: Callable[[Any, int], Any]) -> Callable[[rpc.Received, grpc.ServicerContext], bytes]:
        def handle(req: rpc.Received, context: grpc.ServicerContext) -> bytes:
            self.counter.add("up", name, req.nbytes)
            try:
                reply = fn(req.msg, req.nbytes, context)
            except Abort as exc:
                context.abort(exc.code, exc.detail)
            except codec.CodecError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            data = reply.SerializeToString() if not isinstance(reply, bytes) else reply
            self.counter.add("down", name, len(data))
            return data

        return handle

    def _run_config(self) -> pb.RunConfig:
        c = self.config
        return pb.RunConfig(
            algorithm=c.algorithm,
            compressor=c.compressor,
            options=c.options,
            task=c.task,
            task_options=c.task_options,
            dim=0 if self.theta is None else self.theta.size,
            num_workers=c.num_workers,
            seed=c.seed,
            zstd=c.zstd,
        )

    def _on_Register(self, req: pb.RegisterRequest, nbytes: int, context: Any) -> pb.RegisterReply:
        if not req.worker_id:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "worker_id must not be empty")
        if req.num_samples < 1 or req.n_features < 1 or req.n_classes == 1:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "registration needs num_samples >= 1, n_features >= 1, n_classes >= 2 (or 0 for regression)",
            )
        if not (math.isfinite(req.smoothness) and req.smoothness >= 0):
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "smoothness must be finite and >= 0")
        with self._cond:
            if req.worker_id in self._workers:
                raise Abort(grpc.StatusCode.ALREADY_EXISTS, f"worker {req.worker_id!r} is already registered")
            if self.phase != "registering":
                raise Abort(grpc.StatusCode.FAILED_PRECONDITION, f"registration is closed (server is {self.phase})")
            shape = (req.n_features, req.n_classes)
            if self._task_shape is None:
                try:
                    task = make_task(self.config.task, *shape, **self.config.task_options)
                except ValueError as exc:
                    raise Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
                self._task_shape = shape
                self.theta = task.init_params(np.random.default_rng(self.config.seed)).astype(np.float64)
                self.aggregator = Aggregator(self.config.num_workers, self.theta.size, self.algorithm.absorb)
                if getattr(self.algorithm, "tracks_theta_hat", False):
                    self._theta_hat = np.repeat(self.theta[None, :], self.config.num_workers, axis=0)
            elif shape != self._task_shape:
                raise Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"worker data has {shape[0]} features / {shape[1]} classes; "
                    f"the run has {self._task_shape[0]} / {self._task_shape[1]}",
                )
            index = len(self._workers)
            self._workers[req.worker_id] = _Worker(req.worker_id, index, req.num_samples, req.smoothness)
            log.info("registered %s as worker %d (%d samples)", req.worker_id, index, req.num_samples)
            if len(self._workers) == self.config.num_workers:
                self.phase = "training"
            self._cond.notify_all()
            return pb.RegisterReply(worker_index=index, config=self._run_config())

    def _worker(self, worker_id: str) -> _Worker:
        w = self._workers.get(worker_id)
        if w is None:
            raise Abort(grpc.StatusCode.NOT_FOUND, f"unknown worker {worker_id!r}; register first")
        return w

    def _on_GetModel(self, req: pb.ModelRequest, nbytes: int, context: Any) -> bytes:
        with self._cond:
            w = self._worker(req.worker_id)
            self._ready.add(w.worker_id)
            self._cond.notify_all()
            if self.phase in ("training", "registering") and req.round > self.round + 1 and self.round >= 0:
                raise Abort(
                    grpc.StatusCode.OUT_OF_RANGE, f"round {req.round} is ahead of the server (round {self.round})"
                )
            remaining = context.time_remaining() if context is not None else None
            wait = 60.0 if remaining is None else max(0.0, remaining - 0.05)
            ready = self._cond.wait_for(
                lambda: self.phase in ("done", "failed") or self.round >= req.round, timeout=wait
            )
            if self.phase == "failed":
                raise Abort(grpc.StatusCode.ABORTED, f"run failed: {self.error}")
            if not ready:
                raise Abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"round {req.round} not started yet")
            data = self._broadcast
            if self.phase == "done":
                self._done_served.add(w.worker_id)
                self._cond.notify_all()
            else:
                self._down_this_round[w.index] = self._down_this_round.get(w.index, 0) + len(data)
            return data

    def _check_round(self, w: _Worker, round_: int) -> None:
        if self.phase != "training":
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, f"not accepting reports: server is {self.phase}")
        if round_ != self.round:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, f"round {round_} is not open (current round {self.round})")
        if w.index in self._reports:
            raise Abort(grpc.StatusCode.ALREADY_EXISTS, f"worker {w.worker_id!r} already reported for round {round_}")

    def _accept(self, w: _Worker, report: _Report) -> None:
        report.latency = time.monotonic() - self._round_started
        self._reports[w.index] = report
        w.responsive, w.misses = True, 0
        self._cond.notify_all()

    def _on_Push(self, req: pb.Upload, nbytes: int, context: Any) -> pb.Ack:
        with self._cond:
            self._worker(req.worker_id)
            dim = self.theta.size
        p = codec.upload_from_proto(req, dim)  # validate outside the lock
        if req.HasField("smoothness") and not (math.isfinite(req.smoothness) and req.smoothness >= 0):
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "smoothness must be finite and >= 0")
        if p.kind not in self.algorithm.payload_kinds:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.config.algorithm} does not take {p.kind} payloads")
        vector = to_dense(p)
        with self._cond:
            w = self._worker(req.worker_id)
            self._check_round(w, req.round)
            if self._selected is not None and w.index not in self._selected:
                raise Abort(
                    grpc.StatusCode.FAILED_PRECONDITION, f"worker {w.worker_id!r} is not selected in round {req.round}"
                )
            if req.HasField("smoothness"):
                w.smoothness = max(w.smoothness, req.smoothness)
            if self._theta_hat is not None:
                self._estimate_smoothness(w, vector)
                self._theta_hat[w.index] = self.theta
            self.aggregator.add(w.index, vector)
            w.last_upload = req.round
            self._accept(w, _Report("upload", p.kind, payload_bits(p), nbytes, req.local_loss))
            return pb.Ack(round=req.round)

    def _on_Skip(self, req: pb.SkipNotice, nbytes: int, context: Any) -> pb.Ack:
        reason = codec.skip_reason_from_proto(req)
        with self._cond:
            w = self._worker(req.worker_id)
            self._check_round(w, req.round)
            loss = req.local_loss if req.HasField("local_loss") else None
            self._accept(w, _Report(reason, nbytes=nbytes, loss=loss))
            return pb.Ack(round=req.round)

    # ------------------------------------------------------------------ rounds
    def _publish(self, round_: int, done: bool = False) -> None:
        """Serialize the broadcast once; every worker gets the same bytes. Call with the lock held."""
        params = self.theta.astype(self.config.broadcast_dtype)
        self._selected = None if done else self._select(round_)
        msg = pb.ModelBroadcast(
            round=round_,
            params=codec.tensor_to_proto(params),
            recent_step_sq=self.history.recent(),
            total_samples=sum(w.num_samples for w in self._workers.values()),
            num_workers=len(self._workers),
            done=done,
            selective=self._selected is not None,
            selected=sorted(self._selected or ()),
        )
        self._broadcast = msg.SerializeToString()
        self.round = round_
        self._reports = {}
        self._down_this_round = {}
        self._round_started = time.monotonic()
        self._cond.notify_all()

    def _estimate_smoothness(self, w: _Worker, vector: np.ndarray) -> None:
        """Secant estimate of L_m from two uploads of full gradients at different iterates:
        ``||g_m(theta^k) - g_m(theta_hat)|| / ||theta^k - theta_hat||``, keeping the largest seen
        (for server-side selection; workers also report an upper bound with their first upload)."""
        if self.aggregator.absorb != "replace" or w.last_upload < 0:
            return
        dtheta = float(np.linalg.norm(self.theta - self._theta_hat[w.index]))
        if dtheta > 0:
            dgrad = float(np.linalg.norm(vector - self.aggregator.stored[w.index]))
            w.smoothness = max(w.smoothness, dgrad / dtheta)

    def _select(self, round_: int) -> frozenset[int] | None:
        """Server-side worker selection, for algorithms that have it (RIAG, CIAG, LAG-PS)."""
        select = getattr(self.algorithm, "select", None)
        if select is None:
            return None
        workers = sorted(self._workers.values(), key=lambda w: w.index)
        view = SelectionView(
            round=round_,
            theta=self.theta,
            theta_hat=self._theta_hat,
            smoothness=tuple(w.smoothness for w in workers),
            staleness=tuple(round_ - w.last_upload - 1 if w.last_upload >= 0 else round_ for w in workers),
            recent_step_sq=self.history.recent(),
        )
        return frozenset(select(view, self._rng))

    def _all_reported(self) -> bool:
        waiting = [w for w in self._workers.values() if w.responsive]
        return bool(waiting) and all(w.index in self._reports for w in waiting)

    def run(self) -> dict[str, Any]:
        """Wait for registration, train ``rounds`` rounds, return the summary."""
        cfg = self.config
        with self._cond:
            if not self._cond.wait_for(lambda: self.phase != "registering", timeout=cfg.register_timeout):
                self.phase, self.error = (
                    "failed",
                    f"only {len(self._workers)} of {cfg.num_workers} workers registered "
                    f"within {cfg.register_timeout:g} s",
                )
                self._cond.notify_all()
            if self.phase == "failed":
                raise RuntimeError(self.error)
            # round 0's deadline starts once every worker has asked for the model, i.e. has finished
            # its start-up, so a slow start is not mistaken for a missed round (bounded wait)
            self._cond.wait_for(
                lambda: len(self._ready) >= len(self._workers) or self.phase == "failed",
                timeout=cfg.start_timeout,
            )
        started = time.monotonic()
        for k in range(cfg.rounds):
            with self._cond:
                self._publish(k)
                self._cond.wait_for(lambda: self._all_reported() or self.phase == "failed", timeout=cfg.round_timeout)
                if self.phase == "failed":
                    raise RuntimeError(self.error)
                record = self._close_round(k, started)
                self.records.append(record)
            if self._evaluator and (k % self._eval_every == self._eval_every - 1 or k == cfg.rounds - 1):
                t0 = time.monotonic()
                record.update(self._evaluator(self.theta))
                started += time.monotonic() - t0  # evaluation is not training time
            if self._metrics_file:
                self._metrics_file.write(json.dumps(record) + "\n")
                self._metrics_file.flush()
            if self._on_round:
                self._on_round(record)
        with self._cond:
            self.phase = "done"
            self._publish(cfg.rounds, done=True)
            # serve the final model to every worker before summing up the bytes
            responsive = {w.worker_id for w in self._workers.values() if w.responsive}
            self._cond.wait_for(lambda: responsive <= self._done_served, timeout=cfg.done_grace)
        return self.summary()

    def _close_round(self, k: int, started: float) -> dict[str, Any]:
        now = time.monotonic()
        for w in self._workers.values():
            if w.index not in self._reports:
                self._reports[w.index] = _Report("deadline")
                w.misses += 1
                if w.misses >= self.config.max_misses and w.responsive:
                    w.responsive = False
                    log.warning("worker %s missed %d deadlines; no longer waiting for it", w.worker_id, w.misses)
        step = -self.algorithm.lr * self.aggregator.total
        self.theta += step
        step_sq = float(step @ step)
        self.history.push(step_sq)
        ordered = sorted(self._workers.values(), key=lambda w: w.index)
        reports = [self._reports[w.index] for w in ordered]
        losses = [r.loss for r in reports if r.loss is not None]
        return {
            "round": k,
            "uploads": sum(r.status == "upload" for r in reports),
            "skips": sum(r.status in ("lazy_rule", "not_selected") for r in reports),
            "deadline_misses": sum(r.status == "deadline" for r in reports),
            "payload_bits": sum(r.bits for r in reports),
            "bytes_up": sum(r.nbytes for r in reports),
            "bytes_down": sum(self._down_this_round.values()),
            "loss": math.fsum(losses) if len(losses) == len(reports) else None,
            "aggregate_norm": float(np.linalg.norm(self.aggregator.total)),
            "step_sq": step_sq,
            "round_time": now - self._round_started,
            "slowest_wait": max((r.latency for r in reports if r.latency is not None), default=None),
            "elapsed": now - started,
            "workers": [
                {"id": w.worker_id, "status": r.status, "bits": r.bits, "bytes": r.nbytes, "latency": r.latency}
                for w, r in zip(ordered, reports, strict=True)
            ],
        }

    def summary(self) -> dict[str, Any]:
        recs = self.records
        cfg = self.config
        last_loss = next((r["loss"] for r in reversed(recs) if r["loss"] is not None), None)
        return {
            "algorithm": cfg.algorithm,
            "compressor": getattr(getattr(self.algorithm, "compressor", None), "name", cfg.algorithm),
            "options": dict(cfg.options),
            "zstd": cfg.zstd,
            "workers": cfg.num_workers,
            "dim": int(self.theta.size) if self.theta is not None else 0,
            "rounds": len(recs),
            "uploads": sum(r["uploads"] for r in recs),
            "skips": sum(r["skips"] for r in recs),
            "deadline_misses": sum(r["deadline_misses"] for r in recs),
            "payload_bits": sum(r["payload_bits"] for r in recs),
            "upload_bytes": sum(r["bytes_up"] for r in recs),
            "bytes_up": self.counter.total("up"),
            "bytes_down": self.counter.total("down"),
            "last_round_loss": last_loss,
            "wall_time": recs[-1]["elapsed"] if recs else 0.0,
        }

    def wait_registered(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` workers have registered (False on timeout)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._workers) >= count, timeout=timeout)

    def fail(self, reason: str) -> None:
        """Abort the run: waiting handlers and the round loop give up with ``reason``."""
        with self._cond:
            self.phase, self.error = "failed", reason
            self._cond.notify_all()

    def close(self) -> None:
        if self._metrics_file:
            self._metrics_file.close()
            self._metrics_file = None


def create_server(
    ps: ParameterServer, address: str = "127.0.0.1:0", max_message_bytes: int = rpc.MAX_MESSAGE_BYTES
) -> tuple[grpc.Server, int]:
    """A started gRPC server for ``ps`` and the port it bound (port 0 picks a free one)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2 * ps.config.num_workers + 8),
        options=rpc.channel_options(max_message_bytes),
    )
    server.add_generic_rpc_handlers((rpc.generic_handler(ps.handlers()),))
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    server.start()
    return server, port

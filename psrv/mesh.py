"""The coordinator of a decentralized run (``--algorithm dsgd``, :mod:`psrv.algorithms.dsgd`).

It registers the workers (Join), gives each its neighbours' addresses and Metropolis-Hastings
weights (:mod:`psrv.decentralized`), keeps the round clock (Barrier: round k closes once every
worker has reported it) and collects the measurements: each worker's loss, its local disagreement
and the bytes it sent to and received from each neighbour in the round. No model passes through
it during training: the workers exchange their half-step models directly (:mod:`worker.gossip`).
After the last round each worker hands in its final model once (Finish), so the run's average
model x_bar can be evaluated and its consensus distance reported; those bytes are counted apart
(``final_bytes``).

Per-round records (``metrics.jsonl``): ``loss`` (sum of the workers' f_i at their own models),
``bytes_up`` / ``bytes_down`` (all the workers sent / received: gossip and Barrier messages, so
they compare with a parameter server's uplink and downlink), ``coordinator_bytes_up`` /
``coordinator_bytes_down`` (the coordinator's Barrier messages of the round), ``gossip_bytes``
(every Exchange message of the round), ``links`` ([src, dst, bytes] per directed link, as the sender
counted it; ``links_received`` as the receivers did), ``disagreement`` (mean over workers of
sum_j w_ij ||x_j - x_i||^2 of the half-steps), ``round_time``, ``elapsed``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from psrv import codec, decentralized, meshrpc
from psrv.algorithms import make_algorithm
from psrv.engine import ServerConfig, natural_key
from psrv.metrics import ByteCounter, MetricsSink
from psrv.rpc import Received, channel_options, keepalive_options
from psrv.tasks import make_task
from psrv.v1 import mesh_pb2 as mpb

log = logging.getLogger("psrv.mesh")


class MeshError(Exception):
    """A request the coordinator refuses: ``status`` names the gRPC status code."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Member:
    worker_id: str
    address: str
    num_samples: int
    index: int = -1


@dataclass
class _Report:
    loss: float | None
    disagreement: float
    links: list[mpb.LinkBytes]
    nbytes: int
    at: float = 0.0  # time.monotonic() when it arrived


@dataclass
class _State:
    phase: str = "registering"  # registering | training | done | failed
    error: str = ""
    members: dict[str, _Member] = field(default_factory=dict)
    shape: tuple[int, int] | None = None
    reports: dict[int, dict[str, _Report]] = field(default_factory=dict)
    closed: int = -1  # the last round every worker has reported
    finals: dict[str, np.ndarray] = field(default_factory=dict)


class MeshCoordinator:
    """Registration, topology, round clock and metrics of a dsgd run; thread-safe (one condition).

    ``sink`` gets every round's record (the last one once the final models are in, with
    x_bar as the model, so an evaluator sees the average model); ``run`` returns the summary."""

    def __init__(self, config: ServerConfig, sink: MetricsSink | None = None) -> None:
        self.config = config
        self.algorithm = make_algorithm(config.algorithm, config.options, config.compressor)
        if not getattr(self.algorithm, "decentralized", False):
            raise ValueError(f"{config.algorithm} is not a decentralized algorithm (the mesh runs dsgd)")
        self.topology = self.algorithm.topology_name
        self.sink = sink
        self.counter = ByteCounter()
        self.state = _State(shape=tuple(config.task_shape) if config.task_shape else None)
        self.dim = 0 if self.state.shape is None else self._dim(self.state.shape)
        self.W: np.ndarray | None = None
        self.order: list[str] = []
        self.theta: np.ndarray | None = None
        self.records: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._allowed = frozenset(config.worker_ids)

    def _dim(self, shape: tuple[int, int]) -> int:
        return make_task(self.config.task, *shape, **self.config.task_options).dim

    # ------------------------------------------------------------------ requests
    def join(self, req: mpb.JoinRequest, wait: float) -> mpb.JoinResponse:
        cfg, s = self.config, self.state
        if not req.worker_id or not req.address:
            raise MeshError("INVALID_ARGUMENT", "Join needs a worker_id and the address of its gossip service")
        if self._allowed and req.worker_id not in self._allowed:
            raise MeshError("PERMISSION_DENIED", f"worker id {req.worker_id!r} is not one of this run's ids")
        shape = (req.n_features, req.n_classes)
        with self._cond:
            if s.phase == "failed":
                raise MeshError("ABORTED", s.error)
            known = s.members.get(req.worker_id)
            if s.phase != "registering" and (known is None or known.address != req.address):
                raise MeshError(
                    "FAILED_PRECONDITION", f"the dsgd run has started ({s.phase}); a worker cannot join or rejoin it"
                )
            if s.phase == "registering":
                if s.shape is None:
                    s.shape, self.dim = shape, self._dim(shape)
                elif shape != s.shape:
                    raise MeshError(
                        "INVALID_ARGUMENT",
                        f"worker {req.worker_id!r} has data of {shape[0]} features / {shape[1]} classes; "
                        f"the run has {s.shape[0]} / {s.shape[1]}",
                    )
                if req.num_samples < 1:
                    raise MeshError("INVALID_ARGUMENT", "Join needs num_samples >= 1")
                s.members[req.worker_id] = _Member(req.worker_id, req.address, req.num_samples)  # again: new address
                if len(s.members) == cfg.num_workers:
                    self._start()
            if not self._cond.wait_for(lambda: s.phase != "registering", timeout=max(0.0, wait)):
                raise MeshError("DEADLINE_EXCEEDED", f"{len(s.members)} of {cfg.num_workers} workers have joined")
            if s.phase == "failed":
                raise MeshError("ABORTED", s.error)
            return self._join_response(s.members[req.worker_id])

    def _start(self) -> None:
        """Every worker has joined: number them (by id, naturally) and make the topology. Lock held."""
        s = self.state
        self.order = sorted(s.members, key=natural_key)
        for i, wid in enumerate(self.order):
            s.members[wid].index = i
        self.W = decentralized.mixing_matrix(self.topology, len(self.order))
        s.phase = "training"
        log.info(
            "dsgd mesh: %d workers on a %s, spectral gap %.4f",
            len(self.order),
            self.topology,
            decentralized.spectral_gap(self.W),
        )
        self._cond.notify_all()

    def _join_response(self, m: _Member) -> mpb.JoinResponse:
        assert self.W is not None
        row = self.W[m.index]
        peers = [
            mpb.MeshPeer(worker_id=wid, address=self.state.members[wid].address, weight=row[j], index=j)
            for j, wid in enumerate(self.order)
            if j != m.index and row[j] > 0
        ]
        total = sum(x.num_samples for x in self.state.members.values())
        return mpb.JoinResponse(
            worker_index=m.index,
            config=codec.run_config_to_proto(self.config, self.dim),
            neighbours=peers,
            self_weight=row[m.index],
            total_samples=total,
            rounds=self.config.rounds,
            topology=self.topology,
        )

    def barrier(self, req: mpb.BarrierRequest, nbytes: int, wait: float) -> mpb.BarrierResponse:
        s, k = self.state, int(req.round)
        with self._cond:
            if req.worker_id not in s.members or s.phase == "registering":
                raise MeshError("NOT_FOUND", f"worker {req.worker_id!r} has not joined")
            if s.phase == "failed":
                raise MeshError("ABORTED", s.error)
            if k != s.closed + 1:
                raise MeshError("OUT_OF_RANGE", f"round {k} reported while the mesh is at round {s.closed + 1}")
            got = s.reports.setdefault(k, {})
            if req.worker_id in got:
                raise MeshError("ALREADY_EXISTS", f"worker {req.worker_id!r} already reported round {k}")
            loss = req.loss if req.HasField("loss") else None
            got[req.worker_id] = _Report(loss, req.disagreement, list(req.links), nbytes, time.monotonic())
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: s.closed >= k or s.phase == "failed", timeout=max(0.0, wait)):
                raise MeshError("DEADLINE_EXCEEDED", f"round {k} has not closed")
            if s.closed < k:
                raise MeshError("ABORTED", s.error)
            return self._barrier_response(k)

    def _barrier_response(self, k: int) -> mpb.BarrierResponse:
        return mpb.BarrierResponse(round=k, done=k >= self.config.rounds - 1)

    def finish(self, req: mpb.FinishRequest) -> mpb.FinishResponse:
        s = self.state
        with self._cond:
            if req.worker_id not in s.members or s.closed < self.config.rounds - 1:
                raise MeshError("FAILED_PRECONDITION", "Finish comes after the last round")
            try:
                s.finals[req.worker_id] = np.array(codec.tensor_from_proto(req.params, self.dim, "params"))
            except codec.CodecError as exc:
                raise MeshError("INVALID_ARGUMENT", str(exc)) from None
            self._cond.notify_all()
        return mpb.FinishResponse()

    def fail(self, reason: str) -> None:
        with self._cond:
            if self.state.phase not in ("done", "failed"):
                self.state.phase, self.state.error = "failed", reason
            self._cond.notify_all()

    @property
    def phase(self) -> str:
        return self.state.phase

    # ------------------------------------------------------------------ the run
    def _wait(self, pred: Any, timeout: float, why: Any) -> None:
        """Wait for ``pred`` (lock held); fail the run with ``why()`` when it does not come in time."""
        s = self.state
        if not self._cond.wait_for(lambda: pred() or s.phase == "failed", timeout=timeout):
            s.phase, s.error = "failed", why()
            self._cond.notify_all()
        if s.phase == "failed":
            raise RuntimeError(s.error)

    def run(self) -> dict[str, Any]:
        """Wait for every worker to join, close ``rounds`` rounds, collect the final models; the
        summary. ``RuntimeError`` when a worker does not come or stops reporting."""
        cfg, s = self.config, self.state
        with self._cond:
            self._wait(
                lambda: s.phase == "training",
                cfg.register_timeout,
                lambda: f"only {len(s.members)} of {cfg.num_workers} workers joined within {cfg.register_timeout:g} s",
            )
        started = last = time.monotonic()
        for k in range(cfg.rounds):
            limit = cfg.round_timeout + (cfg.start_timeout if k == 0 else 0.0)
            with self._cond:
                got = s.reports.setdefault(k, {})
                self._wait(
                    lambda got=got: len(got) == cfg.num_workers,
                    limit,
                    lambda k=k, got=got, limit=limit: self._missing(k, got, limit),
                )
                s.closed = k
                self._cond.notify_all()
                now = time.monotonic()
                record = self._record(k, s.reports.pop(k), last, now - last, now - started)
                last = now
            final = k == cfg.rounds - 1
            if final:
                with self._cond:
                    self._wait(
                        lambda: len(s.finals) == cfg.num_workers,
                        cfg.done_grace + cfg.round_timeout,
                        lambda: f"only {len(s.finals)} of {cfg.num_workers} workers sent their final model",
                    )
                    X = np.stack([s.finals[w] for w in self.order])
                    s.phase = "done"
                self.theta = X.mean(axis=0)
                record["consensus_distance"] = decentralized.consensus_distance(X)
            self.records.append(record)
            if self.sink is not None:
                t0 = time.monotonic()
                self.sink.round_closed(record, self.theta, final)
                started += time.monotonic() - t0
        if cfg.rounds == 0:
            with self._cond:
                s.phase = "done"
        return self.summary()

    def _missing(self, k: int, got: dict[str, Any], limit: float) -> str:
        missing = [w for w in self.order if w not in got]
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        return (
            f"round {k}: no report from {shown} within {limit:g} s (--round-timeout); dsgd cannot go on "
            "without a worker (its neighbours wait for its model)"
        )

    def _record(
        self, k: int, got: dict[str, _Report], opened: float, round_time: float, elapsed: float
    ) -> dict[str, Any]:
        ids = self.order
        index = {w: i for i, w in enumerate(ids)}
        reports = [got[w] for w in ids]
        losses = [r.loss for r in reports if r.loss is not None]
        pairs = [(w, link) for w in ids for link in got[w].links if link.peer in index]
        sent = [[index[w], index[link.peer], int(link.sent)] for w, link in pairs]
        received = [[index[link.peer], index[w], int(link.received)] for w, link in pairs]
        up = sum(r.nbytes for r in reports)
        down = len(ids) * self._barrier_response(k).ByteSize()
        self.counter.add("down", "Barrier", down)
        return {
            "round": k,
            "uploads": 0,  # no model reaches the coordinator
            "skips": 0,
            "payload_bits": 0,
            # what the workers sent / received in all: their gossip and their Barrier messages
            "bytes_up": sum(b for _, _, b in sent) + up,
            "bytes_down": sum(b for _, _, b in received) + down,
            "coordinator_bytes_up": up,
            "coordinator_bytes_down": down,
            "gossip_bytes": sum(b for _, _, b in sent),
            "links": sent,
            "links_received": received,
            "loss": math.fsum(losses) if len(losses) == len(reports) else None,
            "disagreement": float(np.mean([r.disagreement for r in reports])),
            "round_time": round_time,
            "slowest_wait": max(r.at for r in reports) - opened,
            "elapsed": elapsed,
            # latency: from the previous round's close to this worker's report (its step and its gossip)
            "workers": [
                {
                    "id": w,
                    "status": "gossip",
                    "bytes": sum(int(link.sent) for link in r.links),
                    "latency": r.at - opened,
                }
                for w, r in zip(ids, reports, strict=True)
            ],
        }

    def summary(self) -> dict[str, Any]:
        rs = self.records
        gossip = sum(r["gossip_bytes"] for r in rs)
        per_link: dict[tuple[int, int], int] = {}
        for r in rs:
            for src, dst, b in r["links"]:
                per_link[src, dst] = per_link.get((src, dst), 0) + b
        return {
            "algorithm": self.config.algorithm,
            "compressor": self.algorithm.compressor_name,
            "options": dict(self.config.options),
            "topology": self.topology,
            "spectral_gap": None if self.W is None else decentralized.spectral_gap(self.W),
            "workers": self.config.num_workers,
            "dim": self.dim,
            "rounds": len(rs),
            "uploads": 0,
            "skips": 0,
            "payload_bits": 0,
            "upload_bytes": 0,
            # what the workers sent / received in all: gossip and their messages to the coordinator
            "bytes_up": gossip + self.counter.total("up"),
            "bytes_down": sum(b for r in rs for _, _, b in r["links_received"]) + self.counter.total("down"),
            # the coordinator's own traffic: Join, Barrier and (once, after training) Finish
            "coordinator_bytes_up": self.counter.total("up"),
            "coordinator_bytes_down": self.counter.total("down"),
            "barrier_bytes": sum(r["coordinator_bytes_up"] + r["coordinator_bytes_down"] for r in rs),
            "final_bytes": self.counter.bytes.get(("up", "Finish"), 0),
            "gossip_bytes": gossip,
            "link_bytes": [[s, d, b] for (s, d), b in sorted(per_link.items())],
            "max_link_bytes_per_round": max((b for r in rs for _, _, b in r["links"]), default=0),
            "consensus_distance": rs[-1].get("consensus_distance") if rs else None,
            "last_round_loss": rs[-1]["loss"] if rs else None,
            "wall_time": rs[-1]["elapsed"] if rs else 0.0,
        }


# ---------------------------------------------------------------------------------- gRPC
class MeshServicer:
    """The coordinator's gRPC face: decode, call, encode; errors become statuses; bytes counted."""

    def __init__(self, coord: MeshCoordinator) -> None:
        self.coord = coord

    def handlers(self) -> dict[str, Any]:
        return {"Join": self._join, "Barrier": self._barrier, "Finish": self._finish}

    def _call(self, name: str, req: Received, context: Any, fn: Any) -> bytes:
        self.coord.counter.add("up", name, req.nbytes)
        try:
            reply = fn()
        except MeshError as exc:
            context.abort(getattr(grpc.StatusCode, exc.status), str(exc))
        data = reply.SerializeToString()
        if name != "Barrier":  # a round's Barrier replies are booked in its record (MeshCoordinator._record)
            self.coord.counter.add("down", name, len(data))
        return data

    @staticmethod
    def _wait(context: Any) -> float:
        remaining = context.time_remaining()
        return 60.0 if remaining is None else max(0.0, remaining - 0.05)

    def _join(self, req: Received, context: Any) -> bytes:
        return self._call("Join", req, context, lambda: self.coord.join(req.msg, self._wait(context)))

    def _barrier(self, req: Received, context: Any) -> bytes:
        return self._call("Barrier", req, context, lambda: self.coord.barrier(req.msg, req.nbytes, self._wait(context)))

    def _finish(self, req: Received, context: Any) -> bytes:
        return self._call("Finish", req, context, lambda: self.coord.finish(req.msg))


def create_mesh_server(coord: MeshCoordinator, address: str = "127.0.0.1:0") -> tuple[grpc.Server, int]:
    """A started gRPC server for ``coord`` and its port (port 0 picks a free one)."""
    threads = 2 * coord.config.num_workers + 8  # every worker blocks in a Join or a Barrier at once
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="psrv-mesh"),
        options=[*channel_options(), ("grpc.so_reuseport", 0), *keepalive_options(server=True)],
    )
    server.add_generic_rpc_handlers((meshrpc.generic_handler(meshrpc.MESH_SERVICE, MeshServicer(coord).handlers()),))
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    server.start()
    return server, port


def serve_mesh(config: ServerConfig, sink: MetricsSink | None, address: str) -> tuple[dict[str, Any], np.ndarray]:
    """``psrv start-server --algorithm dsgd``: coordinate one run on ``address`` (workers start with
    ``psrv start-worker --gossip-listen HOST:PORT``); the summary and the average model. SIGTERM
    fails the run."""
    import signal
    import sys

    coord = MeshCoordinator(config, sink)
    server, bound = create_mesh_server(coord, address)
    print(f"psrv dsgd coordinator listening on {address.rpartition(':')[0]}:{bound}; waiting for "
          f"{config.num_workers} workers (start-worker --gossip-listen HOST:PORT)", file=sys.stderr)  # fmt: skip
    signal.signal(signal.SIGTERM, lambda signum, _frame: coord.fail(f"terminated by {signal.Signals(signum).name}"))
    try:
        summary = coord.run()
    finally:
        server.stop(grace=1.0)
    assert coord.theta is not None
    return summary, coord.theta

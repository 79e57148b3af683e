"""Virtual workers: one process hosts many logical workers (``psrv start-worker --shard A-B/M``).

Each logical worker is the worker of :func:`worker.client.run_worker` -- its own id, shard,
algorithm state (error-feedback memories, clocks, control variates), random stream
(:func:`worker.client.worker_rng`: from its shard, so the same seed gives the same run however
the workers are spread over processes), byte counts and credentials -- and a separate
participant on the wire: its own Register, its own uploads and skip notices. What the workers of
one host share is the process (Python, torch, gRPC: the ~230 MiB a worker process costs before
its data), the training data (loaded once, each worker keeps its shard's rows) and, where their
credentials are the same, one gRPC channel and one ``HostRounds`` stream (:class:`HostStream`): a
broadcast they all get goes down once and is counted once per connection. ``multiplex=False``
(and a server that checks credentials) gives each worker its own Rounds stream instead.

Each logical worker has a thread of its own for registering and reconnecting, but its rounds are
run by one of the stream's lanes: a thread per usable core, each running the rounds of a fixed
share of the workers in turn (a thread per worker computing, handing the GIL and the cores to
each other every round, cost a quarter more CPU and half again the wall time). A host's reports
of a round go up in one message, and a delta broadcast is decoded once for all its workers. A
worker that is not selected in a round (client sampling, ``-o sample=``) reports
``not_selected`` without computing (:class:`worker.client._Job`), so it costs only the
broadcast's decoding. Measured figures: docs/scale.md.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from psrv import codec, data, memory, rpc, stream, tls
from psrv.replica import ReplicaShare
from psrv.v1 import psrv_pb2 as pb
from worker.client import STOP, WorkerConfig, WorkerResult, check_address, load_training_data, run_worker

log = logging.getLogger("psrv.worker.host")

__all__ = ["HostResult", "host_configs", "load_host_data", "parse_shard_range", "run_host"]


def parse_shard_range(spec: str) -> tuple[range, int]:
    """``--shard``: ``I/M`` (one worker, shard I of M) or ``A-B/M`` (shards A..B of M, both
    included: B-A+1 logical workers); ``ValueError`` (one line) otherwise."""
    try:
        part, total = spec.split("/")
        num = int(total)
        first, _, last = part.partition("-")
        lo, hi = int(first), int(last) if last else int(first)
        if not 0 <= lo <= hi < num:
            raise ValueError
    except ValueError:
        raise ValueError(f"expected I/M with 0 <= I < M, or A-B/M with 0 <= A <= B < M, got {spec!r}") from None
    return range(lo, hi + 1), num


def host_configs(base: WorkerConfig, shards: range, num_shards: int, ids: Sequence[str]) -> list[WorkerConfig]:
    """The configurations of the logical workers of one host: ``base`` with each one's id and shard;
    credential paths containing ``{id}`` are filled in with the worker's id (``--tls-cert
    pki/workers/{id}.crt``: one certificate and token per logical worker)."""
    if len(ids) != len(shards):
        raise ValueError(f"{len(ids)} worker ids for {len(shards)} shards")
    out = []
    for wid, index in zip(ids, shards, strict=True):
        security = None if base.security is None else base.security.for_worker(wid)
        out.append(dataclasses.replace(base, worker_id=wid, shard=index, num_shards=num_shards, security=security))
    return out


def load_host_data(cfgs: Sequence[WorkerConfig]) -> list[data.Dataset]:
    """Each logical worker's shard, the data set loaded and partitioned once for the host (every
    worker of a run derives the same split from the seed, :func:`worker.client.load_worker_data`)."""
    first = cfgs[0]
    key = (first.data, first.test_fraction, first.seed, first.regression, first.split, first.num_shards)
    for c in cfgs:
        if (c.data, c.test_fraction, c.seed, c.regression, c.split, c.num_shards) != key:
            raise ValueError("the logical workers of one host must share the data, seed, split and shard count")
    train, _ = load_training_data(first.data, first.test_fraction, first.seed, first.regression)
    if first.num_shards is None:
        return [train] * len(cfgs)
    return data.shards(train, [c.shard or 0 for c in cfgs], first.num_shards, first.split, first.seed)


class _Generation:
    """One HostRounds stream: opened once every live worker of the host has joined it
    (:meth:`HostStream.open`), ended when they have all finished or left (a worker whose run ends
    early or fails leaves it; the others go on), broken when the connection fails (they all
    reconnect, each as a worker that lost the server). Its lanes run the workers' rounds."""

    def __init__(self, host: HostStream) -> None:
        self.host = host
        self.opens: dict[str, pb.RoundsOpen] = {}
        self.members: dict[str, HostedRounds] = {}
        self.finished: set[str] = set()
        self.out = rpc.Outbox(host.counter, "HostRounds")
        self.call: Any = None
        self.lanes: list[queue.SimpleQueue] = []
        self.lane_of: dict[str, int] = {}
        self.started = self.broken = self.ended = False
        self.failed = False  # cancelled, or broke: the lanes drop what is queued (the error follows)
        #: the last delta broadcast decoded, (message, dim, decoded): its workers share one decoding
        self.decoded: tuple[Any, int, codec.ModelMessage] | None = None
        #: the workers whose report on their last broadcast is due, and the reports held, as
        #: (worker, report), until none is: the server serves the host's next round only once all have
        #: reported, so they go as one message (``reports``) instead of one each. A report is held at
        #: most _HELD_SECONDS (checked as the next report comes: a round deadline is not missed for it)
        self._batch = threading.Lock()
        self._due: set[str] = set()
        self._held: list[tuple[str, bytes]] = []
        self._held_bytes = 0
        self._held_since = 0.0

    def start(self) -> None:
        """Open the stream, start the lanes and the reader. Lock held. On failure every member's
        thread is told (each reconnects as after a lost stream)."""
        self.started = True
        n = min(_cores(), len(self.members))
        self.lanes = [queue.SimpleQueue() for _ in range(n)]
        self.lane_of = {w: i % n for i, w in enumerate(self.members)}
        try:
            for i, lane in enumerate(self.lanes):
                threading.Thread(target=self._lane, args=(lane,), name=f"psrv-host-lane-{i}", daemon=True).start()
            opened = pb.HostRoundsRequest(open=pb.HostRoundsOpen(workers=list(self.opens.values())))
            self.send(opened.SerializeToString())
            self.call = self.host.stub.HostRounds(iter(self.out))
            threading.Thread(target=self._read, name="psrv-host-rounds", daemon=True).start()
        except Exception as exc:  # noqa: BLE001 -- grpc, or no thread to be had: every member is told
            self.broken = self.failed = True
            self.out.close()
            for lane in self.lanes:
                lane.put(exc)

    def send(self, data: bytes) -> None:
        self.out.put(data)

    def report(self, worker_id: str, report: bytes | None) -> None:
        """``worker_id``'s serialized HostRoundsReport (None: it has none, it leaves or failed): held
        until every report due is in, _HELD_BYTES are held or the first has waited _HELD_SECONDS,
        then sent with the others held (one ``report``, or ``reports``)."""
        out = []
        with self._batch:
            self._due.discard(worker_id)
            if report is not None and len(report) >= _HELD_BYTES:
                out.append([(worker_id, report)])  # a big upload goes alone, as it would on its own stream
            elif report is not None:
                if not self._held:
                    self._held_since = time.monotonic()
                self._held.append((worker_id, report))
                self._held_bytes += len(report)
            if self._held and (
                not self._due or self._held_bytes >= _HELD_BYTES or time.monotonic() - self._held_since >= _HELD_SECONDS
            ):
                out.append(self._held)
                self._held, self._held_bytes = [], 0
        for held in out:
            self._send_reports(held)

    def _send_reports(self, held: list[tuple[str, bytes]]) -> None:
        """One message of ``held`` reports; each worker is counted its report's field (tag, length,
        body), the first also the message's framing, as the server charges them."""
        if len(held) == 1:
            data = stream.field_bytes(_ONE, held[0][1])
            shares = [len(data)]
        else:
            fields = [stream.field_bytes(_EACH, r) for _, r in held]
            data = stream.field_bytes(_MANY, *fields)
            shares = stream.shares([len(f) for f in fields], len(data))
        for (w, _), n in zip(held, shares, strict=True):
            self.members[w].counter.add("up", "HostRounds", n)
        self.send(data)

    def _read(self) -> None:
        """The server's messages, each to the lanes of the workers it names; at the end (the
        stream's, or its failure), to every lane the reason it ended."""
        error: BaseException = stream.StreamError("HostRounds: the server ended the stream before the final broadcast")
        try:
            for reply in self.call:
                names = list(reply.worker_ids)
                unknown = [w for w in names if w not in self.members]
                if unknown or not names:
                    raise stream.StreamError(
                        f"HostRounds: a message for {unknown or 'nobody'}, not this host's workers"
                    )
                self.members[names[0]].counter.add("down", "HostRounds", reply.ByteSize())  # a shared broadcast: once
                kind = reply.response.WhichOneof("response")
                body = reply.response.model if kind == "model" else reply.response.rejected
                if kind == "model" and not body.done:
                    with self._batch:
                        self._due.update(names)  # each answers it (a report or a resync)
                for w in names:
                    self.lanes[self.lane_of[w]].put((w, kind, body))
        except (grpc.RpcError, stream.StreamError) as exc:
            error = exc
            self.failed = True
        with self.host.cond:
            self.broken = True
            self.out.close()  # gRPC's request thread ends (after the final broadcast: the half-close did)
        for lane in self.lanes:
            lane.put(error)  # to the workers still running (after its final broadcast: unread)

    def _lane(self, inbox: queue.SimpleQueue) -> None:
        """Run the rounds of this lane's workers, one message at a time: one thread computes for
        several logical workers (a thread per worker, handing the GIL and the cores to each other
        every round, cost a quarter more CPU: scripts/bench_host_threads.py)."""
        while True:
            item = inbox.get()
            if isinstance(item, BaseException):
                for w, member in self.members.items():
                    if self.lanes[self.lane_of[w]] is inbox and member.outcome_due:
                        member.end(item)
                return
            w, kind, body = item
            member = self.members[w]
            if member.outcome_due and not self.failed:  # once the stream failed, its error follows
                member.take(kind, body)

    def decode(self, body: Any, dim: int) -> codec.ModelMessage:
        """The broadcast ``body`` decoded, once for all the host's workers where it is a delta
        broadcast (``update``: only read by :class:`worker.client.Downlink`); a snapshot or dense
        model is decoded per worker (each takes its arrays as its own and changes them)."""
        shared = self.decoded
        if shared is not None and shared[0] is body and shared[1] == dim:
            return shared[2]
        model = codec.model_from_proto(body, dim)
        if model.form == "update":
            self.decoded = (body, dim, model)
        return model

    def close(self, worker_id: str, finished: bool) -> None:
        """``worker_id`` is done with this stream: it had the final broadcast (``finished``), or its
        run ended early or failed: it leaves the stream (``leave``: the server stops waiting for it)
        and the stream goes on for the others."""
        with self.host.cond:
            self.finished.add(worker_id)
            if not finished and self.call is not None and not self.broken:
                self.send(pb.HostRoundsRequest(leave=pb.HostRoundsLeave(worker_id=worker_id)).SerializeToString())
            self._maybe_end()

    def _maybe_end(self) -> None:
        """Half-close once every worker of the stream has finished or left the host. Lock held."""
        if (
            self.started
            and not self.ended
            and all(w in self.finished or w not in self.host.members for w in self.opens)
        ):
            self.ended = True
            self.out.close()


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class HostStream:
    """The client's end of HostRounds for the logical workers ``members`` of one host (see
    psrv.proto): their Rounds streams multiplexed on one stream of ``channel``."""

    def __init__(self, channel: grpc.Channel, members: Sequence[str]) -> None:
        self.counter = rpc.ByteCounter()  # the host's stream, every worker together
        self.stub = rpc.CountingStub(channel, self.counter)
        self.members = set(members)  # the workers still running (a stream opens once each has asked)
        self.cond = threading.Condition()
        self._gen: _Generation | None = None

    def open(self, member: HostedRounds, request: pb.GetModelRequest) -> _Generation:
        """Join the stream being opened (or the next, when the current one has started or broke)."""
        with self.cond:
            gen = self._gen
            if gen is None or gen.started or gen.broken:
                gen = self._gen = _Generation(self)
            opened = pb.RoundsOpen(worker_id=request.worker_id, round=request.round)
            if request.HasField("replica_round"):
                opened.replica_round = request.replica_round
            gen.opens[request.worker_id], gen.members[request.worker_id] = opened, member
            member.gen = gen  # before the stream starts: a lane may take its first broadcast at once
            self._maybe_start()
            return gen

    def leave(self, worker_id: str) -> None:
        """``worker_id``'s run has ended (finished or failed): the host's streams stop waiting for it."""
        with self.cond:
            self.members.discard(worker_id)
            self._maybe_start()
            for gen in (self._gen,):
                if gen is not None:
                    gen._maybe_end()

    def _maybe_start(self) -> None:
        gen = self._gen
        if gen is not None and not gen.started and self.members <= gen.opens.keys():
            gen.start()


class HostedRounds:
    """A logical worker's rounds on its host's HostRounds stream: :meth:`drive` (see
    :meth:`worker.client._Job.run`) joins the stream and waits while a lane of the stream runs
    the job's rounds, until the final model, the worker leaving, or a failure (raised here, in the
    worker's own thread, which reconnects as a worker on its own stream would)."""

    def __init__(self, host: HostStream, cfg: WorkerConfig, counter: rpc.ByteCounter) -> None:
        self.host, self.cfg, self.counter = host, cfg, counter
        self.gen: _Generation | None = None
        self.job: Any = None
        self.retry: Any = None
        self.finished = False
        self.outcome_due = False  # a lane runs this worker's rounds; its outcome is not yet handed over
        self._rejected: str | None = None
        self._outcome: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._head = pb.HostRoundsReport(worker_id=cfg.worker_id).SerializeToString()  # the same in every report

    def drive(self, job: Any, retry: Any) -> None:
        self.job, self.retry, self.outcome_due = job, retry, True
        self.host.open(self, job.down.request(job.k))
        outcome = self._outcome.get()
        if outcome is not None:
            raise outcome

    def end(self, outcome: BaseException | None) -> None:
        """In the lane: this worker's rounds are over (None) or failed; its thread takes it on. A
        report it owes is not coming: the others' held reports need not wait for it."""
        self.outcome_due = False
        if self.gen is not None:
            self.gen.report(self.cfg.worker_id, None)
        self._outcome.put(outcome)

    def take(self, kind: str, body: Any) -> None:
        """In the lane: the server's message for this worker (a broadcast, or why its last report
        was rejected); a broadcast is answered with a report or a resync."""
        if kind == "rejected":
            self._rejected = body.reason
            return
        job = self.job
        try:
            assert self.gen is not None  # HostStream.open set it
            model = self.gen.decode(body, job.task.dim)
            self.finished = model.done
            self.retry.ok()  # the server answered on this connection
            rejected, self._rejected = self._rejected, None
            step = job.take(model, rejected)
            if step is None:  # the same round again, as a snapshot
                self._send(pb.RoundsRequest(resync=pb.RoundsResync()).SerializeToString())
                return
            if step is not STOP:
                self._report(*step[0])
                job.commit(step[1])
                return
        except BaseException as exc:  # noqa: BLE001 -- the worker's thread raises it (its lane goes on)
            self.end(exc)
            return
        self.end(None)

    def _send(self, report: bytes) -> None:
        assert self.gen is not None
        self.gen.report(self.cfg.worker_id, self._head + stream.field_bytes(_INNER, report))

    def _report(self, k: int, payload: Any, reason: str, loss: float | None, zstd: bool, smooth: float | None) -> None:
        if payload is None:
            self._send(codec.rounds_skip(reason, loss).SerializeToString())
        else:
            upload = codec.upload_to_wire(self.cfg.worker_id, k, loss, payload, zstd=zstd, smoothness=smooth)
            self._send(stream.field_bytes(rpc.PUSH, *upload.parts))

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close(self.cfg.worker_id, self.finished)


#: reports held for one message add up to less than this (the server's message limit is at least 1 MiB,
#: stream.limit_for); one this big goes alone
_HELD_BYTES = 64 * 1024
#: and a report waits at most this long for the others (measured from the first held; checked as each comes)
_HELD_SECONDS = 0.02

#: field numbers: HostRoundsRequest.report and .reports, HostRoundsReports.reports, HostRoundsReport.report
_ONE = pb.HostRoundsRequest.DESCRIPTOR.fields_by_name["report"].number
_MANY = pb.HostRoundsRequest.DESCRIPTOR.fields_by_name["reports"].number
_EACH = pb.HostRoundsReports.DESCRIPTOR.fields_by_name["reports"].number
_INNER = pb.HostRoundsReport.DESCRIPTOR.fields_by_name["report"].number


@dataclass
class HostResult:
    """The logical workers' results (in the order they were given); ``errors``: worker id -> the
    one-line reason of each that failed; ``replicas_made``: the rounds' closes the host replayed
    on its shared replicas (:class:`psrv.replica.ReplicaShare`: once a round for all its workers,
    plus one for each worker that had to go on from a copy of its own)."""

    results: list[WorkerResult | None] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    replicas_made: int = 0


def _reason(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    text = details() if callable(details) else str(exc)
    return " ".join(str(text or type(exc).__name__).split())[:300]


def run_host(
    cfgs: Sequence[WorkerConfig], datasets: Sequence[data.Dataset] | None = None, multiplex: bool = True
) -> HostResult:
    """Run the logical workers ``cfgs`` in this process, each with a thread of its own (on a
    HostRounds stream its rounds run in the stream's lanes: see the module's docstring), until every
    one has finished; workers with the same server and credentials share one channel and, with
    ``multiplex`` and no credentials, one HostRounds stream (else each has its own Rounds stream on
    the channel). ``datasets``: each worker's shard (default :func:`load_host_data`). A worker that
    fails does not stop the others; its reason is in ``errors``.

    This is also the API for measuring a server against many workers from one process (e.g. M =
    1,000 logical workers against an in-process server)."""
    if not cfgs:
        return HostResult()
    ids = [c.worker_id for c in cfgs]
    if len(set(ids)) != len(ids):
        raise ValueError("a worker id is given twice")
    for c in cfgs:
        check_address(c.server)
    memory.tune_malloc()  # before the threads start (psrv.memory)
    datasets = list(datasets) if datasets is not None else load_host_data(cfgs)
    channels: dict[tuple[str, tls.ClientSecurity], grpc.Channel] = {}
    for c in cfgs:
        key = (c.server, c.security or tls.ClientSecurity())
        if key not in channels:
            channels[key] = key[1].channel(c.server, rpc.channel_options() + rpc.keepalive_options())
            if key[1].ca is not None:  # a refused certificate: fail now, saying why
                tls.check_handshake(channels[key], c.server, key[1])
    out = HostResult(results=[None] * len(cfgs))
    hosts: dict[tuple[str, tls.ClientSecurity], HostStream] = {}
    if multiplex:
        for key, channel in channels.items():
            if key[1] == tls.ClientSecurity():  # one stream has one caller's credentials: only without any
                hosts[key] = HostStream(channel, [c.worker_id for c in cfgs if (c.server, c.security or key[1]) == key])

    # one replica of the server's state for all the workers of one server (one job), whatever their
    # stream; a worker alone with its server keeps its own (changed in place: no copy a round)
    per_server = collections.Counter(c.server for c in cfgs)
    replicas = {server: ReplicaShare() for server, n in per_server.items() if n > 1}

    def one(i: int, cfg: WorkerConfig) -> None:
        key = (cfg.server, cfg.security or tls.ClientSecurity())
        host = hosts.get(key)
        rounds = None if host is None else (lambda stub, c: HostedRounds(host, c, stub.counter))
        try:
            out.results[i] = run_worker(cfg, datasets[i], channels[key], rounds, replicas.get(cfg.server))
        except Exception as exc:  # noqa: BLE001 -- a worker's failure is reported, the others go on
            out.errors[cfg.worker_id] = _reason(exc)
            log.error("worker %s: %s", cfg.worker_id, out.errors[cfg.worker_id])
        finally:
            if host is not None:
                host.leave(cfg.worker_id)

    threads = [
        threading.Thread(target=one, args=(i, c), name=f"psrv-worker-{c.worker_id}", daemon=True)
        for i, c in enumerate(cfgs)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    except KeyboardInterrupt:  # Ctrl-C: the process ends with its workers' threads; they have no retries to tell
        logging.getLogger("psrv.worker").setLevel(logging.CRITICAL)
        raise
    finally:
        for ch in channels.values():
            ch.close()
    out.replicas_made = sum(share.made for share in replicas.values())
    return out

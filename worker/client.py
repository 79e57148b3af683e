"""The worker client (``psrv start-worker``): register, then every round

    model -> gradient (torch) -> algorithm step (trigger, feedback, compress) -> encode -> send

The algorithm's new state is committed only once the server acknowledges the
message; if the round already closed (the worker was too slow), the state stays
as it was, so worker and server never disagree about what was received.

A worker that loses the server (the server is down or restarting, the link is cut, the stream
breaks) reconnects by itself: it retries with exponential backoff and full jitter
(:class:`Backoff`) for up to ``retry_for`` seconds, registers again under its id and goes on
from the round the server is at, as a restarted worker would (its algorithm state starts over,
its model comes as a snapshot). Past ``retry_for`` it gives up with :class:`ServerLost`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import numpy as np
import threadpoolctl

from psrv import codec, data, memory, rpc, stream, tls
from psrv.algorithms import RoundInfo, make_algorithm
from psrv.replica import DownCompressor, Replica, ReplicaShare
from psrv.server_opt import ServerOpt, make_server_opt
from psrv.tasks import LogReg, make_task
from psrv.triggers import StepHistory
from psrv.v1 import psrv_pb2 as pb

log = logging.getLogger("psrv.worker")


@dataclass(frozen=True)
class WorkerConfig:
    server: str
    worker_id: str
    data: str = "mnist"
    shard: int | None = None  # take shard `shard` of `num_shards` of the (training part of the) data
    num_shards: int | None = None
    split: str = "iid"
    seed: int = 0
    test_fraction: float = 0.2
    connect_timeout: float = 60.0  # seconds the first registration keeps trying (the server may start later)
    rpc_timeout: float = 30.0
    retry_for: float = 60.0  # seconds a worker that lost the server keeps trying to get back
    crash_after: int | None = None  # fault injection: exit abruptly after this many rounds
    leave_after: int | None = None  # fault injection: drop the connection after this many rounds, as a crash would
    corrupt_replica_at: int | None = None  # fault injection: flip a bit of the replica's theta in this round
    byzantine: float = 0.0  # fault injection: a hostile worker, its algorithm fed -byzantine x its gradient
    torch_threads: int = 1  # many workers share few cores: one thread each avoids oversubscription
    regression: bool = False  # a user file's label column is a real-valued target
    device: str = "cpu"  # where a torch task's model computes: cpu, cuda or auto (psrv.tasks.torch_task)
    security: tls.ClientSecurity | None = None  # TLS / mutual TLS / token (psrv.tls); None: plaintext


def load_training_data(
    spec: str, test_fraction: float, seed: int, regression: bool = False
) -> tuple[data.Dataset, data.Dataset]:
    """The (train, test) split every process of a run derives identically from the seed
    (:func:`psrv.data.load_split`: a data set, or the rows of a task that brings its own data)."""
    return data.load_split(spec, test_fraction, seed, regression)


def load_worker_data(cfg: WorkerConfig) -> data.Dataset:
    train, _ = load_training_data(cfg.data, cfg.test_fraction, cfg.seed, cfg.regression)
    if cfg.num_shards is None:
        return train
    return data.shard(train, cfg.shard or 0, cfg.num_shards, cfg.split, cfg.seed)


@dataclass
class WorkerResult:
    worker_id: str
    index: int
    rounds: int = 0
    uploads: int = 0
    skips: int = 0
    rejected: int = 0
    grad_evals: int = 0  # gradient evaluations (a LASG round costs two; an unselected one none)
    snapshots: int = 0  # whole states received (joining, falling behind, or healing a mismatch)
    digest_mismatches: int = 0  # rounds whose replica disagreed with the server's digest
    reconnects: int = 0  # times the worker lost the server and registered again
    bytes_up: int = 0
    bytes_down: int = 0
    final_params: np.ndarray | None = None


def worker_rng(seed: int, shard: int | None, worker_id: str) -> np.random.Generator:
    """The worker's random stream (minibatches, stochastic compressors), seeded from its stable
    identity -- its shard, else its id -- never from the order in which workers happened to
    register, so the same seed gives the same run."""
    identity = shard if shard is not None else (1 << 32) + zlib.crc32(worker_id.encode())
    return np.random.default_rng([seed, identity])


class ServerLost(RuntimeError):
    """The worker could not reach the server for as long as it was told to try (one line)."""


def check_address(address: str) -> str:
    """``address`` if it is a gRPC target a worker can dial: ``HOST:PORT`` (``[IPv6]:PORT``) with a
    port in 1..65535, or a target with a scheme (``dns:///host:port``, ``unix:/path``, ...);
    ``ValueError`` (one line) otherwise, so ``localhost`` or ``host:http`` fail at once instead
    of after a connect timeout."""
    if address.startswith(("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")):
        return address  # gRPC's own target syntax: gRPC checks it
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})", address)
    if m is None or not 1 <= int(m.group(2)) <= 65535:
        raise ValueError(f"server address {address!r} is not HOST:PORT (a port in 1..65535), e.g. 127.0.0.1:50051")
    return address


@dataclass
class Backoff:
    """Exponential backoff with full jitter (M. Brooker, "Exponential Backoff And Jitter", AWS
    Architecture Blog, 2015): before retry n = 0, 1, 2, ... sleep ``U(0, 1) * min(cap, base * 2**n)``
    seconds. The jitter spreads the retries of many workers that lost the server at the same moment,
    so a restarted server is not hit by all of them at once."""

    base: float = 0.1
    cap: float = 5.0
    rng: np.random.Generator = field(default_factory=np.random.default_rng)  # OS entropy: workers differ

    def delay(self, n: int) -> float:
        return float(self.rng.uniform(0.0, 1.0)) * min(self.cap, self.base * 2.0 ** min(n, 64))


#: statuses of a broken connection or of a round the worker missed: reconnect (register again, resync)
_RECOVERABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # server down or restarting, connection refused or lost
        grpc.StatusCode.DEADLINE_EXCEEDED,  # no answer in time (a cut link)
        grpc.StatusCode.CANCELLED,  # the server ended the call (shutting down)
        grpc.StatusCode.ALREADY_EXISTS,  # a report for a round that already has one
        grpc.StatusCode.FAILED_PRECONDITION,  # a report for a round that has closed
        grpc.StatusCode.NOT_FOUND,  # a server that does not know this worker (restarted)
        grpc.StatusCode.OUT_OF_RANGE,  # a round the server is not at
    }
)


def _cause(exc: BaseException) -> str:
    """One line saying why a call failed."""
    if isinstance(exc, grpc.RpcError):
        details = " ".join(str(exc.details() or "").split())
        return f"{exc.code().name}: {details[:300]}"
    return " ".join(str(exc).split())[:300]


class _Retry:
    """The retries of one outage: the first failure starts the clock, :meth:`ok` (the server
    answered) stops it. :meth:`failed` sleeps :class:`Backoff`'s delay, or raises
    :class:`ServerLost` once ``budget`` seconds have passed since the first failure."""

    def __init__(self, address: str, backoff: Backoff) -> None:
        self.address, self.backoff = address, backoff
        self.since: float | None = None
        self.attempt = 0

    def ok(self) -> None:
        self.since, self.attempt = None, 0

    def left(self, budget: float) -> float:
        """Seconds of ``budget`` left in this outage (all of it when there is none)."""
        return budget if self.since is None else budget - (time.monotonic() - self.since)

    def failed(self, exc: BaseException, budget: float, flag: str) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since, self.attempt = now, 0
        spent = now - self.since
        if spent >= budget:
            raise ServerLost(
                f"cannot reach the server at {self.address}: {_cause(exc)}; tried for {spent:.0f} s ({flag} {budget:g})"
            ) from exc
        pushback = rpc.retry_after(exc) or 0.0  # the server's word on when to try again, where it gave one
        delay = min(max(self.backoff.delay(self.attempt), pushback), budget - spent)
        log.log(logging.INFO if self.attempt else logging.WARNING, "server at %s: %s; retrying in %.2f s (%.0f s left)",
                self.address, _cause(exc), delay, budget - spent)  # fmt: skip
        self.attempt += 1
        time.sleep(delay)


def initial_state(algo: Any, dim: int, reply: pb.RegisterResponse) -> Any:
    """The algorithm state to start from after a registration: a fresh ``init``, or, when the server
    says this worker rejoins (it restarted, or the server resumed from a checkpoint), the state
    rebuilt from what the server handed back (``Algorithm.rejoin``: accumulating rules take their
    row of the server's sum). A worker that re-registers must also drop its replica and ask for
    the model from round ``reply.rejoin.round`` (or 0: the server serves its current round)."""
    if not reply.HasField("rejoin"):
        return algo.init(dim)
    round_, contribution = codec.rejoin_from_proto(reply.rejoin, dim)
    log.warning("rejoining at round %d%s", round_, "" if contribution is None else " from the server's stored sum")
    return algo.rejoin(dim, contribution)


class _Gradients:
    """This round's (mini)batch and a counted gradient oracle on it.

    With ``batch`` B < n_m the rows are drawn without replacement from the worker's rng
    and the objective weight is rescaled (total N*B/n_m) so the minibatch gradient is an
    unbiased estimate of grad f_m; every evaluation in the round uses the same rows."""

    def __init__(self, task: Any, ds: data.Dataset, mb: codec.ModelMessage, batch: int, rng: np.random.Generator):
        self.task, self.num_workers, self.evals = task, mb.num_workers, 0
        self.ds, self.mb, self.batch, self.rng = ds, mb, batch, rng
        if 0 < batch < len(ds):
            rows = rng.choice(len(ds), batch, replace=False)
            self.X, self.y, self.total = ds.X[rows], ds.y[rows], mb.total_samples * batch / len(ds)
        else:
            self.X, self.y, self.total = ds.X, ds.y, mb.total_samples

    def loss_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        self.evals += 1
        return self.task.local_loss_grad(theta, self.X, self.y, self.total, self.num_workers)

    def grad_at(self, theta: np.ndarray) -> np.ndarray:
        return self.loss_grad(theta)[1]

    def local_grad_at(self, theta: np.ndarray) -> np.ndarray:
        """The gradient at ``theta`` on a fresh minibatch (a local step of psrv.algorithms.local)."""
        fresh = _Gradients(self.task, self.ds, self.mb, self.batch, self.rng)
        self.evals += 1
        return fresh.loss_grad(theta)[1]


class Downlink:
    """The worker's view of the model. A plain broadcast gives theta directly; while the server
    sends updates, the worker keeps a :class:`psrv.replica.Replica` of the server's state, replays
    every round's close, and checks the digest; a replica that disagrees (or is missing, or is of
    another round) is dropped and the worker asks for a snapshot -- counted and logged.

    ``share``: the :class:`psrv.replica.ReplicaShare` of the host's workers that talk to the same
    server: the replica is then one of the host's, never changed in place (a worker alone changes
    its own in place, with no copy)."""

    def __init__(
        self,
        worker_id: str,
        opt: ServerOpt,
        depth: int,
        dtype: np.dtype,
        corrupt_at: int | None = None,
        down: DownCompressor | None = None,
        share: ReplicaShare | None = None,
    ):
        self.worker_id, self.opt, self.depth, self.dtype, self.down = worker_id, opt, depth, dtype, down
        self.replica: Replica | None = None
        self.corrupt_at, self.share = corrupt_at, share
        self.snapshots = self.mismatches = 0

    def request(self, round_: int) -> pb.GetModelRequest:
        msg = pb.GetModelRequest(worker_id=self.worker_id, round=round_)
        if self.replica is not None:
            msg.replica_round = self.replica.round
        return msg

    def receive(self, m: codec.ModelMessage) -> tuple[np.ndarray, tuple[float, ...], np.ndarray] | None:
        """(theta to compute at, step history, theta in float64), or None: ask again (snapshot).
        A dense broadcast's float64 theta is made only for the final model (40 MB -> 80 MB of
        conversion per round at d = 1e7 otherwise)."""
        if m.form == "dense":
            self.replica = None
            theta = m.params if m.params.flags.writeable else np.array(m.params)  # torch wants it writable
            return theta, m.recent_step_sq, theta.astype(np.float64) if m.done else theta
        share = self.share
        if m.form == "snapshot":
            history = StepHistory(self.depth)
            for step_sq in reversed(m.recent_step_sq):
                history.push(step_sq)
            if self.down is None:
                self.opt.check_state(m.opt_state, m.theta.size)  # ValueError: not this run's optimizer's
            replica = Replica(m.round, m.theta, m.total, history, m.opt_state)
            self.snapshots += 1
        else:
            replica = self.replica
            if replica is None or replica.round != m.round - 1:
                log.warning("worker %s: no replica of round %d; asking for a snapshot", self.worker_id, m.round - 1)
                self.replica = None
                return None
            if m.form == "compressed":  # EF21-P: w moves by the decoded step; the history comes with it
                if share is None:
                    replica.move(self.down, m.step)
                else:
                    replica = share.child(replica, lambda base: base.moved(self.down, m.step), m.digest)
            elif share is None:
                replica.advance(m.change, self.opt)
            else:
                replica = share.child(replica, lambda base: base.advanced(m.change, self.opt), m.digest)
        if replica.digest() != m.digest:
            self.mismatches += 1
            log.warning("worker %s: replica disagrees with the server in round %d; asking for a snapshot",
                        self.worker_id, m.round)  # fmt: skip
            self.replica = None
            return None
        if share is not None:
            replica = share.canonical(replica)
        if self.corrupt_at == m.round:  # fault injection: the next round's digest must catch this
            replica = replica.copy() if share is not None else replica  # the host's others keep theirs
            replica.corrupt()
        self.replica = replica
        theta = replica.theta.astype(self.dtype)  # what a dense broadcast would carry
        history = m.recent_step_sq if m.form == "compressed" or self.down is not None else replica.history.recent()
        return theta, history, replica.theta

    def aggregate(self) -> np.ndarray | None:
        """The previous round's aggregate, exact, read-only (FedAvg-M's g^r, SCAFFOLD's c): from the
        replica; None without one or under a compressed downlink (which replicates only ``w``)."""
        if self.replica is None or self.down is not None:
            return None
        view = self.replica.total.view()
        view.flags.writeable = False
        return view


def local_smoothness(task: Any, ds: data.Dataset, total_samples: float, num_workers: int) -> float | None:
    """L_m of f_m: the task's own ``local_smoothness`` where it has one (exact for linreg),
    else its bound on this shard scaled by n_m/N (over-counting the regulariser by at most
    the difference between n_m/N and 1/M). None when the task has no bound (the MLP)."""
    if not len(ds):
        return None
    exact = getattr(task, "local_smoothness", None)
    if exact is not None:
        return float(exact(ds.X, total_samples, num_workers))
    bound = getattr(task, "smoothness", None)
    return None if bound is None else float(bound(ds.X)) * len(ds) / total_samples


class UnaryRounds:
    """Rounds over unary calls: a GetModel long poll, then a Push or a Skip (``--transport unary``).
    A report too late for its round (FAILED_PRECONDITION), or a second one for it (ALREADY_EXISTS),
    is remembered and handed out with the next model, as the Rounds stream's ``rejected`` is."""

    def __init__(self, stub: rpc.CountingStub, cfg: WorkerConfig) -> None:
        self.stub, self.cfg = stub, cfg
        self._rejected: str | None = None

    def model(self, request: pb.GetModelRequest, dim: int) -> tuple[codec.ModelMessage, str | None]:
        rejected, self._rejected = self._rejected, None
        while True:
            try:
                return codec.model_from_proto(self.stub.GetModel(request, timeout=self.cfg.rpc_timeout), dim), rejected
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                # the long poll expired; the round has not started yet

    def report(self, k: int, payload: Any, reason: str, loss: float | None, zstd: bool, smooth: float | None) -> None:
        cfg = self.cfg
        try:
            if payload is None:
                self.stub.Skip(codec.skip_to_proto(cfg.worker_id, k, reason, loss), timeout=cfg.rpc_timeout)
            else:
                upload = codec.upload_to_wire(cfg.worker_id, k, loss, payload, zstd=zstd, smoothness=smooth)
                self.stub.Push(upload, timeout=cfg.rpc_timeout)  # streamed when big
        except grpc.RpcError as exc:  # the round closed, or it has a report from us: go on with the next
            if exc.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
                raise
            self._rejected = exc.details()

    def close(self) -> None:
        pass


class StreamRounds:
    """Rounds on one persistent stream (:class:`psrv.rpc.RoundStream`, the default): the server
    sends each round's broadcast, the worker answers with its report; asking for a round again
    without having reported it is a ``resync`` (a snapshot comes)."""

    def __init__(self, stub: rpc.CountingStub, cfg: WorkerConfig) -> None:
        self.stub, self.cfg = stub, cfg
        self.stream: rpc.RoundStream | None = None
        self._reported = True
        self._finished = False

    def model(self, request: pb.GetModelRequest, dim: int) -> tuple[codec.ModelMessage, str | None]:
        if self.stream is None:
            opened = pb.RoundsOpen(worker_id=request.worker_id, round=request.round)
            if request.HasField("replica_round"):
                opened.replica_round = request.replica_round
            self.stream = self.stub.Rounds(opened)
        elif not self._reported:
            self.stream.resync()
        self._reported = False
        data, rejected = self.stream.receive()
        model = codec.model_from_wire(data, dim)  # a big dense model's values stay where they arrived
        self._finished = model.done
        return model, None if rejected is None else rejected.reason

    def report(self, k: int, payload: Any, reason: str, loss: float | None, zstd: bool, smooth: float | None) -> None:
        assert self.stream is not None
        self._reported = True
        if payload is None:
            self.stream.skip(codec.rounds_skip(reason, loss))
        else:
            self.stream.push(codec.upload_to_wire(self.cfg.worker_id, k, loss, payload, zstd=zstd, smoothness=smooth))

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close(finished=self._finished)


def _connection_lost(exc: BaseException) -> bool:
    """The server is out of reach, or too busy this moment: back off and try again."""
    if not isinstance(exc, grpc.RpcError):
        return False
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a limit that passes (others' load) says when to retry;
        return rpc.retry_after(exc) is not None  # the rest (id length, worker slots, sizes) stays: the worker exits
    return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


def _recoverable(exc: BaseException) -> bool:
    """A failure in the rounds after which the worker reconnects instead of exiting."""
    return isinstance(exc, stream.StreamError) or (isinstance(exc, grpc.RpcError) and exc.code() in _RECOVERABLE)


_threads_set: int | None = None


def _limit_threads(n: int) -> None:
    global _threads_set
    import torch

    torch.set_num_threads(n)
    # numpy's BLAS too: its idle threads spin after every call (a third of a worker's CPU at d = 1e7)
    threadpoolctl.threadpool_limits(n, user_api="blas")
    _threads_set = n


def run_worker(
    cfg: WorkerConfig,
    dataset: data.Dataset | None = None,
    channel: grpc.Channel | None = None,
    rounds: Callable[[rpc.CountingStub, WorkerConfig], Any] | None = None,
    replicas: ReplicaShare | None = None,
) -> WorkerResult:
    """Register, then train until the server sends the final model; reconnect whenever the server
    is lost (see the module's docstring). ``channel``: a channel to ``cfg.server`` that this worker
    shares with others (the logical workers of one process, :mod:`worker.host`); it is used as it
    is, for every connection, and not closed here. ``rounds(stub, cfg)``: the transport of the rounds
    when the server asks for streams (default :class:`StreamRounds`; a host's workers share one
    stream, :class:`worker.host.HostedRounds`). ``replicas``: the replicas this worker shares with
    the others of its host that talk to the same server (else it keeps its own). Raises
    ``ValueError`` for a malformed server address, :class:`ServerLost` when the server stays out of
    reach, ``grpc.RpcError`` for what retrying cannot fix (the run failed, the server refuses this
    worker or its data)."""
    check_address(cfg.server)
    memory.tune_malloc()  # malloc set up for big messages (psrv.memory)
    if _threads_set != cfg.torch_threads:  # once per process (the logical workers of a host share it)
        _limit_threads(cfg.torch_threads)
    ds = dataset if dataset is not None else load_worker_data(cfg)
    request = pb.RegisterRequest(
        worker_id=cfg.worker_id, num_samples=len(ds), n_features=ds.n_features, n_classes=ds.n_classes
    )
    counter = rpc.ByteCounter()  # the bytes of every connection the worker makes
    retry = _Retry(cfg.server, Backoff())
    job: _Job | None = None
    while True:
        security = cfg.security or tls.ClientSecurity()
        own = channel is None
        opened = security.channel(cfg.server, rpc.channel_options() + rpc.keepalive_options()) if own else None
        with opened if own else contextlib.nullcontext(channel) as conn:
            if own and job is None and security.ca is not None:  # a refused certificate: fail now, saying why
                tls.check_handshake(conn, cfg.server, security)
            stub = rpc.CountingStub(conn, counter)
            try:
                if job is None:
                    timeout = max(1.0, min(cfg.rpc_timeout, retry.left(cfg.connect_timeout)))
                    job = _Job(cfg, ds, stub.Register(request, timeout=timeout), replicas)
                else:
                    job.register_again(stub, request, max(1.0, min(cfg.rpc_timeout, retry.left(cfg.retry_for))))
                return job.run(stub, retry, rounds)
            except (grpc.RpcError, stream.StreamError) as exc:
                if job is None:
                    if not _connection_lost(exc):
                        raise
                    retry.failed(exc, cfg.connect_timeout, "--connect-timeout")
                elif (job.registered and _recoverable(exc)) or _connection_lost(exc):
                    job.lost(exc)
                    retry.failed(exc, cfg.retry_for, "--retry-for")
                else:
                    raise


#: :meth:`_Job.take`'s answer when the worker's rounds on this connection are over
STOP = object()


class _Job:
    """One worker's run: its task, algorithm state, downlink view and counts, across every
    connection it makes to the server (:meth:`run` on each)."""

    def __init__(
        self, cfg: WorkerConfig, ds: data.Dataset, reply: pb.RegisterResponse, replicas: ReplicaShare | None = None
    ) -> None:
        self.cfg, self.ds, self.reply = cfg, ds, reply
        self.registered = True
        conf = self.conf = reply.config
        self.algo = make_algorithm(conf.algorithm, dict(conf.options), conf.compressor)
        self.task = make_task(conf.task, ds.n_features, ds.n_classes, device=cfg.device, **dict(conf.task_options))
        if isinstance(self.task, LogReg):  # it only reads its rows: read-only, it may keep them sparse (its docstring)
            rows = ds.X.view()
            rows.setflags(write=False)
            ds = self.ds = replace(ds, X=rows)
        # warm up (torch's lazy initialisation) while the others register, not inside round 0's deadline
        self.task.local_loss_grad(np.zeros(self.task.dim), ds.X[:2], ds.y[:2], len(ds), max(1, conf.num_workers))
        self.rng = worker_rng(conf.seed, cfg.shard, cfg.worker_id)
        self.state: Any = initial_state(self.algo, self.task.dim, reply)
        self.result = WorkerResult(cfg.worker_id, reply.worker_index)
        self.down = Downlink(
            cfg.worker_id,
            make_server_opt(conf.server_opt, self.algo.lr),
            self.algo.history_depth,
            codec.model_dtype(conf),
            cfg.corrupt_replica_at,
            DownCompressor(conf.down_compressor) if conf.down_compressor else None,
            replicas,
        )
        self.k = 0
        self.pending: tuple[Any, bool] | None = None  # the last report's (new state, uploaded): committed once accepted
        log.info("worker %s registered as %d: %s", cfg.worker_id, reply.worker_index, conf.algorithm)

    def lost(self, exc: BaseException) -> None:
        """The connection broke: start over as a restarted worker would, at the server's round, from
        a snapshot and the algorithm's initial state (the last report's fate is unknown, and the
        server may be a new one, so no state that the server's may not match is kept)."""
        if self.registered:  # the first failure of an outage (the retries log their own)
            log.warning("worker %s lost the server at %s: %s", self.cfg.worker_id, self.cfg.server, _cause(exc))
        self.registered = False
        self.state, self.pending, self.k = self.algo.init(self.task.dim), None, 0
        self.down.replica = None

    def register_again(self, stub: rpc.CountingStub, request: pb.RegisterRequest, timeout: float) -> None:
        """Register under the same id after a lost connection (the server's rejoin). ALREADY_EXISTS:
        the server still holds this registration (it has not started training, or has finished)."""
        try:
            reply = stub.Register(request, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            stub.model_dim = self.conf.dim
        else:
            if reply.config != self.conf:
                raise ServerLost(
                    f"the server at {self.cfg.server} came back with another job ({reply.config.algorithm}, "
                    f"dim {reply.config.dim}; this worker ran {self.conf.algorithm}, dim {self.conf.dim})"
                )
            self.result.index = reply.worker_index
            self.reply = reply
            self.state = initial_state(self.algo, self.task.dim, reply)  # accumulating rules: the server's row
        self.registered = True
        self.result.reconnects += 1
        log.warning("worker %s registered again with the server at %s", self.cfg.worker_id, self.cfg.server)

    def run(self, stub: rpc.CountingStub, retry: _Retry, make_rounds: Callable[..., Any] | None = None) -> WorkerResult:
        """Rounds on this connection until the final model; the result. The rounds' transport
        (``make_rounds(stub, cfg)``, on a server that asks for streams) either hands out models and
        takes reports (``model``, ``report``), or runs this job's rounds itself (``drive(job,
        retry)``: a host's logical workers, :class:`worker.host.HostedRounds`)."""
        streams = self.conf.round_transport == pb.ROUND_TRANSPORT_STREAM
        rounds = (make_rounds or StreamRounds)(stub, self.cfg) if streams else UnaryRounds(stub, self.cfg)
        try:
            if hasattr(rounds, "drive"):
                rounds.drive(self, retry)
            else:
                while True:
                    mb, rejected = rounds.model(self.down.request(self.k), self.task.dim)
                    retry.ok()  # the server answered on this connection
                    step = self.take(mb, rejected)
                    if step is STOP:
                        break
                    if step is not None:
                        rounds.report(*step[0])
                        self.commit(step[1])
        finally:
            rounds.close()
        result = self.result
        result.snapshots, result.digest_mismatches = self.down.snapshots, self.down.mismatches
        result.bytes_up = stub.counter.total("up")
        result.bytes_down = stub.counter.total("down")
        return result

    def take(self, mb: codec.ModelMessage, rejected: str | None) -> Any:
        """One round on the model ``mb`` (``rejected``: why the last report was refused, or None):
        :data:`STOP` (the final model, or this worker leaves), None (ask for this round again,
        without a replica: a snapshot comes), or ``(report, pending)``: the arguments of the
        transport's ``report``, then, once it is sent, :meth:`commit` of ``pending``."""
        cfg, conf, ds, task, algo, down, result = (
            self.cfg, self.conf, self.ds, self.task, self.algo, self.down, self.result
        )  # fmt: skip
        rng, batch, wants_smoothness = self.rng, self.algo.batch, self.algo.tracks_theta_hat
        # fault injection, once the last report has been answered (the next model came)
        if cfg.leave_after is not None and result.rounds >= cfg.leave_after:
            log.error("fault injection: worker %s leaves after %d rounds", cfg.worker_id, result.rounds)
            return STOP
        if cfg.crash_after is not None and result.rounds >= cfg.crash_after:
            log.error("fault injection: worker %s exits after %d rounds", cfg.worker_id, result.rounds)
            os._exit(17)
        if self.pending is not None:  # the last report's fate arrives with the next model
            if rejected is None:
                self.state, uploaded = self.pending
                result.uploads += uploaded
                result.skips += not uploaded
            else:
                result.rejected += 1  # the round closed before our report arrived: nothing was absorbed
                log.warning("round %d report rejected: %s", self.k - 1, rejected)
            self.pending = None
        self.k = k = mb.round
        view = down.receive(mb)
        if view is None:
            return None
        theta, recent_step_sq, exact = view
        if mb.done:
            result.final_params = np.array(exact, dtype=np.float64)
            return STOP
        selected = mb.selected
        # the previous round's aggregate, exact from the replica (FedAvg-M's g^r, SCAFFOLD's c)
        aggregate = down.aggregate()
        if selected is not None and self.reply.worker_index not in selected:
            seen = RoundInfo(k, mb.num_workers, share=len(ds) / mb.total_samples, aggregate=aggregate)
            # computes nothing
            return (k, None, "not_selected", None, conf.zstd, None), (algo.observe(self.state, seen), False)
        grads = _Gradients(task, ds, mb, batch, rng)
        loss, grad = grads.loss_grad(theta)
        if cfg.byzantine:  # fault injection: a byzantine worker (psrv.robust's adversary)
            grad = -cfg.byzantine * grad
        info = RoundInfo(
            k, mb.num_workers, tuple(recent_step_sq), theta, grads.grad_at,
            grads.local_grad_at, len(ds) / mb.total_samples, aggregate,
        )  # fmt: skip
        decision = algo.step(self.state, grad, info, rng)
        result.grad_evals += grads.evals
        # only server-side selection uses L_m, and the bound costs an eigendecomposition
        first = wants_smoothness and result.uploads == 0 and decision.payload is not None
        smooth = local_smoothness(task, ds, mb.total_samples, mb.num_workers) if first else None
        report = (k, decision.payload, "lazy_rule", loss, conf.zstd, smooth)
        return report, (decision.state, decision.payload is not None)

    def commit(self, pending: tuple[Any, bool]) -> None:
        """The report of :meth:`take` was sent: keep its state until the next model tells its fate."""
        self.pending = pending
        self.result.rounds += 1
        self.k += 1

"""A decentralized worker (``psrv start-worker --gossip-listen HOST:PORT``, ``--algorithm dsgd``):
it serves ``GossipService`` for its neighbours, joins the coordinator (:mod:`psrv.mesh`), then every
round runs adapt-then-combine DSGD (Lopes & Sayed, ICASSP 2007; :mod:`psrv.decentralized`):

    x^{k+1/2} = x^k - lr * n * grad f_i(x^k)     (its own data; n * f_i averages to f)
    send x^{k+1/2} to every neighbour (Exchange), receive theirs
    x^{k+1}   = w_ii x^{k+1/2} + sum_j w_ij x_j^{k+1/2}
    Barrier(k): loss, disagreement, bytes per neighbour

Half-steps travel in the run's model type (float32 by default); a worker combines its own
half-step rounded the same way, so with doubly stochastic W the average of the models moves
exactly by the average of the (rounded) steps. Bytes are counted per neighbour, both ways.
There is no rejoin: a worker that fails ends the run (its neighbours cannot go on without it).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import threadpoolctl

from psrv import codec, data, meshrpc
from psrv.algorithms import make_algorithm
from psrv.rpc import Received, channel_options, keepalive_options
from psrv.tasks import make_task
from psrv.v1 import mesh_pb2 as mpb
from worker.client import WorkerConfig, WorkerResult, check_address, load_worker_data, worker_rng

log = logging.getLogger("psrv.gossip")


class GossipError(RuntimeError):
    """A decentralized run this worker cannot go on with (one line)."""


class Mailbox:
    """The half-step models neighbours sent, by (round, sender), with the bytes each took."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._got: dict[tuple[int, str], np.ndarray] = {}
        self.received: dict[tuple[int, str], int] = {}

    def put(self, sender: str, round_: int, values: np.ndarray, nbytes: int) -> None:
        with self._cond:
            self._got[round_, sender] = values
            self.received[round_, sender] = nbytes
            self._cond.notify_all()

    def take(self, round_: int, senders: list[str], timeout: float) -> dict[str, np.ndarray]:
        """Every sender's model of ``round_`` (waiting up to ``timeout`` s); ``GossipError`` naming who is late."""
        with self._cond:
            if not self._cond.wait_for(lambda: all((round_, s) in self._got for s in senders), timeout=timeout):
                late = [s for s in senders if (round_, s) not in self._got]
                raise GossipError(f"round {round_}: no model from neighbour {', '.join(late)} within {timeout:g} s")
            return {s: self._got.pop((round_, s)) for s in senders}


@dataclass
class GossipService:
    """This worker's ``GossipService``: accepts the half-steps of the expected neighbours."""

    mailbox: Mailbox
    dim: int = 0
    peers: frozenset[str] = field(default_factory=frozenset)
    #: set once the topology is known (a neighbour may send round 0 before this worker has read it)
    ready: threading.Event = field(default_factory=threading.Event)

    def exchange(self, req: Received, context: Any) -> bytes:
        msg = req.msg
        if not self.ready.wait(timeout=30.0):
            context.abort(grpc.StatusCode.UNAVAILABLE, "this worker has not joined the mesh yet")
        if msg.sender not in self.peers:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{msg.sender!r} is not a neighbour of this worker")
        try:
            values = codec.tensor_from_proto(msg.values, self.dim, "values")
        except codec.CodecError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.mailbox.put(msg.sender, int(msg.round), values, req.nbytes)
        return b""  # ExchangeResponse: empty


def serve_gossip(service: GossipService, listen: str, threads: int = 8) -> tuple[grpc.Server, int]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="psrv-gossip"),
        options=[*channel_options(), ("grpc.so_reuseport", 0), *keepalive_options(server=True)],
    )
    server.add_generic_rpc_handlers((meshrpc.generic_handler(meshrpc.GOSSIP_SERVICE, {"Exchange": service.exchange}),))
    port = server.add_insecure_port(listen)
    if port == 0:
        raise GossipError(f"cannot listen on {listen} for the gossip service (--gossip-listen)")
    server.start()
    return server, port


def advertised(listen: str, port: int) -> str:
    """The address neighbours dial: the listen host (0.0.0.0 / [::] are not dialable: loopback)."""
    host = listen.rpartition(":")[0]
    if host in ("", "0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def _join(coord: meshrpc.Caller, req: mpb.JoinRequest, cfg: WorkerConfig) -> tuple[mpb.JoinResponse, int, int]:
    """Join, repeating while the others have not joined yet or the coordinator is not up yet; the
    reply and the bytes of the call that got it (sent, received)."""
    deadline = time.monotonic() + cfg.connect_timeout
    while True:
        try:
            return coord.call("Join", req, timeout=max(1.0, min(cfg.rpc_timeout, 10.0)))
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                raise
            if time.monotonic() > deadline:
                raise GossipError(
                    f"could not join the dsgd run at {cfg.server} within {cfg.connect_timeout:g} s "
                    f"(--connect-timeout): {exc.details()}"
                ) from None
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                time.sleep(0.2)


def run_gossip_worker(
    cfg: WorkerConfig, listen: str = "127.0.0.1:0", dataset: data.Dataset | None = None
) -> WorkerResult:
    """Join the coordinator at ``cfg.server``, train every round with the neighbours it names, hand in
    the final model. ``GossipError`` when a neighbour or the coordinator stops answering."""
    check_address(cfg.server)
    import torch

    torch.set_num_threads(cfg.torch_threads)
    threadpoolctl.threadpool_limits(cfg.torch_threads, user_api="blas")
    ds = dataset if dataset is not None else load_worker_data(cfg)
    mailbox = Mailbox()
    service = GossipService(mailbox)
    server, port = serve_gossip(service, listen)
    channels: list[grpc.Channel] = []
    try:
        opts = channel_options() + keepalive_options()
        coord_channel = grpc.insecure_channel(cfg.server, options=opts)
        channels.append(coord_channel)
        coord = meshrpc.Caller(coord_channel, meshrpc.MESH_SERVICE)
        join = mpb.JoinRequest(
            worker_id=cfg.worker_id,
            address=advertised(listen, port),
            num_samples=len(ds),
            n_features=ds.n_features,
            n_classes=ds.n_classes,
        )
        reply, join_up, join_down = _join(coord, join, cfg)
        conf = reply.config
        algo = make_algorithm(conf.algorithm, dict(conf.options), conf.compressor)
        task = make_task(conf.task, ds.n_features, ds.n_classes, device=cfg.device, **dict(conf.task_options))
        service.dim, service.peers = task.dim, frozenset(p.worker_id for p in reply.neighbours)
        service.ready.set()
        n, total, lr, dtype = conf.num_workers, reply.total_samples, algo.lr, codec.model_dtype(conf)
        x = task.init_params(np.random.default_rng(conf.seed)).astype(np.float64)  # as the server's theta^0
        rng = worker_rng(conf.seed, cfg.shard, cfg.worker_id)
        peers = []
        for p in reply.neighbours:
            ch = grpc.insecure_channel(p.address, options=opts)
            channels.append(ch)
            peers.append((p.worker_id, p.weight, meshrpc.Caller(ch, meshrpc.GOSSIP_SERVICE)))
        ids = [p[0] for p in peers]
        # bytes_up / bytes_down: everything this worker sent / received, gossip and coordinator
        result = WorkerResult(cfg.worker_id, reply.worker_index, bytes_up=join_up, bytes_down=join_down)
        log.info(
            "worker %s registered as %d in the %s mesh; neighbours %s",
            cfg.worker_id,
            reply.worker_index,
            reply.topology,
            ", ".join(ids),
        )
        for k in range(reply.rounds):
            if 0 < algo.batch < len(ds):
                rows = rng.choice(len(ds), algo.batch, replace=False)
                X, y, weight = ds.X[rows], ds.y[rows], total * algo.batch / len(ds)
            else:
                X, y, weight = ds.X, ds.y, total
            loss, grad = task.local_loss_grad(x.astype(dtype), X, y, weight, n)
            result.grad_evals += 1
            half = (x - lr * n * np.asarray(grad, dtype=np.float64)).astype(dtype)
            msg = mpb.ExchangeRequest(sender=cfg.worker_id, round=k, values=codec.tensor_to_proto(half))
            payload = msg.SerializeToString()
            sends = [(wid, call.future("Exchange", payload, cfg.rpc_timeout)) for wid, _, call in peers]
            got = mailbox.take(k, ids, cfg.rpc_timeout)
            for wid, fut in sends:
                try:
                    fut.result()
                except grpc.RpcError as exc:
                    raise GossipError(f"round {k}: neighbour {wid} did not take the model: {exc.details()}") from None
            own = half.astype(np.float64)
            x = reply.self_weight * own
            disagreement = 0.0
            for wid, w, _ in peers:
                theirs = got[wid].astype(np.float64)
                x += w * theirs
                disagreement += w * float(np.sum((theirs - own) ** 2))
            links = [mpb.LinkBytes(peer=wid, sent=len(payload), received=mailbox.received.pop((k, wid))) for wid in ids]
            result.bytes_up += len(payload) * len(ids)
            result.bytes_down += sum(link.received for link in links)
            barrier = mpb.BarrierRequest(
                worker_id=cfg.worker_id, round=k, loss=float(loss), links=links, disagreement=disagreement
            )
            try:
                _, up, down = coord.call("Barrier", barrier, timeout=max(4 * cfg.rpc_timeout, 60.0))
            except grpc.RpcError as exc:
                raise GossipError(f"round {k}: the coordinator at {cfg.server}: {exc.details()}") from None
            result.bytes_up, result.bytes_down = result.bytes_up + up, result.bytes_down + down
            result.rounds += 1
            result.uploads += len(ids)  # models sent to neighbours
        _, up, down = coord.call(
            "Finish",
            mpb.FinishRequest(worker_id=cfg.worker_id, params=codec.tensor_to_proto(x)),
            timeout=cfg.rpc_timeout,
        )
        result.bytes_up, result.bytes_down = result.bytes_up + up, result.bytes_down + down
        result.final_params = x
        return result
    finally:
        for ch in channels:
            ch.close()
        server.stop(grace=1.0)  # neighbours' last Exchange calls were answered before their Barrier

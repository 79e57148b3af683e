"""The server's end of ``HostRounds`` (see psrv.proto): the Rounds streams of the logical workers
of one host (:mod:`worker.host`) multiplexed on one stream.

Each worker is served as its own Rounds stream would serve it (its round, its replica, its
reports counted, refused or ``rejected`` as there), with two differences: a broadcast that
several of the stream's workers get alike (a dense broadcast: all of them) goes down once, naming
them, and is counted once (server byte counter and the round record's ``bytes_down``, booked to
the first worker it names); and the stream serves the next round only once each of its workers
has answered the last, so one handler thread waits for a whole host. With M workers on P hosts
the server holds P streams and threads instead of M, and a round's broadcast is sent P times
instead of M (docs/scale.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from psrv import rpc, stream
from psrv.engine import EngineError, NotReady
from psrv.v1 import psrv_pb2 as pb

METHOD = "HostRounds"


def host_rounds(sv: Any, requests: Iterator[rpc.Received], context: grpc.ServicerContext) -> Iterator[bytes]:
    """The handler (``sv``: the :class:`psrv.server.Servicer`)."""
    if sv.auth is not None:
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            "HostRounds: this server checks credentials, and one stream has one caller's; run each worker on "
            "its own Rounds stream (virtual workers with per-worker --tls-cert/--token-file paths do)",
        )
    received = _next(sv, requests, context)
    if received is None:
        return
    first = received.msg
    if first.WhichOneof("request") != "open" or not first.open.workers:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "HostRounds: the first message must be `open`, naming workers")
    opens = list(first.open.workers)
    ids = [o.worker_id for o in opens]
    if len(set(ids)) != len(ids):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "HostRounds: a worker is named twice in `open`")
    releases = {}
    try:
        for wid in ids:
            sv._call(lambda *_, w=wid: sv._charge(context, w), None, 0, context)  # one call per worker, as Rounds
            sv._call(lambda *_, w=wid: sv.engine.worker(w), None, 0, context)  # NOT_FOUND before waiting
            releases[wid] = sv._call(lambda *_, w=wid: sv._hold(w, context), None, 0, context)
        tokens = {wid: sv.engine.connected(wid) for wid in ids}

        def gone() -> None:
            for wid, token in tokens.items():
                sv.engine.disconnected(wid, token, "its HostRounds stream closed")

        def leave(wid: str) -> None:  # as if its own Rounds stream had closed
            sv.engine.disconnected(wid, tokens[wid], "it left its host's HostRounds stream")
            releases[wid]()

        context.add_callback(gone)
        yield from _messages(sv, requests, context, opens, leave)
    finally:
        for release in releases.values():
            release()


def _next(sv: Any, requests: Iterator[rpc.Received], context: Any) -> Any:
    received = next(requests, None)
    if received is None:
        return None
    sv.counter.add("up", METHOD, received.nbytes)
    if isinstance(received.msg, stream.StreamError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(received.msg))
    return received


def _serve_all(sv: Any, need: list[str], k: dict[str, int], replica: dict[str, int | None], context: Any) -> Any:
    """The broadcasts (:meth:`psrv.engine.RoundEngine.serve`, not booked) of the workers of ``need``
    that can be served: every one is first asked without waiting (so each counts as ready for
    round 0), then the stream waits for the first that is not yet published, and asks again.
    Where some are served and the others' round is still not published after a second ask, the
    served are returned alone: the others' round may wait for their reports (a worker that asked
    for a snapshot of round k while the others wait for k+1). None: the host left."""
    served: dict[str, Any] = {}
    asked_again = False
    while True:
        todo = [w for w in need if w not in served]
        if not todo:
            return served
        for w in todo:
            got = _ask(sv, w, k[w], replica[w], 0.0, context)
            if got is not None:
                served[w] = got
        todo = [w for w in need if w not in served]
        if todo and served:
            if asked_again:
                return served
            asked_again = True
            continue
        if todo:
            got = _wait(sv, todo[0], k[todo[0]], replica[todo[0]], context)
            if got is None:
                return None
            served[todo[0]] = got


def _ask(sv: Any, worker_id: str, k: int, replica: int | None, wait: float, context: Any) -> Any:
    """The engine's broadcast for the worker (not booked), or None when it is not published within
    ``wait`` seconds; an engine error ends the stream with its status."""
    try:
        return sv.engine.serve(worker_id, k, wait, replica, count=False)
    except NotReady:
        return None
    except EngineError as exc:
        context.abort(getattr(grpc.StatusCode, exc.status), str(exc))


def _wait(sv: Any, worker_id: str, k: int, replica: int | None, context: Any) -> Any:
    """:meth:`psrv.server.Servicer._serve` (as long as the host is connected), not booked."""
    while context.is_active():
        got = _ask(sv, worker_id, k, replica, 5.0, context)
        if got is not None:
            return got
    return None


def _messages(
    sv: Any, requests: Iterator[rpc.Received], context: Any, opens: list[Any], leave: Callable[[str], None]
) -> Iterator[bytes]:
    k = {o.worker_id: o.round for o in opens}
    replica = {o.worker_id: (o.replica_round if o.HasField("replica_round") else None) for o in opens}
    need = [o.worker_id for o in opens]  # to be sent a broadcast
    waiting: set[str] = set()  # sent one, its report due
    finished: set[str] = set()  # had the final broadcast, or left
    while True:
        if need and not waiting:
            served = _serve_all(sv, need, k, replica, context)
            if served is None:
                return
            groups: dict[int, list[str]] = {}
            for w in served:
                groups.setdefault(id(served[w].data), []).append(w)
            for names in groups.values():
                s = served[names[0]]
                if not s.done:
                    sv.engine.count_down(names[0], s.round, len(s.data))  # as Rounds books it, once
                msg = pb.HostRoundsResponse(worker_ids=names)
                head = msg.SerializeToString()
                inner = stream.field_bytes(rpc.RESPONSE_MODEL, s.data)
                data = head + stream.field_bytes(2, inner)
                sv.counter.add("down", METHOD, len(data))
                yield data
                for w in names:
                    if s.done:
                        finished.add(w)
                    else:
                        k[w], replica[w] = s.round, (None if s.form == "dense" else s.round)
                        waiting.add(w)
            need = [w for w in need if w not in served]
            if len(finished) == len(k):
                return
            continue
        received = _next(sv, requests, context)
        if received is None:
            return
        msg = received.msg
        kind = msg.WhichOneof("request")
        if kind == "leave":
            w = msg.leave.worker_id
            if w not in k or w in finished:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"HostRounds: `leave` for worker {w!r}, not on this stream or gone")  # fmt: skip
            leave(w)
            finished.add(w)
            waiting.discard(w)
            need = [x for x in need if x != w]
            if len(finished) == len(k):
                return
            continue
        if kind == "report":
            batch = [(msg.report, received.nbytes)]
        elif kind == "reports" and msg.reports.reports:
            batch = _shares(msg.reports.reports, received.nbytes)
        else:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "HostRounds: `open` again; expected a worker's report")
        for report, nbytes in batch:
            w = report.worker_id
            if w not in waiting:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"HostRounds: a report for worker {w!r}, which has no broadcast to answer")  # fmt: skip
            waiting.discard(w)
            need.append(w)
            rejected = _report(sv, w, k[w], report.report, nbytes, context)
            if rejected is _RESYNC:  # the same round again, as a snapshot
                replica[w] = None
                continue
            if rejected is not None:
                out = pb.HostRoundsResponse(
                    worker_ids=[w], response=pb.RoundsResponse(rejected=pb.RoundsRejected(round=k[w], reason=rejected))
                ).SerializeToString()
                sv.counter.add("down", METHOD, len(out))
                yield out
            k[w] += 1


_RESYNC = object()


def _shares(reports: Any, nbytes: int) -> list[tuple[Any, int]]:
    """The reports of a ``reports`` message, each with the bytes it is charged: its own field's
    (tag, length, body), the first also the message's framing, so that they add up to ``nbytes``."""
    sizes = [1 + len(stream.varint(n)) + n for n in (r.ByteSize() for r in reports)]
    return list(zip(reports, stream.shares(sizes, nbytes), strict=True))


def _report(sv: Any, w: str, k: int, inner: Any, nbytes: int, context: Any) -> Any:
    """Worker ``w``'s report on round ``k`` (a RoundsRequest), as its Rounds stream would take it:
    the reason it was rejected, None, or ``_RESYNC``."""
    kind = inner.WhichOneof("request")
    if kind == "resync":  # charged, as on Rounds
        sv._call(lambda *_, w=w: sv._charge(context, w), None, 0, context)
        return _RESYNC
    if kind == "push":
        body: Any = memoryview(inner.push.SerializeToString())
    elif kind == "skip":
        body = inner.skip
    else:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"HostRounds: expected a report (skip, push or resync), got `{kind}`")  # fmt: skip
    return sv._call(sv._round_report, (w, k, kind, body, iter(())), nbytes, context)

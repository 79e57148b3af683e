"""``psrv inspect`` on the Rounds stream (one persistent bidirectional stream per worker, the
default transport): the same short runs as test_inspect.py through the tap, with the same
assertions where they carry over (every message decoded, counts and bytes equal the server's and
each worker's counters, one report per worker per round with the right worker and round, payload
kinds and byte splits, the byte identity), the pcap decoder on the tap's and the kernel's
captures, a hand-made stream with every kind of Rounds message (pieces, rejected, resync), and
the documented tshark commands on a stream run's capture (where tshark is installed)."""

from __future__ import annotations

import re
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection

from psrv import rpc, stream
from psrv.inspect.cli import summarize
from psrv.inspect.grpcmsg import BYTE_KEYS, PROTO_KEYS, ConnectionDecoder, describe, field_split
from psrv.inspect.http2 import CONNECTION_KEYS, PREFACE
from psrv.inspect.pcap import decode_pcap
from psrv.v1 import psrv_pb2 as pb
from tests.test_inspect import (
    ROUNDS,
    RUNS,
    STATUS_NOT_FOUND,
    M,
    Run,
    _by_conn,
    _documented,
    _for_run,
    _run,
    _sh,
    _stream_records,
    _without,
    tshark,  # noqa: F401 - the fixture
)

REPORTS = ("RoundsRequest.skip", "RoundsRequest.push", "RoundsRequest.push_piece", "RoundsRequest.resync")


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _run(tmp_path_factory.mktemp(f"{request.param}-stream"), request.param, transport="stream")


def _msgs(run: Run) -> list[dict[str, Any]]:
    return [r for r in run.records if r["type"] == "message"]


# ------------------------------------------------------------------------------ the tap


def test_stream_tap_decodes_every_message(run: Run) -> None:
    assert run.summary["rounds"] == ROUNDS and all(r is not None and r.rejected == 0 for r in run.results)
    msgs = _msgs(run)
    assert all(r["error"] is None and r["message"] for r in msgs)
    seen = Counter((r["dir"], r["method"]) for r in msgs)
    # every message the server read and every one it sent, nothing else: Register and Rounds
    assert seen == Counter({k: v for k, v in run.ps.counter.messages.items() if v})
    assert {m for _, m in seen} == {"Register", "Rounds"}
    for d in ("up", "down"):
        assert sum(r["proto_bytes"] for r in msgs if r["dir"] == d) == run.ps.counter.total(d)
        for method in rpc.METHODS:
            assert sum(r["proto_bytes"] for r in msgs if r["dir"] == d and r["method"] == method) == (
                run.ps.counter.bytes.get((d, method), 0)
            )
    # one stream per worker, and the ghost's: its `open` decoded, the reply trailers-only NOT_FOUND
    streams = {(r["conn"], r["stream"]) for r in msgs if r["method"] == "Rounds"}
    assert len(streams) == M + 1
    (ghost,) = [r for r in run.records if r["type"] == "frames"]
    assert ghost["method"] == "Rounds" and ghost["dir"] == "down" and ghost["worker"] == "ghost"
    assert ghost["round"] == ROUNDS + 5 and ghost["status"] == STATUS_NOT_FOUND and "unknown worker" in ghost["detail"]
    (opened,) = [r for r in msgs if r["worker"] == "ghost"]
    assert opened["message"] == "RoundsRequest.open" and opened["round"] == ROUNDS + 5
    # the workers' streams end after the final broadcast with OK: the worker ends its half and reads
    # the server's trailers (RoundStream.close); gRPC may still reset the stream once both are done
    for r in msgs:
        if r["method"] == "Rounds" and r["dir"] == "down":
            assert r["message"] in ("RoundsResponse.model", "RoundsResponse.model_piece")
            assert r["status"] == 0


def test_stream_tap_decoded_reports_match_the_run(run: Run) -> None:
    msgs = [r for r in _msgs(run) if r["method"] == "Rounds" and r["worker"] != "ghost"]
    reports = [r for r in msgs if r["message"] in REPORTS]
    # one report per worker per round, with the stream's worker and the round of the broadcast before it
    assert sorted((r["worker"], r["round"]) for r in reports) == sorted(
        (f"w{i}", k) for i in range(M) for k in range(ROUNDS)
    )
    pushes = [r for r in reports if r["message"] == "RoundsRequest.push"]
    skips = [r for r in reports if r["message"] == "RoundsRequest.skip"]
    assert len(pushes) == run.summary["uploads"] and len(skips) == run.summary["skips"]
    assert {r["kind"] for r in skips} <= {"lazy_rule", "not_selected"}
    kind, field = ("sparse", "indices") if run.ps.config.algorithm == "gd" else ("laq", "codes")
    assert {r["kind"] for r in pushes} == {kind}
    # the split goes through the oneof into the PushRequest's payload
    assert all(r["bytes"][field] > 0 and r["bytes"]["header"] < r["proto_bytes"] / 2 for r in pushes)
    # per stream, in time order: open, then broadcast / report pairs, the last broadcast final
    for conn, sid in {(r["conn"], r["stream"]) for r in msgs}:
        mine = [r for r in msgs if (r["conn"], r["stream"]) == (conn, sid)]
        assert [r["time"] for r in mine] == sorted(r["time"] for r in mine)
        worker = mine[0]["worker"]
        assert mine[0]["message"] == "RoundsRequest.open" and mine[0]["round"] == 0
        assert all(r["worker"] == worker for r in mine)
        models = [r for r in mine if r["message"] == "RoundsResponse.model"]
        assert [r["round"] for r in models] == list(range(ROUNDS + 1))
        assert [r["kind"] for r in models] == [""] * ROUNDS + ["final"]
        names = [r["message"] for r in mine[1:]]
        assert names[::2] == ["RoundsResponse.model"] * (ROUNDS + 1) and len(names) == 2 * ROUNDS + 1
        assert all(name in REPORTS for name in names[1::2])
        for model, report in zip(mine[1::2], mine[2::2], strict=False):
            assert report["round"] == model["round"]
        # the model's values (dense broadcasts) are split out as for GetModelResponse
        assert all(r["bytes"]["values"] == 0 or r["bytes"]["values"] <= r["proto_bytes"] - 2 for r in models)
    # per worker, the bytes its own stub counted (Register and its stream)
    for i, res in enumerate(run.results):
        mine = [r for r in _msgs(run) if r["worker"] == f"w{i}"]
        assert sum(r["proto_bytes"] for r in mine if r["dir"] == "up") == res.bytes_up
        assert sum(r["proto_bytes"] for r in mine if r["dir"] == "down") == res.bytes_down


def test_stream_tap_byte_split_adds_up_to_bytes_relayed(run: Run) -> None:
    conns = [r for r in run.records if r["type"] == "connection"]
    assert conns and all(r["error"] is None and r["balanced"] for r in conns)
    for r in _stream_records(run.records):
        assert set(r["bytes"]) == set(BYTE_KEYS)
        assert r["wire_bytes"] == sum(r["bytes"].values())
        assert r["proto_bytes"] == sum(r["bytes"][k] for k in PROTO_KEYS)
        assert r["bytes"]["grpc_prefix"] == (5 if r["type"] == "message" else 0)
    for d in ("up", "down"):
        relayed = sum(r["relayed"] for r in conns if r["dir"] == d)
        assert relayed == run.relayed[d] > 0
        conn_bytes = sum(r[k] for r in conns if r["dir"] == d for k in CONNECTION_KEYS)
        stream_bytes = sum(sum(r["bytes"].values()) for r in _stream_records(run.records) if r["dir"] == d)
        assert relayed == conn_bytes + stream_bytes
        assert all(r["partial"] == r["undecoded"] == 0 for r in conns)
        # late: the worker cancels its call once it has the final broadcast; up, that RST_STREAM (13
        # bytes) after the server's trailers, or down, the trailers (or a WINDOW_UPDATE) after it
        assert all(r["late"] <= 128 * (M + 1) for r in conns)
    assert sum(r["preface"] for r in conns) == len(PREFACE) * len(conns) // 2
    # the summary lists the oneof members as message kinds
    kinds = summarize(run.records)["kinds"]
    assert "Rounds up RoundsRequest.open" in kinds and "Rounds down RoundsResponse.model/final" in kinds


# ------------------------------------------------------------------------------ pcaps


def test_stream_pcap_of_the_tap_gives_the_same_records(run: Run) -> None:
    assert _by_conn(decode_pcap(run.tap_pcap).records) == _by_conn(run.records)  # times included
    assert _by_conn(decode_pcap(run.tap_pcap, port=run.server_port).records) == _by_conn(run.records)


def _settled(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records without what depends on the race at a stream's end: the worker cancels its call
    (RST_STREAM) once it has the final broadcast, while the server sends its trailers and both
    sides their last WINDOW_UPDATEs; which came first may differ between two vantage points (the
    tap's reads, the kernel's timestamps). So the frames after each direction's last message are
    charged to it in one and are ``late`` in the other, and the stream's records have the
    trailers' status in one and are ``reset`` in the other. The same for the unknown worker's
    stream (its NOT_FOUND against the client's end of its requests)."""
    last = {(r["conn"], r["stream"], r["dir"]): i for i, r in enumerate(records) if r["type"] != "connection"}
    out = []
    for i, r in enumerate(records):
        if r["type"] != "connection" and r["method"] == "Rounds":
            drop = ("status", "reset")
            if last[r["conn"], r["stream"], r["dir"]] == i:
                drop += ("bytes", "wire_bytes")
            r = {k: v for k, v in r.items() if k not in drop}
        elif r["type"] == "connection":
            assert r["balanced"] and r["error"] is None
            r = {k: v for k, v in r.items() if k not in ("late", "streams")}
        out.append(r)
    return out


@pytest.mark.root
def test_stream_kernel_capture_agrees_with_the_tap(run: Run) -> None:
    if run.live_pcap is None:
        pytest.skip("no AF_PACKET capture here (needs Linux and root)")
    assert run.capture["drops"] == 0
    legs = {port: _settled(decode_pcap(run.live_pcap, port).records) for port in (run.tap_port, run.server_port)}
    mine = _settled(run.records)
    assert _without(legs[run.tap_port], "time") == _without(mine, "time")
    assert _without(legs[run.server_port], "time", "conn") == _without(mine, "time", "conn")


# ------------------------------------------------------- every kind of Rounds message (h2)


def _rounds_conversation() -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """A Rounds stream between h2 state machines, every kind of message once at least: open; a
    model, a skip; a big model in pieces, an upload in pieces; rejected, a model, a resync, the
    same round again, a push; the final model and trailers. Returns the chunks as they crossed
    (with their times) and the messages."""
    c = H2Connection(H2Configuration(client_side=True))
    s = H2Connection(H2Configuration(client_side=False))
    chunks: list[tuple[str, bytes, float]] = []
    clock = [0.0]

    def flush() -> None:
        for _ in range(4):
            for conn, peer, d in ((c, s, "up"), (s, c, "down")):
                data = conn.data_to_send()
                if data:
                    clock[0] += 1.0
                    chunks.append((d, data, clock[0]))
                    peer.receive_data(data)

    def send(conn: H2Connection, msg: bytes, end: bool = False) -> None:
        conn.send_data(1, b"\0" + len(msg).to_bytes(4, "big") + msg, end_stream=end)
        flush()
        # the receiver keeps the windows open (as gRPC does): WINDOW_UPDATEs are stream bytes too
        receiver = s if conn is c else c
        if not end:
            receiver.increment_flow_control_window(len(msg) + 5, stream_id=1)
        receiver.increment_flow_control_window(len(msg) + 5)
        flush()

    c.initiate_connection()
    s.initiate_connection()
    flush()
    c.send_headers(
        1,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", f"/{rpc.SERVICE}/Rounds"),
            (":authority", "127.0.0.1"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    flush()
    s.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    flush()
    dense = pb.GetModelResponse(round=3, params=pb.DenseTensor(dtype=1, data=b"p" * 400), num_workers=2)
    big = pb.GetModelResponse(round=4, params=pb.DenseTensor(dtype=1, data=b"q" * 3000), num_workers=2)
    upload = pb.PushRequest(worker_id="w7", round=4, laq=pb.LaqPayload(dim=3000, bits=4, codes=b"c" * 1500))
    small = pb.PushRequest(sparse=pb.SparseTensor(dim=9, nnz=2, indices=b"ii", values=b"v" * 8))
    final = pb.GetModelResponse(round=6, done=True, params=pb.DenseTensor(dtype=1, data=b"f" * 40))
    opened = pb.RoundsRequest(open=pb.RoundsOpen(worker_id="w7", round=3, replica_round=2)).SerializeToString()
    skip = pb.RoundsRequest(skip=pb.RoundsSkip(reason=pb.SKIP_REASON_LAZY_RULE, local_loss=0.25))
    rejected = pb.RoundsResponse(rejected=pb.RoundsRejected(round=4, reason="round 4 is closed"))
    send(c, opened)
    send(s, stream.field_bytes(rpc.RESPONSE_MODEL, dense.SerializeToString()))
    send(c, skip.SerializeToString())
    for piece in stream.pieces(big.SerializeToString(), 1024, within=rpc.RESPONSE_MODEL_PIECE):
        send(s, piece)
    for piece in stream.pieces(upload.SerializeToString(), 1024, within=4):
        send(c, piece)
    send(s, rejected.SerializeToString())
    send(s, stream.field_bytes(rpc.RESPONSE_MODEL, pb.GetModelResponse(round=5).SerializeToString()))
    send(c, pb.RoundsRequest(resync=pb.RoundsResync()).SerializeToString())
    send(s, stream.field_bytes(rpc.RESPONSE_MODEL, pb.GetModelResponse(round=5, num_workers=2).SerializeToString()))
    send(c, pb.RoundsRequest(push=small).SerializeToString(), end=True)
    send(s, stream.field_bytes(rpc.RESPONSE_MODEL, final.SerializeToString()))
    s.send_headers(1, [("grpc-status", "0")], end_stream=True)
    flush()
    return chunks, {"dense": dense, "upload": upload, "small": small, "final": final}


def test_rounds_messages_every_kind() -> None:
    chunks, info = _rounds_conversation()
    dec = ConnectionDecoder("c")
    records = [r for d, b, t in chunks for r in dec.feed(d, b, t)] + dec.close(99.0)
    msgs = [r for r in records if r["type"] == "message"]
    got = [(r["dir"], r["message"], r["worker"], r["round"], r["kind"]) for r in msgs]
    assert got == [
        ("up", "RoundsRequest.open", "w7", 3, ""),
        ("down", "RoundsResponse.model", "w7", 3, ""),
        ("up", "RoundsRequest.skip", "w7", 3, "lazy_rule"),
        ("down", "RoundsResponse.model_piece", "w7", 4, "piece"),
        ("down", "RoundsResponse.model_piece", "w7", 4, "piece"),
        ("down", "RoundsResponse.model_piece", "w7", 4, "piece"),
        ("up", "RoundsRequest.push_piece", "w7", 4, "piece"),
        ("up", "RoundsRequest.push_piece", "w7", 4, "piece"),
        ("down", "RoundsResponse.rejected", "w7", 4, "rejected"),
        ("down", "RoundsResponse.model", "w7", 5, ""),
        ("up", "RoundsRequest.resync", "w7", 5, "resync"),
        ("down", "RoundsResponse.model", "w7", 5, ""),
        ("up", "RoundsRequest.push", "w7", 5, "sparse"),
        ("down", "RoundsResponse.model", "w7", 6, "final"),
    ]
    assert all(r["error"] is None and r["method"] == "Rounds" for r in msgs)
    by = {(r["message"], r["round"]): r for r in msgs}
    assert by["RoundsResponse.model", 3]["bytes"]["values"] == 400
    assert by["RoundsRequest.push", 5]["bytes"]["indices"] == 2 and by["RoundsRequest.push", 5]["bytes"]["values"] == 8
    assert by["RoundsResponse.model", 6]["bytes"]["values"] == 40
    assert msgs[-1]["status"] == 0  # the trailers are charged to the last message down
    for r in msgs:
        assert r["proto_bytes"] == sum(r["bytes"][k] for k in PROTO_KEYS)
        assert r["wire_bytes"] == sum(r["bytes"].values())
    conns = {r["dir"]: r for r in records if r["type"] == "connection"}
    for d, acct in conns.items():
        assert acct["balanced"] and acct["error"] is None
        fed = sum(len(b) for dd, b, _ in chunks if dd == d)
        streams = sum(r["wire_bytes"] for r in records if r["type"] != "connection" and r["dir"] == d)
        assert fed == acct["relayed"] == sum(acct[k] for k in CONNECTION_KEYS) + streams
    # chunk boundaries do not matter
    dec = ConnectionDecoder("c")
    split = [(d, b[i : i + 7], t) for d, b, t in chunks for i in range(0, len(b), 7)]
    assert [r for d, b, t in split for r in dec.feed(d, b, t)] + dec.close(99.0) == records


@pytest.mark.parametrize(
    "msg, want",
    [
        (
            pb.RoundsRequest(push=pb.PushRequest(worker_id="w", laq=pb.LaqPayload(dim=300, bits=4, codes=b"c" * 150))),
            {"codes": 150},
        ),
        (
            pb.RoundsRequest(push=pb.PushRequest(sparse=pb.SparseTensor(dim=9, nnz=2, indices=b"ii", values=b"v" * 8))),
            {"indices": 2, "values": 8},
        ),
        (
            pb.RoundsRequest(push=pb.PushRequest(zstd=pb.ZstdPayload(kind=pb.PAYLOAD_KIND_LAQ, data=b"z" * 300))),
            {"zstd": 300},
        ),
        (
            pb.RoundsResponse(model=pb.GetModelResponse(round=2, params=pb.DenseTensor(data=b"p" * 400))),
            {"values": 400},
        ),
        (pb.RoundsRequest(skip=pb.RoundsSkip(reason=pb.SKIP_REASON_LAZY_RULE, local_loss=0.1)), {}),
        (pb.RoundsRequest(push_piece=pb.PushStreamRequest(offset=5, total_size=10, data=b"d" * 5)), {}),
        (pb.RoundsResponse(rejected=pb.RoundsRejected(round=3, reason="late")), {}),
    ],
)
def test_rounds_field_split(msg: Any, want: dict[str, int]) -> None:
    split = field_split(msg.SerializeToString(), msg.DESCRIPTOR)
    assert sum(split.values()) == msg.ByteSize()
    assert {k: v for k, v in split.items() if k != "header" and v} == want


def test_rounds_describe_stays_unary_compatible() -> None:
    push = pb.PushRequest(worker_id="w", round=3, laq=pb.LaqPayload(codes=b"c"))
    assert describe("Push", "up", push.SerializeToString()) == {
        "message": "PushRequest",
        "worker": "w",
        "round": 3,
        "kind": "laq",
    }
    assert describe("Rounds", "up", pb.RoundsRequest(push=push).SerializeToString()) == {
        "message": "RoundsRequest.push",
        "worker": "w",
        "round": 3,
        "kind": "laq",
    }
    with pytest.raises(ValueError):
        describe("Rounds", "down", b"")  # a RoundsResponse with nothing set


# ------------------------------------------------------------ docs/wireshark.md with tshark

TSHARK_RUN = pytest.mark.parametrize("run", ["gd-topk"], indirect=True)  # every worker uploads every round


@TSHARK_RUN
def test_stream_documented_tshark_uploads(tshark: None, run: Run) -> None:  # noqa: F811
    rows = [line.split("\t") for line in _sh(_for_run(_documented("tshark uploads"), run)).splitlines()]
    seen = Counter(
        (w, int(k)) for _, workers, rounds in rows for w, k in zip(workers.split(","), rounds.split(","), strict=True)
    )
    pushes = [r for r in _msgs(run) if r["message"] == "RoundsRequest.push"]
    assert seen == Counter((r["worker"], r["round"]) for r in pushes)


@TSHARK_RUN
def test_stream_documented_tshark_bytes_up(tshark: None, run: Run) -> None:  # noqa: F811
    assert int(_sh(_for_run(_documented("tshark bytes_up"), run))) == run.ps.counter.total("up")


#: Wireshark's name of the message in each oneof member of RoundsRequest / RoundsResponse
_MEMBER = {
    f"psrv.v1.{f.message_type.name}": f.name
    for msg in (pb.RoundsRequest, pb.RoundsResponse)
    for f in msg.DESCRIPTOR.oneofs[0].fields
}


@TSHARK_RUN
def test_stream_documented_tshark_rounds(tshark: None, run: Run) -> None:  # noqa: F811
    """The documented listing of the Rounds streams: every message, with the member of its oneof,
    and every broadcast's round."""
    got: Counter[str] = Counter()
    rounds: Counter[int] = Counter()
    for line in _sh(_for_run(_documented("tshark rounds"), run)).splitlines():
        _, _, model_rounds, names = line.split("\t")
        names_ = names.split(",")
        for i, name in enumerate(names_):
            if name in ("psrv.v1.RoundsRequest", "psrv.v1.RoundsResponse"):
                got[_MEMBER[names_[i + 1]]] += 1
        rounds.update(int(k) for k in model_rounds.split(",") if k)
    msgs = [r for r in _msgs(run) if r["method"] == "Rounds"]
    assert got == Counter(r["message"].split(".")[1] for r in msgs)
    assert rounds == Counter(r["round"] for r in msgs if r["message"] == "RoundsResponse.model")


@pytest.mark.parametrize("run", ["laq"], indirect=True)  # skips and uploads
def test_stream_documented_display_filters(tshark: None, run: Run) -> None:  # noqa: F811
    """Every documented Rounds filter is valid with the documented options and picks some packets, not all."""
    argv = shlex.split(_for_run(_documented("tshark uploads"), run).replace("\\\n", " "))
    base = shlex.join(argv[: argv.index("-Y")])
    total = len(_sh(base).splitlines())
    filters = [re.split(r"\s{2,}", line)[0] for line in _documented("tshark display filters (Rounds)").splitlines()]
    assert len(filters) >= 8
    for f in filters:
        n = len(_sh(f"{base} -Y {shlex.quote(f)}").splitlines())
        assert 0 < n < total, f"{f!r} matches {n} of {total} packets"


def test_documents_the_rounds_records() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "wireshark.md").read_text()
    assert "RoundsRequest.skip" in text and "when the stream ends" in text

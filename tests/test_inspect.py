"""``psrv inspect``: the tap on a real short run (server + 2 worker threads, gd/top-k and LAQ, unary
calls; the Rounds stream: test_inspect_rounds.py),
byte accounting, the pcap decoder on the tap's capture, on a kernel capture of the same run
(AF_PACKET, where the test runs as root; tcpdump is not installed here) and on hand-made
captures with reordered, retransmitted and overlapping segments, the HTTP/2 parser on
edge cases generated with the h2 library, the protobuf field split, the CLI, and the tshark
commands and display filters of docs/wireshark.md on the tap's capture (where tshark is installed)."""

from __future__ import annotations

import ipaddress
import json
import random
import re
import shlex
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from h2.config import H2Configuration
from h2.connection import H2Connection

from psrv import codec, data, rpc
from psrv.inspect.cli import inspect, read_records, summarize
from psrv.inspect.grpcmsg import BYTE_KEYS, PROTO_KEYS, ConnectionDecoder, field_split
from psrv.inspect.http2 import CONNECTION_KEYS, PREFACE
from psrv.inspect.live import Frame, LiveCapture
from psrv.inspect.pcap import decode_pcap
from psrv.inspect.pcapfile import PcapError, PcapFile, read_packets
from psrv.inspect.tap import TapThread
from psrv.inspect.tcpip import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_NULL, ethernet, ip_tcp_packet, parse_tcp
from psrv.server import ParameterServer, ServerConfig, create_server
from psrv.v1 import psrv_pb2 as pb
from worker.client import WorkerConfig, load_training_data, run_worker

M, ROUNDS = 2, 6
RUNS = {
    "gd-topk": ("gd", "topk", {"lr": 0.05, "ratio": 0.1}),
    "laq": ("laq", "", {"lr": 0.05}),
}
STATUS_NOT_FOUND = 5
BIG = bytes(range(256)) * 4096  # 1 MiB of values in one rejected upload


def _can_capture() -> bool:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3)).close()
        return True
    except (OSError, AttributeError):
        return False


@dataclass
class Run:
    ps: ParameterServer
    summary: dict[str, Any]
    results: list[Any]
    records: list[dict[str, Any]]
    relayed: dict[str, int]
    tap_port: int
    server_port: int
    tap_pcap: Path
    live_pcap: Path | None
    capture: dict[str, int] | None


def _ghost_reports(port: int, transport: str) -> None:
    """Reports of an unknown worker after the run, answered NOT_FOUND (trailers-only replies).
    unary: a Skip and a big Push (many DATA frames, flow control on the stream and the connection);
    stream: a Rounds stream whose `open` names the unknown worker."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        if transport == "stream":
            call = channel.stream_stream(
                f"/{rpc.SERVICE}/Rounds",
                request_serializer=pb.RoundsRequest.SerializeToString,
                response_deserializer=pb.RoundsResponse.FromString,
            )
            opened = pb.RoundsRequest(open=pb.RoundsOpen(worker_id="ghost", round=ROUNDS + 5))
            with pytest.raises(grpc.RpcError) as err:
                list(call(iter([opened]), timeout=10))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            return
        stub = rpc.CountingStub(channel)
        big = pb.PushRequest(
            worker_id="ghost", round=ROUNDS + 5, dense=pb.DenseTensor(dtype=pb.DTYPE_FLOAT32, data=BIG)
        )
        for call, msg in [
            (stub.Skip, codec.skip_to_proto("ghost", ROUNDS + 5, "lazy_rule", 0.0)),
            (stub.Push, big),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                call(msg, timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _run(tmp: Path, name: str, transport: str = "unary") -> Run:
    """A short run through the tap; ``transport``: GetModel / Push / Skip calls (``unary``) or one
    Rounds stream per worker (``stream``, see test_inspect_rounds.py)."""
    algorithm, compressor, options = RUNS[name]
    ps = ParameterServer(
        ServerConfig(
            algorithm=algorithm,
            compressor=compressor,
            options=options,
            num_workers=M,
            rounds=ROUNDS,
            round_timeout=20.0,
            done_grace=5.0,
            transport=transport,
        )
    )
    server, port = create_server(ps)
    tap = TapThread(("127.0.0.1", port), pcap=tmp / "tap.pcap").start()
    cap = LiveCapture(tmp / "live.pcap", {tap.port, port}).start() if _can_capture() else None
    idle = False
    results: list[Any] = [None] * M
    try:
        train, _ = load_training_data("digits", 0.2, 0)

        def work(i: int) -> None:
            cfg = WorkerConfig(
                server=f"127.0.0.1:{tap.port}", worker_id=f"w{i}", data="digits", connect_timeout=20, rpc_timeout=20
            )
            results[i] = run_worker(cfg, data.shard(train, i, M))

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(M)]
        for t in threads:
            t.start()
        summary = ps.run()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        _ghost_reports(tap.port, transport)
        # let every client connection end before the server stops: otherwise the server's
        # GOAWAY races the closing client and the kernel may drop it after the tap relayed it
        idle = tap.wait_idle(10)
    finally:
        server.stop(grace=None)
        tap.wait_idle(10)  # also when the body failed before its own wait
        tap.close()
        capture = None
        if cap is not None:
            time.sleep(0.2)
            capture = cap.stop()
    assert idle, "the tap still had open connections"
    return Run(
        ps,
        summary,
        results,
        list(tap.records),
        dict(tap.tap.relayed),
        tap.port,
        port,
        tmp / "tap.pcap",
        tmp / "live.pcap" if cap is not None else None,
        capture,
    )


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _run(tmp_path_factory.mktemp(request.param), request.param)


def _stream_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["type"] in ("message", "frames")]


def _by_conn(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records per connection, in order (connections may overlap in time)."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        out[r["conn"]].append(r)
    return dict(out)


def _without(records: list[dict[str, Any]], *keys: str) -> list[str]:
    return sorted(json.dumps({k: v for k, v in r.items() if k not in keys}, sort_keys=True) for r in records)


# ------------------------------------------------------------------------------ the tap


def test_tap_decodes_every_message(run: Run) -> None:
    assert run.summary["rounds"] == ROUNDS and all(r is not None and r.rejected == 0 for r in run.results)
    msgs = [r for r in run.records if r["type"] == "message"]
    assert all(r["error"] is None and r["message"] for r in msgs)
    seen = Counter((r["dir"], r["method"]) for r in msgs)
    # every request the server handled and every reply it sent, nothing else
    assert seen == Counter({k: v for k, v in run.ps.counter.messages.items() if v})
    assert {m for _, m in seen} >= {"Register", "GetModel", "Push"} | ({"Skip"} if run.summary["skips"] else set())
    for d in ("up", "down"):
        assert sum(r["proto_bytes"] for r in msgs if r["dir"] == d) == run.ps.counter.total(d)
        for method in rpc.METHODS:
            assert sum(r["proto_bytes"] for r in msgs if r["dir"] == d and r["method"] == method) == (
                run.ps.counter.bytes.get((d, method), 0)
            )
    # the rejected reports: requests decoded, replies trailers-only NOT_FOUND
    rejected = [r for r in run.records if r["type"] == "frames"]
    assert sorted(r["method"] for r in rejected) == ["Push", "Skip"]
    for r in rejected:
        assert r["dir"] == "down" and r["round"] == ROUNDS + 5 and r["worker"] == "ghost"
        assert r["status"] == STATUS_NOT_FOUND and "unknown worker" in r["detail"]
    (big,) = [r for r in msgs if r["worker"] == "ghost" and r["method"] == "Push"]
    assert big["kind"] == "dense" and big["bytes"]["values"] == len(BIG)
    assert big["bytes"]["frame_headers"] >= 9 * 4  # HEADERS and DATA frames (flow control splits it)
    assert all(r["status"] == 0 for r in msgs if r["dir"] == "down")


def test_tap_decoded_uploads_match_the_run(run: Run) -> None:
    ups = [
        r
        for r in run.records
        if r["type"] == "message" and r["method"] in ("Push", "Skip") and r["dir"] == "up" and r["worker"] != "ghost"
    ]
    report_rounds = [r for r in ups if r["round"] < ROUNDS]
    # one report (upload or skip notice) per worker per round, with the right ids and rounds
    assert sorted((r["worker"], r["round"]) for r in report_rounds) == sorted(
        (f"w{i}", k) for i in range(M) for k in range(ROUNDS)
    )
    pushes = [r for r in ups if r["method"] == "Push"]
    assert len(pushes) == run.summary["uploads"]
    assert len([r for r in report_rounds if r["method"] == "Skip"]) == run.summary["skips"]
    kind, field = ("sparse", "indices") if run.ps.config.algorithm == "gd" else ("laq", "codes")
    assert {r["kind"] for r in pushes} == {kind}
    assert all(r["bytes"][field] > 0 for r in pushes)
    # replies carry the worker and round of their request
    by_stream = {(r["conn"], r["stream"], r["dir"]): r for r in run.records if r["type"] != "connection"}
    for (conn, stream, d), r in by_stream.items():
        if d == "down":
            req = by_stream[conn, stream, "up"]
            assert r["worker"] == req["worker"] and r["method"] == req["method"]
            if r["method"] in ("Push", "Skip") and r["type"] == "message":
                assert r["round"] == req["round"]
    # per worker, the bytes its own stub counted
    for i, res in enumerate(run.results):
        mine = [r for r in run.records if r["type"] == "message" and r["worker"] == f"w{i}"]
        assert sum(r["proto_bytes"] for r in mine if r["dir"] == "up") == res.bytes_up
        assert sum(r["proto_bytes"] for r in mine if r["dir"] == "down") == res.bytes_down


def test_tap_byte_split_adds_up_to_bytes_relayed(run: Run) -> None:
    conns = [r for r in run.records if r["type"] == "connection"]
    assert conns and all(r["error"] is None and r["balanced"] for r in conns)
    for r in _stream_records(run.records):
        assert set(r["bytes"]) == set(BYTE_KEYS)
        assert r["wire_bytes"] == sum(r["bytes"].values())
        assert r["proto_bytes"] == sum(r["bytes"][k] for k in PROTO_KEYS)
        assert r["bytes"]["grpc_prefix"] == (5 if r["type"] == "message" else 0)
        assert r["bytes"]["frame_headers"] % 9 == 0 and r["bytes"]["frame_headers"] >= 9
    for d in ("up", "down"):
        # the identity: bytes relayed (counted by the relay) ==
        #   preface + control frames + late + partial + undecoded            (connection records)
        # + sum over stream records of frame headers + hpack + other h2 + 5-byte prefix + fields
        relayed = sum(r["relayed"] for r in conns if r["dir"] == d)
        assert relayed == run.relayed[d] > 0
        conn_bytes = sum(r[k] for r in conns if r["dir"] == d for k in CONNECTION_KEYS)
        stream_bytes = sum(sum(r["bytes"].values()) for r in _stream_records(run.records) if r["dir"] == d)
        assert relayed == conn_bytes + stream_bytes
        assert all(r["late"] == r["partial"] == r["undecoded"] == 0 for r in conns)
    assert sum(r["preface"] for r in conns) == len(PREFACE) * len(conns) // 2


# ------------------------------------------------------------------------------ pcaps


def test_pcap_of_the_tap_gives_the_same_records(run: Run) -> None:
    dec = decode_pcap(run.tap_pcap)  # no port: connections found by the HTTP/2 preface
    assert _by_conn(dec.records) == _by_conn(run.records)  # times included
    assert _by_conn(decode_pcap(run.tap_pcap, port=run.server_port).records) == _by_conn(run.records)
    assert dec.stats["connections"] == len(_by_conn(run.records)) == 2


@pytest.mark.root
def test_kernel_capture_agrees_with_the_tap(run: Run) -> None:
    if run.live_pcap is None:
        pytest.skip("no AF_PACKET capture here (needs Linux and root)")
    assert run.capture["drops"] == 0
    streams: dict[int, dict[tuple[str, str], bytearray]] = {}
    legs = {}
    for port in (run.tap_port, run.server_port):
        streams[port] = defaultdict(bytearray)
        legs[port] = decode_pcap(
            run.live_pcap, port, on_bytes=lambda c, d, b, s=streams[port]: s[c, d].extend(b)
        ).records
    # worker <-> tap: the same connection names (the workers' ports), the same records but times
    assert _without(legs[run.tap_port], "time") == _without(run.records, "time")
    # tap <-> server: byte for byte the same streams, so the same records (under the tap's port)
    assert _without(legs[run.server_port], "time", "conn") == _without(run.records, "time", "conn")
    assert sorted(bytes(b) for b in streams[run.tap_port].values()) == sorted(
        bytes(b) for b in streams[run.server_port].values()
    )


def _times(records: list[dict[str, Any]], drop: tuple[str, ...]) -> list[float]:
    """Record times, in the order of the records' other fields."""
    order = sorted(
        (json.dumps({k: v for k, v in r.items() if k not in drop}, sort_keys=True), r["time"]) for r in records
    )
    return [t for _, t in order]


def _segments(path: Path) -> list[tuple[float, Any]]:
    return [(p.time, parse_tcp(p.linktype, p.data)) for p in read_packets(path)]


def _classic(path: Path, linktype: int, frames: list[tuple[float, bytes]], big: bool, nano: bool) -> None:
    o = ">" if big else "<"
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    scale = 10**9 if nano else 10**6
    with open(path, "wb") as f:
        f.write(struct.pack(o + "IHHiIII", magic, 2, 4, 0, 0, 262144, linktype))
        for t, frame in frames:
            ticks = round(t * scale)
            f.write(struct.pack(o + "IIII", ticks // scale, ticks % scale, len(frame), len(frame)) + frame)


def _pcapng(path: Path, linktype: int, frames: list[tuple[float, bytes]]) -> None:
    def block(btype: int, body: bytes) -> bytes:
        body += b"\0" * (-len(body) % 4)
        return struct.pack(">II", btype, len(body) + 12) + body + struct.pack(">I", len(body) + 12)

    with open(path, "wb") as f:
        f.write(block(0x0A0D0D0A, struct.pack(">IHHq", 0x1A2B3C4D, 1, 0, -1)))
        tsresol = struct.pack(">HHB3x", 9, 1, 9) + struct.pack(">HH", 0, 0)  # nanoseconds
        f.write(block(1, struct.pack(">HHI", linktype, 0, 262144) + tsresol))
        for t, frame in frames:
            ticks = round(t * 10**9)
            head = struct.pack(">IIIII", 0, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), len(frame))
            f.write(block(6, head + frame))


def _v6(ip: str) -> str:
    return str(ipaddress.IPv6Address((0xFD00 << 112) | int(ipaddress.IPv4Address(ip))))


def _mangle(segments: list[tuple[float, Any]], rng: random.Random, shift: int, v6: bool) -> list[tuple[float, bytes]]:
    """Re-segment every payload into small pieces, shift sequence numbers by ``shift`` (to
    wrap around 2^32), reorder pieces within a window, retransmit some and re-send others
    as overlapping segments. Each packet keeps its original time."""
    out: list[tuple[float, bytes]] = []

    def ip(seg: Any, seq: int, payload: bytes, flags: int | None = None) -> bytes:
        src, dst = seg.src, seg.dst
        if v6:
            src, dst = (_v6(src[0]), src[1]), (_v6(dst[0]), dst[1])
        return ip_tcp_packet(src, dst, seq + shift, seg.ack + shift, seg.flags if flags is None else flags, payload)

    for t, seg in segments:
        if not seg.payload:
            out.append((t, ip(seg, seg.seq, b"")))
            continue
        pieces, i = [], 0
        while i < len(seg.payload):
            n = rng.randint(1, 700)
            pieces.append((seg.seq + i, seg.payload[i : i + n]))
            i += n
        window = []
        for seq, chunk in pieces:
            window.append(ip(seg, seq, chunk))
            if rng.random() < 0.2:  # a retransmission
                window.append(ip(seg, seq, chunk))
            if rng.random() < 0.1 and len(chunk) > 4:  # an overlapping re-send of the tail
                window.append(ip(seg, seq + 2, chunk[2:]))
        rng.shuffle(window)
        out += [(t, p) for p in window]
    return out


def test_pcap_reader_reorders_retransmits_and_reads_other_formats(run: Run, tmp_path: Path) -> None:
    rng = random.Random(7)
    segments = _segments(run.tap_pcap)
    sll = struct.pack("!HHH8sH", 0, 772, 6, b"\0" * 8, 0x0800)
    cases = {
        "sll-big-endian-wrap.pcap": (LINKTYPE_LINUX_SLL, False, lambda p: sll + p, dict(big=True, nano=False)),
        "null-nano.pcap": (LINKTYPE_NULL, False, lambda p: struct.pack("<I", 2) + p, dict(big=False, nano=True)),
        "ethernet-v6.pcapng": (LINKTYPE_ETHERNET, True, ethernet, None),
    }
    for name, (linktype, v6, link, classic) in cases.items():
        shift = (1 << 32) - 3000 - segments[0][1].seq if "wrap" in name else 0
        frames = [(t, link(p)) for t, p in _mangle(segments, rng, shift, v6)]
        path = tmp_path / name
        if classic is None:
            _pcapng(path, linktype, frames)
        else:
            _classic(path, linktype, frames, **classic)
        got = decode_pcap(path, port=run.server_port).records
        drop = ("time", "conn") if v6 else ("time",)  # connection names change with the addresses
        assert _without(got, *drop) == _without(run.records, *drop), name
        # every piece keeps its segment's time, so records keep theirs (to the file's resolution)
        assert _times(got, drop) == pytest.approx(_times(run.records, drop), abs=2e-6), name


def test_pcap_gap_is_reported(run: Run, tmp_path: Path) -> None:
    segments = _segments(run.tap_pcap)
    data_idx = [i for i, (_, s) in enumerate(segments) if s.payload]
    drop = data_idx[len(data_idx) // 2]
    frames = [
        (t, ethernet(ip_tcp_packet(s.src, s.dst, s.seq, s.ack, s.flags, s.payload)))
        for i, (t, s) in enumerate(segments)
        if i != drop
    ]
    path = tmp_path / "lost.pcap"
    _classic(path, LINKTYPE_ETHERNET, frames, big=False, nano=False)
    conns = [r for r in decode_pcap(path, port=run.server_port).records if r["type"] == "connection"]
    assert any(r["error"] and "gap" in r["error"] for r in conns)


def test_pcapng_packets_keep_their_interface(tmp_path: Path) -> None:
    """Two interfaces (Ethernet in microseconds, Linux SLL in 1/64 s), the obsolete packet block,
    a simple packet block, and a second section in the other byte order (raw IP): every packet
    gets its own interface's link type and time resolution."""
    ip = ip_tcp_packet(("10.0.0.1", 40000), ("10.0.0.2", 50051), 1, 1, 0x18, b"hello")
    sll = struct.pack("!HHH8sH", 0, 772, 6, b"\0" * 8, 0x0800) + ip

    def section(e: str, interfaces: list[tuple[int, int]], packets: list[tuple[int, int, int, bytes]]) -> bytes:
        def block(btype: int, body: bytes) -> bytes:
            body += b"\0" * (-len(body) % 4)
            return struct.pack(e + "II", btype, len(body) + 12) + body + struct.pack(e + "I", len(body) + 12)

        out = block(0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1))
        for linktype, tsresol in interfaces:
            out += block(
                1, struct.pack(e + "HHI", linktype, 0, 262144) + struct.pack(e + "HHB3xHH", 9, 1, tsresol, 0, 0)
            )
        for btype, iface, ticks, frame in packets:
            if btype == 3:
                out += block(3, struct.pack(e + "I", len(frame)) + frame)
                continue
            head = (e + "IIIII", iface) if btype == 6 else (e + "HHIIII", iface, 0)
            out += block(btype, struct.pack(*head, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), len(frame)) + frame)
        return out

    path = tmp_path / "two.pcapng"
    first = [(6, 0, 1_700_000_000_123_456, ethernet(ip)), (6, 1, 64 * 1_700_000_001 + 16, sll), (2, 1, 32, sll)]
    path.write_bytes(
        section(">", [(LINKTYPE_ETHERNET, 6), (LINKTYPE_LINUX_SLL, 0x86)], [*first, (3, 0, 0, ethernet(ip))])
        + section("<", [(101, 9)], [(6, 0, 1_700_000_002 * 10**9 + 5, ip)])
    )
    got = [(p.time, p.linktype) for p in read_packets(path)]
    assert got == [
        (1_700_000_000.123456, LINKTYPE_ETHERNET),
        (1_700_000_001.25, LINKTYPE_LINUX_SLL),
        (0.5, LINKTYPE_LINUX_SLL),
        (0.0, LINKTYPE_ETHERNET),
        ((1_700_000_002 * 10**9 + 5) / 10**9, 101),
    ]
    assert all(parse_tcp(p.linktype, p.data).payload == b"hello" for p in read_packets(path))


def test_pcap_files_written_exactly_and_read_until_cut_short(tmp_path: Path) -> None:
    frame = ethernet(ip_tcp_packet(("10.0.0.1", 1), ("10.0.0.2", 2), 1, 1, 0x18, b"x" * 100))
    t_ns = [1_700_000_000_123_456_789, 1_700_000_000_123_457_001]  # 212 ns apart: one float apart at most
    path = tmp_path / "nano.pcap"
    f = PcapFile(path, LINKTYPE_ETHERNET, nano=True)
    for t in t_ns:
        f.write(frame, t)
    f.close()
    raw = path.read_bytes()
    assert struct.unpack("<II", raw[24:32]) == (1_700_000_000, 123_456_789)  # nanoseconds kept exactly
    assert struct.unpack("<II", raw[24 + 16 + len(frame) : 32 + 16 + len(frame)]) == (1_700_000_000, 123_457_001)
    assert [p.time for p in read_packets(path)] == [t / 10**9 for t in t_ns]
    # a file still being written: a record cut short at the end is left out; a header alone is an error
    for cut, n in [(len(raw) - 1, 1), (len(raw) - len(frame) - 3, 1), (24 + 16 + len(frame), 1), (24, 0)]:
        (tmp_path / "cut.pcap").write_bytes(raw[:cut])
        assert len(list(read_packets(tmp_path / "cut.pcap"))) == n, cut
    (tmp_path / "cut.pcap").write_bytes(raw[:20])
    with pytest.raises(PcapError, match="truncated"):
        list(read_packets(tmp_path / "cut.pcap"))
    (tmp_path / "text.pcap").write_text("hello")
    with pytest.raises(PcapError, match="not a pcap"):
        list(read_packets(tmp_path / "text.pcap"))


def test_live_frame_time_is_the_kernel_timestamp() -> None:
    frame = Frame(1_700_000_000_123_456_789, "lo", False, 60, b"", ("lo", 0x0800, 0, 772, b""))
    assert frame.time == 1_700_000_000 + 123_456_789 * 1e-9


# ------------------------------------------------------------ docs/wireshark.md with tshark

DOCS = Path(__file__).resolve().parents[1] / "docs" / "wireshark.md"
#: placeholders of the documented commands: the capture, the server's port, the repository's protos/
_PLACEHOLDERS = re.compile(r"tap\.pcap|50051|/path/to/psrv/protos")


def _documented(name: str) -> str:
    """The fenced block under ``<!-- tested: NAME -->`` in docs/wireshark.md."""
    m = re.search(rf"<!-- tested: {re.escape(name)} -->\n```[a-z]*\n(.*?)```", DOCS.read_text(), re.S)
    assert m, f"docs/wireshark.md has no block marked 'tested: {name}'"
    return m.group(1)


def _for_run(command: str, run: Run) -> str:
    """A documented command, pointed at this run's tap capture, server port and protos/."""
    values = {
        "tap.pcap": str(run.tap_pcap),
        "50051": str(run.server_port),
        "/path/to/psrv/protos": str(DOCS.parents[1] / "protos"),
    }
    return _PLACEHOLDERS.sub(lambda m: shlex.quote(values[m.group()]), command)


def _sh(command: str) -> str:
    res = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{command}\nfailed ({res.returncode}): {res.stderr}"
    assert "valid" not in res.stderr, res.stderr  # "Some fields aren't valid", "... is not a valid ..."
    return res.stdout


@pytest.fixture(scope="module")
def tshark() -> None:
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed (apt-get install tshark)")


TSHARK_RUN = pytest.mark.parametrize("run", ["gd-topk"], indirect=True)  # every worker uploads every round


@TSHARK_RUN
def test_documented_tshark_uploads(tshark: None, run: Run) -> None:
    rows = [line.split("\t") for line in _sh(_for_run(_documented("tshark uploads"), run)).splitlines()]
    seen = Counter(
        (w, int(k)) for _, workers, rounds in rows for w, k in zip(workers.split(","), rounds.split(","), strict=True)
    )
    pushes = [r for r in run.records if r["type"] == "message" and r["method"] == "Push" and r["dir"] == "up"]
    assert seen == Counter((r["worker"], r["round"]) for r in pushes)
    assert ("w0", 0) in seen  # round 0 is not on the wire: shown by add_default_value


@TSHARK_RUN
def test_documented_tshark_bytes_up(tshark: None, run: Run) -> None:
    assert int(_sh(_for_run(_documented("tshark bytes_up"), run))) == run.ps.counter.total("up")


@TSHARK_RUN
def test_documented_display_filters(tshark: None, run: Run) -> None:
    """Every documented filter is valid with the documented options and picks some packets, not all."""
    argv = shlex.split(_for_run(_documented("tshark uploads"), run).replace("\\\n", " "))
    base = shlex.join(argv[: argv.index("-Y")])
    total = len(_sh(base).splitlines())
    filters = [re.split(r"\s{2,}", line)[0] for line in _documented("tshark display filters").splitlines()]
    assert len(filters) >= 10
    for f in filters:
        n = len(_sh(f"{base} -Y {shlex.quote(f)}").splitlines())
        assert 0 < n < total, f"{f!r} matches {n} of {total} packets"


# ---------------------------------------------------------------- HTTP/2 edge cases (h2)


def _grpc(msg: Any) -> bytes:
    body = msg.SerializeToString()
    return b"\0" + len(body).to_bytes(4, "big") + body


def _h2_conversation() -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """Client and server h2 state machines talking; returns the chunks as they crossed."""
    c = H2Connection(H2Configuration(client_side=True))
    s = H2Connection(H2Configuration(client_side=False))
    chunks: list[tuple[str, bytes]] = []

    def flush() -> None:
        for _ in range(4):
            up = c.data_to_send()
            if up:
                chunks.append(("up", up))
                s.receive_data(up)
            down = s.data_to_send()
            if down:
                chunks.append(("down", down))
                c.receive_data(down)

    def req(sid: int, method: str) -> None:
        c.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", f"/{rpc.SERVICE}/{method}"),
                (":authority", "127.0.0.1"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )

    c.initiate_connection()
    s.initiate_connection()
    flush()
    upload = pb.PushRequest(
        worker_id="w9",
        round=4,
        local_loss=0.5,
        sparse=pb.SparseTensor(
            dim=1000, nnz=3, index_encoding=1, indices=b"\x01\x02\x03", value_dtype=1, values=b"v" * 12
        ),
    )
    body = _grpc(upload)
    # stream 1: an upload split over two DATA frames, the second padded; reply + trailers
    req(1, "Push")
    c.send_data(1, body[:7])
    c.send_data(1, body[7:], end_stream=True, pad_length=7)
    flush()
    s.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    s.send_data(1, _grpc(pb.PushResponse(round=4)))
    flush()
    c.increment_flow_control_window(1000, stream_id=1)  # up, after the request ended: still stream 1's
    flush()
    s.send_headers(1, [("grpc-status", "0")], end_stream=True)
    c.ping(b"12345678")
    flush()
    # stream 3: a skip notice answered trailers-only with a long message (HEADERS + CONTINUATION)
    req(3, "Skip")
    c.send_data(3, _grpc(pb.SkipRequest(worker_id="w9", round=5, reason=pb.SKIP_REASON_LAZY_RULE)), end_stream=True)
    flush()
    long_detail = "round 5 is not open; " * 1999 + "round 5 is not open"
    s.send_headers(3, [(":status", "200"), ("grpc-status", "9"), ("grpc-message", long_detail)], end_stream=True)
    flush()
    # stream 5: two model requests in one DATA frame, then the client cancels
    req(5, "GetModel")
    two = _grpc(pb.GetModelRequest(worker_id="w9", round=6)) + _grpc(pb.GetModelRequest(worker_id="w9", round=7))
    c.send_data(5, two)
    flush()
    c.reset_stream(5, 8)
    flush()
    # a RST_STREAM for stream 1, long over: late
    late = struct.pack("!I", 8)
    chunks.append(("up", len(late).to_bytes(3, "big") + bytes([3, 0]) + (1).to_bytes(4, "big") + late))
    chunks.append(("down", b"\0\0\x08\x06\0\0\0"))  # the start of a frame that never completes: partial
    return chunks, {"upload": upload, "detail": long_detail}


def test_http2_edge_cases_account_every_byte() -> None:
    chunks, info = _h2_conversation()

    def decode(pieces: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        dec = ConnectionDecoder("c")
        out = [r for d, b in pieces for r in dec.feed(d, b, 1.0)]
        return out + dec.close(2.0)

    records = decode(chunks)
    # chunk boundaries do not matter: byte by byte gives the same records
    assert decode([(d, b[i : i + 1]) for d, b in chunks for i in range(len(b))]) == records
    by = defaultdict(list)
    for r in records:
        by[r["type"], r.get("stream"), r["dir"]].append(r)
    (push,) = by["message", 1, "up"]
    assert (
        push["message"] == "PushRequest" and push["worker"] == "w9" and push["round"] == 4 and push["kind"] == "sparse"
    )
    # HEADERS + 2 DATA + WINDOW_UPDATE; pad length + 7 padding + the window increment
    assert push["bytes"]["frame_headers"] == 36 and push["bytes"]["h2_other"] == 8 + 4
    assert push["bytes"]["indices"] == 3 and push["bytes"]["values"] == 12
    assert push["proto_bytes"] == info["upload"].ByteSize()
    (ack,) = by["message", 1, "down"]
    assert ack["message"] == "PushResponse" and ack["round"] == 4 and ack["status"] == 0 and ack["worker"] == "w9"
    assert ack["bytes"]["frame_headers"] == 27  # HEADERS, DATA, trailers
    (rejected,) = by["frames", 3, "down"]
    assert rejected["status"] == 9 and rejected["detail"] == info["detail"] and rejected["round"] == 5
    assert rejected["bytes"]["frame_headers"] >= 18 and rejected["bytes"]["hpack"] > 16384  # CONTINUATION
    polls = by["message", 5, "up"]
    assert [r["round"] for r in polls] == [6, 7] and all(r["reset"] for r in polls)
    assert not by["frames", 5, "down"]  # the server never answered: nothing went down on stream 5
    conns = {r["dir"]: r for r in records if r["type"] == "connection"}
    assert conns["up"]["late"] == 13 and conns["down"]["partial"] == 7 and conns["up"]["preface"] == 24
    for d, acct in conns.items():
        assert acct["balanced"] and acct["error"] is None
        fed = sum(len(b) for dd, b in chunks if dd == d)
        streams = sum(sum(r["bytes"].values()) for r in records if r["type"] != "connection" and r["dir"] == d)
        assert fed == acct["relayed"] == sum(acct[k] for k in CONNECTION_KEYS) + streams


def test_garbage_is_undecoded_not_fatal() -> None:
    dec = ConnectionDecoder("c")
    assert dec.feed("up", b"GET / HTTP/1.1\r\n\r\n", 1.0) == []
    (up, down) = dec.close(1.0)
    assert up["error"] and up["undecoded"] == 18 and up["balanced"]


# ----------------------------------------------------------------- protobuf field split


@pytest.mark.parametrize(
    "msg, want",
    [
        (
            pb.PushRequest(worker_id="w", round=3, dense=pb.DenseTensor(dtype=1, shape=[4], data=b"d" * 16)),
            {"values": 16},
        ),
        (
            pb.PushRequest(worker_id="w", sparse=pb.SparseTensor(dim=9, nnz=2, indices=b"ii", values=b"v" * 8)),
            {"indices": 2, "values": 8},
        ),
        (
            pb.PushRequest(worker_id="w", laq=pb.LaqPayload(dim=300, radius=1.0, bits=4, codes=b"c" * 150)),
            {"codes": 150},
        ),
        (pb.PushRequest(qsgd=pb.QsgdPayload(dim=8, norm=2.0, levels=4, signs=b"s", codes=b"ccc")), {"codes": 4}),
        (
            pb.PushRequest(sign_sparse=pb.SignSparsePayload(dim=8, nnz=3, indices=b"iii", signs=b"s")),
            {"indices": 3, "codes": 1},
        ),
        (pb.PushRequest(worker_id="w", zstd=pb.ZstdPayload(kind=pb.PAYLOAD_KIND_QSGD, data=b"z" * 300)), {"zstd": 300}),
        (
            pb.GetModelResponse(round=2, params=pb.DenseTensor(dtype=1, data=b"p" * 400), recent_step_sq=[1.0]),
            {"values": 400},
        ),
        (pb.SkipRequest(worker_id="w", round=1, reason=pb.SKIP_REASON_LAZY_RULE, local_loss=0.1), {}),
        (pb.PushResponse(), {}),
    ],
)
def test_field_split(msg: Any, want: dict[str, int]) -> None:
    split = field_split(msg.SerializeToString(), msg.DESCRIPTOR)
    assert sum(split.values()) == msg.ByteSize()
    assert {k: v for k, v in split.items() if k != "header" and v} == want


def test_field_split_rejects_malformed() -> None:
    bad = pb.PushRequest(worker_id="w", round=1).SerializeToString()[:-1] + b"\x80"
    with pytest.raises(ValueError):
        field_split(bad, pb.PushRequest.DESCRIPTOR)


# ------------------------------------------------------------------------------- CLI


def test_cli_summary_and_pcap(run: Run, tmp_path: Path) -> None:
    log = tmp_path / "tap.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in run.records))
    runner = CliRunner()
    res = runner.invoke(inspect, ["summary", str(log)])
    assert res.exit_code == 0, res.output
    assert "Register up RegisterRequest" in res.output and "w1 down" in res.output
    s = json.loads(runner.invoke(inspect, ["summary", str(log), "--json"]).output)
    assert s["totals"]["up"]["bytes"] == run.relayed["up"] and s["totals"]["down"]["bytes"] == run.relayed["down"]
    assert sum(row["count"] for k, row in s["kinds"].items() if " up " in k) == sum(
        run.ps.counter.messages[k] for k in run.ps.counter.messages if k[0] == "up"
    )
    assert not s["errors"]
    out = tmp_path / "pcap.jsonl"
    res = runner.invoke(inspect, ["pcap", str(run.tap_pcap), "--port", str(run.server_port), "--log", str(out)])
    assert res.exit_code == 0, res.output
    assert _by_conn(read_records(out)) == _by_conn(run.records)
    assert summarize(read_records(out)) == summarize(run.records)


@pytest.mark.slow  # the tap runs its --duration of 5 s
def test_cli_tap(tmp_path: Path) -> None:
    ps = ParameterServer(ServerConfig(num_workers=1, rounds=1))
    server, port = create_server(ps)
    with socket.socket() as s:  # a free port for the tap to listen on
        s.bind(("127.0.0.1", 0))
        tap_port = s.getsockname()[1]
    log, pcap = tmp_path / "tap.jsonl", tmp_path / "tap.pcap"
    args = ["tap", "--listen", f"127.0.0.1:{tap_port}", "--upstream", f"127.0.0.1:{port}"]
    args += ["--log", str(log), "--pcap", str(pcap), "--duration", "5"]
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.setdefault("r", CliRunner().invoke(inspect, args)), daemon=True)
    t.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{tap_port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            req = pb.RegisterRequest(worker_id="solo", num_samples=5, n_features=4, n_classes=3)
            rpc.CountingStub(ch).Register(req, timeout=10, wait_for_ready=True)
        t.join(timeout=20)
    finally:
        server.stop(grace=None)
    assert not t.is_alive()
    res = result["r"]
    assert res.exit_code == 0, res.output
    records = read_records(log)
    assert [(r["method"], r["dir"], r["worker"]) for r in records if r["type"] == "message"] == [
        ("Register", "up", "solo"),
        ("Register", "down", "solo"),
    ]
    assert all(r["balanced"] for r in records if r["type"] == "connection")
    assert "Register down RegisterResponse" in res.output
    assert decode_pcap(pcap, port=port).records == records


def test_pcap_port_reuse_and_missing_handshake(run: Run, tmp_path: Path) -> None:
    segments = _segments(run.tap_pcap)
    conn = run.records[0]["conn"]
    port = int(conn.rsplit(":", 1)[1])
    mine = [(t, s) for t, s in segments if port in (s.src[1], s.dst[1])]
    want = [r for r in run.records if r["conn"] == conn]

    def frames(segs: list[tuple[float, Any]], shift: int, dt: float, handshake: bool) -> list[tuple[float, bytes]]:
        return [
            (t + dt, ethernet(ip_tcp_packet(s.src, s.dst, s.seq + shift, s.ack + shift, s.flags, s.payload)))
            for t, s in segs
            if handshake or s.payload or s.flags & 0x05  # without SYN, SYN-ACK and the bare ACK
        ]

    # the same 4-tuple twice (a new ISN the second time), then once without its handshake
    path = tmp_path / "reuse.pcap"
    _classic(path, LINKTYPE_ETHERNET, frames(mine, 0, 0, True) + frames(mine, 123456789, 100.0, True), False, False)
    got = decode_pcap(path, port=run.server_port).records
    assert _without(got, "time") == _without(want + want, "time")
    path = tmp_path / "midstream.pcap"
    _classic(path, LINKTYPE_ETHERNET, frames(mine, 0, 0, False), big=False, nano=False)
    assert decode_pcap(path, port=run.server_port).records == want

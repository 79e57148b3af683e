"""TLS, mutual TLS and per-worker credentials (:mod:`psrv.tls`, :mod:`psrv.certs`): real servers on
port 0 with the credentials `psrv certs` makes (once per session), real workers in threads, and raw
clients that try to act as another worker.

Shown: runs over TLS and over mutual TLS + tokens complete; a worker without a client certificate,
with one from another CA, or trusting another CA fails at once with a one-line reason; a call without
a token is UNAUTHENTICATED before anything is read; worker w1's token or certificate used for w0 is
PERMISSION_DENIED for Register, GetModel, Skip, Push, PushStream and the Rounds stream, and none of
those reaches the engine (w0 registers afterwards as if nothing happened); health stays open."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from psrv import codec, data, rpc, stream
from psrv.certs import Pki, make_test_pki
from psrv.cli import main
from psrv.server import ParameterServer, ServerConfig, create_server
from psrv.tls import ClientSecurity, HandshakeError, SecurityError, ServerSecurity, is_loopback, load_tokens
from psrv.tls import check_handshake as tls_check_handshake
from psrv.v1 import psrv_pb2 as pb
from worker.client import WorkerConfig, load_training_data, run_worker

Code = grpc.StatusCode
WORKERS = ["w0", "w1"]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_test_pki(tmp_path_factory.mktemp("pki"), [*WORKERS, "w2"], hosts=["psrv.test"])


@pytest.fixture(scope="session")
def other(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA with its own w0: the right names, the wrong signatures."""
    return make_test_pki(tmp_path_factory.mktemp("other"), ["w0"])


def _client(pki: Pki, cert: str | None, token: str | None, ca: Pki | None = None) -> ClientSecurity:
    return ClientSecurity(
        ca=str((ca or pki).ca),
        cert=None if cert is None else str(pki.worker_cert(cert)),
        key=None if cert is None else str(pki.worker_key(cert)),
        token_file=None if token is None else str(pki.worker_token(token)),
    )


class Server:
    """A server with ``security`` on port 0 (nothing runs its rounds: calls are checked first)."""

    def __init__(self, security: ServerSecurity, **config: Any) -> None:
        config.setdefault("num_workers", 2)
        config.setdefault("rounds", 3)
        self.ps = ParameterServer(ServerConfig(**config))
        self.server, self.port = create_server(self.ps, "127.0.0.1:0", security=security)
        self.address = f"127.0.0.1:{self.port}"

    def stub(self, security: ClientSecurity) -> tuple[grpc.Channel, rpc.CountingStub]:
        channel = security.channel(self.address)
        return channel, rpc.CountingStub(channel)

    def close(self) -> None:
        self.server.stop(None).wait(5)


@pytest.fixture
def make_server() -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    def make(security: ServerSecurity, **config: Any) -> Server:
        made.append(Server(security, **config))
        return made[-1]

    yield make
    for s in made:
        s.close()


REGISTER = pb.RegisterRequest(worker_id="w0", num_samples=10, n_features=4, n_classes=3)
BIG = bytes(4 * stream.CHUNK_BYTES)


def _calls(stub: rpc.CountingStub, worker: str = "w0") -> dict[str, Callable[[], Any]]:
    """Every call that names a worker, for ``worker``."""
    upload = pb.PushRequest(worker_id=worker, round=0, dense=pb.DenseTensor(dtype=pb.DTYPE_FLOAT32, data=bytes(60)))

    def rounds() -> Any:
        s = stub.Rounds(pb.RoundsOpen(worker_id=worker, round=0))
        try:
            return s.receive()
        finally:
            s.close()

    return {
        "Register": lambda: stub.Register(_register(worker), timeout=5),
        "GetModel": lambda: stub.GetModel(pb.GetModelRequest(worker_id=worker, round=0), timeout=5),
        "Skip": lambda: stub.Skip(codec.skip_to_proto(worker, 0, "lazy_rule", 0.0), timeout=5),
        "Push": lambda: stub.Push(upload, timeout=5),
        "PushStream": lambda: stub.PushStream(upload, timeout=5),
        "Rounds": rounds,
    }


def _register(worker: str) -> pb.RegisterRequest:
    return pb.RegisterRequest(worker_id=worker, num_samples=10, n_features=4, n_classes=3)


def _status(call: Callable[[], Any]) -> tuple[Code, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


# ------------------------------------------------------------------------------- whole runs
def _run(server: Server, securities: dict[str, ClientSecurity]) -> tuple[dict[str, Any], list[Any]]:
    train, _ = load_training_data("digits", 0.2, 0)
    results: list[Any] = [None] * len(securities)

    def work(i: int, worker: str) -> None:
        cfg = WorkerConfig(
            server=server.address, worker_id=worker, data="digits", connect_timeout=30, rpc_timeout=30,
            security=securities[worker],
        )  # fmt: skip
        try:
            results[i] = run_worker(cfg, data.shard(train, i, len(securities)))
        except Exception as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i, w), daemon=True) for i, w in enumerate(securities)]
    for t in threads:
        t.start()
    summary = server.ps.run()
    for t in threads:
        t.join(timeout=60)
    return summary, results


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_run_over_mutual_tls_with_tokens(pki: Pki, make_server: Callable[..., Server], transport: str) -> None:
    server = make_server(pki.server_security(), algorithm="topk-ef", rounds=4, round_timeout=30, transport=transport)
    summary, results = _run(server, {w: pki.client_security(w) for w in WORKERS})
    assert [r.rounds for r in results] == [4, 4], results
    assert summary["rounds"] == 4 and server.ps.phase == "done"
    assert sum(r.uploads for r in results) == 8


def test_run_over_server_tls_only(pki: Pki, make_server: Callable[..., Server]) -> None:
    """Plain TLS: the worker checks the server against the CA; no client certificate, no token."""
    server = make_server(ServerSecurity(str(pki.server_cert), str(pki.server_key)), algorithm="gd", rounds=3,
                         round_timeout=30)  # fmt: skip
    summary, results = _run(server, {w: ClientSecurity(ca=str(pki.ca)) for w in WORKERS})
    assert [r.rounds for r in results] == [3, 3], results
    assert summary["rounds"] == 3


# ------------------------------------------------------------------------------- the handshake
@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("no client certificate", "--tls-cert/--tls-key"),
        ("client certificate of another CA", "--tls-client-ca"),
        ("server certificate of another CA", "CERTIFICATE_VERIFY_FAILED"),
    ],
)
def test_handshake_refusals_fail_the_worker_at_once(
    pki: Pki, other: Pki, make_server: Callable[..., Server], case: str, why: str
) -> None:
    server = make_server(pki.server_security())
    security = {
        "no client certificate": _client(pki, None, "w0"),
        "client certificate of another CA": ClientSecurity(
            str(pki.ca), str(other.worker_cert("w0")), str(other.worker_key("w0")), None, str(pki.worker_token("w0"))
        ),
        "server certificate of another CA": _client(pki, "w0", "w0", ca=other),
    }[case]
    cfg = WorkerConfig(server=server.address, worker_id="w0", data="digits", connect_timeout=60, security=security)
    with pytest.raises(HandshakeError) as err:  # at once, not after the 60 s connect timeout
        run_worker(cfg, load_training_data("digits", 0.2, 0)[0])
    assert why in str(err.value) and server.address in str(err.value)
    assert "\n" not in str(err.value)
    assert server.ps.engine.state.phase == "registering" and not server.ps.engine.wait_registered(1, 0.0)


def test_plaintext_client_never_reaches_a_tls_server(pki: Pki, make_server: Callable[..., Server]) -> None:
    server = make_server(pki.server_security())
    channel, stub = server.stub(ClientSecurity(token_file=str(pki.worker_token("w0"))))
    with channel:
        code, _ = _status(lambda: stub.Register(REGISTER, timeout=2))
    assert code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)


# ------------------------------------------------------------------------------- identities
@pytest.mark.parametrize("method", ["Register", "GetModel", "Skip", "Push", "PushStream", "Rounds"])
def test_missing_token_is_unauthenticated(pki: Pki, make_server: Callable[..., Server], method: str) -> None:
    server = make_server(pki.server_security())
    channel, stub = server.stub(_client(pki, "w0", None))
    with channel:
        code, details = _status(_calls(stub)[method])
    assert code == Code.UNAUTHENTICATED, details
    assert "--token-file" in details


def test_unknown_token_is_unauthenticated(pki: Pki, other: Pki, make_server: Callable[..., Server]) -> None:
    server = make_server(ServerSecurity(tokens=str(pki.tokens)))
    channel, stub = server.stub(ClientSecurity(token_file=str(other.worker_token("w0"))))
    with channel:
        code, details = _status(_calls(stub)["Register"])
    assert (code, details) == (Code.UNAUTHENTICATED, "the worker token is not one of --worker-tokens")


@pytest.mark.parametrize("method", ["Register", "GetModel", "Skip", "Push", "PushStream", "Rounds"])
def test_another_workers_token_is_permission_denied(pki: Pki, make_server: Callable[..., Server], method: str) -> None:
    """w1's token (and w0's certificate) acting as w0: refused, and nothing reached the engine."""
    server = make_server(pki.server_security())
    channel, stub = server.stub(_client(pki, "w0", "w1"))
    with channel:
        code, details = _status(_calls(stub)[method])
    assert code == Code.PERMISSION_DENIED, details
    assert details == "the worker token belongs to 'w1'; it cannot act as worker 'w0'"
    _w0_registers_untouched(server, pki)


def test_another_workers_certificate_is_permission_denied(pki: Pki, make_server: Callable[..., Server]) -> None:
    """w1's certificate with w0's token: the certificate's identity must be w0 too."""
    server = make_server(pki.server_security())
    channel, stub = server.stub(_client(pki, "w1", "w0"))
    with channel:
        for method, call in _calls(stub).items():
            code, details = _status(call)
            assert code == Code.PERMISSION_DENIED, (method, details)
            assert "client certificate names 'w1'" in details and "worker 'w0'" in details
    _w0_registers_untouched(server, pki)


def test_certificate_alone_binds_the_id(pki: Pki, make_server: Callable[..., Server]) -> None:
    """Mutual TLS without tokens: the certificate is the credential."""
    server = make_server(ServerSecurity(str(pki.server_cert), str(pki.server_key), str(pki.ca)))
    channel, stub = server.stub(_client(pki, "w1", None))
    with channel:
        code, details = _status(_calls(stub, "w0")["Skip"])
        assert code == Code.PERMISSION_DENIED, details
        assert stub.Register(_register("w1"), timeout=5).worker_index == 0


def test_tokens_on_plaintext(pki: Pki, make_server: Callable[..., Server]) -> None:
    """Tokens alone (no TLS: readable on the wire, but bound to the id all the same)."""
    server = make_server(ServerSecurity(tokens=str(pki.tokens)))
    channel, stub = server.stub(ClientSecurity(token_file=str(pki.worker_token("w1"))))
    with channel:
        assert _status(_calls(stub, "w0")["Push"])[0] == Code.PERMISSION_DENIED
        assert stub.Register(_register("w1"), timeout=5).worker_index == 0


def _w0_registers_untouched(server: Server, pki: Pki) -> None:
    """No refused call registered, skipped or pushed anything: w0 registers first, as index 0."""
    assert server.ps.phase == "registering" and server.ps.round <= 0
    channel, stub = server.stub(pki.client_security("w0"))
    with channel:
        assert stub.Register(REGISTER, timeout=5).worker_index == 0


def test_health_stays_open(pki: Pki, make_server: Callable[..., Server]) -> None:
    server = make_server(pki.server_security())
    channel, _ = server.stub(_client(pki, "w2", None))  # a valid certificate, no token
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=rpc.SERVICE), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_push_stream_is_refused_before_its_pieces_are_read(pki: Pki, make_server: Callable[..., Server]) -> None:
    """Without a token the server refuses the stream at its start: the upload's pieces never
    count as received bytes."""
    server = make_server(pki.server_security())
    channel, stub = server.stub(_client(pki, "w0", None))
    big = pb.PushRequest(worker_id="w0", dense=pb.DenseTensor(dtype=pb.DTYPE_FLOAT32, data=BIG))
    with channel:
        assert _status(lambda: stub.PushStream(big, timeout=5))[0] == Code.UNAUTHENTICATED
    assert server.ps.counter.total("up") == 0


# ------------------------------------------------------------------------------- psrv certs
def test_certs_command_writes_loadable_files_with_private_keys_0600(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    out = tmp_path / "pki"
    result = CliRunner().invoke(main, ["certs", str(out), "--workers", "3", "--host", "10.1.2.3", "--host", "ps.lan"])
    assert result.exit_code == 0, result.output
    pki = Pki(out)
    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in sans} == {"localhost", "127.0.0.1", "10.1.2.3", "ps.lan"}
    hashes = load_tokens(str(pki.tokens))
    assert sorted(hashes) == ["w0", "w1", "w2"]
    for w in ("w0", "w1", "w2"):
        cert = x509.load_pem_x509_certificate(pki.worker_cert(w).read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == w
        token = pki.worker_token(w).read_text().strip()
        assert hashes[w] == hashlib.sha256(token.encode()).digest()
        assert b"PRIVATE KEY" in pki.worker_key(w).read_bytes()
    secret = [out / "ca.key", pki.server_key, *(p for w in ("w0", "w1", "w2") for p in
                                                 (pki.worker_key(w), pki.worker_token(w)))]  # fmt: skip
    for path in secret:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert stat.S_IMODE(os.stat(pki.ca).st_mode) == 0o644
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # atomic: no temp files left
    pki.server_security().check()
    pki.client_security("w2").check()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "need at least one worker"),
        (["--workers", "w0,w 1"], "'w 1' is not a worker id"),
        (["--workers", "w0,w0"], "listed twice"),
    ],
)
def test_certs_command_refuses_bad_worker_lists(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["certs", str(tmp_path / "pki"), *args])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "pki").exists()


# ------------------------------------------------------------------------------- bad options
def test_bad_credential_files_are_one_line_errors(pki: Pki, other: Pki, tmp_path: Path) -> None:
    plain = tmp_path / "plain-tokens.txt"
    plain.write_text("w0 secret-token\n")
    cases = [
        (ServerSecurity(str(pki.server_cert), str(other.server_key)), "is not the key of the certificate"),
        (ServerSecurity(str(pki.server_cert)), "--tls-cert needs --tls-key"),
        (ServerSecurity(client_ca=str(pki.ca)), "--tls-client-ca needs --tls-cert"),
        (ServerSecurity(str(pki.server_key), str(pki.server_key)), "holds no PEM certificate"),
        (ServerSecurity(tokens=str(plain)), "expected `WORKER_ID sha256:HEX`"),
        (ClientSecurity(cert=str(pki.worker_cert("w0")), key=str(pki.worker_key("w0"))), "need --tls-ca"),
    ]
    for security, message in cases:
        with pytest.raises(SecurityError) as err:
            security.check()
        assert message in str(err.value) and "\n" not in str(err.value)


def test_start_server_refuses_a_bad_key_before_listening(pki: Pki, other: Pki) -> None:
    args = ["start-server", "--algorithm", "gd", "--port", "0", "--tls-cert", str(pki.server_cert)]
    result = CliRunner().invoke(main, [*args, "--tls-key", str(other.server_key)])
    assert result.exit_code == 2
    assert "--tls-key" in result.output and "is not the key of the certificate in --tls-cert" in result.output


def test_loopback_addresses() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.3.4.5"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.2", "server"))


# ------------------------------------------------------------------------------- psrv run --tls
@pytest.mark.slow
@pytest.mark.process
def test_psrv_run_tls_end_to_end(tmp_path: Path) -> None:
    from psrv.options import DataConfig
    from psrv.runner import run_local

    config = ServerConfig(algorithm="gd", num_workers=2, rounds=3, round_timeout=60, register_timeout=120)
    summary = run_local(config, DataConfig(data="digits"), tmp_path / "gd", tls=True)
    assert summary["rounds"] == 3 and summary["worker_exit_codes"] == [0, 0]
    assert Pki(tmp_path / "gd" / "tls").worker_token("w1").exists()
    log = (tmp_path / "gd" / "worker0.log").read_text()
    assert '"rounds": 3' in log


# ------------------------------------------------------------------------------- psrv inspect on TLS
def test_inspect_tap_terminates_mutual_tls(pki: Pki, make_server: Callable[..., Server], tmp_path: Path) -> None:
    """Workers -> TLS-terminating tap -> server, all mutual TLS with tokens: the run completes, the
    server still binds each worker's own certificate (the tap presents it), and the tap decodes
    every message as on a cleartext run, its bytes adding up to what it relayed; its pcap holds the
    plaintext."""
    from psrv.inspect.cli import summarize
    from psrv.inspect.grpcmsg import PROTO_KEYS
    from psrv.inspect.pcap import decode_pcap
    from psrv.inspect.tap import TapThread, TapTls

    server = make_server(pki.server_security(), algorithm="topk-ef", rounds=3, round_timeout=30)
    tls = TapTls(
        cert=str(pki.server_cert), key=str(pki.server_key), client_ca=str(pki.ca),
        upstream_ca=str(pki.ca), upstream_client_certs=str(pki.root / "workers"),
    )  # fmt: skip
    tap = TapThread(("127.0.0.1", server.port), tls=tls, pcap=tmp_path / "tap.pcap").start()
    try:
        through = Server.__new__(Server)
        through.ps, through.address = server.ps, f"127.0.0.1:{tap.port}"
        summary, results = _run(through, {w: pki.client_security(w) for w in WORKERS})
        assert tap.wait_idle(20)
    finally:
        tap.close()
    assert [r.rounds for r in results] == [3, 3], results
    records = list(tap.records)
    messages = [r for r in records if r["type"] == "message"]
    assert {r["worker"] for r in messages if r["method"] == "Register"} == set(WORKERS)
    assert {r["method"] for r in messages} >= {"Register", "Rounds"}
    s = summarize(records)
    assert not s["errors"]
    for direction, relayed in tap.tap.relayed.items():
        assert s["totals"][direction]["bytes"] == relayed
    # what the server counted of the psrv messages is what the tap decoded of them
    up = sum(sum(r["bytes"][k] for k in PROTO_KEYS) for r in messages if r["dir"] == "up" and r["method"] != "Check")
    assert up == summary["bytes_up"]
    # the capture is of the plaintext: the pcap decoder gives the same records
    assert decode_pcap(tmp_path / "tap.pcap", port=server.port).records == records


def test_inspect_tap_command_on_tls(pki: Pki, make_server: Callable[..., Server], tmp_path: Path) -> None:
    """`psrv inspect tap` with the TLS options: a worker's Register through it is decoded and logged."""
    import socket

    from psrv.inspect.cli import inspect, read_records

    server = make_server(pki.server_security(), num_workers=1, rounds=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        tap_port = s.getsockname()[1]
    log = tmp_path / "tap.jsonl"
    args = ["tap", "--listen", f"127.0.0.1:{tap_port}", "--upstream", server.address, "--log", str(log),
            "--duration", "3", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
            "--tls-client-ca", str(pki.ca), "--upstream-ca", str(pki.ca),
            "--upstream-client-certs", str(pki.root / "workers")]  # fmt: skip
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.setdefault("r", CliRunner().invoke(inspect, args)), daemon=True)
    t.start()
    through = pki.client_security("w0").channel(f"127.0.0.1:{tap_port}", [("grpc.use_local_subchannel_pool", 1)])
    with through as channel:
        reply = rpc.CountingStub(channel).Register(REGISTER, timeout=10, wait_for_ready=True)
    t.join(timeout=20)
    assert reply.worker_index == 0 and not t.is_alive()
    assert result["r"].exit_code == 0, result["r"].output
    messages = [(r["method"], r["dir"], r["worker"]) for r in read_records(log) if r["type"] == "message"]
    assert messages == [("Register", "up", "w0"), ("Register", "down", "w0")]


def test_unauthenticated_long_polls_do_not_harm_a_run(pki: Pki, make_server: Callable[..., Server]) -> None:
    """200 concurrent GetModel long polls without a token (TLS, so they do reach the server) are all
    refused at once while two real workers train: none waits, the run completes. (On a loaded
    machine some find gRPC's limit of calls at once full before the token check: refused too, and
    a worker that meets that limit backs off and tries again.)"""
    server = make_server(
        ServerSecurity(str(pki.server_cert), str(pki.server_key), tokens=str(pki.tokens)),
        algorithm="gd", rounds=3, round_timeout=30,
    )  # fmt: skip
    with ClientSecurity(ca=str(pki.ca)).channel(server.address) as channel:
        poll = channel.unary_unary(f"/{rpc.SERVICE}/GetModel")
        request = pb.GetModelRequest(worker_id="w0", round=1).SerializeToString()
        calls = [poll.future(request, timeout=60) for _ in range(200)]
        workers = {w: ClientSecurity(ca=str(pki.ca), token_file=str(pki.worker_token(w))) for w in WORKERS}
        summary, results = _run(server, workers)
        codes = [c.exception().code() if c.exception() else None for c in calls]
    assert [r.rounds for r in results] == [3, 3], results
    assert summary["rounds"] == 3
    assert set(codes) <= {Code.UNAUTHENTICATED, Code.RESOURCE_EXHAUSTED} and len(codes) == 200


# ------------------------------------------------------------------------------- the commands
@pytest.mark.parametrize(("host", "tls", "warned"), [("0.0.0.0", False, True), ("127.0.0.1", False, False),
                                                     ("0.0.0.0", True, False)])  # fmt: skip
def test_start_server_warns_on_a_public_address_without_tls(
    pki: Pki, host: str, tls: bool, warned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psrv.server

    real = psrv.server.create_server  # the test listens on loopback only, whatever --host says
    monkeypatch.setattr(psrv.server, "create_server", lambda ps, _address, **kw: real(ps, "127.0.0.1:0", **kw))
    args = ["start-server", "--algorithm", "gd", "--workers", "1", "--rounds", "1", "--host", host, "--port", "0",
            "--register-timeout", "0.2"]  # fmt: skip
    if tls:
        args += ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "only 0 of 1 workers registered" in result.output  # nobody came
    assert ("warning: listening on 0.0.0.0 without TLS" in result.output) == warned


def test_start_worker_says_why_the_handshake_failed(pki: Pki, make_server: Callable[..., Server]) -> None:
    server = make_server(pki.server_security())
    args = ["start-worker", "--server", server.address, "--worker-id", "w0", "--data", "digits",
            "--tls-ca", str(pki.ca), "--token-file", str(pki.worker_token("w0"))]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert line.startswith(f"Error: worker w0: cannot connect to {server.address}")
    assert line.endswith("pass --tls-cert/--tls-key)")


@pytest.mark.parametrize(("name", "ok"), [("psrv.test", True), ("elsewhere.test", False)])
def test_tls_server_name_is_what_the_certificate_is_checked_for(
    pki: Pki, make_server: Callable[..., Server], name: str, ok: bool
) -> None:
    """--tls-server-name: the certificate (SAN localhost, 127.0.0.1, psrv.test) must name it."""
    server = make_server(pki.server_security())
    security = ClientSecurity(str(pki.ca), str(pki.worker_cert("w0")), str(pki.worker_key("w0")), name,
                              str(pki.worker_token("w0")))  # fmt: skip
    channel, stub = server.stub(security)
    with channel:
        if ok:
            assert stub.Register(REGISTER, timeout=5).worker_index == 0
        else:
            with pytest.raises(HandshakeError, match="--tls-server-name"):
                tls_check_handshake(channel, server.address, security)


def test_compose_tls_override_gives_each_service_its_credentials() -> None:
    """docker-compose.tls.yml: every service of docker-compose.yml gets, through the entrypoint's
    PSRV_EXTRA_ARGS, exactly the options `psrv run --tls` uses, for the `psrv certs` folder the
    containers see at /out/tls and for its own worker id."""
    yaml = pytest.importorskip("yaml")
    from psrv.cluster import entrypoint

    root = Path(__file__).resolve().parents[1]
    base = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]
    over = yaml.safe_load((root / "docker-compose.tls.yml").read_text())["services"]
    assert set(over) == set(base)
    pki = Pki(Path("/out/tls"))
    for name, svc in over.items():
        role, *args = base[name]["command"]
        extra = entrypoint.extra_args(svc["environment"])
        want = pki.server_argv() if role == "server" else pki.worker_argv(args[args.index("--worker-id") + 1])
        assert extra == want
        assert entrypoint.command(role, [*args, *extra])[-len(extra) :] == extra


def test_id_templates_fill_in_each_workers_own_files(pki: Pki) -> None:
    """``--tls-cert pki/workers/{id}.crt`` (a host of logical workers, ``psrv run --tls`` with
    virtual workers): each worker's paths are its own, and a template is not a file click checks."""
    template = pki.client_security("{id}")
    assert template.templated and not pki.client_security("w0").templated
    assert template.for_worker("w1") == pki.client_security("w1")


@pytest.mark.parametrize("shard", ["0-2/3", "2/3"])
def test_a_missing_templated_file_is_one_usage_line_naming_the_option(pki: Pki, shard: str) -> None:
    """Workers w0 and w1 have files, w5 does not: start-worker refuses before it connects anywhere,
    for a host of logical workers and for a single worker alike."""
    ids = "w0,w1,w5" if "-" in shard else "w5"
    res = CliRunner().invoke(
        main,
        ["start-worker", "--server", "127.0.0.1:9", "--shard", shard, "--worker-id", ids, *pki.worker_argv("{id}")],
    )
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error:") and "--tls-" in last and "w5" in last, res.output

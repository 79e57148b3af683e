"""``psrv certs``: a throwaway public-key infrastructure for a run -- a test CA, a server
certificate, one client certificate per worker (common name = the worker id, the identity mutual
TLS binds to it) and a token per worker -- made with the ``cryptography`` package.

The layout of ``DIR`` (what the ``--tls-*`` and token options of psrv's commands take)::

    ca.crt  ca.key                     the CA (its key signs nothing else; keep it or delete it)
    server.crt  server.key             start-server --tls-cert/--tls-key; SAN: localhost, 127.0.0.1, --host names
    worker-tokens.txt                  start-server --worker-tokens (ID sha256:HEX, no secrets)
    workers/ID.crt  workers/ID.key     start-worker --tls-cert/--tls-key (CN = ID)
    workers/ID.token                   start-worker --token-file

Keys (P-256 ECDSA) and tokens are written 0600 and atomically (:func:`psrv.files.atomic_write_bytes`);
certificates 0644. For tests and private clusters: a production deployment uses its own CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from psrv.files import atomic_write_bytes, atomic_write_text
from psrv.tls import WORKER_ID, ClientSecurity, ServerSecurity, hash_token

__all__ = ["Pki", "make_test_pki", "worker_ids"]

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Pki:
    """The files of one ``psrv certs`` folder."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def tokens(self) -> Path:
        return self.root / "worker-tokens.txt"

    def worker_cert(self, worker: str) -> Path:
        return self.root / "workers" / f"{worker}.crt"

    def worker_key(self, worker: str) -> Path:
        return self.root / "workers" / f"{worker}.key"

    def worker_token(self, worker: str) -> Path:
        return self.root / "workers" / f"{worker}.token"

    def server_argv(self) -> list[str]:
        """``start-server`` options for TLS, mutual TLS and tokens with these files."""
        return ["--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key),
                "--tls-client-ca", str(self.ca), "--worker-tokens", str(self.tokens)]  # fmt: skip

    def server_security(self) -> ServerSecurity:
        """The same as :meth:`server_argv`, for :func:`psrv.server.create_server`."""
        return ServerSecurity(str(self.server_cert), str(self.server_key), str(self.ca), str(self.tokens))

    def client_security(self, worker: str) -> ClientSecurity:
        """The same as :meth:`worker_argv`, for :class:`worker.client.WorkerConfig`."""
        return ClientSecurity(str(self.ca), str(self.worker_cert(worker)), str(self.worker_key(worker)), None,
                              str(self.worker_token(worker)))  # fmt: skip

    def worker_argv(self, worker: str) -> list[str]:
        """``start-worker`` options for worker ``worker``."""
        return ["--tls-ca", str(self.ca), "--tls-cert", str(self.worker_cert(worker)),
                "--tls-key", str(self.worker_key(worker)), "--token-file", str(self.worker_token(worker))]  # fmt: skip


def worker_ids(spec: str) -> list[str]:
    """``--workers``: a count N (``w0`` .. ``wN-1``, the ids ``psrv run`` gives) or a comma list."""
    spec = spec.strip()
    if spec.isdigit():
        n = int(spec)
        if n < 1:
            raise ValueError("need at least one worker")
        return [f"w{i}" for i in range(n)]
    ids = [w.strip() for w in spec.split(",") if w.strip()]
    bad = [w for w in ids if not WORKER_ID.match(w)]
    if bad or not ids:
        raise ValueError(f"{bad[0] if bad else spec!r} is not a worker id (letters, digits, . _ -)")
    if len(set(ids)) != len(ids):
        raise ValueError(f"an id is listed twice in {spec!r}")
    return ids


def _write_key(path: Path, key: object) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write_bytes(path, pem)  # a mkstemp file: 0600 from its creation, never readable by others
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)


def _san(host: str) -> object:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_test_pki(out: str | Path, workers: Sequence[str], hosts: Sequence[str] = (), days: int = 30) -> Pki:
    """Write a CA, a server certificate for ``localhost``, ``127.0.0.1`` and ``hosts``, and a
    certificate and token per worker id into ``out`` (see the module's docstring)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    pki = Pki(Path(out))
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # clocks a little behind
    until = now + datetime.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "psrv test"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # fmt: skip

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("psrv test CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(cn: str, sans: Sequence[object], usage: object) -> tuple[object, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return key, cert.public_bytes(serialization.Encoding.PEM)

    names = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    server_key, server_pem = issue(names[0], [_san(h) for h in names], ExtendedKeyUsageOID.SERVER_AUTH)
    _write_key(pki.root / "ca.key", ca_key)
    _write_public(pki.ca, ca.public_bytes(serialization.Encoding.PEM))
    _write_key(pki.server_key, server_key)
    _write_public(pki.server_cert, server_pem)
    lines = ["# psrv worker tokens: ID sha256:HEX (start-server --worker-tokens); the tokens are in workers/ID.token"]
    for worker in workers:
        key, pem = issue(worker, [x509.DNSName(worker)], ExtendedKeyUsageOID.CLIENT_AUTH)
        _write_key(pki.worker_key(worker), key)
        _write_public(pki.worker_cert(worker), pem)
        token = secrets.token_urlsafe(32)
        atomic_write_text(pki.worker_token(worker), token + "\n")
        os.chmod(pki.worker_token(worker), 0o600)
        lines.append(f"{worker} {hash_token(token)}")
    _write_public(pki.tokens, ("\n".join(lines) + "\n").encode())
    return pki

"""Transport security and worker credentials: TLS / mutual TLS on every psrv connection, and a
per-worker credential bound to the worker id.

Server side (:class:`ServerSecurity`, ``psrv start-server --tls-cert --tls-key [--tls-client-ca]
[--worker-tokens]``): the server certificate (TLS); with a client CA, every connection must present
a client certificate it signed (mutual TLS), and that certificate's identity (its common name or a
DNS/URI subject alternative name) is a worker id; with a tokens file (``ID sha256:HEX`` lines: the
SHA-256 of each worker's secret, never the secret itself), every call of psrv's service must carry
``authorization: Bearer TOKEN`` metadata, and the token names the worker it belongs to.

A call that carries a worker id (Register, GetModel[Stream], Push[Stream], Skip, the Rounds
stream's open) is then allowed only for the id its credentials name: no or an unknown token is
UNAUTHENTICATED, a valid credential for another worker PERMISSION_DENIED (the message says which
credential named whom). Health checking and reflection stay open. Without any of these options the
server is plaintext and open, as before.

Worker side (:class:`ClientSecurity`, ``psrv start-worker --tls-ca [--tls-cert --tls-key]
[--tls-server-name] [--token-file]``): a TLS channel that trusts ``--tls-ca``, presents the worker's
certificate for mutual TLS, and sends the token with every call (a client interceptor, so it works
on plaintext channels too -- where it is readable on the wire).

Tokens are compared with :func:`hmac.compare_digest` on their SHA-256 digests, over every entry,
so the time taken does not depend on which entry (if any) matched.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

__all__ = [
    "AUTH_METADATA",
    "Authenticator",
    "ClientSecurity",
    "SecurityError",
    "ServerSecurity",
    "hash_token",
    "is_loopback",
    "load_tokens",
]

#: the metadata key a worker's token travels in (``Bearer TOKEN``)
AUTH_METADATA = "authorization"
_BEARER = "bearer "
_HASH_PREFIX = "sha256:"
#: worker ids a certificate or a tokens file can name (also safe as file names)
WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SecurityError(ValueError):
    """A credential option that cannot be used (missing file, not PEM, key not the certificate's,
    bad tokens line): the message names the option."""


def _read(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None


def _check_certs(data: bytes, path: str, flag: str) -> list[Any]:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise SecurityError(f"{flag}: {path} holds no PEM certificate")
    return certs


def _check_key(data: bytes, path: str, flag: str, cert: Any, cert_flag: str) -> None:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SecurityError(f"{flag}: {path} is not an unencrypted PEM private key ({exc})") from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise SecurityError(f"{flag}: {path} is not the key of the certificate in {cert_flag}")


def _pair(cert_path: str | None, key_path: str | None, cert_flag: str, key_flag: str) -> tuple[bytes, bytes] | None:
    """A certificate chain and its private key, read and checked; None when neither is given."""
    if (cert_path is None) != (key_path is None):
        given, missing = (cert_flag, key_flag) if key_path is None else (key_flag, cert_flag)
        raise SecurityError(f"{given} needs {missing} too")
    if cert_path is None or key_path is None:
        return None
    cert, key = _read(cert_path, cert_flag), _read(key_path, key_flag)
    assert cert is not None and key is not None
    leaf = _check_certs(cert, cert_path, cert_flag)[0]
    _check_key(key, key_path, key_flag, leaf, cert_flag)
    return cert, key


def _ca(path: str | None, flag: str) -> bytes | None:
    data = _read(path, flag)
    if data is not None:
        _check_certs(data, str(path), flag)
    return data


def hash_token(token: str) -> str:
    """What a tokens file stores for ``token``: ``sha256:`` and its hex SHA-256."""
    return _HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: str, flag: str = "--worker-tokens") -> dict[str, bytes]:
    """A tokens file: ``ID sha256:HEX`` per line (blank lines and ``#`` comments allowed) ->
    {worker id: SHA-256 digest}. Plain tokens are refused: the file must not hold secrets."""
    data = _read(path, flag)
    assert data is not None
    out: dict[str, bytes] = {}
    for n, raw in enumerate(data.decode(errors="replace").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{flag}: {path} line {n}"
        if len(parts) != 2 or not parts[1].startswith(_HASH_PREFIX):
            raise SecurityError(f"{where}: expected `WORKER_ID sha256:HEX` (see `psrv certs`)")
        worker, digest = parts[0], parts[1][len(_HASH_PREFIX) :]
        if not WORKER_ID.match(worker):
            raise SecurityError(f"{where}: {worker!r} is not a worker id (letters, digits, . _ -)")
        try:
            value = bytes.fromhex(digest)
        except ValueError:
            value = b""
        if len(value) != 32:
            raise SecurityError(f"{where}: the sha256 digest must be 64 hex digits")
        if worker in out:
            raise SecurityError(f"{where}: worker {worker!r} is listed twice")
        out[worker] = value
    if not out:
        raise SecurityError(f"{flag}: {path} lists no worker")
    return out


def read_token(path: str, flag: str = "--token-file") -> str:
    """A worker's token: the file's text without surrounding whitespace."""
    data = _read(path, flag)
    assert data is not None
    token = data.decode(errors="replace").strip()
    if not token or any(c.isspace() for c in token):
        raise SecurityError(f"{flag}: {path} must hold one token (no spaces)")
    return token


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listening address's host part) only accepts connections from this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------------- server side
class Authenticator:
    """Who a call's credentials say it is, and whether that is the worker it acts for.

    ``tokens``: {worker id: SHA-256 of its token} (None: tokens are not used); ``certs``: client
    certificates (mutual TLS) name workers."""

    def __init__(self, tokens: dict[str, bytes] | None = None, certs: bool = False) -> None:
        self.tokens, self.certs = tokens, certs

    def token_identity(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """The worker whose token the call's metadata carries, or None (no token, or unknown)."""
        value = next((v for k, v in metadata or () if k == AUTH_METADATA), None)
        if not isinstance(value, str) or not value.lower().startswith(_BEARER) or self.tokens is None:
            return None
        digest = hashlib.sha256(value[len(_BEARER) :].strip().encode()).digest()
        found = None
        for worker, expected in self.tokens.items():  # every entry: the time says nothing of which matched
            if hmac.compare_digest(digest, expected):
                found = worker
        return found

    @staticmethod
    def cert_identities(context: Any) -> set[str]:
        """The names a call's client certificate was issued to: its common name and its DNS/URI
        subject alternative names (gRPC's ``auth_context``)."""
        auth = context.auth_context()
        names = set()
        for key in ("x509_common_name", "x509_subject_alternative_name"):
            for value in auth.get(key, ()):
                names.add(value.decode() if isinstance(value, bytes) else str(value))
        return names

    def unauthenticated(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """Why a call to psrv's service is refused before it is read (token missing or unknown), or None."""
        if self.tokens is None or self.token_identity(metadata) is not None:
            return None
        has = any(k == AUTH_METADATA for k, _ in metadata or ())
        return (
            "the worker token is not one of --worker-tokens"
            if has
            else "no worker token (start-worker --token-file; the server has --worker-tokens)"
        )

    def authorize(self, context: Any, worker_id: str) -> None:
        """Abort the call unless its credentials name ``worker_id``: UNAUTHENTICATED without a valid
        credential, PERMISSION_DENIED when they name another worker."""
        if self.tokens is not None:
            metadata = context.invocation_metadata()
            who = self.token_identity(metadata)
            if who is None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, self.unauthenticated(metadata) or "no worker token")
            if who != worker_id:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the worker token belongs to {who!r}; it cannot act as worker {worker_id!r}",
                )
        if self.certs:
            names = self.cert_identities(context)
            if not names:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate (mutual TLS: --tls-client-ca)")
            if worker_id not in names:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the client certificate names {'/'.join(sorted(names))!r}; it cannot act as worker {worker_id!r}",
                )


def interceptors(auth: Authenticator | None, service: str) -> list[grpc.ServerInterceptor]:
    """The server interceptors ``auth`` needs: with tokens, one that refuses calls to ``service``
    without a valid token before their first message is read."""
    return [] if auth is None or auth.tokens is None else [_TokenGate(auth, service)]


class _TokenGate(grpc.ServerInterceptor):
    """Refuses a call to ``service`` without a valid token before its first message is read
    (UNAUTHENTICATED); other services (health, reflection) pass."""

    def __init__(self, auth: Authenticator, service: str) -> None:
        self.auth, self.prefix = auth, f"/{service}/"

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        why = self.auth.unauthenticated(details.invocation_metadata)
        if why is None:
            return handler
        return _aborting(handler, why)


def _aborting(handler: Any, why: str) -> Any:
    """A handler of ``handler``'s kind that ends the call with UNAUTHENTICATED ``why``."""

    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    kind = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(abort)


@dataclass(frozen=True)
class ServerSecurity:
    """``start-server``'s credential options (file paths); all None: plaintext and open."""

    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None
    tokens: str | None = None

    @property
    def tls(self) -> bool:
        return self.cert is not None

    def check(self) -> None:
        """Read and check every file now (a one-line :class:`SecurityError` naming the option)."""
        self.credentials()
        self.authenticator()

    def credentials(self) -> grpc.ServerCredentials | None:
        """The server's TLS credentials (None: plaintext)."""
        pair = _pair(self.cert, self.key, "--tls-cert", "--tls-key")
        ca = _ca(self.client_ca, "--tls-client-ca")
        if pair is None:
            if ca is not None:
                raise SecurityError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
            return None
        key, chain = pair[1], pair[0]
        return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca, require_client_auth=ca is not None)

    def authenticator(self) -> Authenticator | None:
        if self.tokens is None and self.client_ca is None:
            return None
        tokens = None if self.tokens is None else load_tokens(self.tokens)
        return Authenticator(tokens, certs=self.client_ca is not None)


# ------------------------------------------------------------------------------------- client side
_Details = collections.namedtuple(
    "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
)


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer TOKEN`` to every call."""

    def __init__(self, token: str) -> None:
        self.header = (AUTH_METADATA, f"Bearer {token}")

    def _details(self, d: Any) -> _Details:
        return _Details(
            d.method, d.timeout, [*(d.metadata or ()), self.header], d.credentials,
            getattr(d, "wait_for_ready", None), getattr(d, "compression", None),
        )  # fmt: skip

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


@dataclass(frozen=True)
class ClientSecurity:
    """``start-worker``'s credential options (file paths); all None: a plaintext channel."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    token_file: str | None = None

    @property
    def templated(self) -> bool:
        """Whether a path holds ``{id}``: one file per logical worker of a host (``--tls-cert
        pki/workers/{id}.crt``), filled in by :meth:`for_worker`."""
        return any(isinstance(v, str) and "{id}" in v for v in vars(self).values())

    def for_worker(self, worker_id: str) -> ClientSecurity:
        """These credentials with ``{id}`` in every path replaced by ``worker_id``."""
        return replace(self, **{k: v.replace("{id}", worker_id) for k, v in vars(self).items() if isinstance(v, str)})

    def check(self) -> None:
        """Read and check every file now (a one-line :class:`SecurityError` naming the option)."""
        self.credentials()
        if self.token_file is not None:
            read_token(self.token_file)

    def credentials(self) -> grpc.ChannelCredentials | None:
        pair = _pair(self.cert, self.key, "--tls-cert", "--tls-key")
        ca = _ca(self.ca, "--tls-ca")
        if ca is None:
            if pair is not None or self.server_name is not None:
                raise SecurityError("--tls-cert/--tls-key/--tls-server-name need --tls-ca (the server's CA)")
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=None if pair is None else pair[1],
            certificate_chain=None if pair is None else pair[0],
        )

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A channel to ``address`` with these credentials (a context manager, as grpc's)."""
        opts = list(options)
        creds = self.credentials()
        if creds is None:
            channel = grpc.insecure_channel(address, options=opts)
        else:
            if self.server_name is not None:
                opts.append(("grpc.ssl_target_name_override", self.server_name))
            channel = grpc.secure_channel(address, creds, options=opts)
        if self.token_file is not None:
            channel = grpc.intercept_channel(channel, _TokenInterceptor(read_token(self.token_file)))
        return channel


class HandshakeError(ConnectionError):
    """The connection's TLS handshake failed: retrying will not help (one line, with a hint)."""


_HANDSHAKE = ("handshake", "SSL_ERROR", "CERTIFICATE", "Socket closed", "Hostname Verification")


def handshake_failed(exc: grpc.RpcError) -> str | None:
    """The TLS handshake's failure in an UNAVAILABLE status (it will not heal by retrying), or None.
    A server that refuses the client's certificate (or a plaintext client) closes the socket
    right after the handshake: the client then only sees ``Socket closed``."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    details = exc.details() or ""
    return details if any(m in details for m in _HANDSHAKE) else None


def check_handshake(channel: grpc.Channel, address: str, security: ClientSecurity | None, timeout: float = 5.0) -> None:
    """Raise :class:`HandshakeError` if ``channel`` fails to connect for a TLS reason (wrong CA, a
    client certificate the server refuses, TLS on one side only); a server that is not up yet, or
    any other outcome, passes. One health check without waiting for the channel to be ready: a
    call that waits (as Register does) would only say ``Deadline Exceeded`` at its end."""
    check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None)
    try:
        check(b"", timeout=timeout)
    except grpc.RpcError as exc:
        details = handshake_failed(exc)
        if details is not None:
            raise HandshakeError(f"cannot connect to {address}: {details}{explain(details, security)}") from None


def explain(details: str, security: ClientSecurity | None) -> str:
    """A hint for a worker's connection failure that TLS may have caused ('' when none applies)."""
    sec = security or ClientSecurity()
    if "Hostname Verification" in details:
        return " (the server's certificate is not for this host: pass --tls-server-name with a name it has)"
    if "CERTIFICATE_VERIFY_FAILED" in details or "certificate verify failed" in details:
        return " (the server's certificate does not verify against --tls-ca, or not for this host: --tls-server-name)"
    if "Socket closed" in details or "Connection reset" in details:
        if sec.ca is None:
            return " (the server closed the connection: does it serve TLS? then pass --tls-ca)"
        return (
            " (the server closed the connection during the TLS handshake: does it require a client certificate "
            "signed by its --tls-client-ca? pass --tls-cert/--tls-key)"
        )
    return ""

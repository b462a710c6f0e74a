"""TLS for every pdserve server and for the channels between components, with certificates
read from files and re-read when the files change (cert-manager rotates them in place).

Server side (`server_credentials`): grpc's dynamic SSL credentials call `_ServerFiles.fetch`
before every new connection's handshake. It compares the files' (mtime, size, inode) with
what it loaded last; only on a change does it read them again, check that the key matches
the certificate (a half-written rotation is refused, the old pair stays in use), and hand
the new pair to gRPC. Connections already open keep the session they negotiated, so live
streams are never dropped by a rotation.

The HTTP API (`server_ssl_context`): an `ssl.SSLContext` that checks the same stamps on
every handshake and moves the new connection onto a context made from the new files.

Client side (`ChannelTls`): gRPC's channel credentials are fixed when a channel is made, so
a client asks `changed()` before each call and opens a new channel when the files changed;
the old channel is closed once its last call ends (shared/transport/channels.py).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import threading
import time
from pathlib import Path

import grpc

from shared.transport.types import TlsConfig

log = logging.getLogger(__name__)

# How often a client re-checks its files (a stat per file); servers check on every handshake.
CLIENT_RECHECK_S = 1.0

Stamp = tuple[tuple[int, int, int] | None, ...]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; False for wildcards and everything else."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a DNS name other than localhost: assume reachable from outside


def plaintext_warning(address: str, protocol: str = "gRPC") -> str | None:
    """The warning a server logs when it serves plaintext on `address`; None on loopback."""
    host = address.rpartition(":")[0]
    if is_loopback(host):
        return None
    return (
        f"PLAINTEXT {protocol} on {address}: not loopback, so anyone who can reach this port can "
        "read and forge its traffic. Give --tls-cert/--tls-key (and the CA flags) to serve "
        "TLS; plaintext is meant for local runs only."
    )


def _stamp(paths: tuple[Path, ...]) -> Stamp:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def check_pair(cert: Path, key: Path, ca: Path | None) -> None:
    """Raise ssl.SSLError / OSError unless `key` matches `cert` and `ca` parses."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.load_verify_locations(cafile=ca)


def _read(config: TlsConfig) -> tuple[bytes, bytes, bytes | None]:
    check_pair(config.cert, config.key, config.ca)
    ca = config.ca.read_bytes() if config.ca is not None else None
    return config.cert.read_bytes(), config.key.read_bytes(), ca


class _ServerFiles:
    """The files behind one server's credentials; `fetch` runs on gRPC's handshake thread."""

    def __init__(self, config: TlsConfig) -> None:
        self._config = config
        self._paths = config.paths
        self._lock = threading.Lock()
        self._stamp = _stamp(self._paths)
        self.reloads = 0
        cert, key, ca = _read(config)
        self.initial = grpc.ssl_server_certificate_configuration([(key, cert)], ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """None: keep the current pair (gRPC's contract for "no change")."""
        stamp = _stamp(self._paths)
        with self._lock:
            if stamp == self._stamp:
                return None
            try:
                cert, key, ca = _read(self._config)
            except (OSError, ssl.SSLError) as err:
                # Mid-rotation or broken: keep serving with the pair we have; retry on the
                # next handshake (the stamp is not updated).
                log.warning(
                    "TLS files %s unusable, keeping the current certificate: %s",
                    [str(p) for p in self._paths],
                    err,
                )
                return None
            if _stamp(self._paths) != stamp:
                return None  # changed while we read: take it on the next handshake
            self._stamp = stamp
            self.reloads += 1
        log.info("TLS certificate reloaded from %s", self._config.cert)
        return grpc.ssl_server_certificate_configuration([(key, cert)], ca)


def server_credentials(config: TlsConfig) -> grpc.ServerCredentials:
    """Reloading server credentials; client certificates are required (and must chain to
    `config.ca`) when `config.require_client_cert`."""
    files = _ServerFiles(config)
    return grpc.dynamic_ssl_server_credentials(
        files.initial, files.fetch, require_client_authentication=config.require_client_cert
    )


class _HttpsFiles:
    """The same files behind an `ssl.SSLContext` (the HTTP API's uvicorn server).

    asyncio makes every connection's TLS object from the one context it was given (`base`);
    its SNI callback, which OpenSSL runs on every ClientHello (with or without a server
    name), checks the files' stamp and moves the connection onto the newest context. A new
    context is only made from a pair whose key matches its certificate; connections already
    open keep what they negotiated."""

    def __init__(self, config: TlsConfig) -> None:
        self._config = config
        self._paths = config.paths
        self._lock = threading.Lock()
        self._stamp = _stamp(self._paths)
        self.reloads = 0
        self.base = self._context()
        self.base.sni_callback = self._on_client_hello
        self.current = self.base

    def _context(self) -> ssl.SSLContext:
        config = self._config
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(config.cert, config.key)  # SSLError unless the key matches
        if config.ca is not None:
            context.load_verify_locations(cafile=config.ca)
        if config.require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols(["http/1.1"])
        return context

    def _on_client_hello(
        self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        stamp = _stamp(self._paths)
        with self._lock:
            if stamp != self._stamp:
                try:
                    fresh = self._context()
                except (OSError, ssl.SSLError) as err:
                    log.warning(
                        "TLS files %s unusable, keeping the current certificate: %s",
                        [str(p) for p in self._paths],
                        err,
                    )
                else:
                    if _stamp(self._paths) == stamp:  # else: take it on the next handshake
                        self._stamp, self.current = stamp, fresh
                        self.reloads += 1
                        log.info("TLS certificate reloaded from %s", self._config.cert)
            current = self.current
        if current is not context:
            connection.context = current


def server_ssl_context(config: TlsConfig) -> ssl.SSLContext:
    """An `ssl.SSLContext` for an asyncio server (uvicorn) that serves the files of `config`
    and picks up rotated ones on the next handshake, as `server_credentials` does for gRPC;
    client certificates chaining to `config.ca` are required when `require_client_cert`."""
    return _HttpsFiles(config).base


class ChannelTls:
    """A client's TLS files: credentials for a new channel, and whether they changed since."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self._paths = config.paths
        self._stamp: Stamp = ()
        self._checked = 0.0

    def credentials(self) -> grpc.ChannelCredentials:
        """Credentials from the files as they are now (checked: the key matches)."""
        stamp = _stamp(self._paths)
        cert, key, ca = _read(self.config)
        self._stamp, self._checked = stamp, time.monotonic()
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def changed(self) -> bool:
        """True once the files differ from the last `credentials()` (checked at most every
        CLIENT_RECHECK_S)."""
        now = time.monotonic()
        if now - self._checked < CLIENT_RECHECK_S:
            return False
        self._checked = now
        return _stamp(self._paths) != self._stamp

    def options(self) -> list[tuple[str, str]]:
        """Channel options: the name the server's certificate must carry, when not the
        dialled host (workers are dialled by pod IP; their certificates name a Service)."""
        name = self.config.server_name
        return [("grpc.ssl_target_name_override", name)] if name else []

"""TLS and mTLS over real loopback gRPC servers, with certificates made in the test.

1. Workers (mTLS): a decode server built exactly as a worker builds it (`start_server` with
   the worker's `TlsConfig`) accepts only clients whose certificate chains to the internal
   CA; every other client is refused at the handshake.
2. Rotation: certificate files rewritten in place are picked up by the next connection,
   on the server and on the client, while a stream already open runs to its end.
3. The orchestrator's public port: TLS, client certificates and the bearer token in every
   combination, through the real client library.
4. Plaintext on a non-loopback address is logged loudly: the check, and a real orchestrator
   process whose gRPC and HTTP ports are bound to an address the check cannot prove is
   loopback (tests only ever bind loopback).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from shared.cluster.certificates import CertificateAuthority, Pem
from shared.transport import tls as tls_module
from shared.transport.grpc_transport import GrpcDecodeClient
from shared.transport.server import decode_service, start_server
from shared.transport.tls import is_loopback, plaintext_warning
from shared.transport.types import (
    DecodeFinish,
    KvReceipt,
    Lease,
    LoadReport,
    ReserveRequest,
    StatusCode,
    TlsConfig,
    TokenBatch,
    TransportConfig,
    TransportError,
)
from tests.worker_harness import spawn_pdserve, stop_worker

LOAD = LoadReport(free_slots=3, total_slots=4, queue_depth=0, live_requests=1)


class ScriptedDecode:
    """A `DecodeHandler` whose token stream the test feeds batch by batch (a fake, so the
    test controls exactly when a stream is live)."""

    def __init__(self) -> None:
        self.batches: asyncio.Queue[TokenBatch] = asyncio.Queue()
        self.streaming = asyncio.Event()

    async def reserve(self, request: ReserveRequest) -> Lease:
        raise TransportError(StatusCode.RESOURCE_EXHAUSTED, "no slots in this fake")

    async def stream_tokens(self, lease_id: str) -> AsyncIterator[TokenBatch]:
        self.streaming.set()
        while True:
            batch = await self.batches.get()
            yield batch
            if batch.finish is not None:
                return

    async def transfer_kv(self, messages: AsyncIterator) -> KvReceipt:
        raise TransportError(StatusCode.UNIMPLEMENTED, "not in this fake")

    async def cancel(self, lease_id: str) -> bool:
        return False

    async def get_load(self) -> LoadReport:
        return LOAD


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, object]:
    internal = CertificateAuthority(tmp_path / "internal", "internal-ca")
    other = CertificateAuthority(tmp_path / "other", "other-ca")
    return {
        "ca": internal,
        "other": other,
        "server": internal.issue("decode", ("localhost", "127.0.0.1", "decode.pdserve.test")),
        "client": internal.issue("orchestrator", ("orchestrator",)),
        "stranger": other.issue("stranger", ("stranger",)),
    }


def worker_tls(pem: Pem, ca: CertificateAuthority, server_name: str | None = None) -> TlsConfig:
    """What `pdserve decode --tls-cert --tls-key --tls-ca` builds (worker_config.py)."""
    return TlsConfig(pem.cert, pem.key, ca.cert, require_client_cert=True, server_name=server_name)


async def serve_decode(tls: TlsConfig | None, handler: ScriptedDecode | None = None):
    config = TransportConfig(tls=tls)
    return await start_server("127.0.0.1:0", [decode_service(handler or ScriptedDecode())], config)


async def load_through(client: GrpcDecodeClient) -> LoadReport:
    try:
        return await client.get_load()
    finally:
        await client.close()


def client_config(tls: TlsConfig | None) -> TransportConfig:
    return TransportConfig(tls=tls, rpc_timeout_s=5.0)


# 1. Accept and refuse --------------------------------------------------------------------


def test_worker_accepts_a_client_with_a_certificate_from_the_internal_ca(pki) -> None:
    async def main() -> None:
        server = await serve_decode(worker_tls(pki["server"], pki["ca"]))
        try:
            config = client_config(worker_tls(pki["client"], pki["ca"]))
            client = GrpcDecodeClient(f"127.0.0.1:{server.port}", config)
            assert await load_through(client) == LOAD
            # By a name on the certificate that is not the dialled host (pods are dialled by
            # IP; their certificates name the Service): --tls-server-name.
            named = worker_tls(pki["client"], pki["ca"], server_name="decode.pdserve.test")
            client = GrpcDecodeClient(f"127.0.0.1:{server.port}", client_config(named))
            assert await load_through(client) == LOAD
        finally:
            await server.stop(None)

    asyncio.run(main())


REFUSED = {
    "plaintext client": lambda p: None,
    "no client certificate": "no-cert",
    "client certificate from another CA": lambda p: worker_tls(p["stranger"], p["ca"]),
    "server not trusted by the client": lambda p: worker_tls(p["client"], p["other"]),
    "server name not on its certificate": lambda p: worker_tls(
        p["client"], p["ca"], server_name="prefill.pdserve.test"
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_worker_refuses_every_other_client(pki, case: str) -> None:
    async def main() -> None:
        server = await serve_decode(worker_tls(pki["server"], pki["ca"]))
        address = f"127.0.0.1:{server.port}"
        try:
            if REFUSED[case] == "no-cert":
                # TLS that trusts the server, but presents no certificate of its own.
                credentials = grpc.ssl_channel_credentials(pki["ca"].cert.read_bytes())
                async with grpc.aio.secure_channel(address, credentials) as channel:
                    from grpc_health.v1 import health_pb2, health_pb2_grpc

                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(), timeout=5
                        )
                    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
                return
            client = GrpcDecodeClient(address, client_config(REFUSED[case](pki)))
            with pytest.raises(TransportError) as err:
                await load_through(client)
            assert err.value.code is StatusCode.UNAVAILABLE, err.value
        finally:
            await server.stop(None)

    asyncio.run(main())


# 2. Rotation -----------------------------------------------------------------------------


async def read_one(stream: AsyncIterator[TokenBatch], handler: ScriptedDecode, token: int) -> None:
    await handler.batches.put(TokenBatch((token,)))
    assert (await anext(stream)).token_ids == (token,)


async def finish(stream: AsyncIterator[TokenBatch], handler: ScriptedDecode) -> None:
    await handler.batches.put(TokenBatch((), DecodeFinish.LENGTH))
    assert (await anext(stream)).finish is DecodeFinish.LENGTH
    assert await anext(stream, None) is None


def test_server_certificate_rotation_keeps_live_streams(pki, tmp_path: Path) -> None:
    """The server's files are rewritten with a certificate from another CA: new connections
    get the new one (a client trusting only the new CA gets in, one trusting only the old
    CA is refused), while a stream opened before the rotation runs on to its end."""
    ca, other = pki["ca"], pki["other"]
    served = ca.issue("decode", into=tmp_path, filename="served")
    handler = ScriptedDecode()

    async def main() -> None:
        tls = TlsConfig(served.cert, served.key, ca.cert, require_client_cert=True)
        server = await serve_decode(tls, handler)
        address = f"127.0.0.1:{server.port}"
        old_client = GrpcDecodeClient(address, client_config(worker_tls(pki["client"], ca)))
        try:
            stream = old_client.stream_tokens("lease-1")
            await read_one(stream, handler, 1)

            other.issue("decode", into=tmp_path, filename="served")  # rotated in place
            trusts_new = GrpcDecodeClient(address, client_config(worker_tls(pki["client"], other)))
            assert await load_through(trusts_new) == LOAD
            trusts_old = GrpcDecodeClient(address, client_config(worker_tls(pki["client"], ca)))
            with pytest.raises(TransportError) as err:
                await load_through(trusts_old)
            assert err.value.code is StatusCode.UNAVAILABLE

            for token in (2, 3):  # the stream opened before the rotation goes on
                await read_one(stream, handler, token)
            await finish(stream, handler)
        finally:
            await old_client.close()
            await server.stop(None)

    asyncio.run(main())


def test_client_certificate_rotation_keeps_live_streams(pki, tmp_path: Path, monkeypatch) -> None:
    """The client's files are rewritten: its next call goes out on a new connection with
    the new certificate (one the server refuses, then one it accepts again), while its
    stream opened before runs on, on the old connection, to its end."""
    monkeypatch.setattr(tls_module, "CLIENT_RECHECK_S", 0.0)
    ca, other = pki["ca"], pki["other"]
    mine = ca.issue("orchestrator", into=tmp_path, filename="mine")
    handler = ScriptedDecode()

    async def main() -> None:
        server = await serve_decode(worker_tls(pki["server"], ca), handler)
        client = GrpcDecodeClient(
            f"127.0.0.1:{server.port}", client_config(TlsConfig(mine.cert, mine.key, ca.cert))
        )
        try:
            stream = client.stream_tokens("lease-1")
            await read_one(stream, handler, 1)
            other.issue("orchestrator", into=tmp_path, filename="mine")  # not trusted there
            with pytest.raises(TransportError) as err:
                await client.get_load()
            assert err.value.code is StatusCode.UNAVAILABLE
            await read_one(stream, handler, 2)
            ca.issue("orchestrator", into=tmp_path, filename="mine")  # trusted again
            assert await client.get_load() == LOAD
            await read_one(stream, handler, 3)
            await finish(stream, handler)
        finally:
            await client.close()
            await server.stop(None)

    asyncio.run(main())


def test_a_half_written_rotation_keeps_the_current_certificate(pki, tmp_path: Path) -> None:
    """A key that does not match the certificate (a rotation caught halfway) is not taken:
    the server goes on with the pair it has, and takes the next good one."""
    ca = pki["ca"]
    served = ca.issue("decode", into=tmp_path, filename="served")

    async def main() -> None:
        tls = TlsConfig(served.cert, served.key, ca.cert, require_client_cert=True)
        server = await serve_decode(tls)
        address = f"127.0.0.1:{server.port}"
        config = client_config(worker_tls(pki["client"], ca))
        try:
            fresh = ca.issue("decode", into=tmp_path / "next")
            served.key.write_bytes(fresh.key.read_bytes())  # new key, old certificate
            assert await load_through(GrpcDecodeClient(address, config)) == LOAD
            served.cert.write_bytes(fresh.cert.read_bytes())  # the pair is whole again
            assert await load_through(GrpcDecodeClient(address, config)) == LOAD
        finally:
            await server.stop(None)

    asyncio.run(main())


# Flags -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "C"], "mTLS needs --tls-cert, --tls-key, --tls-ca together; missing"),
        (["--tls-server-name", "n"], "--tls-server-name needs --tls-cert, --tls-key and --tls-ca"),
        (["--tls-cert", "C", "--tls-key", "K", "--tls-ca", "nowhere"], "--tls-ca nowhere does"),
    ],
)
def test_worker_tls_flags_come_together(tmp_path: Path, monkeypatch, flags, message) -> None:
    from shared.config import ConfigError
    from shared.serving.worker_config import Role, parse_worker_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "C").write_text("c")
    (tmp_path / "K").write_text("k")
    with pytest.raises(ConfigError) as err:
        parse_worker_args(["--port", "0", *flags], Role.DECODE)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "C"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "C"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--internal-tls-cert", "C", "--internal-tls-key", "K"], "missing --internal-tls-ca"),
        (["--max-unsent-tokens", "0"], "--max-unsent-tokens=0 must be > 0"),
    ],
)
def test_orchestrator_tls_flags_come_together(tmp_path: Path, monkeypatch, flags, message):
    from orchestrator.config import parse_orchestrator_args
    from shared.config import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "C").write_text("c")
    (tmp_path / "K").write_text("k")
    with pytest.raises(ConfigError) as err:
        parse_orchestrator_args(["--prefill", "h:1", "--decode", "h:2", *flags])
    assert message in str(err.value)


# 3. Connection lifetimes -------------------------------------------------------------------


def test_old_connections_are_closed_and_clients_reconnect(pki) -> None:
    """max_connection_age (+ grace) is really applied: a stream still open past age + grace
    is ended (UNAVAILABLE), and the same client's next call reconnects."""
    handler = ScriptedDecode()

    async def main() -> None:
        config = TransportConfig(max_connection_age_s=0.5, max_connection_age_grace_s=0.5)
        server = await start_server("127.0.0.1:0", [decode_service(handler)], config)
        client = GrpcDecodeClient(f"127.0.0.1:{server.port}", client_config(None))
        try:
            stream = client.stream_tokens("lease-1")
            await read_one(stream, handler, 1)
            with pytest.raises(TransportError) as err:
                await asyncio.wait_for(anext(stream), 10)  # no more tokens ever come
            assert err.value.code is StatusCode.UNAVAILABLE
            assert await client.get_load() == LOAD
        finally:
            await client.close()
            await server.stop(None)

    asyncio.run(main())


# 4. Plaintext ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "loud"),
    [
        ("127.0.0.1:50061", False),
        ("127.5.6.7:1", False),
        ("[::1]:50061", False),
        ("localhost:50061", False),
        ("0.0.0.0:50061", True),
        ("[::]:50061", True),
        ("10.1.2.3:50061", True),
        ("decode.example:50061", True),
    ],
)
def test_plaintext_is_loud_off_loopback(address: str, loud: bool) -> None:
    warning = plaintext_warning(address)
    assert (warning is not None) is loud
    if loud:
        assert "PLAINTEXT" in warning and address in warning and "--tls-cert" in warning
    assert is_loopback(address.rpartition(":")[0]) is not loud


def test_a_plaintext_loopback_server_logs_no_warning(caplog) -> None:
    async def main() -> None:
        server = await serve_decode(None)
        await server.stop(None)

    with caplog.at_level(logging.WARNING, logger="shared.transport.server"):
        asyncio.run(main())
    assert not [r for r in caplog.records if "PLAINTEXT" in r.getMessage()]


@pytest.mark.timeout(120)
def test_an_orchestrator_serving_plaintext_off_loopback_says_so_at_start(process_cluster) -> None:
    """`127.1` is 127.0.0.1 in inet_aton's short form: the sockets really are on loopback
    (the suite never listens elsewhere), but the check, which trusts only what it can
    prove (an IP literal it parses, or `localhost`), takes it for an address reachable
    from outside, as it would a real interface's; so the process's start is where the
    warning must come from. gRPC's own resolver (c-ares) does not read the short form:
    the process uses the system's (GRPC_DNS_RESOLVER=native)."""
    workers = process_cluster.workers
    orchestrator = spawn_pdserve(
        "orchestrator",
        [
            "orchestrator",
            "--host",
            "127.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            "--prefill",
            workers.prefill.address,
            "--decode",
            workers.decode_address,
        ],
        timeout=90,
        extra_env={"GRPC_DNS_RESOLVER": "native"},
    )
    try:
        output = "".join(orchestrator.output)
        for protocol in ("gRPC", "HTTP"):
            assert f"PLAINTEXT {protocol} on 127.1:" in output, output
        assert "--tls-cert" in output
    finally:
        stop_worker(orchestrator)

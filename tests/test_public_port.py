"""The orchestrator's public port against callers we do not control, over a real loopback
gRPC server (the one `pdserve orchestrator` starts: `start_public_server`) in front of
in-process workers (fake transport behind it, so no process starts here).

1. TLS, client certificates and the bearer token, in every combination; the HTTP API
   (`start_http_server`) under the same TLS, client-certificate and rotation rules.
2. Limits, each with a status that names it: request size, stop strings (count, length),
   concurrent streams per connection, request bytes that are not a GenerateRequest.
3. Clients that never read: their streams are cancelled once too far behind (slot freed,
   RESOURCE_EXHAUSTED when they read again), and a client that reads is not held up by
   them by more than a bound counted in decode steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import grpc
import httpx
import pytest

from orchestrator.main import start_http_server, start_public_server
from shared.client.generator import AsyncGeneratorClient, ClientTls, GenerateError, build_request
from shared.cluster.certificates import CertificateAuthority
from shared.rpc.pdserve.v1 import generate_pb2
from tests.cluster_harness import InProcessCluster
from tests.reference import reference_greedy

GENERATE = "/pdserve.v1.Generator/Generate"


@contextlib.asynccontextmanager
async def public_port(
    engine, params, fingerprint: str, *flags: str
) -> AsyncIterator[tuple[InProcessCluster, str]]:
    """An in-process cluster behind the real public gRPC server on a loopback port."""
    cluster = InProcessCluster(
        engine,
        params,
        fingerprint,
        orchestrator_flags=["--host", "127.0.0.1", "--port", "0", *flags],
    )
    await cluster.start()
    server = await start_public_server(cluster.config, cluster.orchestrator.frontend)
    try:
        yield cluster, f"127.0.0.1:{server.port}"
    finally:
        await server.stop(None)
        await cluster.close()


async def generate(
    target: str,
    prompt: str | Sequence[int],
    *,
    token: str | None = None,
    tls: ClientTls | None = None,
    **options: object,
) -> list:
    async with AsyncGeneratorClient(target, token, tls) as client:
        return [c async for c in client.generate(prompt, timeout=20, **options)]


async def refused(target: str, prompt: str | Sequence[int] = (256, 1), **kw) -> GenerateError:
    with pytest.raises(GenerateError) as err:
        await generate(target, prompt, max_tokens=2, **kw)
    return err.value


def tokens_of(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


# 1. TLS, client certificates, bearer token --------------------------------------------------


@pytest.fixture
def public_pki(tmp_path: Path) -> dict[str, object]:
    public = CertificateAuthority(tmp_path / "public", "public-ca")
    clients = CertificateAuthority(tmp_path / "clients", "frontend-ca")
    other = CertificateAuthority(tmp_path / "other", "other-ca")
    (tmp_path / "token").write_text("s3cret\n")
    return {
        "server": public.issue("orchestrator", server=True, client=False),
        "public": public,
        "other": other,
        "clients": clients,
        "frontend": clients.issue("frontend", ("frontend",), server=False),
        "stranger": other.issue("stranger", ("stranger",), server=False),
        "token": tmp_path / "token",
    }


def _tls(pki, client: str | None = None) -> ClientTls:
    pem = pki[client] if client else None
    return ClientTls.from_files(
        pki["public"].cert, pem.cert if pem else None, pem.key if pem else None
    )


@pytest.mark.parametrize("mode", ["tls", "client-cert", "client-cert+token"])
def test_public_port_tls_modes(engine, params, tiny_fingerprint, public_pki, mode) -> None:
    pki = public_pki
    flags = ["--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key)]
    if mode != "tls":
        flags += ["--tls-client-ca", str(pki["clients"].cert)]
    token = None
    if mode == "client-cert+token":
        flags += ["--auth-token-file", str(pki["token"])]
        token = "s3cret"
    expected = reference_greedy(engine, params, [256, 1, 2], 3)

    async def main() -> None:
        async with public_port(engine, params, tiny_fingerprint, *flags) as (_, target):
            good = _tls(pki, None if mode == "tls" else "frontend")
            chunks = await generate(
                target, [256, 1, 2], token=token, tls=good, max_tokens=3, ignore_eos=True
            )
            assert tokens_of(chunks) == expected
            assert (await refused(target, token=token)).code == "UNAVAILABLE"  # plaintext
            if mode == "tls":
                return
            for who in (None, "stranger"):  # no client certificate; one from another CA
                err = await refused(target, token=token, tls=_tls(pki, who))
                assert err.code == "UNAVAILABLE", err
            if mode == "client-cert+token":  # the certificate alone is not enough
                err = await refused(target, tls=good)
                assert err.code == "UNAUTHENTICATED" and "missing bearer token" in err.message
                err = await refused(target, token="wrong", tls=good)
                assert err.code == "UNAUTHENTICATED" and "wrong bearer token" in err.message

    asyncio.run(main())


def _https_client(pki, trust: Path, client: str | None = None) -> httpx.AsyncClient:
    context = ssl.create_default_context(cafile=trust)
    if client is not None:
        context.load_cert_chain(pki[client].cert, pki[client].key)
    return httpx.AsyncClient(verify=context, timeout=20)


async def _complete(client: httpx.AsyncClient, base: str, n: int = 3) -> httpx.Response:
    body = {
        "model": "tiny",
        "prompt": [256, 1, 2],
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": True,
    }
    return await client.post(
        base + "/v1/completions", json=body, headers={"authorization": "Bearer s3cret"}
    )


def _https_flags(pki, served, mode: str) -> tuple[list[str], str | None]:
    """The orchestrator's flags for an HTTPS API with `served`'s certificate (and, for
    "client-cert", client certificates required), and the client certificate to use."""
    flags = ["--tls-cert", str(served.cert), "--tls-key", str(served.key)]
    flags += ["--http-port", "0", "--auth-token-file", str(pki["token"])]
    if mode != "client-cert":
        return flags, None
    return [*flags, "--tls-client-ca", str(pki["clients"].cert)], "frontend"


async def _rotation_is_served_to_new_connections(pki, base: str, me, rotate) -> None:
    """A kept-alive connection goes on with the certificate it negotiated after `rotate()`
    puts one from another CA in the files; new connections get the new one."""
    async with _https_client(pki, pki["public"].cert, me) as early:
        response = await _complete(early, base)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 3
        rotate()
        assert (await _complete(early, base, 2)).status_code == 200
    async with _https_client(pki, pki["other"].cert, me) as fresh:
        assert (await _complete(fresh, base, 2)).status_code == 200
    async with _https_client(pki, pki["public"].cert, me) as stale:
        with pytest.raises(httpx.ConnectError):
            await _complete(stale, base)


@pytest.mark.parametrize("mode", ["tls", "client-cert"])
def test_http_api_serves_the_public_tls(
    engine, params, tiny_fingerprint, public_pki, tmp_path: Path, mode: str
) -> None:
    """--http-port takes the public port's TLS: HTTPS only, client certificates required
    as for gRPC, and a rotated server certificate is served to new connections while a
    connection opened before goes on with the one it negotiated."""
    pki = public_pki
    where = dict(into=tmp_path / "served", filename="served", server=True, client=False)
    served = pki["public"].issue("orchestrator", **where)
    flags, me = _https_flags(pki, served, mode)

    async def main() -> None:
        async with public_port(engine, params, tiny_fingerprint, *flags) as (cluster, _):
            orch = cluster.orchestrator
            http = await start_http_server(cluster.config, orch.frontend, orch.metrics)
            assert http is not None and http.scheme == "https"
            base = f"https://127.0.0.1:{http.port}"
            try:
                rotate = lambda: pki["other"].issue("orchestrator", **where)  # noqa: E731
                await _rotation_is_served_to_new_connections(pki, base, me, rotate)
                async with httpx.AsyncClient(timeout=20) as plain:  # plaintext: refused
                    with pytest.raises(httpx.TransportError):
                        await plain.get(f"http://127.0.0.1:{http.port}/health")
                if mode == "client-cert":
                    for who in (None, "stranger"):  # no certificate; another CA's
                        async with _https_client(pki, pki["other"].cert, who) as client:
                            with pytest.raises(httpx.TransportError):
                                await _complete(client, base)
            finally:
                await http.stop()

    asyncio.run(main())


def test_http_api_refuses_a_half_written_rotation(
    engine, params, tiny_fingerprint, public_pki, tmp_path: Path
) -> None:
    """A key that does not match its certificate is not taken; the next whole pair is."""
    pki = public_pki
    served = pki["public"].issue(
        "orchestrator", into=tmp_path, filename="served", server=True, client=False
    )
    flags = [
        "--tls-cert",
        str(served.cert),
        "--tls-key",
        str(served.key),
        "--http-port",
        "0",
        "--auth-token-file",
        str(pki["token"]),
    ]

    async def main() -> None:
        async with public_port(engine, params, tiny_fingerprint, *flags) as (cluster, _):
            orch = cluster.orchestrator
            http = await start_http_server(cluster.config, orch.frontend, orch.metrics)
            base = f"https://127.0.0.1:{http.port}"
            try:
                fresh = pki["other"].issue(
                    "orchestrator", into=tmp_path / "next", server=True, client=False
                )
                served.key.write_bytes(fresh.key.read_bytes())  # new key, old certificate
                async with _https_client(pki, pki["public"].cert) as client:
                    assert (await _complete(client, base, 1)).status_code == 200
                served.cert.write_bytes(fresh.cert.read_bytes())  # whole again: other CA
                async with _https_client(pki, pki["other"].cert) as client:
                    assert (await _complete(client, base, 1)).status_code == 200
            finally:
                await http.stop()

    asyncio.run(main())


# 2. Limits ------------------------------------------------------------------------------------


def test_public_port_limits_say_which_limit(engine, params, tiny_fingerprint) -> None:
    flags = ("--max-request-kib", "1", "--max-stop-strings", "2", "--max-stop-chars", "8")

    async def main() -> None:
        async with public_port(engine, params, tiny_fingerprint, *flags) as (_, target):
            err = await refused(target, "x" * 2000)
            assert err.code == "RESOURCE_EXHAUSTED" and "larger than max" in err.message, err
            err = await refused(target, stop=["a", "b", "c"])
            assert err.code == "INVALID_ARGUMENT"
            assert "3 stop strings; the limit is 2" in err.message
            err = await refused(target, stop=["123456789"])
            assert err.code == "INVALID_ARGUMENT"
            assert "stop string '123456789' must have 1 to 8 characters" in err.message
            # Not a GenerateRequest at all: `text` (field 2) holding invalid UTF-8.
            async with grpc.aio.insecure_channel(target) as channel:
                call = channel.unary_stream(GENERATE)(b"\x12\x03\xff\xfeA")
                with pytest.raises(grpc.aio.AioRpcError) as raw:
                    async for _ in call:
                        pass
            assert raw.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid GenerateRequest" in raw.value.details()
            assert "bad UTF-8" in raw.value.details()
            # ... and the port goes on serving.
            chunks = await generate(target, [256, 1], max_tokens=2, ignore_eos=True)
            assert chunks[-1].finish_reason == "length"

    asyncio.run(main())


def never_reading_channel(target: str) -> grpc.aio.Channel:
    """A client that reads nothing: a 1 KiB receive window (no window growth), so the
    server's writes block after a few responses, as they would behind any slow reader."""
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    return grpc.aio.insecure_channel(target, options=options)


def open_unread(channel: grpc.aio.Channel, prompt: Sequence[int], max_tokens: int, **kw):
    request = build_request(list(prompt), max_tokens=max_tokens, ignore_eos=True, **kw)
    method = channel.unary_stream(
        GENERATE,
        request_serializer=generate_pb2.GenerateRequest.SerializeToString,
        response_deserializer=generate_pb2.GenerateResponse.FromString,
    )
    return method(request)


def test_concurrent_streams_per_connection(engine, params, tiny_fingerprint) -> None:
    async def main() -> None:
        flags = ("--max-streams-per-connection", "2")
        async with (
            public_port(engine, params, tiny_fingerprint, *flags) as (cluster, target),
            never_reading_channel(target) as channel,
        ):
            held = [open_unread(channel, [256, i], 50) for i in (1, 2)]
            # Both stay open: their windows are full, the server is blocked writing to them.
            await until(lambda: cluster.orchestrator.frontend.in_flight == 2)
            third = open_unread(channel, [256, 3], 5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in third:
                    pass
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "already has 2 Generate streams open" in err.value.details()
            # Another connection is another count.
            chunks = await generate(target, [256, 4], max_tokens=2, ignore_eos=True)
            assert chunks[-1].finish_reason == "length"
            for call in held:
                call.cancel()

    asyncio.run(main())


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, f"waited {timeout}s for {condition}"
        await asyncio.sleep(0.01)


# 3. Clients that never read --------------------------------------------------------------------


def test_never_reading_clients_are_cut_and_do_not_hold_up_a_reader(
    engine, params, tiny_fingerprint
) -> None:
    """Four never-reading streams take all four decode slots, then a reading client asks
    for 10 tokens. Each never-reader is cancelled once 4 tokens wait beyond what its 1 KiB
    window holds, freeing its slot; the reader then gets its exact tokens. Counted in
    decode steps (not seconds, which a shared machine makes noisy): the reader is done
    within READER_STEP_BOUND steps of asking. Without the cut, each never-reader would hold
    its slot for its whole 50 tokens and the reader would wait 50 steps for one."""
    prompt, n = [256, 9, 8, 7], 10
    expected = reference_greedy(engine, params, prompt, n)
    # One request_id for all four (clients choose ids freely; they must not collide on the
    # workers), ~150 bytes a response: the 1 KiB window holds ~7 of them.
    long_id = "x" * 128

    async def main() -> None:
        flags = ("--max-unsent-tokens", "4")
        async with public_port(engine, params, tiny_fingerprint, *flags) as (cluster, target):
            decode = cluster.decode["decode-0:1"]
            async with never_reading_channel(target) as channel:
                hogs = [open_unread(channel, [256, i], 50, request_id=long_id) for i in range(4)]
                await until(lambda: len(decode.table.leases()) == 4)
                start = decode.loop.steps
                chunks = await generate(target, prompt, max_tokens=n, ignore_eos=True)
                steps = decode.loop.steps - start
                assert tokens_of(chunks) == expected
                assert steps <= READER_STEP_BOUND, steps
                # Every never-reader's slot is free while its call is still open...
                await until(decode.all_free)
                # ...and when it reads at last, it learns why its stream ended.
                for hog in hogs:
                    got = []
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        async for response in hog:
                            got.extend(response.token_ids)
                    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "the client fell too far behind" in err.value.details()
                    assert len(got) < 50

    asyncio.run(main())


# 4 never-readers are cut after the ~7 responses their window takes plus 4 unsent tokens
# (~12 steps); the reader then needs n - 1 = 9 steps: ~21 (measured 23 alone, and once 31
# under the whole suite's load; the cause was not pinned down). Without the cut: 50 + 9 =
# 59, so 40 still tells the two apart.
READER_STEP_BOUND = 40

"""Keepalive is really applied, on both ends of a connection: a frozen peer (SIGSTOP: its
kernel still holds the TCP connection open, but nothing answers an HTTP/2 PING) is found
within keepalive time + timeout, on a long stream that no deadline bounds.

1. A client's channel (`channel_options`, as every worker and the orchestrator make
   them) to a frozen server: the stream ends UNAVAILABLE.
2. A server (`start_server`'s options, as every pdserve server is built) with a frozen
   client: the call is ended and its handler cancelled (a decode worker frees the slot).

Each test first shows the stream stays open for several keepalive periods while the peer
runs, so the pings are answered and allowed (a server that found them too frequent would
send GOAWAY and end the stream too, for the wrong reason). Without the keepalive options
either stream would stay open forever.

Run as a script, this module is the other process: `--serve` serves a decode handler
that never sends a token and prints its port; `--stream PORT` opens a token stream there
and prints OPEN.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tests.`, run as a script

import pytest

from shared.serving.lifetime import child_environment, die_with_parent
from shared.transport.grpc_transport import GrpcDecodeClient
from shared.transport.server import decode_service, start_server
from shared.transport.types import StatusCode, TokenBatch, TransportConfig, TransportError
from tests.test_tls import ScriptedDecode

# Both ends alike, as in a deployment where every process takes the same flags.
KEEPALIVE = TransportConfig(keepalive_time_s=1.0, keepalive_timeout_s=1.0, rpc_timeout_s=5.0)
PERIOD_S = KEEPALIVE.keepalive_time_s + KEEPALIVE.keepalive_timeout_s
RUNNING_S = 3 * PERIOD_S  # the peer runs: the stream must stay open this long
FOUND_WITHIN_S = 3 * PERIOD_S  # the peer is frozen: the stream must end within this


@contextlib.contextmanager
def peer(*args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """This module as a script in another process (dies with pytest); its first line."""
    env = child_environment({**os.environ, "JAX_PLATFORMS": "cpu"})
    proc = subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        yield proc, proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


@pytest.mark.timeout(60)
def test_a_frozen_server_is_found_by_the_clients_keepalive() -> None:
    async def main() -> None:
        with peer("--serve") as (server, line):
            assert line.startswith("PORT "), f"the server did not start: {line!r}"
            client = GrpcDecodeClient(f"127.0.0.1:{line.split()[1]}", KEEPALIVE)
            stream = client.stream_tokens("lease-1")
            reading = asyncio.ensure_future(anext(stream))
            try:
                await asyncio.sleep(RUNNING_S)
                assert not reading.done(), reading  # open while the server runs
                server.send_signal(signal.SIGSTOP)
                frozen = time.monotonic()
                with pytest.raises(TransportError) as caught:
                    await asyncio.wait_for(reading, FOUND_WITHIN_S)
                assert caught.value.code is StatusCode.UNAVAILABLE, caught.value
                assert time.monotonic() - frozen < FOUND_WITHIN_S
            finally:
                reading.cancel()
                await client.close()

    asyncio.run(main())


class WatchedDecode(ScriptedDecode):
    """ScriptedDecode that records when a token stream's handler ends (gRPC cancels it
    when the connection is closed)."""

    def __init__(self) -> None:
        super().__init__()
        self.ended = asyncio.Event()

    async def stream_tokens(self, lease_id: str) -> AsyncIterator[TokenBatch]:
        try:
            async for batch in super().stream_tokens(lease_id):
                yield batch
        finally:
            self.ended.set()


@pytest.mark.timeout(60)
def test_a_frozen_client_is_found_by_the_servers_keepalive() -> None:
    async def main() -> None:
        handler = WatchedDecode()
        server = await start_server("127.0.0.1:0", [decode_service(handler)], KEEPALIVE)
        try:
            with peer("--stream", str(server.port)) as (client, line):
                assert line == "OPEN", f"the client did not start: {line!r}"
                await asyncio.wait_for(handler.streaming.wait(), 30)
                await asyncio.sleep(RUNNING_S)
                assert not handler.ended.is_set()  # open while the client runs
                client.send_signal(signal.SIGSTOP)
                frozen = time.monotonic()
                await asyncio.wait_for(handler.ended.wait(), FOUND_WITHIN_S)
                assert time.monotonic() - frozen < FOUND_WITHIN_S
        finally:
            await server.stop(None)

    asyncio.run(main())


# The other process -------------------------------------------------------------------------


async def _serve() -> None:
    server = await start_server("127.0.0.1:0", [decode_service(ScriptedDecode())], KEEPALIVE)
    print(f"PORT {server.port}", flush=True)
    await server.server.wait_for_termination()


async def _stream(port: str) -> None:
    client = GrpcDecodeClient(f"127.0.0.1:{port}", KEEPALIVE)
    print("OPEN", flush=True)
    async for _ in client.stream_tokens("lease-1"):  # no token ever comes
        pass


if __name__ == "__main__" and sys.argv[1:2] in (["--serve"], ["--stream"]):
    die_with_parent()
    asyncio.run(_serve() if sys.argv[1] == "--serve" else _stream(sys.argv[2]))

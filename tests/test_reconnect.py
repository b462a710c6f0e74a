"""A decode worker restarted at the same address (the rolling upgrade's step): regression
tests for commit 982c8ff, whose rolling-upgrade run had lost 199 of 3,210 streams.

1. The prefill worker's channel to that address is still in its reconnect backoff when the
   decode worker is back (a restart takes tens of seconds, so the backoff has grown to its
   cap). A KV push must wait out that backoff, bounded, rather than fail at once with
   UNAVAILABLE (gRPC fails a call on a channel in TRANSIENT_FAILURE without trying, since
   calls do not `wait_for_ready`); and the cap must stay under that bound. Real gRPC
   servers and channels on loopback, with the workers' own transport settings.
2. Because a push may now wait, the orchestrator must not wait on a prefill whose decode
   worker's token stream has already broken: it gives up on that prefill at once and
   resumes the request on another decode worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import socket
import time

import pytest
from prometheus_client import generate_latest

from prefill_server.kv_push import RemoteKvSink
from shared.sampling_params import SamplingParams
from shared.transport.base import PrefillHandler
from shared.transport.grpc_transport import CONNECT_WAIT_BACKOFFS
from shared.transport.server import decode_service, start_server
from shared.transport.types import (
    LoadReport,
    PrefillRequest,
    PrefillResult,
    StatusCode,
    TransportConfig,
    TransportError,
)
from tests.cluster_harness import InProcessCluster
from tests.kv_fixtures import CHUNK, FINGERPRINT, synthetic_prefix, synthetic_spec
from tests.reference import metric_samples, reference_greedy
from tests.transport_support import InboxDecodeHandler, reserve_request

# The workers' transport settings (TransportConfig's defaults: a 1 s reconnect backoff),
# with the small chunks of the synthetic KV.
CONFIG = TransportConfig(max_message_bytes=64 << 10, kv_chunk_bytes=CHUNK)
BACKOFF_S = CONFIG.reconnect_backoff_s
# Connection attempts the channel makes while the decode worker is down before it comes
# back. gRPC backs off 1.6x per failed attempt, +-20 % jitter: after the 5th, an uncapped
# backoff (1.6^4 = 6.6 backoffs, at least 5.2) is past the push's bounded wait (3), while
# the cap of 2 (at most 2.4 with jitter) is within it.
ATTEMPTS_WHILE_DOWN = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class RestartingPort:
    """The decode worker's port while its process is starting again: connections are
    accepted and dropped at once, before any HTTP/2, so each of the channel's connection
    attempts fails as it would against a closed port, and is counted (a refused connect
    leaves no trace the test could wait on)."""

    port: int
    attempts: list[float] = dataclasses.field(default_factory=list)

    async def __aenter__(self) -> RestartingPort:
        self._enough = asyncio.Event()
        self._server = await asyncio.start_server(self._drop, "127.0.0.1", self.port)
        return self

    async def _drop(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.attempts.append(time.monotonic())
        writer.close()
        if len(self.attempts) >= ATTEMPTS_WHILE_DOWN:
            self._enough.set()

    @property
    def enough(self) -> bool:
        return self._enough.is_set()

    async def __aexit__(self, *_exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()


def _prefill_request(request_id: str, decode_target: str, lease_id: str) -> PrefillRequest:
    return PrefillRequest(request_id, (1, 2, 3), SamplingParams(), decode_target, lease_id)


async def _reserve(handler: InboxDecodeHandler) -> str:
    """A lease, as the orchestrator takes it once it has re-admitted the worker: straight
    from the handler, because the orchestrator's connection is another process's and not
    under test (a second channel here would share the prefill side's subchannel, and its
    backoff: gRPC pools subchannels per process)."""
    return (await handler.reserve(reserve_request())).lease_id


@pytest.mark.timeout(90)
def test_a_push_to_a_restarted_decode_worker_waits_out_the_reconnect_backoff() -> None:
    address = f"127.0.0.1:{_free_port()}"
    bound_s = CONNECT_WAIT_BACKOFFS * BACKOFF_S

    async def main() -> None:
        # The prefill worker's KV sink: one channel per decode address, kept across requests.
        sink = RemoteKvSink(CONFIG, FINGERPRINT)
        before = InboxDecodeHandler(synthetic_spec())
        server = await start_server(address, [decode_service(before)], CONFIG)
        try:
            lease_id = await _reserve(before)
            await sink.push(_prefill_request("before", address, lease_id), synthetic_prefix())
            assert lease_id in before.delivered  # the channel is connected
            await server.stop(None)  # the decode worker exits (SIGTERM, drained)

            async with RestartingPort(int(address.rpartition(":")[2])) as down:
                # Pushes meanwhile (leases granted just before the exit) each fail within
                # their bounded wait. Each also keeps the channel trying to connect: left
                # alone, a channel whose backoff ended may wait idle for its next call
                # (so the attempts are driven, and their spacing is still the backoff's).
                for during in itertools.count():
                    started = time.monotonic()
                    with pytest.raises(TransportError) as caught:
                        request = _prefill_request(f"during-{during}", address, "gone")
                        await sink.push(request, synthetic_prefix())
                    assert caught.value.code is StatusCode.UNAVAILABLE
                    assert time.monotonic() - started < bound_s + 2.0
                    if down.enough:
                        break
                    assert during < 30, f"{len(down.attempts)} connection attempts in 30 pushes"
            gaps = [round(b - a, 2) for a, b in itertools.pairwise(down.attempts)]

            after = InboxDecodeHandler(synthetic_spec())  # the new process, same address
            server = await start_server(address, [decode_service(after)], CONFIG)
            lease_id = await _reserve(after)
            started = time.monotonic()
            try:
                await sink.push(_prefill_request("after", address, lease_id), synthetic_prefix())
            except TransportError as err:
                raise AssertionError(
                    f"the push to the restarted worker failed after "
                    f"{time.monotonic() - started:.2f}s: {err} (reconnect attempts while "
                    f"it was down, seconds apart: {gaps})"
                ) from None
            took = time.monotonic() - started
            assert lease_id in after.delivered and not after.rejected
            assert took < bound_s + 2.0, (took, gaps)
        finally:
            await sink.close()
            await server.stop(None)

    asyncio.run(main())


# 2. The orchestrator ------------------------------------------------------------------------


class HeldPrefill:
    """The prefill worker, except that the first prefill call is held until its caller
    gives up on it (as a push waiting for its connection to a decode worker, or a prompt
    queued behind others, would be); the rest go through to the real service."""

    def __init__(self, inner: PrefillHandler) -> None:
        self.inner = inner
        self.held: list[PrefillRequest] = []
        self.abandoned = 0
        self._first_seen = asyncio.Event()

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        if self.held:
            return await self.inner.prefill(request)
        self.held.append(request)
        self._first_seen.set()
        try:
            await asyncio.Event().wait()  # never set: only a cancel ends this call
        except asyncio.CancelledError:
            self.abandoned += 1
            raise
        raise AssertionError("unreachable")

    async def first_held(self) -> PrefillRequest:
        await self._first_seen.wait()
        return self.held[0]

    async def cancel(self, request_id: str) -> bool:
        return await self.inner.cancel(request_id)

    async def get_load(self) -> LoadReport:
        return await self.inner.get_load()


@pytest.mark.timeout(90)
def test_the_orchestrator_abandons_a_prefill_when_its_decode_stream_breaks(
    engine, params, tiny_fingerprint
) -> None:
    """The decode worker a request was placed on dies while the request's prefill is still
    held: the request resumes on the other decode worker at once and ends with exactly the
    reference tokens, and the held prefill is cancelled; it is never waited for (it would
    be held until the prefill call's own deadline, 120 s)."""
    prompt = [256, 7, 1, 8]
    expected = reference_greedy(engine, params, prompt, 12)

    async def body() -> None:
        cluster = InProcessCluster(engine, params, tiny_fingerprint, decode_workers=2)
        held = HeldPrefill(cluster.network.server("prefill-0:1").handler)
        cluster.network.serve("prefill-0:1", held)
        await cluster.start()
        try:
            request = asyncio.ensure_future(
                cluster.api.generate(prompt, max_tokens=12, ignore_eos=True)
            )
            placed_on = (await asyncio.wait_for(held.first_held(), 30)).decode_target
            await cluster.kill_decode(placed_on)
            # Well under the 120 s the held prefill would otherwise keep the request.
            chunks = await asyncio.wait_for(request, 20)
            assert [t for c in chunks for t in c.token_ids] == expected
            assert chunks[-1].finish_reason == "length"
            assert held.abandoned == 1
            assert [r.decode_target for r in held.held] == [placed_on]
            samples = metric_samples(generate_latest(cluster.registry).decode())
            assert samples["pdserve_retries_total{stage=decode_resume}"] == 1
        finally:
            request.cancel()
            with contextlib.suppress(BaseException):
                await request
            await cluster.close()

    asyncio.run(body())

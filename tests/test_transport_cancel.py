"""The transport contract on both transports (tests/transport_support.py): a transfer or a
call cancelled by either side, an address nobody serves, a peer process that dies
mid-transfer. None hangs: each failure surfaces within BOUND_S."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from shared.kv_transfer.codec import KvRejection
from shared.sampling_params import SamplingParams
from shared.transport.grpc_transport import GrpcDecodeClient
from shared.transport.types import (
    PrefillRequest,
    StatusCode,
    TransportError,
)
from tests.kv_fixtures import synthetic_prefix
from tests.transport_support import (
    BOUND_S,
    CONFIG,
    TRANSPORTS,
    Harness,
    StalledSender,
    encode,
    eventually,
    peer_process,
    reserve_request,
    run,
)

# Cancellation and dead peers -----------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_sender_cancels_mid_transfer(kind: str) -> None:
    async def body(h: Harness) -> None:
        lease = await h.decode.reserve(reserve_request())
        sender = StalledSender(encode(synthetic_prefix(), lease.lease_id), count=5)
        task = asyncio.ensure_future(h.decode.transfer_kv(sender.messages()))
        inbox = h.handler.inbox
        await eventually(lambda: inbox.buffered_bytes > 0, "the receiver holds a buffer")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(
            lambda: inbox.buffered_bytes == 0 and inbox.receiving == 0,
            "the receiver released the transfer",
        )
        await eventually(lambda: h.handler.live_transfers == 0, "the handler's call ended")
        await eventually(lambda: sender.closed, "the sender's stream was closed")
        # grpc.aio ends the handler's request stream early (TRUNCATED); the fake cancels the
        # handler's task (CANCELLED). Either way nothing was delivered and nothing is held.
        reason = h.handler.rejected[lease.lease_id].reason
        assert reason in (KvRejection.CANCELLED, KvRejection.TRUNCATED)
        assert h.handler.delivered == {}

    run(kind, body)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_receiver_cancels_mid_transfer(kind: str) -> None:
    async def body(h: Harness) -> None:
        lease = await h.decode.reserve(reserve_request())
        sender = StalledSender(encode(synthetic_prefix(), lease.lease_id), count=5)
        task = asyncio.ensure_future(h.decode.transfer_kv(sender.messages()))
        inbox = h.handler.inbox
        await eventually(lambda: inbox.buffered_bytes > 0, "the receiver holds a buffer")
        assert await h.decode.cancel(lease.lease_id)  # the lease's owner ends it
        with pytest.raises(TransportError) as caught:
            await asyncio.wait_for(task, BOUND_S)
        assert caught.value.code is StatusCode.CANCELLED
        assert caught.value.kv_reason is KvRejection.CANCELLED
        assert inbox.buffered_bytes == 0 and inbox.receiving == 0
        await eventually(lambda: sender.closed, "the sender's stream was closed")
        await eventually(lambda: h.handler.live_transfers == 0, "the handler's call ended")
        assert h.handler.delivered == {}

    run(kind, body)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_transfer_to_an_address_nobody_serves(kind: str) -> None:
    async def body(h: Harness) -> None:
        started = time.monotonic()
        with pytest.raises(TransportError) as caught:
            await h.dead_decode.transfer_kv(encode(synthetic_prefix(), "lease").messages())
        assert caught.value.code is StatusCode.UNAVAILABLE
        with pytest.raises(TransportError) as caught:
            await h.dead_decode.reserve(reserve_request())
        assert caught.value.code is StatusCode.UNAVAILABLE
        assert time.monotonic() - started < BOUND_S

    run(kind, body)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_peer_dies_mid_transfer(kind: str) -> None:
    """The decode peer's process dies while a transfer is in flight: UNAVAILABLE, no hang."""

    async def body(h: Harness) -> None:
        if h.network is not None:
            client = h.decode
            lease = await client.reserve(reserve_request())
            sender = StalledSender(encode(synthetic_prefix(), lease.lease_id), count=5)
            task = asyncio.ensure_future(client.transfer_kv(sender.messages()))
            await eventually(lambda: h.handler.inbox.buffered_bytes > 0, "transfer started")
            await h.network.kill("decode:1")
            await _expect_unavailable(task)
            assert h.handler.inbox.buffered_bytes == 0
            return
        with peer_process() as (proc, port):
            client = GrpcDecodeClient(f"127.0.0.1:{port}", CONFIG)
            lease = await client.reserve(reserve_request())
            sender = StalledSender(encode(synthetic_prefix(), lease.lease_id), count=5)
            task = asyncio.ensure_future(client.transfer_kv(sender.messages()))
            await eventually(lambda: sender.sent == sender.count, "transfer started")
            await asyncio.sleep(0.2)  # let the messages reach the peer
            proc.send_signal(signal.SIGKILL)
            await _expect_unavailable(task)
            await client.close()

    run(kind, body)


async def _expect_unavailable(task: asyncio.Future) -> None:
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        await asyncio.wait_for(task, BOUND_S)
    assert caught.value.code is StatusCode.UNAVAILABLE, caught.value
    assert time.monotonic() - started < BOUND_S


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_caller_cancels_a_unary_call(kind: str) -> None:
    async def body(h: Harness) -> None:
        h.prefill_handler.delay = 60
        request = PrefillRequest("slow", (1,), SamplingParams(), "x:1", "lease")
        task = asyncio.ensure_future(h.prefill.prefill(request))
        await eventually(lambda: h.prefill_handler.seen, "the prefill started")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: h.prefill_handler.cancelled == ["slow"], "handler cancelled")

    run(kind, body)

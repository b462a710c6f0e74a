"""Fault injection of the in-process transport (the faults the contract suite does not
already drive through both transports): a delayed chunk and a broken connection."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from shared.transport.fake import FakeNetwork, FaultPlan
from shared.transport.types import StatusCode, TransportError
from tests.kv_fixtures import synthetic_prefix, synthetic_spec
from tests.transport_support import CONFIG, InboxDecodeHandler, encode, reserve_request


def _setup(faults: FaultPlan, **config: float) -> tuple[InboxDecodeHandler, object]:
    net = FakeNetwork()
    handler = InboxDecodeHandler(synthetic_spec())
    net.serve("decode:1", handler)
    return handler, net.decode_client("decode:1", dataclasses.replace(CONFIG, **config), faults)


def test_delayed_chunk_arrives_late_but_whole() -> None:
    async def main() -> None:
        handler, client = _setup(FaultPlan(delay_chunk=3, delay_seconds=0.3))
        lease = await client.reserve(reserve_request())
        started = time.monotonic()
        await client.transfer_kv(encode(synthetic_prefix(), lease.lease_id).messages())
        assert time.monotonic() - started >= 0.3
        assert lease.lease_id in handler.delivered

    asyncio.run(main())


def test_delay_past_the_transfer_deadline_fails_and_releases() -> None:
    async def main() -> None:
        handler, client = _setup(FaultPlan(delay_chunk=3, delay_seconds=5), transfer_timeout_s=0.2)
        lease = await client.reserve(reserve_request())
        try:
            await client.transfer_kv(encode(synthetic_prefix(), lease.lease_id).messages())
            raise AssertionError("the transfer should have timed out")
        except TransportError as error:
            assert error.code is StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.05)
        assert handler.inbox.buffered_bytes == 0 and handler.delivered == {}

    asyncio.run(main())


def test_disconnect_mid_stream_is_unavailable_and_releases() -> None:
    async def main() -> None:
        handler, client = _setup(FaultPlan(disconnect_after=4))
        lease = await client.reserve(reserve_request())
        try:
            await client.transfer_kv(encode(synthetic_prefix(), lease.lease_id).messages())
            raise AssertionError("the transfer should have failed")
        except TransportError as error:
            assert error.code is StatusCode.UNAVAILABLE
        await asyncio.sleep(0.05)
        assert handler.inbox.buffered_bytes == 0 and handler.inbox.receiving == 0
        assert handler.delivered == {} and lease.lease_id in handler.rejected

    asyncio.run(main())

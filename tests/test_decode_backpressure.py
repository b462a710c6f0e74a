"""The decode worker's per-stream bound: a StreamTokens caller that stops reading never
makes the engine thread wait; once it leaves `--max-unsent-batches` batches unread, its
lease is cancelled (slot freed), what it left is dropped, and its stream ends
RESOURCE_EXHAUSTED when it reads again. A caller that keeps reading is not affected."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from decode_server.worker import build_decode_worker
from shared.engine.engine import Engine, Params
from shared.metrics import WorkerMetrics
from shared.serving.runtime import ModelRuntime
from shared.serving.worker_config import Role, parse_worker_args
from shared.transport.types import (
    GenerationLimits,
    ReserveRequest,
    StatusCode,
    TransportError,
)
from tests.reference import reference_greedy
from tests.worker_harness import ENGINE_FLAGS

UNSENT = 3


def test_a_reader_that_stops_is_cut_and_its_slot_freed(
    engine: Engine, params: Params, tiny_fingerprint: str
) -> None:
    async def main() -> None:
        config = parse_worker_args(
            ["--port", "0", *ENGINE_FLAGS, "--max-unsent-batches", str(UNSENT)], Role.DECODE
        )
        runtime = ModelRuntime(engine, params, tiny_fingerprint, None)
        fatal: list[BaseException] = []
        metrics = WorkerMetrics(CollectorRegistry(), "decode")
        worker = build_decode_worker(runtime, config, metrics, fatal.append)
        worker.start(asyncio.get_running_loop())
        service = worker.service
        limits = GenerationLimits(40, stop_on_eos=False)
        short = GenerationLimits(12, stop_on_eos=False)  # outlives the stalled one's bound
        try:
            stalled = await service.reserve(ReserveRequest("stalled", 3, limits, 30.0))
            reading = await service.reserve(ReserveRequest("reading", 4, short, 30.0))
            stalled_stream = service.stream_tokens(stalled.lease_id)
            reading_stream = service.stream_tokens(reading.lease_id)
            first = asyncio.create_task(anext(stalled_stream))  # reads one batch, no more
            service.deliver_prefix(stalled.lease_id, engine.prefill(params, [256, 1, 2]))
            service.deliver_prefix(reading.lease_id, engine.prefill(params, [256, 3, 4, 5]))
            assert len((await first).token_ids) == 1
            got = [t async for batch in reading_stream for t in batch.token_ids]
            # The reader got every token (the first came from the prefill, not the stream).
            assert got == reference_greedy(engine, params, [256, 3, 4, 5], 12)[1:]
            deadline = time.monotonic() + 10
            while not worker.all_free():  # the stalled lease was cancelled at a step boundary
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert worker.inbox.state(stalled.lease_id) is None  # no inbox entry left
            try:
                async for _ in stalled_stream:
                    pass
                raise AssertionError("the stalled stream ended without an error")
            except TransportError as err:
                assert err.code is StatusCode.RESOURCE_EXHAUSTED
                assert f"left {UNSENT} token batches unread" in err.message
        finally:
            await worker.drain(0.0)
        assert not fatal

    asyncio.run(main())

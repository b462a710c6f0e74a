"""Assembles a decode worker from its parts; the decode and colocated roles both use it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from decode_server.loop import DecodeLoop
from decode_server.service import DecodeService
from decode_server.slots import SlotState, SlotTable
from shared.kv.pages import PageAllocator
from shared.kv_transfer.codec import KvRejection, KvSpec
from shared.kv_transfer.inbox import KvInbox
from shared.metrics import WorkerMetrics
from shared.serving.runtime import ModelRuntime
from shared.serving.worker_config import WorkerConfig
from shared.serving.worker_server import wait_until
from shared.transport.types import DecodeFinish


@dataclasses.dataclass(slots=True)
class DecodeWorker:
    table: SlotTable
    loop: DecodeLoop
    inbox: KvInbox
    service: DecodeService

    def start(self, event_loop: asyncio.AbstractEventLoop) -> None:
        self.service.bind(event_loop)
        self.loop.start()

    def all_free(self) -> bool:
        return self.table.counts()[SlotState.FREE] == self.table.total

    async def drain(self, grace_s: float) -> None:
        """Refuse new leases; let live requests finish within `grace_s`; cancel the rest."""
        self.service.draining = True
        if not await wait_until(self.all_free, grace_s):
            for lease in self.table.leases():
                self.loop.finish(lease.lease_id, DecodeFinish.CANCELLED, "worker shutting down")
            await wait_until(self.all_free, 5.0)
        await asyncio.sleep(0.05)  # let the last token batches reach their streams
        self.loop.stop()


def build_decode_worker(
    runtime: ModelRuntime,
    config: WorkerConfig,
    metrics: WorkerMetrics,
    on_fatal: Callable[[BaseException], None],
    pages: PageAllocator | None = None,
) -> DecodeWorker:
    """`pages`: the KV page allocator (by default over the engine's whole pool)."""
    engine = runtime.engine

    def on_transition(old: SlotState, new: SlotState) -> None:
        metrics.slot_transitions.labels(old.value, new.value).inc()
        metrics.slots.labels(old.value).dec()
        metrics.slots.labels(new.value).inc()

    for state in SlotState:  # every series exists from the start, at zero
        metrics.slots.labels(state.value).set(0)
    for reason in KvRejection:
        metrics.kv_rejections.labels(reason.value)
    metrics.slots.labels(SlotState.FREE.value).set(engine.config.max_slots)
    table = SlotTable(engine.config.max_slots, on_transition)
    service: DecodeService | None = None

    def emit(events: list) -> None:
        assert service is not None
        service.emit(events)

    loop = DecodeLoop(engine, runtime.params, table, emit, metrics, on_fatal, pages)
    # A resumed request's prefix may be longer than the largest prefill bucket.
    spec = KvSpec.from_cache(
        engine.abstract_prefix_cache(engine.config.max_seq_len - 1),
        runtime.fingerprint,
        config.max_kv_bytes,
    )
    inbox = KvInbox(
        spec,
        deliver=lambda lid, p: service.deliver_prefix(lid, p),
        reject=lambda lid, err: service.reject_prefix(lid, err),
    )
    service = DecodeService(
        loop, table, inbox, engine.config.max_seq_len, metrics, config.max_unsent_batches
    )
    return DecodeWorker(table, loop, inbox, service)

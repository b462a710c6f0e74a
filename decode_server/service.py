"""DecodeService: the decode worker's `DecodeHandler`, on the server's event loop.

It ties the pieces together without doing engine work itself:
* Reserve -> `DecodeLoop.reserve` (slot table) + `KvInbox.open` + a token channel.
* TransferKV -> `KvInbox.receive` validates the stream; a whole prefix goes to
  `DecodeLoop.submit`; a rejection finishes the lease (slot freed, stream ends ERROR).
* StreamTokens -> the lease's channel, fed by the engine thread once per step.
* Cancel, or the stream's caller going away -> `DecodeLoop.finish` (next step boundary).

Backpressure: the engine thread never waits for a reader. A channel holds at most
`max_unsent_batches` batches (one per step) that its caller has not read; past that the
lease is finished CANCELLED (slot freed at the next step boundary), the buffered batches are
dropped, and the stream ends RESOURCE_EXHAUSTED when its caller reads again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from decode_server.loop import DecodeLoop
from decode_server.slots import (
    LeaseStateError,
    SlotsExhaustedError,
    SlotState,
    SlotTable,
    UnknownLeaseError,
)
from shared.kv.pages import PagesExhaustedError
from shared.kv.prefix import Prefix
from shared.kv_transfer.codec import KvError
from shared.kv_transfer.inbox import KvInbox
from shared.metrics import WorkerMetrics
from shared.rpc.pdserve.v1 import kv_pb2
from shared.transport.types import (
    DecodeFinish,
    KvReceipt,
    Lease,
    LoadReport,
    ReserveRequest,
    StatusCode,
    TokenBatch,
    TransportError,
)

# A finished lease's tokens wait this long for a StreamTokens that has not attached yet.
UNCLAIMED_CHANNEL_TTL_S = 60.0


class _Channel:
    """One lease's token batches, buffered until its StreamTokens reads them."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[TokenBatch | TransportError] = asyncio.Queue()
        self.attached = False
        self.finished = False
        self.overflowed = False


class DecodeService:
    def __init__(
        self,
        loop: DecodeLoop,
        table: SlotTable,
        inbox: KvInbox,
        max_seq_len: int,
        metrics: WorkerMetrics,
        max_unsent_batches: int = 256,
    ) -> None:
        self._loop, self._table, self._inbox = loop, table, inbox
        self._max_seq_len = max_seq_len
        self._max_unsent = max_unsent_batches
        self._metrics = metrics
        self._channels: dict[str, _Channel] = {}
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self.draining = False

    def bind(self, event_loop: asyncio.AbstractEventLoop) -> None:
        """The loop the engine thread's batches are delivered on (the server's)."""
        self._event_loop = event_loop

    # Engine thread -> event loop ------------------------------------------------------------

    def emit(self, events: list[tuple[str, TokenBatch]]) -> None:
        """DecodeLoop's `emit`: called on the engine thread once per step."""
        assert self._event_loop is not None
        self._event_loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[tuple[str, TokenBatch]]) -> None:
        for lease_id, batch in events:
            channel = self._channels.get(lease_id)
            if channel is None or channel.overflowed:
                continue  # its stream already went away, or was cut for falling behind
            if channel.queue.qsize() >= self._max_unsent and batch.finish is None:
                self._cut(lease_id, channel)
                continue
            channel.queue.put_nowait(batch)
            if batch.finish is not None:
                channel.finished = True
                self._inbox.close(lease_id)  # aborts a transfer still in flight for it
                if not channel.attached:
                    asyncio.get_running_loop().call_later(
                        UNCLAIMED_CHANNEL_TTL_S, self._channels.pop, lease_id, None
                    )

    def _cut(self, lease_id: str, channel: _Channel) -> None:
        """The lease's reader fell `max_unsent_batches` behind: end the lease, drop what it
        left unread, and tell the reader why when it reads again."""
        self._loop.finish(lease_id, DecodeFinish.CANCELLED, "stream reader too far behind")
        self._inbox.close(lease_id)  # its finish batch is dropped below: close the entry now
        channel.overflowed = True
        while not channel.queue.empty():
            channel.queue.get_nowait()
        channel.queue.put_nowait(
            TransportError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"lease {lease_id!r}: the stream's reader left {self._max_unsent} token "
                "batches unread (--max-unsent-batches); the lease was cancelled",
            )
        )
        self._metrics.finished("reader_too_slow")
        if not channel.attached:
            asyncio.get_running_loop().call_later(
                UNCLAIMED_CHANNEL_TTL_S, self._channels.pop, lease_id, None
            )

    # DecodeHandler ----------------------------------------------------------------------------

    async def reserve(self, request: ReserveRequest) -> Lease:
        if self.draining:
            raise TransportError(StatusCode.UNAVAILABLE, "decode worker is draining")
        needed = request.prompt_length + request.limits.max_tokens
        if needed > self._max_seq_len:
            raise TransportError(
                StatusCode.INVALID_ARGUMENT,
                f"prompt_length ({request.prompt_length}) + max_tokens "
                f"({request.limits.max_tokens}) = {needed} exceeds this worker's max_seq_len "
                f"({self._max_seq_len})",
            )
        now_wall, now_mono = time.time(), time.monotonic()
        deadline = None if request.deadline is None else now_mono + request.deadline - now_wall
        try:
            lease = self._loop.reserve(
                request.request_id,
                request.limits,
                request.ttl_seconds,
                deadline,
                request.prompt_length,
                request.logprobs,
            )
        except (SlotsExhaustedError, PagesExhaustedError) as err:
            raise TransportError(StatusCode.RESOURCE_EXHAUSTED, str(err)) from None
        self._channels[lease.lease_id] = _Channel()
        self._inbox.open(lease.lease_id)
        return Lease(lease.lease_id, lease.slot, now_wall + request.ttl_seconds)

    async def stream_tokens(self, lease_id: str) -> AsyncIterator[TokenBatch]:
        channel = self._channels.get(lease_id)
        if channel is None:
            raise TransportError(StatusCode.NOT_FOUND, f"lease {lease_id!r} is unknown or over")
        if channel.attached:
            raise TransportError(
                StatusCode.FAILED_PRECONDITION, f"lease {lease_id!r} is already being streamed"
            )
        channel.attached = True
        finished = False
        try:
            while not finished:
                batch = await channel.queue.get()
                if isinstance(batch, TransportError):
                    finished = True  # the lease is already finished (cut for falling behind)
                    raise batch
                finished = batch.finish is not None
                yield batch
        finally:
            self._channels.pop(lease_id, None)
            if not finished:  # the caller went away: free the slot at the next step
                self._loop.finish(lease_id, DecodeFinish.CANCELLED)

    async def transfer_kv(self, messages: AsyncIterator[kv_pb2.KvTransfer]) -> KvReceipt:
        start = time.perf_counter()
        receipt = await self._inbox.receive(messages)
        self._metrics.kv_received_bytes.inc(receipt.bytes_received)
        self._metrics.kv_receive_seconds.observe(time.perf_counter() - start)
        return receipt

    def deliver_prefix(self, lease_id: str, prefix: Prefix) -> None:
        """KvInbox's `deliver`: a whole, validated prefix arrived for the lease."""
        # Expired or cancelled while the last chunks arrived: there is nothing to insert.
        with contextlib.suppress(UnknownLeaseError, LeaseStateError):
            self._loop.submit(lease_id, prefix)

    def accept_local_prefix(self, lease_id: str, prefix: Prefix) -> None:
        """The colocated role: a prefix from this process's own prefill, no serialization.
        Closes the lease's inbox entry, so no remote transfer can also fill it."""
        if not self._inbox.close(lease_id):
            raise TransportError(
                StatusCode.NOT_FOUND, f"lease {lease_id!r} is unknown, over, or already filled"
            )
        try:
            self._loop.submit(lease_id, prefix)
        except (UnknownLeaseError, LeaseStateError) as err:
            raise TransportError(StatusCode.NOT_FOUND, str(err)) from None

    def reject_prefix(self, lease_id: str, error: KvError) -> None:
        """KvInbox's `reject`: the lease's KV failed; per the design its slot is freed."""
        self._metrics.kv_rejections.labels(error.reason.value).inc()
        self._loop.finish(lease_id, DecodeFinish.ERROR, f"KV rejected: {error}")

    async def cancel(self, lease_id: str) -> bool:
        try:
            self._table.get(lease_id)
        except UnknownLeaseError:
            return False
        self._loop.finish(lease_id, DecodeFinish.CANCELLED)
        return True

    async def get_load(self) -> LoadReport:
        counts = self._table.counts()
        pages = self._loop.pages.counts()
        return LoadReport(
            free_slots=counts[SlotState.FREE],
            total_slots=self._table.total,
            queue_depth=counts[SlotState.RESERVED] + counts[SlotState.FILLING],
            live_requests=self._table.total - counts[SlotState.FREE],
            free_pages=pages.free - pages.reserved,
            total_pages=pages.total,
            page_size=self._loop.pages.page_size,
            max_seq_len=self._max_seq_len,
        )

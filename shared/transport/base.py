"""The seams between workers: what callers call (clients) and what servers implement
(handlers). Both transports implement the clients; the servers of each role implement the
handlers, and either transport can carry calls to them.

Errors: every client method raises `TransportError` (and only that) for a failed call;
handlers raise `TransportError` to choose a status, or `KvError` from the codec, which maps
through `shared.transport.errors`. Cancelling the task that awaits a client call cancels
the call on the server too (the handler's task is cancelled).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Protocol

from shared.rpc.pdserve.v1 import kv_pb2
from shared.transport.types import (
    KvReceipt,
    Lease,
    LoadReport,
    PrefillRequest,
    PrefillResult,
    ReserveRequest,
    TokenBatch,
)

KvStream = Iterable[kv_pb2.KvTransfer] | AsyncIterable[kv_pb2.KvTransfer]


async def as_async_iterator(messages: KvStream) -> AsyncIterator[kv_pb2.KvTransfer]:
    """Either kind of KV stream as one async iterator; closing it closes the source."""
    if isinstance(messages, Iterable):
        iterator = iter(messages)
        try:
            for message in iterator:
                yield message
        finally:
            close = getattr(iterator, "close", None)  # a generator: run its cleanup now
            if close is not None:
                close()
    else:
        async for message in messages:
            yield message


class DecodeClient(Protocol):
    """Calls on one decode worker; used by the orchestrator and by prefill workers."""

    async def reserve(self, request: ReserveRequest) -> Lease:
        """Hold a slot under a lease. RESOURCE_EXHAUSTED when none is free."""
        ...

    def stream_tokens(self, lease_id: str) -> AsyncIterator[TokenBatch]:
        """The lease's tokens, batch by batch; the last batch has `finish` set. Open it
        before the prefill is asked for, once per lease. Closing the iterator early
        (aclose) cancels the stream, not the lease."""
        ...

    async def transfer_kv(self, messages: KvStream) -> KvReceipt:
        """Push one encoded prefix (`KvPayload.messages()`); returns once the decode worker
        validated and took all of it. A rejection raises with `kv_reason` set. The whole
        transfer is bounded by `TransportConfig.transfer_timeout_s`."""
        ...

    async def cancel(self, lease_id: str) -> bool:
        """End the lease (idempotent): its stream finishes CANCELLED, any transfer for it
        is aborted, the slot is freed. False if the lease was unknown or already over."""
        ...

    async def get_load(self) -> LoadReport: ...

    async def close(self) -> None:
        """Release the connection; idempotent. Calls in flight are cancelled."""
        ...


class PrefillClient(Protocol):
    """Calls on one prefill worker; used by the orchestrator."""

    async def prefill(self, request: PrefillRequest, timeout: float | None = None) -> PrefillResult:
        """Prefill, push the KV to `request.decode_target`, return the first token.
        `timeout` bounds the whole call (default: the transport's rpc timeout)."""
        ...

    async def cancel(self, request_id: str) -> bool:
        """Drop the request's prefill if queued or running (idempotent)."""
        ...

    async def get_load(self) -> LoadReport: ...

    async def close(self) -> None: ...


class DecodeHandler(Protocol):
    """What a decode server implements; called on the server's event loop, one call per
    RPC, concurrently. Must never block the loop (engine work goes to the engine thread)."""

    async def reserve(self, request: ReserveRequest) -> Lease: ...

    def stream_tokens(self, lease_id: str) -> AsyncIterator[TokenBatch]:
        """An async generator; it is closed (GeneratorExit) when the caller goes away."""
        ...

    async def transfer_kv(self, messages: AsyncIterator[kv_pb2.KvTransfer]) -> KvReceipt:
        """Consume one TransferKV stream (typically via `KvInbox.receive`). Cancelled
        (CancelledError) when the sender goes away; must then release what it holds."""
        ...

    async def cancel(self, lease_id: str) -> bool: ...

    async def get_load(self) -> LoadReport: ...


class PrefillHandler(Protocol):
    """What a prefill server implements; same calling rules as `DecodeHandler`."""

    async def prefill(self, request: PrefillRequest) -> PrefillResult: ...

    async def cancel(self, request_id: str) -> bool: ...

    async def get_load(self) -> LoadReport: ...

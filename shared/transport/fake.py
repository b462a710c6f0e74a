"""In-process transport: clients that call handler objects directly, with fault injection.

Faithful where the contract tests look: every call runs the handler in its own task (as
grpc.aio does), so cancelling the caller cancels the handler; handler exceptions map to
the same status codes (`errors.to_transport_error`); the KV stream is the same kv.proto
messages through a bounded queue, and the sender stops as soon as the receiver answered.
`FakeNetwork.kill(address)` is a crashed process: calls in flight end with UNAVAILABLE,
new calls fail at once. `FaultPlan` drops, corrupts, delays or reorders a chunk, or breaks
the connection mid-stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from shared.rpc.pdserve.v1 import kv_pb2
from shared.transport.base import DecodeHandler, KvStream, PrefillHandler, as_async_iterator
from shared.transport.errors import to_transport_error
from shared.transport.types import (
    KvReceipt,
    Lease,
    LoadReport,
    PrefillRequest,
    PrefillResult,
    ReserveRequest,
    StatusCode,
    TokenBatch,
    TransportConfig,
    TransportError,
)

T = TypeVar("T")
_END = object()  # end of a KV stream in the fake's queue
STREAM_WINDOW = 4  # messages in flight between sender and receiver (backpressure)


@dataclasses.dataclass(slots=True, frozen=True)
class FaultPlan:
    """Faults applied to each KV stream. Chunk indices count chunks from 0; the manifest
    and trailer are not chunks. `disconnect_after` counts every message delivered."""

    drop_chunk: int | None = None
    corrupt_chunk: int | None = None  # one data byte flipped, CRC left as sent
    delay_chunk: int | None = None
    delay_seconds: float = 0.0
    reorder_chunk: int | None = None  # swapped with the chunk after it
    disconnect_after: int | None = None  # the connection breaks after this many messages


def _corrupted(message: kv_pb2.KvTransfer) -> kv_pb2.KvTransfer:
    chunk = message.chunk
    data = bytearray(chunk.data)
    data[len(data) // 2] ^= 0xFF
    bad = kv_pb2.KvChunk(
        index=chunk.index, offset=chunk.offset, data=bytes(data), crc32c=chunk.crc32c
    )
    return kv_pb2.KvTransfer(chunk=bad)


async def apply_faults(messages: KvStream, plan: FaultPlan) -> AsyncIterator[kv_pb2.KvTransfer]:
    """The stream as a faulty network would deliver it (all but `disconnect_after`, which
    the transport itself acts on). Usable in front of any transport."""
    held: kv_pb2.KvTransfer | None = None  # the chunk being reordered
    async for message in as_async_iterator(messages):
        if message.WhichOneof("message") != "chunk":
            if held is not None:
                yield held
                held = None
            yield message
            continue
        index = message.chunk.index
        if index == plan.delay_chunk:
            await asyncio.sleep(plan.delay_seconds)
        if index == plan.drop_chunk:
            continue
        if index == plan.corrupt_chunk:
            message = _corrupted(message)
        if index == plan.reorder_chunk:
            held = message
            continue
        yield message
        if held is not None:
            yield held
            held = None


class _Disconnected(Exception):
    pass


class _FakeServer:
    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.alive = True
        self.calls: set[asyncio.Task] = set()

    def start(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(coro)
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)
        return task

    def outcome(self, task: asyncio.Task[T]) -> T:
        """A finished call's result, or its failure as a TransportError."""
        if task.cancelled():
            if not self.alive:
                raise TransportError(StatusCode.UNAVAILABLE, "the peer went away mid-call")
            raise TransportError(StatusCode.CANCELLED, "the call was cancelled")
        error = task.exception()
        if error is not None:
            raise to_transport_error(error) from None
        return task.result()


class FakeNetwork:
    """Addresses -> handlers, in one process and one event loop."""

    def __init__(self) -> None:
        self._servers: dict[str, _FakeServer] = {}

    def serve(self, address: str, handler: DecodeHandler | PrefillHandler) -> None:
        self._servers[address] = _FakeServer(handler)

    async def kill(self, address: str) -> None:
        """The process at `address` dies: its calls are cancelled, its address refuses."""
        server = self._servers.pop(address)
        server.alive = False
        for task in list(server.calls):
            task.cancel()
        await asyncio.gather(*server.calls, return_exceptions=True)

    def server(self, address: str) -> _FakeServer:
        server = self._servers.get(address)
        if server is None:
            raise TransportError(StatusCode.UNAVAILABLE, f"connection refused: {address}")
        return server

    def decode_client(
        self, address: str, config: TransportConfig | None = None, faults: FaultPlan | None = None
    ) -> FakeDecodeClient:
        return FakeDecodeClient(self, address, config or TransportConfig(), faults or FaultPlan())

    def prefill_client(
        self, address: str, config: TransportConfig | None = None
    ) -> FakePrefillClient:
        return FakePrefillClient(self, address, config or TransportConfig())


class _FakeClient:
    def __init__(self, network: FakeNetwork, address: str, config: TransportConfig) -> None:
        self._network = network
        self.address = address
        self.config = config

    async def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        server = self._network.server(self.address)
        task = server.start(getattr(server.handler, method)(*args))
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout or self.config.rpc_timeout_s)
        except asyncio.CancelledError:
            task.cancel()  # the caller gave up: so does the server, as with grpc.aio
            raise
        if not done:
            task.cancel()
            raise TransportError(StatusCode.DEADLINE_EXCEEDED, f"{method} took too long")
        return server.outcome(task)

    async def close(self) -> None:
        """Nothing to release: there is no connection."""


class FakeDecodeClient(_FakeClient):
    """`DecodeClient` calling a `DecodeHandler` in this process."""

    def __init__(
        self, network: FakeNetwork, address: str, config: TransportConfig, faults: FaultPlan
    ) -> None:
        super().__init__(network, address, config)
        self.faults = faults

    async def reserve(self, request: ReserveRequest) -> Lease:
        return await self._call("reserve", request)

    async def cancel(self, lease_id: str) -> bool:
        return await self._call("cancel", lease_id)

    async def get_load(self) -> LoadReport:
        return await self._call("get_load")

    async def stream_tokens(self, lease_id: str) -> AsyncIterator[TokenBatch]:
        server = self._network.server(self.address)
        queue: asyncio.Queue[TokenBatch] = asyncio.Queue()

        async def pump() -> None:
            async for batch in server.handler.stream_tokens(lease_id):
                await queue.put(batch)

        task = server.start(pump())
        try:
            while not task.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                batch = getter.result()
                yield batch
                if batch.finish is not None:
                    return
            while not queue.empty():  # the handler ended: what it sent before, in order
                batch = queue.get_nowait()
                yield batch
                if batch.finish is not None:
                    return
            server.outcome(task)  # raises the handler's failure, if any
        finally:
            task.cancel()

    async def transfer_kv(self, messages: KvStream) -> KvReceipt:
        server = self._network.server(self.address)
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=STREAM_WINDOW)

        async def receive() -> AsyncIterator[kv_pb2.KvTransfer]:
            while (message := await queue.get()) is not _END:
                yield message

        task = server.start(server.handler.transfer_kv(receive()))
        # The sender runs beside the call, as grpc.aio consumes a request iterator: when the
        # receiver answers early (a rejection, a cancelled lease) the sender is cancelled
        # even while it waits for its next message.
        sender = asyncio.ensure_future(self._send(messages, queue, task))
        try:
            async with asyncio.timeout(self.config.transfer_timeout_s):
                await asyncio.wait({sender, task}, return_when=asyncio.FIRST_COMPLETED)
                if sender.done() and sender.exception() is not None:
                    task.cancel()
                    if isinstance(sender.exception(), _Disconnected):
                        raise TransportError(StatusCode.UNAVAILABLE, "connection broke mid-stream")
                    raise sender.exception()
                await asyncio.wait({task})
        except TimeoutError:
            task.cancel()
            raise TransportError(
                StatusCode.DEADLINE_EXCEEDED, "KV transfer took too long"
            ) from None
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        return server.outcome(task)

    async def _send(
        self, messages: KvStream, queue: asyncio.Queue[Any], task: asyncio.Task
    ) -> None:
        """Feed the receiver until the stream ends or the receiver answered (rejected)."""
        sent, stream = 0, apply_faults(messages, self.faults)
        try:
            async for message in stream:
                if (
                    self.faults.disconnect_after is not None
                    and sent >= self.faults.disconnect_after
                ):
                    raise _Disconnected
                if not await _put_unless_done(queue, message, task):
                    return
                sent += 1
        finally:
            await stream.aclose()
        await _put_unless_done(queue, _END, task)


async def _put_unless_done(queue: asyncio.Queue[Any], item: Any, task: asyncio.Task) -> bool:
    """Put `item` once there is room; False (and nothing put) if `task` finished first."""
    if task.done():
        return False
    putter = asyncio.ensure_future(queue.put(item))
    try:
        await asyncio.wait({putter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not putter.done():
            putter.cancel()
    return putter.done() and not putter.cancelled()


class FakePrefillClient(_FakeClient):
    """`PrefillClient` calling a `PrefillHandler` in this process."""

    async def prefill(self, request: PrefillRequest, timeout: float | None = None) -> PrefillResult:
        return await self._call("prefill", request, timeout=timeout)

    async def cancel(self, request_id: str) -> bool:
        return await self._call("cancel", request_id)

    async def get_load(self) -> LoadReport:
        return await self._call("get_load")

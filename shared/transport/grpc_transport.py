"""grpc.aio implementations of `DecodeClient` and `PrefillClient`.

One channel per worker address, created with every limit configured (message sizes,
keepalive, reconnect backoff). Calls never wait for a connection (`wait_for_ready` is off):
a peer that refuses connections fails the call at once with UNAVAILABLE, and every unary
call and every KV transfer carries a deadline, so a peer that stops answering ends the
call with DEADLINE_EXCEEDED, and a dead TCP peer on a long stream is found by keepalive.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from shared.kv.codec import KvRejection
from shared.rpc.pdserve.v1 import worker_pb2, worker_pb2_grpc
from shared.transport import convert
from shared.transport.base import KvStream, as_async_iterator
from shared.transport.errors import KV_REJECTION_KEY
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


def channel_options(config: TransportConfig) -> list[tuple[str, int]]:
    backoff_ms = int(config.reconnect_backoff_s * 1000)
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", backoff_ms),
        ("grpc.min_reconnect_backoff_ms", backoff_ms),
        ("grpc.max_reconnect_backoff_ms", backoff_ms * 10),
    ]


def transport_error(error: grpc.aio.AioRpcError) -> TransportError:
    """A failed call as the domain error, with the KV rejection reason from the trailers."""
    name = error.code().name
    code = StatusCode[name] if name in StatusCode.__members__ else StatusCode.UNKNOWN
    reason = None
    for key, value in error.trailing_metadata() or ():
        if key == KV_REJECTION_KEY:
            reason = KvRejection(value)
    return TransportError(code, error.details() or name, kv_reason=reason)


class _Client:
    def __init__(self, address: str, config: TransportConfig) -> None:
        self.address = address
        self.config = config
        self._channel = grpc.aio.insecure_channel(address, options=channel_options(config))

    async def _unary(
        self, method: Callable[..., Awaitable[Any]], request: Any, timeout: float | None = None
    ) -> Any:
        try:
            return await method(request, timeout=timeout or self.config.rpc_timeout_s)
        except grpc.aio.AioRpcError as error:
            raise transport_error(error) from None

    async def close(self) -> None:
        await self._channel.close()


class GrpcDecodeClient(_Client):
    """`DecodeClient` over gRPC."""

    def __init__(self, address: str, config: TransportConfig) -> None:
        super().__init__(address, config)
        self._stub = worker_pb2_grpc.DecodeWorkerStub(self._channel)

    async def reserve(self, request: ReserveRequest) -> Lease:
        reply = await self._unary(self._stub.Reserve, convert.reserve_to_proto(request))
        return convert.lease_from_proto(reply)

    async def stream_tokens(self, lease_id: str) -> AsyncIterator[TokenBatch]:
        # No deadline: the stream lasts as long as the generation; keepalive finds a dead
        # peer, and the decode worker ends the stream at the request's own deadline.
        call = self._stub.StreamTokens(worker_pb2.StreamTokensRequest(lease_id=lease_id))
        try:
            async for message in call:
                yield convert.tokens_from_proto(message)
        except grpc.aio.AioRpcError as error:
            raise transport_error(error) from None
        finally:
            call.cancel()  # no-op once finished; ends the RPC when the caller stops early

    async def transfer_kv(self, messages: KvStream) -> KvReceipt:
        call = self._stub.TransferKV(timeout=self.config.transfer_timeout_s)
        # We write the stream ourselves (not via a request iterator) so that when the call
        # ends early (a rejection, a cancelled lease, a dead peer) the writer is cancelled
        # and the source stream closed at once, even while it waits for its next message.
        writer = asyncio.ensure_future(_write(call, messages))
        answer = asyncio.ensure_future(_await_call(call))
        try:
            await asyncio.wait({writer, answer}, return_when=asyncio.FIRST_COMPLETED)
            failure = _source_failure(writer)
            if failure is not None:  # the sender's own stream broke: end the call
                call.cancel()
                raise failure
            return convert.receipt_from_proto(await answer)
        except grpc.aio.AioRpcError as error:
            raise transport_error(error) from None
        except asyncio.CancelledError:
            call.cancel()  # the sender gave up: the receiver's handler ends too
            raise
        finally:
            for task in (writer, answer):
                task.cancel()
            await asyncio.gather(writer, answer, return_exceptions=True)

    async def cancel(self, lease_id: str) -> bool:
        request = worker_pb2.CancelLeaseRequest(lease_id=lease_id)
        return (await self._unary(self._stub.Cancel, request)).found

    async def get_load(self) -> LoadReport:
        reply = await self._unary(self._stub.GetLoad, worker_pb2.GetLoadRequest())
        return convert.load_from_proto(reply)


async def _write(call: grpc.aio.StreamUnaryCall, messages: KvStream) -> None:
    stream = as_async_iterator(messages)
    try:
        async for message in stream:
            await call.write(message)
        await call.done_writing()
    finally:
        await stream.aclose()


def _source_failure(writer: asyncio.Future) -> BaseException | None:
    """The writer's failure if it came from the source stream, not from the call (a write
    to a call that already ended fails too; the call's own status says why)."""
    if not writer.done() or writer.cancelled():
        return None
    error = writer.exception()
    if error is None or isinstance(error, grpc.aio.AioRpcError | asyncio.InvalidStateError):
        return None
    return error


async def _await_call(call: grpc.aio.StreamUnaryCall) -> Any:
    return await call


class GrpcPrefillClient(_Client):
    """`PrefillClient` over gRPC."""

    def __init__(self, address: str, config: TransportConfig) -> None:
        super().__init__(address, config)
        self._stub = worker_pb2_grpc.PrefillWorkerStub(self._channel)

    async def prefill(self, request: PrefillRequest, timeout: float | None = None) -> PrefillResult:
        reply = await self._unary(self._stub.Prefill, convert.prefill_to_proto(request), timeout)
        return convert.prefill_result_from_proto(reply)

    async def cancel(self, request_id: str) -> bool:
        request = worker_pb2.CancelPrefillRequest(request_id=request_id)
        return (await self._unary(self._stub.Cancel, request)).found

    async def get_load(self) -> LoadReport:
        reply = await self._unary(self._stub.GetLoad, worker_pb2.GetLoadRequest())
        return convert.load_from_proto(reply)

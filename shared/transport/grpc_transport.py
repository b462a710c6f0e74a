"""grpc.aio implementations of `DecodeClient` and `PrefillClient`.

One channel per worker address (shared/transport/channels.py: with TLS, replaced when the
certificate files change), created with every limit configured (message sizes, keepalive,
reconnect backoff). Calls never wait for a connection (`wait_for_ready` is off): a peer
that refuses connections fails the call with UNAVAILABLE, at once (a KV push first gives a
reconnecting channel a bounded moment, see `transfer_kv`), and every unary call and every
KV transfer carries a deadline, so a peer that stops answering ends the call with
DEADLINE_EXCEEDED, and a dead TCP peer on a long stream is found by keepalive.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from shared.kv_transfer.codec import KvRejection
from shared.rpc.pdserve.v1 import worker_pb2, worker_pb2_grpc
from shared.transport import convert
from shared.transport.base import KvStream, as_async_iterator
from shared.transport.channels import RotatingChannel
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
# A KV push waits at most this many reconnect backoffs for its channel to connect.
CONNECT_WAIT_BACKOFFS = 3


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
    def __init__(self, address: str, config: TransportConfig, make_stub: Callable) -> None:
        self.address = address
        self.config = config
        self._channel = RotatingChannel(address, config, make_stub)

    async def _unary(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            with self._channel.call() as stub:
                call = getattr(stub, method)
                return await call(request, timeout=timeout or self.config.rpc_timeout_s)
        except grpc.aio.AioRpcError as error:
            raise transport_error(error) from None

    async def close(self) -> None:
        await self._channel.close()


class GrpcDecodeClient(_Client):
    """`DecodeClient` over gRPC."""

    def __init__(self, address: str, config: TransportConfig) -> None:
        super().__init__(address, config, worker_pb2_grpc.DecodeWorkerStub)

    async def reserve(self, request: ReserveRequest) -> Lease:
        reply = await self._unary("Reserve", convert.reserve_to_proto(request))
        return convert.lease_from_proto(reply)

    async def stream_tokens(self, lease_id: str) -> AsyncIterator[TokenBatch]:
        # No deadline: the stream lasts as long as the generation; keepalive finds a dead
        # peer, and the decode worker ends the stream at the request's own deadline.
        with self._channel.call() as stub:
            call = stub.StreamTokens(worker_pb2.StreamTokensRequest(lease_id=lease_id))
            try:
                async for message in call:
                    yield convert.tokens_from_proto(message)
            except grpc.aio.AioRpcError as error:
                raise transport_error(error) from None
            finally:
                call.cancel()  # no-op once finished; ends the RPC when the caller stops early

    async def transfer_kv(self, messages: KvStream) -> KvReceipt:
        # The decode worker granted this lease moments ago, so it is up; if it was just
        # restarted, our channel may still be waiting out its reconnect backoff and would
        # fail the push at once: give it a bounded moment to connect first (a peer that is
        # really gone still fails, UNAVAILABLE, within that moment).
        await self._channel.connected(CONNECT_WAIT_BACKOFFS * self.config.reconnect_backoff_s)
        with self._channel.call() as stub:
            call = stub.TransferKV(timeout=self.config.transfer_timeout_s)
            return await self._transfer(call, messages)

    async def _transfer(self, call: grpc.aio.StreamUnaryCall, messages: KvStream) -> KvReceipt:
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
        return (await self._unary("Cancel", request)).found

    async def get_load(self) -> LoadReport:
        reply = await self._unary("GetLoad", worker_pb2.GetLoadRequest())
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
        super().__init__(address, config, worker_pb2_grpc.PrefillWorkerStub)

    async def prefill(self, request: PrefillRequest, timeout: float | None = None) -> PrefillResult:
        reply = await self._unary("Prefill", convert.prefill_to_proto(request), timeout)
        return convert.prefill_result_from_proto(reply)

    async def cancel(self, request_id: str) -> bool:
        request = worker_pb2.CancelPrefillRequest(request_id=request_id)
        return (await self._unary("Cancel", request)).found

    async def get_load(self) -> LoadReport:
        reply = await self._unary("GetLoad", worker_pb2.GetLoadRequest())
        return convert.load_from_proto(reply)

"""gRPC servicers that adapt any `DecodeHandler` / `PrefillHandler` to worker.proto.

Thin by design: proto -> domain, await the handler, domain -> proto; exceptions map to a
status through `errors.to_transport_error` (a KV rejection also sets the
`pdserve-kv-rejection` trailer; a rejected KV stream is read to its end first, see `_drain`).
Cancellation is not caught: when the caller goes away, grpc.aio cancels the handler's task
and the handler releases what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import NoReturn, TypeVar

import grpc

from shared.rpc.pdserve.v1 import kv_pb2, worker_pb2, worker_pb2_grpc
from shared.transport import convert
from shared.transport.base import DecodeHandler, PrefillHandler
from shared.transport.errors import KV_REJECTION_KEY, to_transport_error
from shared.transport.types import StatusCode, TransportError

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a rejected KV stream is read to its end before the rejection is sent; see `_drain`.
REJECTED_STREAM_DRAIN_S = 5.0


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> NoReturn:
    status = to_transport_error(error)
    if status.code is StatusCode.INTERNAL:
        log.error("handler failed", exc_info=error)
    trailers = ((KV_REJECTION_KEY, status.kv_reason.value),) if status.kv_reason else ()
    await context.abort(grpc.StatusCode[status.code.name], status.message, trailers)
    raise AssertionError("unreachable: context.abort raises")


async def _answer(context: grpc.aio.ServicerContext, call: Awaitable[T]) -> T:
    try:
        return await call
    except Exception as error:  # every failure becomes a status; cancellation passes
        await abort(context, error)


async def _drain(messages: AsyncIterator[kv_pb2.KvTransfer], limit_s: float) -> None:
    """Reads and drops the rest of a rejected stream, until the sender half-closes or
    `limit_s` passes.

    grpc.aio clients lose the status of a client-streaming call that the server ends before
    they half-close: a write still in flight fails and overwrites it with
    `INTERNAL: Internal error from Core` (grpc/grpc#36066). Letting the sender finish first
    means it sees why its KV was refused (FAILED_PRECONDITION for a wrong model, DATA_LOSS
    for a corrupt chunk); the bytes are dropped unread, and rejections are rare.
    """

    async def read_to_end() -> None:
        async for _ in messages:
            pass

    # If the sender keeps writing past the limit or goes away, answer now, as before.
    with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError, grpc.aio.UsageError):
        await asyncio.wait_for(read_to_end(), limit_s)


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, handler: DecodeHandler) -> None:
        self._handler = handler

    async def Reserve(
        self, request: worker_pb2.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReserveResponse:
        try:
            domain = convert.reserve_from_proto(request)
        except ValueError as error:
            await abort(context, TransportError(StatusCode.INVALID_ARGUMENT, str(error)))
        lease = await _answer(context, self._handler.reserve(domain))
        return convert.lease_to_proto(lease)

    async def StreamTokens(
        self, request: worker_pb2.StreamTokensRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.StreamTokensResponse]:
        batches = self._handler.stream_tokens(request.lease_id)
        try:
            async for batch in batches:
                yield convert.tokens_to_proto(batch)
        except Exception as error:
            await abort(context, error)
        finally:
            await batches.aclose()

    async def TransferKV(
        self,
        request_iterator: AsyncIterator[kv_pb2.KvTransfer],
        context: grpc.aio.ServicerContext,
    ) -> kv_pb2.KvReceipt:
        try:
            receipt = await self._handler.transfer_kv(request_iterator)
        except Exception as error:
            await _drain(request_iterator, REJECTED_STREAM_DRAIN_S)
            await abort(context, error)
        return convert.receipt_to_proto(receipt)

    async def Cancel(
        self, request: worker_pb2.CancelLeaseRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.CancelResponse:
        found = await _answer(context, self._handler.cancel(request.lease_id))
        return worker_pb2.CancelResponse(found=found)

    async def GetLoad(
        self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.LoadReport:
        return convert.load_to_proto(await _answer(context, self._handler.get_load()))


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, handler: PrefillHandler) -> None:
        self._handler = handler

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        try:
            domain = convert.prefill_from_proto(request)
        except ValueError as error:
            await abort(context, TransportError(StatusCode.INVALID_ARGUMENT, str(error)))
        result = await _answer(context, self._handler.prefill(domain))
        return convert.prefill_result_to_proto(result)

    async def Cancel(
        self, request: worker_pb2.CancelPrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.CancelResponse:
        found = await _answer(context, self._handler.cancel(request.request_id))
        return worker_pb2.CancelResponse(found=found)

    async def GetLoad(
        self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.LoadReport:
        return convert.load_to_proto(await _answer(context, self._handler.get_load()))

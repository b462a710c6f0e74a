"""The prefill worker's `PrefillHandler`: a request's checks, then the prefill loop.

A servicer (shared/transport/grpc_servicers.py) maps its errors to gRPC status codes; this
class only raises `TransportError`s naming what was wrong.
"""

from __future__ import annotations

from prefill_server.loop import PrefillLoop
from shared.transport.types import (
    LoadReport,
    PrefillRequest,
    PrefillResult,
    StatusCode,
    TransportError,
)


class PrefillService:
    """The `PrefillHandler` of prefill and colocated workers: checks, then the loop."""

    def __init__(self, loop: PrefillLoop, fingerprint: str, max_queue: int) -> None:
        self._loop, self._fingerprint, self._max_queue = loop, fingerprint, max_queue
        self.draining = False

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        if self.draining:
            raise TransportError(StatusCode.UNAVAILABLE, "prefill worker is draining")
        if request.model_fingerprint and request.model_fingerprint != self._fingerprint:
            raise TransportError(
                StatusCode.FAILED_PRECONDITION,
                f"this worker serves model {self._fingerprint}, the request expects "
                f"{request.model_fingerprint}",
            )
        if not request.prompt_token_ids:
            raise TransportError(StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
        if not request.lease_id or not request.decode_target:
            raise TransportError(
                StatusCode.INVALID_ARGUMENT, "a prefill needs a decode_target and a lease_id"
            )
        return await self._loop.submit(request)

    async def cancel(self, request_id: str) -> bool:
        return self._loop.cancel(request_id)

    async def get_load(self) -> LoadReport:
        depth = self._loop.queue_depth
        return LoadReport(
            free_slots=max(0, self._max_queue - depth),
            total_slots=self._max_queue,
            queue_depth=depth,
            live_requests=self._loop.live_requests,
            # The orchestrator's prefix routing hashes prompts in blocks of this size: it
            # must be the size this worker's prefix cache keys its pages by.
            page_size=self._loop.pool.page_size,
        )

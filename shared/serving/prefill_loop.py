"""The prefill engine thread and the KV push that follows each prefill.

Shared by the prefill worker and the colocated worker (which lives in decode_server), so it
sits in `shared`: servers never import each other.

The life of a request inside the prefill worker:
1. A gRPC handler calls `PrefillLoop.submit` on the server's event loop. The request joins
   a bounded queue (full: RESOURCE_EXHAUSTED, nothing queued).
2. The engine thread takes requests one at a time; a request cancelled or past its deadline
   while it waited is dropped without touching the device. Otherwise it prefills (padding
   to a bucket) and samples the first token.
3. Back on the event loop, the KV is pushed to the decode worker and lease the request
   names, through a `KvSink` (gRPC for a remote decode worker, which encodes only the
   prompt's true length; a direct in-memory hand-over for the colocated role). The engine
   thread meanwhile prefills the next request: pushes and prefills overlap.
4. The handler answers with the first token and timings. A failed push is reported with
   the decode worker's status; nothing is retried here (the orchestrator decides).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

from shared.engine.engine import Engine, EngineError, Params, Prefix
from shared.metrics import WorkerMetrics
from shared.transport.types import (
    LoadReport,
    PrefillRequest,
    PrefillResult,
    PrefillTimings,
    StatusCode,
    TransportError,
)

log = logging.getLogger(__name__)


class KvSink(Protocol):
    """Where a finished prefix goes: the decode worker named by the request."""

    async def push(self, request: PrefillRequest, prefix: Prefix) -> int:
        """Deliver `prefix` for `request.lease_id` at `request.decode_target`; return the
        payload bytes sent. Raises TransportError with the decode worker's status."""
        ...


@dataclasses.dataclass(slots=True)
class _Job:
    request: PrefillRequest
    arrived: float  # time.perf_counter()
    future: asyncio.Future[tuple[Prefix, float, float]]  # (prefix, queue_s, prefill_s)
    cancelled: bool = False


class PrefillLoop:
    def __init__(
        self,
        engine: Engine,
        params: Params,
        sink: KvSink,
        metrics: WorkerMetrics,
        *,
        max_queue: int,
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        self._engine, self._params, self._sink, self._metrics = engine, params, sink, metrics
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._jobs: dict[str, _Job] = {}  # by request id; event loop only
        self._on_fatal = on_fatal
        self._thread = threading.Thread(target=self._run, name="prefill-engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        while True:  # make room for the sentinel: drop what still waits
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled = True
                self._resolve(job, TransportError(StatusCode.UNAVAILABLE, "worker shutting down"))
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def live_requests(self) -> int:
        return len(self._jobs)

    # Event loop side -------------------------------------------------------------------------

    async def submit(self, request: PrefillRequest) -> PrefillResult:
        if request.request_id in self._jobs:
            raise TransportError(
                StatusCode.ALREADY_EXISTS, f"request {request.request_id!r} is already here"
            )
        self._check_deadline(request, "before it was queued")
        loop = asyncio.get_running_loop()
        job = _Job(request, time.perf_counter(), loop.create_future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise TransportError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"prefill queue is full ({self._queue.maxsize} waiting); retry later",
            ) from None
        self._jobs[request.request_id] = job
        self._metrics.prefill_queue_depth.set(self._queue.qsize())
        try:
            prefix, queue_s, prefill_s = await job.future
            self._check_deadline(request, "before its KV was sent")
            start = time.perf_counter()
            kv_bytes = await self._sink.push(request, prefix)
            transfer_s = time.perf_counter() - start
        except asyncio.CancelledError:
            job.cancelled = True  # the engine thread skips it if it has not started it
            self._metrics.finished("cancelled")
            raise
        except TransportError as err:
            self._metrics.finished(err.code.name.lower())
            raise
        finally:
            self._jobs.pop(request.request_id, None)
        self._metrics.kv_sent_bytes.inc(kv_bytes)
        self._metrics.kv_send_seconds.observe(transfer_s)
        self._metrics.finished("ok")
        return PrefillResult(
            prefix.first_token, PrefillTimings(queue_s, prefill_s, transfer_s, kv_bytes),
            prefix.first_logprob,
        )  # fmt: skip

    def cancel(self, request_id: str) -> bool:
        job = self._jobs.get(request_id)
        if job is None:
            return False
        job.cancelled = True
        if not job.future.done():
            job.future.cancel()
        return True

    @staticmethod
    def _check_deadline(request: PrefillRequest, when: str) -> None:
        if request.deadline is not None and time.time() >= request.deadline:
            raise TransportError(
                StatusCode.DEADLINE_EXCEEDED,
                f"request {request.request_id!r} passed its deadline {when}",
            )

    # Engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while (job := self._queue.get()) is not None:
                self._metrics.prefill_queue_depth.set(self._queue.qsize())
                if job.cancelled:
                    continue
                self._prefill(job)
        except BaseException as err:  # a dead engine thread must be loud, never silent
            log.exception("prefill engine thread died")
            self._on_fatal(err)

    def _prefill(self, job: _Job) -> None:
        request = job.request
        queue_s = time.perf_counter() - job.arrived
        self._metrics.prefill_queue_seconds.observe(queue_s)
        if request.deadline is not None and time.time() >= request.deadline:
            self._resolve(job, TransportError(
                StatusCode.DEADLINE_EXCEEDED,
                f"request {request.request_id!r} passed its deadline while queued",
            ))  # fmt: skip
            return
        start = time.perf_counter()
        try:
            prefix = self._engine.prefill(
                self._params,
                request.prompt_token_ids,
                sampling=request.sampling,
                allow_long=request.resume,
                logprobs=request.logprobs,
            )
        except EngineError as err:
            self._resolve(job, TransportError(StatusCode.INVALID_ARGUMENT, str(err)))
            return
        prefill_s = time.perf_counter() - start
        self._metrics.prefill_seconds.observe(prefill_s)
        self._resolve(job, (prefix, queue_s, prefill_s))

    def _resolve(self, job: _Job, outcome: object) -> None:
        def settle() -> None:
            if job.future.done():
                return  # cancelled meanwhile
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(settle)


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
        )

"""The prefill engine thread and the KV push that follows each prefill.

Run by the prefill worker, and by the colocated worker (decode_server/colocated.py, the
one module of another server allowed to import it: it composes this loop with the decode
worker's).

The life of a request inside the prefill worker:
1. A gRPC handler calls `PrefillLoop.submit` on the server's event loop. The request joins
   a queue bounded by `max_queue` prompts not yet prefilled (full: RESOURCE_EXHAUSTED,
   nothing queued).
2. The engine thread moves arrivals into the chunk scheduler
   (prefill_server/scheduler.py) and runs calls of packed chunks
   (shared/engine/chunked_prefill.py): up to `max_rows` prompts per call, `chunk` tokens
   of each, shortest remaining first with an aging bound. A prompt's first scheduling
   reuses the longest prefix of it held by the prefix cache (shared/kv/prefix_cache.py)
   and computes only the rest. A request cancelled or past its deadline is dropped at the
   next call, its pages released. When a prompt's last chunk has run, its first token is
   sampled and its KV read out of the pool; its whole blocks stay cached.
3. Back on the event loop, the KV is pushed to the decode worker and lease the request
   names, through a `KvSink` (gRPC for a remote decode worker, which encodes only the
   prompt's true length; a direct in-memory hand-over for the colocated role). The engine
   thread meanwhile runs the next call: pushes and prefills overlap.
4. The handler answers with the first token and timings (cached tokens included). A failed
   push is reported with the decode worker's status; nothing is retried here (the
   orchestrator decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

import jax
import numpy as np

from prefill_server.scheduler import (
    ChunkScheduler,
    PrefillWork,
    ScheduledChunk,
)
from shared.config import PrefillSettings
from shared.engine.chunked_prefill import ChunkedPrefill, ChunkOutput, ChunkRow, PackedChunks
from shared.engine.engine import Engine, EngineError, Params
from shared.engine.sampling import token_logprob
from shared.kv.prefix import Prefix
from shared.kv.prefix_cache import PrefixCacheStats, PrefixPagePool
from shared.kv.prefix_hash import HashFn, blake2b_hash, namespace
from shared.metrics import WorkerMetrics
from shared.serving.worker_server import progress
from shared.transport.types import (
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


@dataclasses.dataclass(frozen=True, slots=True)
class _Done:
    prefix: Prefix
    queue_s: float
    prefill_s: float
    cached_tokens: int


@dataclasses.dataclass(frozen=True, slots=True)
class PlannedCall:
    """One call's chunks, in policy order, and their packed inputs."""

    chunks: list[ScheduledChunk]
    packed: PackedChunks
    wants: bool  # some row asked for logprobs


@dataclasses.dataclass(slots=True)
class _Job:
    request: PrefillRequest
    arrived: float  # time.monotonic(): the scheduler's clock
    future: asyncio.Future[_Done]
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
        settings: PrefillSettings | None = None,
        fingerprint: str = "",
        hash_fn: HashFn = blake2b_hash,
    ) -> None:
        self._engine, self._params, self._sink, self._metrics = engine, params, sink, metrics
        settings = settings or PrefillSettings()
        self.settings = settings
        config = engine.config
        chunk = settings.chunk or config.max_prompt_len
        # Pool bytes of one page: every layer, K and V, every cache head.
        self._page_bytes = engine.kv_bytes_per_token * config.page_size
        cache_pages = settings.prefix_cache_bytes // self._page_bytes
        # Room for max_rows prompts of max_seq_len at once, plus the cache's budget.
        num_pages = 1 + settings.max_rows * config.max_pages_per_slot + cache_pages
        self.device = ChunkedPrefill(engine, num_pages, chunk, settings.max_rows)
        # Everything that changes a block's KV: weights, architecture, dtype, page size.
        root = namespace(
            fingerprint, engine.model_config.fingerprint(), engine.dtype, config.page_size
        )
        self.pool = PrefixPagePool(num_pages, config.page_size, root, cache_pages, hash_fn)
        self.scheduler = ChunkScheduler(self.pool, chunk, settings.max_rows, settings.aging_s)
        self._max_queue = max_queue
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._jobs: dict[str, _Job] = {}  # by request id; event loop only
        self._waiting = 0  # jobs submitted and not prefilled yet; event loop only
        self._on_fatal = on_fatal
        self._thread = threading.Thread(target=self._run, name="prefill-engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._published = PrefixCacheStats()
        self._publish_cache_metrics()
        # Set when another engine thread runs this loop's calls (`host`): woken on submit.
        self._wake: Callable[[], None] | None = None

    def compile(self) -> None:
        """Compile every call shape ahead (warm-up), before `start`."""
        self.device.compile(self._params)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def host(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]) -> None:
        """Serve without a thread of its own: another engine thread (the colocated
        worker's decode loop) calls `poll`, `plan`, `complete` and `run_alone`, and is
        woken through `wake` when a request arrives."""
        self._loop, self._wake = loop, wake

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self._wake is not None:
            self._wake()  # the host thread takes no more; it fails what is left when it ends
            return
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        if self._wake is not None:
            return not self._stopping  # hosted: the host thread's own health is its role's
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return self._waiting

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
        if self._waiting >= self._max_queue:
            raise TransportError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"prefill queue is full ({self._max_queue} waiting); retry later",
            )
        loop = asyncio.get_running_loop()
        job = _Job(request, time.monotonic(), loop.create_future())
        self._jobs[request.request_id] = job
        self._waiting += 1
        self._metrics.prefill_queue_depth.set(self._waiting)
        self._queue.put(job)
        if self._wake is not None:
            self._wake()
        try:
            try:
                done = await job.future
            finally:
                self._waiting -= 1
                self._metrics.prefill_queue_depth.set(self._waiting)
            self._check_deadline(request, "before its KV was sent")
            start = time.perf_counter()
            kv_bytes = await self._sink.push(request, done.prefix)
            transfer_s = time.perf_counter() - start
        except asyncio.CancelledError:
            job.cancelled = True  # the engine thread drops it at its next call
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
        timings = PrefillTimings(
            done.queue_s, done.prefill_s, transfer_s, kv_bytes, done.cached_tokens
        )
        return PrefillResult(done.prefix.first_token, timings, done.prefix.first_logprob)

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
            while self._take_arrivals():
                self._drop_abandoned()
                planned = self.plan(self.settings.max_rows)
                if planned is not None:
                    self.run_alone(planned)
        except BaseException as err:  # a dead engine thread must be loud, never silent
            log.exception("prefill engine thread died")
            self._on_fatal(err)
        finally:
            self.fail_all()

    # The hosting engine thread's side (and this loop's own) ----------------------------------

    def poll(self) -> bool:
        """Take what arrived and drop what was abandoned, without blocking -> whether any
        prompt waits to be computed."""
        if not self._stopping:
            self._take_arrivals(block=False)
        self._drop_abandoned()
        return len(self.scheduler) > 0

    @property
    def has_work(self) -> bool:
        """Whether a request waits to be taken or a prompt to be computed (the engine
        thread that hosts this loop; nothing is taken or dropped)."""
        return (not self._stopping and not self._queue.empty()) or len(self.scheduler) > 0

    def plan(self, max_rows: int) -> PlannedCall | None:
        """The next call's chunks (at most `max_rows` rows), packed; None: nothing can run."""
        chunks = self.scheduler.next_chunks(max_rows)
        if not chunks:
            return None
        rows, wants = [], False
        for c in chunks:
            job: _Job = c.work.payload
            wants |= job.request.logprobs is not None
            lookup = c.work.lookup
            if c.start == c.work.cached:  # its first chunk
                self._metrics.prefill_queue_seconds.observe(c.work.started - c.work.arrived)
                if lookup.copy_from is not None:  # part of a cached block, then its own
                    self.device.copy_page(lookup.copy_from, lookup.pages[lookup.hit_pages])
            rows.append(
                ChunkRow(
                    c.work.tokens[c.start : c.start + c.count],
                    c.start,
                    lookup.pages,
                    job.request.sampling,
                )
            )
        return PlannedCall(chunks, self.device.pack(rows, wants), wants)

    def run_alone(self, planned: PlannedCall) -> None:
        """Run a planned call by itself (no decode step beside it)."""
        self.complete(planned, self.device.run_packed(self._params, planned.packed))

    def complete(self, planned: PlannedCall, out: ChunkOutput) -> None:
        """After a planned call ran (alone or beside a decode step): advance its prompts;
        each one it finished gets its first token and its KV read out, to be pushed."""
        chunks, wants = planned.chunks, planned.wants
        self._metrics.prefill_tokens_computed.inc(sum(c.count for c in chunks))
        step_logprobs = None  # on the host, read once for every row that finishes
        for i, c in enumerate(chunks):
            c.work.done += c.count
            self.pool.publish(c.work.tokens, c.work.lookup, c.work.done)
            if c.work.finished:
                if wants and step_logprobs is None:
                    step_logprobs = jax.device_get(out.logprobs)
                self._finish(c.work, int(out.tokens[i]), step_logprobs, i)
        self._publish_cache_metrics()

    def _take_arrivals(self, block: bool = True) -> bool:
        """Move queued requests into the scheduler; block (if `block`) while there is
        nothing to do. False once stopped."""
        block = block and len(self.scheduler) == 0
        while True:
            try:
                job = self._queue.get(block=block)
            except queue.Empty:
                return True
            if job is None or self._stopping:
                return False
            block = False
            self._admit(job)

    def _admit(self, job: _Job) -> None:
        request = job.request
        if job.cancelled:
            return
        prompt = np.asarray(request.prompt_token_ids, dtype=np.int64)
        try:
            self._engine.validate_tokens(prompt)
            limit = self._engine.config.max_seq_len
            if len(prompt) >= limit:
                raise EngineError(
                    f"prompt of {len(prompt)} tokens leaves no room in max_seq_len ({limit}) "
                    "for a generated token; shorten the prompt"
                )
        except EngineError as err:
            self._resolve(job, TransportError(StatusCode.INVALID_ARGUMENT, str(err)))
            return
        self.scheduler.add(PrefillWork(prompt, job.arrived, job))

    def _drop_abandoned(self) -> None:
        now = time.time()
        for work in self.scheduler.works():
            job: _Job = work.payload  # type: ignore[assignment]
            deadline = job.request.deadline
            if job.cancelled:
                self.scheduler.remove(work)
            elif deadline is not None and now >= deadline:
                self.scheduler.remove(work)
                self._resolve(
                    job,
                    TransportError(
                        StatusCode.DEADLINE_EXCEEDED,
                        f"request {job.request.request_id!r} passed its deadline while queued",
                    ),
                )

    def _finish(self, work: PrefillWork, first: int, step_logprobs: tuple | None, row: int) -> None:
        job: _Job = work.payload  # type: ignore[assignment]
        request = job.request
        assert work.lookup is not None and work.started is not None
        cache = self.device.gather(work.lookup.pages, len(work.tokens))
        first_logprob = None
        if request.logprobs is not None:
            chosen, ids, values = step_logprobs
            first_logprob = token_logprob(chosen[row], ids[row], values[row], request.logprobs)
        prefix = Prefix(cache, len(work.tokens), first, request.sampling, first_logprob)
        self.scheduler.remove(work, cache=True)
        queue_s = work.started - work.arrived
        prefill_s = time.monotonic() - work.started
        self._metrics.prefill_seconds.observe(prefill_s)
        self._resolve(job, _Done(prefix, queue_s, prefill_s, work.cached))

    def fail_all(self) -> None:
        """Fail every request still here (the engine thread is ending)."""
        error = TransportError(StatusCode.UNAVAILABLE, "worker shutting down")
        for work in self.scheduler.works():
            self.scheduler.remove(work)
            self._resolve(work.payload, error)  # type: ignore[arg-type]
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._resolve(job, error)

    def _publish_cache_metrics(self) -> None:
        stats, seen, m = self.pool.stats, self._published, self._metrics
        m.prefix_cache_tokens.labels("hit").inc(stats.hit_tokens - seen.hit_tokens)
        m.prefix_cache_tokens.labels("miss").inc(stats.miss_tokens - seen.miss_tokens)
        m.prefix_cache_evictions.inc(stats.evictions - seen.evictions)
        m.prefix_cache_hit_rate.set(stats.hit_rate)
        m.prefix_cache_bytes.set(self.pool.cached_pages * self._page_bytes)
        self._published = dataclasses.replace(stats)

    def _resolve(self, job: _Job, outcome: object) -> None:
        def settle() -> None:
            if job.future.done():
                return  # cancelled meanwhile
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

        if self._loop is None:
            return
        # RuntimeError: the event loop has closed, nobody waits any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(settle)


def compile_prefill_loop(loop: PrefillLoop) -> float:
    """Compile a prefill loop's call shapes (every rows bucket at its chunk, every KV
    read-out length) before it serves; returns the seconds (also printed)."""
    device = loop.device
    progress(f"compiling chunked prefill: chunk {device.chunk}, rows {device.row_buckets}")
    start = time.perf_counter()
    loop.compile()
    seconds = time.perf_counter() - start
    progress(f"compiled chunked prefill in {seconds:.1f}s")
    return seconds

"""The decode worker's engine thread: continuous batching over the slot table.

The life of a request inside the decode worker:
1. A gRPC handler reserves a slot (`SlotTable.reserve`) and the KV pages its prompt and
   first token need (a promise in the `PageAllocator`): the lease is RESERVED. No pages:
   RESOURCE_EXHAUSTED, nothing held.
2. The KV arrives on TransferKV and is validated by the codec off this thread; the handler
   calls `DecodeLoop.submit(lease_id, prefix)`: the lease is FILLING and the prefix waits
   in `_arrivals`.
3. Between two steps this thread inserts every waiting prefix in one call, into the pages
   promised to it: the leases are DECODING.
4. Each step generates one token for every live slot (the live rows only); a slot whose
   next token starts a page gets one first. When the pool is dry the youngest requests are
   preempted: their streams end PREEMPTED and the orchestrator resumes them exactly
   elsewhere. Each token goes to its lease's channel through `emit`; a slot that hit EOS,
   a stop token or its length limit is released, and its pages go back to the pool.
5. Cancels, deadlines and lease expiries are applied at the next step boundary; whatever
   ends a lease, its slot and its pages (or its page promise) are freed.

Growth policy: pages on demand, one page at a time, with preemption of the youngest
request when the pool runs dry. Reserving `prompt + max_tokens` up front would never
preempt, but would hold pages for tokens most requests never generate (they stop at EOS);
on demand, the pool holds live tokens only. A preempted request is never failed: its
stream ends with a finish the orchestrator resumes from (sampling depends only on seed and
position, so the resumed tokens are the same).

This thread alone owns the device and the decode state; gRPC handlers never run JAX work.
When no slot is live it sleeps on a condition variable (no busy spin), waking for new work
or for the next lease expiry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from decode_server.scheduler import DecodeBatch, chunk_rows_beside
from decode_server.slots import Lease, SlotState, SlotTable
from shared.engine.chunked_prefill import ChunkedPrefill, ChunkOutput, PackedChunks
from shared.engine.engine import Engine, Params
from shared.kv.pages import PageAllocator, PagesExhaustedError
from shared.kv.prefix import Prefix
from shared.logprobs import TokenLogprob
from shared.metrics import WorkerMetrics
from shared.transport.types import DecodeFinish, GenerationLimits, TokenBatch

log = logging.getLogger(__name__)

IDLE_WAKEUP_S = 0.05  # how often an idle loop checks lease expiries


# Called once per step (engine thread) with every lease's new tokens and finishes.
Emit = Callable[[list[tuple[str, TokenBatch]]], None]


class PlannedChunks(Protocol):
    packed: PackedChunks


class PrefillBeside(Protocol):
    """Prefill work this loop's engine thread runs beside its decode steps: the colocated
    worker's prefill loop (prefill_server/loop.py, `PrefillLoop.host`)."""

    device: ChunkedPrefill

    @property
    def has_work(self) -> bool: ...

    def poll(self) -> bool: ...

    def plan(self, max_rows: int) -> PlannedChunks | None: ...

    def run_alone(self, planned: Any) -> None: ...

    def complete(self, planned: Any, out: ChunkOutput) -> None: ...

    def fail_all(self) -> None: ...


class DecodeLoop:
    def __init__(
        self,
        engine: Engine,
        params: Params,
        table: SlotTable,
        emit: Emit,
        metrics: WorkerMetrics,
        on_fatal: Callable[[BaseException], None],
        pages: PageAllocator | None = None,
    ) -> None:
        """`pages`: the page allocator over the engine's pool (by default all of it; a
        test may hand out fewer pages to exhaust the pool quickly)."""
        self._engine, self._params, self._table = engine, params, table
        self._emit, self._metrics, self._on_fatal = emit, metrics, on_fatal
        self._eos = engine.model_config.eos_id
        self._cond = threading.Condition()
        self._arrivals: list[tuple[str, Prefix]] = []  # guarded by _cond
        self._finishes: dict[str, tuple[DecodeFinish, str]] = {}  # guarded by _cond
        self._stopping = False
        self._live: dict[int, Lease] = {}  # slot -> lease; engine thread only
        self._outbox: list[tuple[str, TokenBatch]] = []  # engine thread only
        config = engine.config
        self.pages = pages or PageAllocator(
            config.total_pages, config.page_size, config.max_pages_per_slot
        )  # thread-safe: admission checks it from gRPC handlers
        self._batch: DecodeBatch | None = None  # built by start(), on this thread's device
        self._thread = threading.Thread(target=self._run, name="decode-engine", daemon=True)
        self.steps = 0
        self._beside: PrefillBeside | None = None  # see `host_prefill`
        self.batch_tokens = 0
        self.mixed_steps = 0  # steps that ran a prefill call beside them
        self.prefill_calls_alone = 0  # prefill calls run with no slot decoding

    # Called from other threads ------------------------------------------------------------

    def host_prefill(self, beside: PrefillBeside, batch_tokens: int) -> None:
        """Before `start`: run `beside`'s prefill calls on this thread, each one mixed
        into a decode step while any slot decodes (shared/engine/mixed.py), its rows
        fitted to `batch_tokens` (0: the slots plus one chunk; `chunk_rows_beside`); alone
        while none does."""
        self._beside = beside
        self.batch_tokens = batch_tokens or (self._engine.config.max_slots + beside.device.chunk)

    def start(self) -> None:
        self._batch = DecodeBatch(self._engine, self.pages)
        self._publish_pages()
        self._thread.start()

    def reserve(
        self,
        request_id: str,
        limits: GenerationLimits,
        ttl_s: float,
        deadline: float | None,
        prompt_length: int,
        logprobs: int | None = None,
    ) -> Lease:
        """Lease a free slot and promise the pages of the prompt and its first token
        (SlotsExhaustedError / PagesExhaustedError when either is short: nothing is held);
        wakes the loop so that it watches the new lease's expiry. `logprobs`: stream each
        token's logprob and this many alternatives (None: none)."""
        lease = self._table.reserve(request_id, limits, ttl_s, deadline)
        lease.logprobs = logprobs
        try:
            self.pages.reserve(lease.lease_id, prompt_length + 1)
        except PagesExhaustedError:
            self._table.free(lease.lease_id)
            self._metrics.page_allocation_failures.labels("admission").inc()
            raise
        lease.prompt_length = prompt_length
        with self._cond:
            self._cond.notify()
        return lease

    def submit(self, lease_id: str, prefix: Prefix) -> None:
        """Hand over a validated prefix for a RESERVED lease (which becomes FILLING)."""
        self._table.advance(lease_id, SlotState.RESERVED, SlotState.FILLING)
        with self._cond:
            self._arrivals.append((lease_id, prefix))
            self._cond.notify()

    def finish(self, lease_id: str, reason: DecodeFinish, detail: str = "") -> None:
        """End a lease at the next step boundary (cancel, deadline, rejected KV). Idempotent."""
        with self._cond:
            self._finishes.setdefault(lease_id, (reason, detail))
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._arrivals)

    # The engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._wait_for_work():
                self._expire(time.monotonic())
                self._apply_finishes()
                self._insert_arrivals()
                planned = self._plan_prefill()
                if self._live:
                    self._step(planned)
                elif planned is not None:
                    self._beside.run_alone(planned)  # type: ignore[union-attr]
                    self.prefill_calls_alone += 1
                self._flush()
        except BaseException as err:  # any death must be loud and visible, never silent
            log.exception("decode engine thread died")
            self._fail_everything(f"decode engine thread died: {err!r}")
            self._on_fatal(err)
        finally:
            if self._beside is not None:
                self._beside.fail_all()

    def _plan_prefill(self) -> PlannedChunks | None:
        """The prefill call this iteration runs (beside the step, or alone), if any."""
        beside = self._beside
        if beside is None or not beside.poll():
            return None
        device = beside.device
        rows = (
            chunk_rows_beside(self.batch_tokens, len(self._live), device.chunk, device.max_rows)
            if self._live
            else device.max_rows
        )
        return beside.plan(rows)

    def _wait_for_work(self) -> bool:
        """Block while idle; False once stopping."""
        beside = self._beside
        with self._cond:
            while not (
                self._stopping
                or self._live
                or self._arrivals
                or self._finishes
                or (beside is not None and beside.has_work)
            ):
                if self._table.leases():
                    # Waiting leases may expire: wake up to check; `reserve` notifies.
                    self._cond.wait(IDLE_WAKEUP_S)
                    return True
                self._cond.wait()
            return not self._stopping

    def wake(self) -> None:
        """Wake the engine thread (new prefill work beside it); any thread."""
        with self._cond:
            self._cond.notify()

    def _expire(self, now: float) -> None:
        for lease in self._table.expired(now):
            reason = (
                DecodeFinish.DEADLINE
                if lease.deadline is not None and now >= lease.deadline
                else DecodeFinish.LEASE_EXPIRED
            )
            self.finish(lease.lease_id, reason)

    def _apply_finishes(self) -> None:
        with self._cond:
            finishes, self._finishes = self._finishes, {}
            # A cancelled lease's prefix must never be inserted.
            self._arrivals = [(lid, p) for lid, p in self._arrivals if lid not in finishes]
        for lease_id, (reason, detail) in finishes.items():
            lease = self._table.free(lease_id)
            if lease is None:
                continue  # already finished
            self._free_kv(lease)
            self._close(lease, (), reason, detail)

    def _insert_arrivals(self) -> None:
        with self._cond:
            arrivals, self._arrivals = self._arrivals, []
        if not arrivals:
            return
        leases = [
            self._table.advance(lid, SlotState.FILLING, SlotState.DECODING) for lid, _ in arrivals
        ]
        prefixes = [prefix for _, prefix in arrivals]
        batch = self._batch
        assert batch is not None
        try:
            batch.insert(
                prefixes,
                [lease.slot for lease in leases],
                [lease.lease_id for lease in leases],
                [lease.logprobs for lease in leases],
            )
        except PagesExhaustedError as err:
            # The promise covered the prompt the orchestrator announced; a longer KV
            # (a misbehaving sender) is refused, its slot freed.
            for lease in leases:
                self._table.free(lease.lease_id)
                self.pages.unreserve(lease.lease_id)
                self._close(lease, (), DecodeFinish.ERROR, f"KV larger than reserved: {err}")
            return
        for lease, prefix in zip(leases, prefixes, strict=True):
            lease.generated = 1  # the prefill's first token, already sent by the prefill side
            lease.prompt_length = prefix.true_length
            self._live[lease.slot] = lease
            reason = self._finish_reason(lease, prefix.first_token)
            if reason is not None:
                self._retire(lease, (), reason)

    def _step(self, planned: PlannedChunks | None = None) -> None:
        batch = self._batch
        assert batch is not None
        start = time.perf_counter()
        if planned is None:
            tokens, preempted = batch.step(self._params)
        else:
            assert self._beside is not None
            tokens, preempted, out = batch.step_beside(
                self._params, self._beside.device, planned.packed
            )
            self._beside.complete(planned, out)
            self.mixed_steps += 1
        self._metrics.decode_step_seconds.observe(time.perf_counter() - start)
        self._metrics.batch_occupancy.observe(len(tokens) / self._table.total)
        self.steps += 1
        for slot in preempted:
            lease = self._live.pop(slot)
            self._table.free(lease.lease_id)
            self._metrics.preemptions.inc()
            self._metrics.page_allocation_failures.labels("growth").inc()
            self._close(lease, (), DecodeFinish.PREEMPTED, "KV page pool ran dry")
        for slot, token in tokens.items():
            lease = self._live[slot]
            lease.generated += 1
            reason = self._finish_reason(lease, token)
            streamed = () if reason is DecodeFinish.STOP else (token,)
            # A stop token is not streamed, nor is its logprob.
            logprob = batch.last_logprobs.get(slot) if streamed else None
            logprobs = () if logprob is None else (logprob,)
            if reason is None:
                self._metrics.tokens_generated.inc()
                self._outbox.append((lease.lease_id, TokenBatch(streamed, logprobs=logprobs)))
            else:
                self._retire(lease, streamed, reason, logprobs)
        self._publish_pages()

    def _finish_reason(self, lease: Lease, token: int) -> DecodeFinish | None:
        limits = lease.limits
        if token in limits.stop_token_ids or (limits.stop_on_eos and token == self._eos):
            return DecodeFinish.STOP
        if lease.generated >= limits.max_tokens:
            return DecodeFinish.LENGTH
        # The next step would write past the end of the slot's cache.
        if lease.prompt_length + lease.generated - 1 >= self._engine.config.max_seq_len:
            return DecodeFinish.LENGTH
        return None

    def _retire(
        self,
        lease: Lease,
        tokens: tuple[int, ...],
        reason: DecodeFinish,
        logprobs: tuple[TokenLogprob, ...] = (),
    ) -> None:
        """A live lease finished on its own: free the slot and close its stream."""
        self._free_kv(lease)
        self._table.free(lease.lease_id)
        self._metrics.tokens_generated.inc(len(tokens))
        self._close(lease, tokens, reason, "", logprobs)

    def _free_kv(self, lease: Lease) -> None:
        """Whatever ended the lease: its pages (if inserted) or its page promise go back."""
        if self._live.get(lease.slot) is lease:
            del self._live[lease.slot]
            assert self._batch is not None
            self._batch.release(lease.slot)
        self.pages.unreserve(lease.lease_id)

    def _publish_pages(self) -> None:
        counts = self.pages.counts()
        self._metrics.kv_pages_total.set(counts.total)
        self._metrics.kv_pages.labels("free").set(counts.free - counts.reserved)
        self._metrics.kv_pages.labels("used").set(counts.used)
        self._metrics.kv_pages.labels("reserved").set(counts.reserved)

    def _close(
        self,
        lease: Lease,
        tokens: tuple[int, ...],
        reason: DecodeFinish,
        detail: str,
        logprobs: tuple[TokenLogprob, ...] = (),
    ) -> None:
        self._metrics.finished(reason.name.lower())
        self._outbox.append((lease.lease_id, TokenBatch(tokens, reason, detail, logprobs)))

    def _fail_everything(self, detail: str) -> None:
        for lease in self._table.leases():
            if self._table.free(lease.lease_id) is not None:
                self.pages.release(lease.slot)
                self.pages.unreserve(lease.lease_id)
                self._outbox.append((lease.lease_id, TokenBatch((), DecodeFinish.ERROR, detail)))
        self._flush()

    def _flush(self) -> None:
        """Hand this iteration's tokens and finishes over in one call (one wake-up of the
        event loop per step, not one per slot)."""
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            self._emit(outbox)

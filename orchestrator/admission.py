"""The admission queue: requests wait here, in arrival order, for a decode slot.

Invariant: no prefill starts before its request holds a decode lease, so KV never waits
without a home. The queue is bounded (full: `QueueFullError` -> RESOURCE_EXHAUSTED with
the depth); one dispatcher task places the head of the queue on the decode worker the
policy ranks first, and waits for capacity (a release, a load report) when none has room.

Only requests that some worker could hold wait: one larger (prompt + max_tokens) than
every healthy decode worker's max_seq_len or whole KV pool, as their load reports say,
would wait for room that never comes, so it is refused (`RequestTooLarge` ->
INVALID_ARGUMENT naming the limits) when it arrives, and a waiting one is refused as soon
as the workers that could hold it are gone. A request that fits an idle worker but not a
busy one waits; with no decode worker up, placement fails as before (`NoWorkersError`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging

from orchestrator.placement import PlacementPolicy
from orchestrator.registry import Worker, WorkerRegistry, WorkerRole
from shared.metrics import OrchestratorMetrics
from shared.transport.types import Lease, ReserveRequest, StatusCode, TransportError

log = logging.getLogger(__name__)

IDLE_RECHECK_S = 0.25  # re-rank even without an event (another replica freed slots)


class QueueFullError(Exception):
    def __init__(self, depth: int) -> None:
        super().__init__(
            f"admission queue is full ({depth} requests waiting for a decode slot); retry later"
        )
        self.depth = depth


class NoWorkersError(Exception):
    """No healthy worker of a role is left."""


class RequestTooLarge(Exception):
    """No healthy decode worker could ever hold the request, even idle; the message names
    the request's size and the largest limits."""


@dataclasses.dataclass(eq=False)
class _Waiter:
    request: ReserveRequest
    future: asyncio.Future[tuple[Worker, Lease]]


class SlotBroker:
    def __init__(
        self,
        registry: WorkerRegistry,
        policy: PlacementPolicy,
        metrics: OrchestratorMetrics,
        max_queue: int,
    ) -> None:
        self._registry, self._policy, self._metrics = registry, policy, metrics
        self._max_queue = max_queue
        self._waiting: collections.deque[_Waiter] = collections.deque()
        self._kick = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._refreshing: set[str] = set()  # workers whose load we re-read now
        self._background: set[asyncio.Task] = set()

    @property
    def depth(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._task = asyncio.create_task(self._dispatch())

    async def stop(self) -> None:
        for task in [self._task, *self._background]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def acquire(
        self, request: ReserveRequest, *, first: bool = False
    ) -> tuple[Worker, Lease]:
        """Wait in line for a lease; `first` (a preempted request resuming) goes to the head
        of the line, so that preemption does not cost it its turn. Cancelling the caller
        leaves the line (and releases a lease that was granted at that very moment)."""
        refusal = self._too_large(request)
        if refusal is not None:
            raise refusal
        if len(self._waiting) >= self._max_queue and not first:
            raise QueueFullError(len(self._waiting))
        waiter = _Waiter(request, asyncio.get_running_loop().create_future())
        if first:
            self._waiting.appendleft(waiter)
        else:
            self._waiting.append(waiter)
        self._metrics.queue_depth.set(len(self._waiting))
        self._kick.set()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                worker, lease = waiter.future.result()
                asyncio.get_running_loop().create_task(self._give_back(worker, lease))
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)
            self._metrics.queue_depth.set(len(self._waiting))

    def release(self, worker: Worker) -> None:
        """A lease on `worker` ended (its request finished or moved)."""
        worker.leases = max(0, worker.leases - 1)
        worker.released_since_report = True
        self._kick.set()

    def _too_large(self, request: ReserveRequest) -> RequestTooLarge | None:
        """The refusal for a request no healthy decode worker could ever hold; None when
        one could (or none is up: placement says so)."""
        workers = self._registry.up(WorkerRole.DECODE)
        positions = request.prompt_length + request.limits.max_tokens
        if not workers or any(w.could_ever_hold(positions) for w in workers):
            return None
        return RequestTooLarge(
            f"no healthy decode worker can hold prompt_tokens ({request.prompt_length}) + "
            f"max_tokens ({request.limits.max_tokens}) = {positions} tokens: "
            f"{_limits(workers, positions)}; shorten the prompt or lower max_tokens"
        )

    def _refuse_too_large(self) -> None:
        """Refuse every waiting request that no worker left up could hold (the workers
        that could were ejected or went away while it waited)."""
        for waiter in list(self._waiting):
            if waiter.future.done():
                continue
            refusal = self._too_large(waiter.request)
            if refusal is not None:
                waiter.future.set_exception(refusal)

    def _refresh_stale(self) -> None:
        """Nothing fits: re-read the load of every decode worker whose page estimate is
        stale (leases released, or pages promised, since its last report), so that pages
        freed since are seen now, not at its next health check (2 s by default)."""
        for worker in self._registry.up(WorkerRole.DECODE):
            stale = worker.released_since_report or worker.pending_pages > 0
            if stale and worker.address not in self._refreshing:
                self._refreshing.add(worker.address)
                task = asyncio.get_running_loop().create_task(self._refresh(worker))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _refresh(self, worker: Worker) -> None:
        try:
            await self._registry.refresh_load(worker)
        finally:
            self._refreshing.discard(worker.address)
            self._kick.set()

    async def _give_back(self, worker: Worker, lease: Lease) -> None:
        with contextlib.suppress(TransportError):
            await worker.decode.cancel(lease.lease_id)
        self.release(worker)

    # The dispatcher ------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for returns the inner
            # result when a cancel arrives just as the inner await finishes, losing the
            # cancel, and this loop then ran on and stop() waited for it forever (seen when
            # a request's release kicked the loop as the orchestrator stopped).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_RECHECK_S):
                    await self._wait_event()
            self._kick.clear()
            self._registry.changed.clear()
            self._refuse_too_large()
            while self._waiting:
                head = self._waiting[0]
                if head.future.done():
                    self._waiting.popleft()
                    continue
                try:
                    placed = await self._place(head.request)
                except (TransportError, NoWorkersError) as err:
                    if not head.future.done():
                        head.future.set_exception(err)
                    continue
                if placed is None:
                    self._refresh_stale()
                    break  # no room anywhere: wait for a release or a load report
                if head.future.done():  # the caller left while we reserved
                    await self._give_back(*placed)
                else:
                    head.future.set_result(placed)

    async def _wait_event(self) -> None:
        kick = asyncio.ensure_future(self._kick.wait())
        changed = asyncio.ensure_future(self._registry.changed.wait())
        try:
            await asyncio.wait({kick, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            kick.cancel()
            changed.cancel()

    async def _place(self, request: ReserveRequest) -> tuple[Worker, Lease] | None:
        """Reserve on the best decode worker with room; None when none has room."""
        candidates = self._registry.up(WorkerRole.DECODE)
        if not candidates:
            raise NoWorkersError("no healthy decode worker is left")
        # Never one too small for it even when idle: its Reserve would refuse the request
        # (INVALID_ARGUMENT) though a larger worker can hold it.
        positions = request.prompt_length + request.limits.max_tokens
        roomy = [w for w in candidates if w.could_ever_hold(positions)]
        for worker in self._policy.rank_decode(roomy, request.prompt_length):
            worker.granted(request.prompt_length)  # counted now: placement runs ahead
            try:
                return worker, await worker.decode.reserve(request)
            except TransportError as err:
                worker.leases -= 1
                if err.code is StatusCode.RESOURCE_EXHAUSTED:
                    worker.mark_full()
                elif err.code in (StatusCode.INVALID_ARGUMENT, StatusCode.FAILED_PRECONDITION):
                    raise  # this request cannot fit any slot of this shape
                else:
                    self._registry.eject(worker, f"Reserve failed: {err}")
        return None


def _limits(workers: list[Worker], positions: int) -> str:
    """Which limits `positions` exceeds: the largest max_seq_len's, the largest KV pool's
    (in the decode worker's own words for the first)."""
    # By address: of equally large workers, the message names the same one every time.
    loads = sorted((w.address, w.load) for w in workers if w.load is not None)
    clauses = []
    seq = [(address, load) for address, load in loads if load.max_seq_len]
    if seq:
        address, load = max(seq, key=lambda item: item[1].max_seq_len)
        if positions > load.max_seq_len:
            clauses.append(
                f"the one with the largest max_seq_len, {address}: {positions} exceeds this "
                f"worker's max_seq_len ({load.max_seq_len})"
            )
    pools = [(address, load) for address, load in loads if load.total_pages]
    if pools:
        address, load = max(pools, key=lambda item: item[1].total_pages * item[1].page_size)
        tokens = load.total_pages * load.page_size
        if positions > tokens:
            clauses.append(
                f"the one with the largest KV pool, {address}: {positions} exceeds its whole "
                f"pool ({load.total_pages} pages of {load.page_size} = {tokens} tokens)"
            )
    return "; ".join(clauses) or "none has both the max_seq_len and the KV pool for it"

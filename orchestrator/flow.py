"""One Generate request's journey through the workers.

1. Admission: the request waits in the `SlotBroker` queue until a decode worker grants a
   lease (its slot is held before any prefill starts).
2. The decode worker's token stream for the lease is opened, then a prefill worker is asked
   to prefill toward that decode worker and lease (a colocated worker prefills for itself).
3. The first token comes back from the prefill call and is yielded at once; the rest come
   from the decode stream, until a finish. A request that asked for logprobs gets each
   token's from the same place as the token (the prefill answer, the decode stream).
4. Failures move the request, exactly:
   * prefill worker failed before answering -> another prefill worker, with a fresh lease
     (bounded by `prefill_retries`);
   * decode worker failed (stream broke, worker died, KV lost) -> resume on another decode
     worker by prefilling prompt + every token already yielded (bounded by
     `decode_retries`). Sampling randomness depends only on (seed, position), so the
     resumed stream continues the very same sequence, greedy or seeded.
5. Whatever ends the request (finish, cancel, deadline, error), its lease is released and,
   if it did not finish on its own, cancelled on the decode worker, and its prefill
   dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator

from orchestrator.admission import NoWorkersError, RequestTooLarge, SlotBroker
from orchestrator.placement import PlacementPolicy, PrefillRoute
from orchestrator.registry import Worker, WorkerRegistry, WorkerRole
from shared.logprobs import TokenLogprob
from shared.metrics import OrchestratorMetrics
from shared.sampling_params import SamplingParams
from shared.transport.types import (
    DecodeFinish,
    GenerationLimits,
    Lease,
    PrefillRequest,
    PrefillResult,
    ReserveRequest,
    StatusCode,
    TokenBatch,
    TransportError,
)

log = logging.getLogger(__name__)


PREFILL_CALL_TIMEOUT_S = 120.0  # without a request deadline


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"


@dataclasses.dataclass(slots=True, frozen=True)
class GenerateJob:
    """A validated request, in token ids."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams
    stop_token_ids: tuple[int, ...]
    stop_on_eos: bool
    deadline: float | None  # unix time; None: no deadline
    # None: no logprobs; N: each token's logprob and the N likeliest tokens at its position.
    logprobs: int | None = None
    # The id workers know this call by (reserve, prefill, cancel): unique per call, never the
    # client's request_id, so that two clients choosing the same id cannot cancel or block
    # each other's work.
    worker_key: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)


@dataclasses.dataclass(slots=True, frozen=True)
class Delta:
    token_ids: tuple[int, ...]
    finish: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the job asked


class RequestFailed(Exception):
    """The request cannot go on; `code` is the status the frontend gets."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _DecodeLost(Exception):
    """The decode side failed; the request can resume elsewhere."""


class _Preempted(Exception):
    """The decode worker ran out of KV pages and took the request's slot back: resume it
    (not a failure; bounded by `max_preemptions` so a request cannot bounce forever)."""


class _PrefillLost(Exception):
    """The prefill side failed before answering; retry with a fresh lease."""


_DECODE_FINISH = {
    DecodeFinish.STOP: FinishReason.STOP,
    DecodeFinish.LENGTH: FinishReason.LENGTH,
    DecodeFinish.DEADLINE: FinishReason.DEADLINE,
}


@dataclasses.dataclass(slots=True)
class _Held:
    """One attempt's decode lease, and what must be undone when it ends."""

    worker: Worker
    lease: Lease
    prefill: Worker | None = None  # the prefill worker asked, once one is
    done: bool = False  # the lease finished on the decode worker: nothing to cancel there


@dataclasses.dataclass(slots=True)
class FlowSettings:
    eos_id: int | None
    lease_ttl_s: float
    prefill_retries: int
    decode_retries: int
    max_preemptions: int = 16


class GenerateFlow:
    def __init__(
        self,
        registry: WorkerRegistry,
        broker: SlotBroker,
        policy: PlacementPolicy,
        metrics: OrchestratorMetrics,
        settings: FlowSettings,
    ) -> None:
        self._registry, self._broker, self._policy = registry, broker, policy
        self._metrics, self._settings = metrics, settings
        self._background: set[asyncio.Task] = set()

    async def run(self, job: GenerateJob) -> AsyncIterator[Delta]:
        """Deltas of generated tokens; the last one has `finish` set. Raises
        RequestFailed, QueueFullError."""
        generated: list[int] = []
        prefill_tries = decode_resumes = preemptions = 0
        while True:
            try:
                # aclosing: when our caller stops early, the attempt's cleanup (release the
                # lease, cancel on the workers) runs now, not whenever the GC finalizes it.
                attempt = self._attempt(job, generated, resuming=preemptions > 0)
                async with contextlib.aclosing(attempt) as deltas:
                    async for delta in deltas:
                        generated.extend(delta.token_ids)
                        yield delta
                return
            except _PrefillLost as err:
                prefill_tries += 1
                if prefill_tries > self._settings.prefill_retries:
                    raise RequestFailed(
                        StatusCode.UNAVAILABLE,
                        f"prefill failed on {prefill_tries} workers; last: {err}",
                    ) from None
                self._metrics.retries.labels("prefill").inc()
            except _Preempted as err:
                preemptions += 1
                if preemptions > self._settings.max_preemptions:
                    raise RequestFailed(
                        StatusCode.UNAVAILABLE,
                        f"preempted {preemptions} times after {len(generated)} tokens: the "
                        f"decode workers' KV pools are too full; last: {err}",
                    ) from None
                self._metrics.retries.labels("preempted").inc()
                log.info(
                    "request %s: preempted after %d tokens, resuming: %s",
                    job.request_id,
                    len(generated),
                    err,
                )
            except _DecodeLost as err:
                decode_resumes += 1
                if decode_resumes > self._settings.decode_retries:
                    raise RequestFailed(
                        StatusCode.UNAVAILABLE,
                        f"decode failed {decode_resumes} times after {len(generated)} tokens; "
                        f"no worker left to resume on; last: {err}",
                    ) from None
                self._metrics.retries.labels("decode_resume").inc()
                log.warning(
                    "request %s: resuming after %d tokens: %s", job.request_id, len(generated), err
                )
            except NoWorkersError as err:
                raise RequestFailed(StatusCode.UNAVAILABLE, str(err)) from None

    async def _attempt(
        self, job: GenerateJob, generated: list[int], *, resuming: bool = False
    ) -> AsyncIterator[Delta]:
        """One try on one decode lease: the first token from a prefill, the rest from the
        decode stream. Raises _PrefillLost, _DecodeLost, _Preempted for `run` to retry."""
        prompt = job.prompt_ids + tuple(generated)
        held = await self._lease(job, prompt, generated, resuming)
        tokens: asyncio.Queue[TokenBatch | BaseException] = asyncio.Queue()
        broken = asyncio.Event()  # the decode stream failed
        reader = asyncio.create_task(self._read(held.worker, held.lease, tokens, broken))
        try:
            first = await self._first_delta(job, prompt, held, broken)
            yield first
            if first.finish is not None:
                return
            async with contextlib.aclosing(self._decoded(job, held, tokens)) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            reader.cancel()
            self._cleanup(job, held.worker, held.lease, held.prefill, cancel=not held.done)

    async def _lease(
        self, job: GenerateJob, prompt: tuple[int, ...], generated: list[int], resuming: bool
    ) -> _Held:
        """Wait in the admission queue for a decode lease for `prompt` and what is left of
        the job's tokens; a request no slot can take fails (RequestFailed)."""
        limits = GenerationLimits(
            job.max_tokens - len(generated), job.stop_token_ids, job.stop_on_eos
        )
        reserve = ReserveRequest(
            job.worker_key,
            len(prompt),
            limits,
            self._settings.lease_ttl_s,
            job.deadline,
            job.logprobs,
        )
        queued = time.perf_counter()
        try:
            worker, lease = await self._broker.acquire(reserve, first=resuming)
        except TransportError as err:  # this request cannot fit any decode slot
            raise RequestFailed(err.code, err.message) from None
        except RequestTooLarge as err:
            # A new request is the caller's to shrink; one under way was admitted, and only
            # lost the workers that could hold it.
            code = StatusCode.UNAVAILABLE if generated else StatusCode.INVALID_ARGUMENT
            raise RequestFailed(code, str(err)) from None
        if not generated:
            self._metrics.queue_seconds.observe(time.perf_counter() - queued)
        return _Held(worker, lease)

    async def _first_delta(
        self, job: GenerateJob, prompt: tuple[int, ...], held: _Held, broken: asyncio.Event
    ) -> Delta:
        """Prefill toward the lease: the first token's delta (a STOP finish when the first
        token ends the request)."""
        route = self._prefill_route(held.worker, prompt)
        held.prefill = route.worker
        result = await self._prefill_unless_broken(
            job, prompt, route.worker, held.worker, held.lease, broken
        )
        self._prefilled(route, result)
        first = result.first_token
        if first in job.stop_token_ids or (job.stop_on_eos and first == self._settings.eos_id):
            return Delta((), FinishReason.STOP)
        first_logprob = () if result.first_logprob is None else (result.first_logprob,)
        return self._delta(job, route.worker, (first,), first_logprob)

    async def _decoded(
        self, job: GenerateJob, held: _Held, tokens: asyncio.Queue[TokenBatch | BaseException]
    ) -> AsyncIterator[Delta]:
        """The decode stream's deltas, to its finish; a finish that is no answer (ERROR,
        LEASE_EXPIRED, CANCELLED, PREEMPTED) or a broken stream raises for a retry."""
        worker = held.worker
        while True:
            item = await tokens.get()
            if isinstance(item, BaseException):
                self._registry.eject(worker, f"token stream failed: {item}")
                raise _DecodeLost(f"{worker.address}: {item}")
            if item.finish is None:
                yield self._delta(job, worker, item.token_ids, item.logprobs)
                continue
            held.done = True
            if item.finish is DecodeFinish.PREEMPTED:
                if item.token_ids:
                    yield self._delta(job, worker, item.token_ids, item.logprobs)
                raise _Preempted(f"{worker.address}: {item.detail}")
            if item.finish not in _DECODE_FINISH:  # ERROR, LEASE_EXPIRED, CANCELLED
                raise _DecodeLost(
                    f"{worker.address} ended the lease: {item.finish.name} {item.detail}".strip()
                )
            finish = _DECODE_FINISH[item.finish]
            yield self._delta(job, worker, item.token_ids, item.logprobs, finish)
            return

    @staticmethod
    def _delta(
        job: GenerateJob,
        worker: Worker,
        token_ids: tuple[int, ...],
        logprobs: tuple[TokenLogprob, ...],
        finish: FinishReason | None = None,
    ) -> Delta:
        """A delta; when the job asked for logprobs, exactly one per token, or the request
        fails loudly (a worker that predates logprobs ignores the field and sends none)."""
        if job.logprobs is None:
            return Delta(token_ids, finish)
        if len(logprobs) != len(token_ids):
            raise RequestFailed(
                StatusCode.FAILED_PRECONDITION,
                f"worker {worker.address} sent {len(token_ids)} tokens with {len(logprobs)} "
                "logprobs: it does not support logprobs (an older version?)",
            )
        return Delta(token_ids, finish, logprobs)

    async def _read(
        self, worker: Worker, lease: Lease, out: asyncio.Queue, broken: asyncio.Event
    ) -> None:
        try:
            async for batch in worker.decode.stream_tokens(lease.lease_id):
                out.put_nowait(batch)
        except TransportError as err:
            out.put_nowait(err)
            broken.set()

    async def _prefill_unless_broken(
        self,
        job: GenerateJob,
        prompt: tuple[int, ...],
        prefill: Worker,
        decode: Worker,
        lease: Lease,
        broken: asyncio.Event,
    ) -> PrefillResult:
        """`_prefill`, abandoned as soon as the decode worker's stream breaks: the KV push
        waits for its connection to the decode worker (which may be reconnecting after a
        restart), so a decode worker that died meanwhile must not hold the request until
        the push's deadline. Raises _DecodeLost then."""
        call = asyncio.ensure_future(self._prefill(job, prompt, prefill, decode, lease))
        watch = asyncio.ensure_future(broken.wait())
        try:
            await asyncio.wait({call, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not call.done():  # the stream broke first (or we were cancelled)
                call.cancel()
            # Always collect the call's outcome: when this task is cancelled just as the
            # call ends with an error (the request's deadline), nobody else would read it.
            await asyncio.gather(call, return_exceptions=True)
        if call.cancelled():
            self._registry.eject(decode, "token stream failed during the prefill")
            raise _DecodeLost(f"{decode.address}: the token stream failed during the prefill")
        return call.result()

    def _prefill_route(self, decode: Worker, prompt: tuple[int, ...]) -> PrefillRoute:
        if WorkerRole.PREFILL in decode.roles:
            return PrefillRoute(decode)  # colocated: it prefills for its own slots only
        # A colocated worker pushes KV only into itself: never pair it with another.
        pure = [w for w in self._registry.up(WorkerRole.PREFILL) if len(w.roles) == 1]
        # A worker that is not up (ejected, failing checks, gone from DNS) may come back
        # restarted, with an empty cache: the policy forgets what it knew of it.
        self._policy.retain(pure)
        ranked = self._policy.rank_prefill(pure, prompt)
        if not ranked:
            raise NoWorkersError("no healthy prefill worker is left")
        route = ranked[0]
        self._metrics.prefill_routing.labels(route.outcome.value).inc()
        self._metrics.prefix_predicted_tokens.inc(route.predicted_tokens)
        return route

    def _prefilled(self, route: PrefillRoute, result: PrefillResult) -> None:
        """The prefill succeeded: the policy learns what the worker now holds."""
        self._metrics.prefix_cached_tokens.inc(max(0, result.timings.cached_tokens))
        if WorkerRole.DECODE not in route.worker.roles:  # colocated: chosen for its slots
            self._policy.prefilled(route, result)

    async def _prefill(
        self,
        job: GenerateJob,
        prompt: tuple[int, ...],
        prefill: Worker,
        decode: Worker,
        lease: Lease,
    ) -> PrefillResult:
        """The first token (and its logprob), from `prefill`, which pushed the KV to
        `decode`."""
        request = PrefillRequest(
            job.worker_key,
            prompt,
            job.sampling,
            decode.address,
            lease.lease_id,
            job.deadline,
            resume=len(prompt) > len(job.prompt_ids),
            logprobs=job.logprobs,
        )
        # The call covers queueing behind other prompts, the prefill and the KV push.
        timeout = PREFILL_CALL_TIMEOUT_S
        if job.deadline is not None:
            timeout = max(0.01, job.deadline - time.time())
        prefill.outstanding += 1
        try:
            return await prefill.prefill.prefill(request, timeout=timeout)
        except TransportError as err:
            await self._blame(job, err, prefill, decode)
            raise AssertionError("unreachable") from None
        finally:
            prefill.outstanding -= 1

    async def _blame(
        self, job: GenerateJob, err: TransportError, prefill: Worker, decode: Worker
    ) -> None:
        """Turn a failed prefill into the right next step; always raises."""
        if err.code is StatusCode.INVALID_ARGUMENT:
            raise RequestFailed(err.code, err.message)
        if err.code is StatusCode.DEADLINE_EXCEEDED:
            if job.deadline is not None and time.time() >= job.deadline:
                raise TimeoutError(err.message)  # the request's own deadline
            # Only the call's timeout: that prefill worker is stuck; try another.
            self._registry.eject(prefill, f"prefill timed out: {err}")
            raise _PrefillLost(f"{prefill.address}: {err}")
        # UNAVAILABLE may be the prefill worker's own death or the decode worker's status
        # relayed from the KV push: ask both which one is still alive.
        decode_ok, prefill_ok = await asyncio.gather(
            self._registry.check(decode), self._registry.check(prefill)
        )
        if not decode_ok:
            self._registry.eject(decode, f"KV push failed: {err}")
            raise _DecodeLost(f"{decode.address}: {err}")
        if not prefill_ok:
            self._registry.eject(prefill, f"prefill failed: {err}")
        raise _PrefillLost(f"{prefill.address}: {err}")

    def _cleanup(
        self, job: GenerateJob, worker: Worker, lease: Lease, prefill: Worker | None, cancel: bool
    ) -> None:
        """Release the lease; if the request did not finish there, cancel it on the
        workers. Runs in a background task: the request's own task may be cancelled."""

        async def run() -> None:
            if cancel:
                # Both idempotent; a cancelled gRPC call already reached the prefill worker,
                # the explicit cancel covers the fake transport and a lost cancellation.
                with contextlib.suppress(TransportError):
                    await worker.decode.cancel(lease.lease_id)
                if prefill is not None:
                    with contextlib.suppress(TransportError):
                        await prefill.prefill.cancel(job.worker_key)
            self._broker.release(worker)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

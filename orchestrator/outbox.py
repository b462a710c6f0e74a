"""A stream's output runs ahead of its client, at most `max_unsent_tokens` ahead.

The invariant: a client that reads slowly, or not at all, never holds a decode slot
hostage and never grows the orchestrator's memory without bound. The request's deltas are
pulled by a pump task as fast as the decode worker makes them (so the decode stream never
backs up) into this outbox; the frontend takes them out as fast as gRPC accepts responses
(its HTTP/2 flow-control window). When the unsent tokens pass the limit, the pump stops
and closes the flow, which cancels the lease on the decode worker (its slot is freed at
the next step boundary) and releases it here; the frontend then ends the call with
RESOURCE_EXHAUSTED, once gRPC lets it write again.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

from orchestrator.flow import Delta, RequestFailed
from shared.transport.types import StatusCode


class ConsumerTooSlow(RequestFailed):
    def __init__(self, unsent: int, limit: int) -> None:
        super().__init__(
            StatusCode.RESOURCE_EXHAUSTED,
            f"the client fell too far behind: {unsent} generated tokens were waiting to be "
            f"sent (the limit is {limit}); the request was cancelled and its slot freed",
        )


class Outbox:
    """`async with Outbox(deltas, limit) as outbox: delta = await outbox.get()`."""

    def __init__(self, source: AsyncIterator[Delta], max_unsent_tokens: int) -> None:
        self._source, self._limit = source, max_unsent_tokens
        self._items: collections.deque[Delta] = collections.deque()
        self._unsent = 0
        self._ready = asyncio.Event()
        self._done = False
        self._error: BaseException | None = None
        self._pump: asyncio.Task | None = None

    async def __aenter__(self) -> Outbox:
        self._pump = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop the pump; the source's cleanup (cancel the lease, release it) runs now."""
        assert self._pump is not None
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)

    async def get(self) -> Delta | None:
        """The next delta; None at the end. Raises what the source raised, or
        ConsumerTooSlow once the caller fell too far behind."""
        while True:
            if isinstance(self._error, ConsumerTooSlow):
                raise self._error  # what is still buffered is dropped: the request is over
            if self._items:
                delta = self._items.popleft()
                self._unsent -= len(delta.token_ids)
                return delta
            if self._done:
                if self._error is not None:
                    raise self._error
                return None
            self._ready.clear()
            await self._ready.wait()

    async def _run(self) -> None:
        try:
            async for delta in self._source:
                self._items.append(delta)
                self._unsent += len(delta.token_ids)
                self._ready.set()
                if self._unsent > self._limit:
                    self._error = ConsumerTooSlow(self._unsent, self._limit)
                    break
        except Exception as err:  # handed to the consumer; cancellation passes
            self._error = err
        finally:
            # Close the source here, in this task: its cleanup cancels the lease at once,
            # not when the garbage collector finds the generator.
            await self._source.aclose()  # type: ignore[attr-defined]
            self._done = True
            self._ready.set()

"""Which prompts' chunks the prefill engine runs next: the policy, on the host.

Every call runs up to `max_rows` rows, one chunk of one prompt per row. The rows go to the
prompts with the fewest tokens left to compute (shortest remaining first), so a short
prompt queued behind a 4k-token one gets its first token after one call, not after the
long prompt's whole prefill; a prompt that has waited longer than `aging_s` since it
arrived goes first whatever its length (oldest first), so a stream of short prompts can
never starve a long one. Ties go to the earlier arrival.

A call costs up to its longest row's context (the attention loop runs that far for every
row), so beside a prompt that finishes in the call, rows reaching past twice its length
(or twice a chunk) wait for the next call, unless aged: a short prompt packed with a
4k-token prompt's late chunks would otherwise pay for their whole context.

A prompt whose beginning (whole blocks beyond what the cache holds) is being computed by
a prefill already started waits for it (unless aged): the blocks are published to the
cache as each chunk completes them, so a burst of prompts sharing a system prompt computes
it once, not once per prompt packed into the same call.

A prompt gets all its pages when it is first scheduled (PrefixPagePool.acquire: the
cached prefix it reuses and fresh pages for the rest), so a started prompt always
finishes; one that finds no pages waits, and the prompts already started finish and free
theirs. Single-threaded: the prefill engine thread owns it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from shared.kv.pages import PagesExhaustedError
from shared.kv.prefix_cache import Lookup, PrefixPagePool

# Beside a prompt that finishes in a call, rows that attend to more than this many times
# its length (or a chunk) wait for the next call.
LONG_ROW_REACH = 2


@dataclasses.dataclass(eq=False, slots=True)
class PrefillWork:
    """One prompt in the scheduler; `done` positions of it have KV (cached or computed)."""

    tokens: np.ndarray
    arrived: float  # clock()
    payload: object = None  # the caller's request
    lookup: Lookup | None = None  # its pages, once started
    done: int = 0
    cached: int = 0  # positions reused from the prefix cache
    started: float | None = None  # clock() at its first chunk

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.done

    @property
    def finished(self) -> bool:
        return self.lookup is not None and self.done == len(self.tokens)


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduledChunk:
    work: PrefillWork
    start: int
    count: int


class ChunkScheduler:
    def __init__(
        self,
        pool: PrefixPagePool,
        chunk: int,
        max_rows: int,
        aging_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool, self.chunk, self.max_rows, self.aging_s = pool, chunk, max_rows, aging_s
        self._clock = clock
        self._works: list[PrefillWork] = []

    def __len__(self) -> int:
        return len(self._works)

    @property
    def waiting(self) -> int:
        """Prompts not started yet."""
        return sum(1 for w in self._works if w.lookup is None)

    def add(self, work: PrefillWork) -> None:
        if len(work.tokens) == 0:
            raise ValueError("an empty prompt has nothing to prefill")
        self._works.append(work)

    def remove(self, work: PrefillWork, cache: bool = False) -> None:
        """Drop a prompt (finished, cancelled, expired); its pages go back to the pool,
        its whole blocks into the prefix cache when `cache` (only a finished prompt)."""
        self._works.remove(work)
        if work.lookup is None:
            return
        if cache and work.finished:
            self.pool.finish(work.tokens, work.lookup)
        else:
            self.pool.release(work.lookup)

    def works(self) -> list[PrefillWork]:
        return list(self._works)

    def next_chunks(self, max_rows: int | None = None) -> list[ScheduledChunk]:
        """The rows of the next call, in policy order (empty: nothing can run now); at
        most `max_rows` of them (default: the scheduler's own), a call beside a decode
        step taking fewer."""
        now = self._clock()
        max_rows = self.max_rows if max_rows is None else min(max_rows, self.max_rows)

        def priority(w: PrefillWork) -> tuple:
            if now - w.arrived >= self.aging_s:
                return (0, w.arrived)
            return (1, w.remaining, w.arrived)

        chunks: list[ScheduledChunk] = []
        # A call's attention runs up to its longest row: beside a prompt that finishes in
        # this call, a row reaching far past it would make that prompt's first token wait
        # for the long row's whole context (unless the long one has aged).
        reach: int | None = None
        for work in sorted(self._works, key=priority):
            if len(chunks) == max_rows:
                break
            fresh = priority(work)[0] == 1
            if work.lookup is None and fresh and self._computing_its_prefix(work):
                continue  # another prefill is computing its beginning: reuse it, later
            if fresh and reach is not None and work.done + min(self.chunk, work.remaining) > reach:
                continue  # runs in the next call, without the prompt that finishes now
            if work.lookup is None:
                try:
                    work.lookup = self.pool.acquire(work.tokens)
                except PagesExhaustedError:
                    continue  # waits for pages; the started prompts will free theirs
                work.done = work.cached = work.lookup.hit_tokens
                work.started = now
            count = min(self.chunk, work.remaining)
            chunks.append(ScheduledChunk(work, work.done, count))
            if count == work.remaining and reach is None:
                reach = LONG_ROW_REACH * max(work.done + count, self.chunk)
        return chunks

    def _computing_its_prefix(self, work: PrefillWork) -> bool:
        """Whether a started prefill shares more whole blocks with `work` than the cache
        holds now and has not computed them yet (then `work` waits, and reuses them once
        they are published: a burst of prompts with one system prompt computes it once)."""
        if not self.pool.enabled:
            return False  # nothing is published: waiting would only delay it
        page = self.pool.page_size
        limit = (len(work.tokens) - 1) // page
        cached = None
        for other in self._works:
            if other.lookup is None or other is work:
                continue
            n = min(limit * page, len(other.tokens))
            differ = np.flatnonzero(work.tokens[:n] != other.tokens[:n])
            shared = (int(differ[0]) if differ.size else n) // page
            if shared == 0 or other.done >= shared * page:
                continue  # nothing in common, or already computed (and published)
            if cached is None:
                cached = self.pool.cached_blocks(work.tokens)
            if shared > cached:
                return True
        return False

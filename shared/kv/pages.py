"""The host side of the paged KV cache: the free list every page pool uses (`FreePages`),
and the decode worker's allocator (`PageAllocator`: which pages each slot owns). The
prefill worker's pool (shared/kv/prefix_cache.py) takes its pages from a `FreePages` too.

The device holds a pool of fixed-size pages per layer ([cache_heads, pages, page_size,
head_dim]) and a page table ([slots, max_pages_per_slot] int32) in the decode state; this
allocator decides which page goes where. Page 0 is never handed out: it is the scratch page
that padding rows of a step and unused page-table entries point at, so a write there is
harmless and a read there is always masked.

Invariants (checked by `check`, and by tests/test_pages.py's property test):
* every page in 1..num_pages-1 is either free or owned by exactly one slot;
* a slot's pages are listed in position order: page i holds positions
  [i * page_size, (i + 1) * page_size).

Called from the decode worker's engine thread, and from gRPC handlers for admission
(`can_admit`, `counts`): every method takes the lock and is cheap (no JAX).
"""

from __future__ import annotations

import dataclasses
import threading

SCRATCH_PAGE = 0


class PagesExhaustedError(RuntimeError):
    """Not enough free pages; the message says how many were needed and free."""

    def __init__(self, needed: int, free: int, total: int, pool: str = "KV pages") -> None:
        super().__init__(f"{pool} exhausted: {needed} needed, {free} free of {total}; retry later")
        self.needed, self.free, self.total = needed, free, total


class FreePages:
    """The free pages of one pool of `num_pages` (ids 1..num_pages-1: the scratch page is
    never handed out). `take` hands out low ids first (easier to read in logs and tests).
    Not thread-safe: the pool that owns it decides the locking."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: needs the scratch page and at least one")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))

    @property
    def total(self) -> int:
        """Pages that can be handed out (the scratch page excluded)."""
        return self.num_pages - 1

    def __len__(self) -> int:
        return len(self._free)

    def take(self, count: int = 1) -> list[int]:
        """`count` pages, or PagesExhaustedError with nothing taken."""
        if count > len(self._free):
            raise PagesExhaustedError(count, len(self._free), self.total)
        return [self._free.pop() for _ in range(count)]

    def give(self, pages: list[int]) -> None:
        """Return pages (taken from this pool, not already free)."""
        self._free.extend(reversed(pages))

    def check_partition(self, *held: list[int]) -> None:
        """AssertionError unless every page is free or in exactly one of `held` once."""
        everything = [*self._free, *(p for pages in held for p in pages)]
        assert len(everything) == len(set(everything)), "a page is held or free twice"
        assert sorted(everything) == list(range(1, self.num_pages)), "a page leaked"


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` positions."""
    return -(-tokens // page_size)


@dataclasses.dataclass(frozen=True, slots=True)
class PageCounts:
    total: int  # allocatable pages (the scratch page excluded)
    free: int
    used: int
    reserved: int  # promised to admitted requests whose KV has not arrived yet


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int, max_pages_per_slot: int) -> None:
        self._free = FreePages(num_pages)
        self.num_pages, self.page_size = num_pages, page_size
        self.max_pages_per_slot = max_pages_per_slot
        self._lock = threading.Lock()
        self._owned: dict[int, list[int]] = {}  # slot -> its pages, in position order
        self._reserved: dict[str, int] = {}  # lease -> pages promised at admission

    # Admission (gRPC handlers) -----------------------------------------------------------

    def reserve(self, key: str, tokens: int) -> None:
        """Promise pages for `tokens` positions to an admitted request (its KV arrives
        later); PagesExhaustedError when free pages minus promises do not cover it."""
        needed = pages_for(tokens, self.page_size)
        with self._lock:
            available = len(self._free) - sum(self._reserved.values())
            if needed > available:
                raise PagesExhaustedError(needed, available, self._free.total)
            self._reserved[key] = needed

    def unreserve(self, key: str) -> None:
        """Drop a promise (the request was cancelled, or its KV was placed). Idempotent."""
        with self._lock:
            self._reserved.pop(key, None)

    # The engine thread ---------------------------------------------------------------------

    def assign(self, slot: int, tokens: int, key: str | None = None) -> list[int]:
        """Give `slot` the pages for its first `tokens` positions (its prefix), consuming
        the promise made under `key`. Returns the page ids in position order."""
        needed = pages_for(tokens, self.page_size)
        if needed > self.max_pages_per_slot:
            raise ValueError(
                f"{tokens} tokens need {needed} pages; a slot holds {self.max_pages_per_slot}"
            )
        with self._lock:
            if key is not None:
                self._reserved.pop(key, None)
            if slot in self._owned:
                raise ValueError(f"slot {slot} already owns pages {self._owned[slot]}")
            pages = self._free.take(needed)
            self._owned[slot] = pages
            return list(pages)

    def grow(self, slot: int, position: int) -> int | None:
        """Make sure `slot` owns the page for `position` (the next token's place).
        Returns the new page id when one was added, None when it already had it; raises
        PagesExhaustedError when the pool is dry (the caller preempts someone)."""
        index = position // self.page_size
        with self._lock:
            pages = self._owned.setdefault(slot, [])
            if index < len(pages):
                return None
            if index != len(pages) or index >= self.max_pages_per_slot:
                raise ValueError(f"slot {slot}: position {position} skips past page {len(pages)}")
            if len(self._free) <= sum(self._reserved.values()):
                # Promised pages are not ours to take: admission said yes to someone.
                raise PagesExhaustedError(1, len(self._free), self._free.total)
            [page] = self._free.take()
            pages.append(page)
            return page

    def release(self, slot: int) -> int:
        """Return every page of `slot` to the pool. Idempotent; returns how many."""
        with self._lock:
            pages = self._owned.pop(slot, [])
            self._free.give(pages)
            return len(pages)

    # Introspection ----------------------------------------------------------------------------

    def pages_of(self, slot: int) -> list[int]:
        with self._lock:
            return list(self._owned.get(slot, []))

    def counts(self) -> PageCounts:
        with self._lock:
            total = self._free.total
            return PageCounts(
                total, len(self._free), total - len(self._free), sum(self._reserved.values())
            )

    def check(self) -> None:
        """Raise AssertionError if a page is leaked, double-owned or out of range."""
        with self._lock:
            self._free.check_partition(*self._owned.values())

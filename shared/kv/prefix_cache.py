"""The prefill worker's page pool on the host: pages for running prefills, and a prefix
cache of finished prompts' pages keyed by chained block hashes (shared/kv/prefix_hash.py).

A page is in exactly one of three states:
* free;
* referenced: listed by one or more running prefills (a cached page can be shared by
  several prompts that start with the same blocks; never written by any of them);
* cached and idle: holds a whole block of a finished prompt, no running prefill uses it;
  evictable, least recently used first.

A cached page is found by its block hash and *verified* before reuse: the entry stores its
block's tokens and its parent's entry (by a serial number never reused, so a block cached
after a parent that was since evicted, its page reused, never matches again). Two prompts
whose hashes collide never share KV (tests swap in a weak hash to prove it). The pool never
evicts a referenced page. A finished prompt's pages go idle leaf first, so under pressure
a chain is evicted from its end and its shared beginning (a system prompt) stays.

The cache is bounded twice: by the pool (a prefill that needs pages evicts idle cached
ones) and by `capacity_pages`, the most idle cached pages kept (the memory budget).
Single-threaded: the prefill engine thread owns it; `stats` is read from other threads
as a snapshot of ints.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from shared.engine.pages import SCRATCH_PAGE
from shared.kv.prefix_hash import BlockHash, HashFn, blake2b_hash, block_bytes


class PoolExhaustedError(RuntimeError):
    """Not enough free or evictable pages for a prefill right now (it waits)."""


@dataclasses.dataclass(slots=True)
class _Entry:
    page: int
    serial: int  # unique for the pool's life: a page reused later gets a new one
    parent: int  # the previous block's entry serial; 0 for the first block
    tokens: bytes  # the block's tokens (block_bytes), checked on every match


@dataclasses.dataclass(slots=True)
class PrefixCacheStats:
    hit_tokens: int = 0  # prompt tokens served from the cache
    miss_tokens: int = 0  # prompt tokens computed
    evictions: int = 0  # cached pages dropped (pool pressure or budget)

    @property
    def hit_rate(self) -> float:
        total = self.hit_tokens + self.miss_tokens
        return self.hit_tokens / total if total else 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class Lookup:
    """A prompt's pages: the cached ones it reuses, then its own (freshly allocated)."""

    pages: tuple[int, ...]
    hit_pages: int  # leading pages reused from the cache (not to be computed or written)


class PrefixPagePool:
    def __init__(
        self,
        num_pages: int,
        page_size: int,
        root: bytes,
        capacity_pages: int,
        hash_fn: HashFn = blake2b_hash,
    ) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: needs the scratch page and at least one")
        self.num_pages, self.page_size = num_pages, page_size
        self.capacity_pages = max(0, capacity_pages)
        self._root, self._hash = root, hash_fn
        self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))  # pop() -> low ids first
        self._refs: dict[int, int] = {}  # page -> running prefills that list it
        self._by_hash: dict[BlockHash, _Entry] = {}
        self._hash_of: dict[int, BlockHash] = {}  # cached page -> its key
        self._serials = 0
        # Idle cached pages, least recently used first.
        self._idle: OrderedDict[int, None] = OrderedDict()
        self.stats = PrefixCacheStats()

    @property
    def enabled(self) -> bool:
        return self.capacity_pages > 0

    # Admission ---------------------------------------------------------------------------

    def acquire(self, tokens: Sequence[int] | np.ndarray) -> Lookup:
        """Pages for a prompt: the longest verified cached prefix of whole blocks (never
        the whole prompt: its last token is always computed, for the first token's
        logits), then new pages for the rest. PoolExhaustedError if free plus evictable
        pages do not cover it; nothing changes then."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        total = -(-len(ids) // self.page_size)
        hits = self._match(ids, limit=(len(ids) - 1) // self.page_size) if self.enabled else []
        needed = total - len(hits)
        # The matched pages cannot be evicted to make room for the rest of this prompt.
        evictable = sum(1 for p in self._idle if p not in hits)
        if needed > len(self._free) + evictable:
            raise PoolExhaustedError(
                f"prefill pool: {needed} pages needed, {len(self._free)} free and "
                f"{evictable} evictable of {self.num_pages - 1}"
            )
        for page in hits:
            self._ref(page)
        fresh = [self._take() for _ in range(needed)]
        for page in fresh:
            self._refs[page] = 1
        self.stats.hit_tokens += len(hits) * self.page_size
        self.stats.miss_tokens += len(ids) - len(hits) * self.page_size
        return Lookup(tuple(hits) + tuple(fresh), len(hits))

    def publish(self, tokens: Sequence[int] | np.ndarray, lookup: Lookup, computed: int) -> None:
        """The first `computed` positions of a running prefill hold their final KV: cache
        its whole blocks among them now, so that prompts arriving meanwhile with the same
        beginning reuse them (they stay referenced, so not evictable, until `release`)."""
        if self.enabled:
            ids = np.asarray(tokens, dtype=np.int64).reshape(-1)[:computed]
            self._insert(ids, lookup)

    def finish(self, tokens: Sequence[int] | np.ndarray, lookup: Lookup) -> None:
        """The prefill is done (its KV was read out): cache its whole blocks, release
        every page it referenced. An abandoned prefill calls `release` instead: only
        the blocks `publish`ed (computed) are cached then."""
        self.publish(tokens, lookup, len(tokens))
        self.release(lookup)

    def cached_blocks(self, tokens: Sequence[int] | np.ndarray) -> int:
        """How many leading whole blocks of `tokens` `acquire` would reuse now."""
        if not self.enabled:
            return 0
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        return len(self._match(ids, limit=(len(ids) - 1) // self.page_size))

    def release(self, lookup: Lookup) -> None:
        """Drop this prefill's references; uncached pages go back to the pool."""
        for page in reversed(lookup.pages):  # the prompt's end is evicted first
            refs = self._refs.get(page, 0) - 1
            if refs > 0:
                self._refs[page] = refs
                continue
            self._refs.pop(page, None)
            if page in self._hash_of:
                self._idle[page] = None  # most recently used end
            else:
                self._free.append(page)
        self._trim()

    # Introspection -----------------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def cached_pages(self) -> int:
        """Pages holding cached blocks, idle or in use."""
        return len(self._hash_of)

    @property
    def idle_cached_pages(self) -> int:
        return len(self._idle)

    @property
    def referenced_pages(self) -> int:
        return len(self._refs)

    def check(self) -> None:
        """Raise AssertionError if a page is lost, counted twice or out of range."""
        everything = list(self._free) + list(self._refs) + list(self._idle)
        assert len(everything) == len(set(everything)), "a page is in two states"
        assert sorted(everything) == list(range(1, self.num_pages)), "a page leaked"
        assert not set(self._idle) & set(self._refs), "an idle page is referenced"
        assert set(self._hash_of) <= set(self._idle) | set(self._refs), "a free page is cached"

    # Internals ---------------------------------------------------------------------------

    def _match(self, ids: np.ndarray, limit: int) -> list[int]:
        pages: list[int] = []
        parent_hash, parent = self._root, 0
        for i in range(limit):
            block = block_bytes(ids[i * self.page_size : (i + 1) * self.page_size])
            key = self._hash(parent_hash, block)
            entry = self._by_hash.get(key)
            if entry is None or entry.parent != parent or entry.tokens != block:
                break  # absent, or a collision: never reuse unverified KV
            pages.append(entry.page)
            parent_hash, parent = key, entry.serial
        return pages

    def _insert(self, ids: np.ndarray, lookup: Lookup) -> None:
        parent_hash, parent = self._root, 0
        for i in range(len(ids) // self.page_size):
            page = lookup.pages[i]
            block = block_bytes(ids[i * self.page_size : (i + 1) * self.page_size])
            key = self._hash(parent_hash, block)
            entry = self._by_hash.get(key)
            if entry is None and page not in self._hash_of:
                self._serials += 1
                entry = self._by_hash[key] = _Entry(page, self._serials, parent, block)
                self._hash_of[page] = key
            elif entry is None or entry.page != page:
                # The key is taken (the same prefix computed twice at once, or a collision):
                # keep the older entry; this prompt's later blocks would chain from a page
                # no entry names, so they could not be found either. Stop.
                return
            parent_hash, parent = key, entry.serial

    def _ref(self, page: int) -> None:
        self._idle.pop(page, None)
        self._refs[page] = self._refs.get(page, 0) + 1

    def _take(self) -> int:
        if not self._free:
            self._evict_one()
        return self._free.pop()

    def _evict_one(self) -> None:
        page, _ = self._idle.popitem(last=False)
        key = self._hash_of.pop(page)
        del self._by_hash[key]
        self.stats.evictions += 1
        self._free.append(page)

    def _trim(self) -> None:
        while len(self._idle) > self.capacity_pages:
            self._evict_one()

"""The prefill worker's page pool on the host: pages for running prefills, and a prefix
cache of finished prompts' pages keyed by chained block hashes (shared/kv/prefix_hash.py).

A page is in exactly one of three states:
* free;
* referenced: listed by one or more running prefills (a cached page can be shared by
  several prompts that start with the same blocks; never written by any of them);
* cached and idle: holds a whole block of a finished prompt, or the partial last block
  of one, and no running prefill uses it; evictable, least recently used first.

A cached page is found by its block hash and *verified* before reuse: the entry stores its
block's tokens and its parent's entry (by a serial number never reused, so a block cached
after a parent that was since evicted, its page reused, never matches again). Two prompts
whose hashes collide never share KV (tests swap in a weak hash to prove it). The pool never
evicts a referenced page. A finished prompt's pages go idle leaf first, so under pressure
a chain is evicted from its end and its shared beginning (a system prompt) stays.

Reuse is token-granular. Whole blocks are shared in place. After the last whole block
that matches, the cached block under the same parent (whole, or a finished prompt's partial
last block) that shares the most leading tokens with the prompt lends them: its page is
copied into the prompt's own next page (`Lookup.copy_from`, done on the device before the
prompt's first chunk), which the prompt then fills on from there. So a conversation's next
turn reuses its previous prompt up to the last token, not just to the last page boundary.

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

from shared.kv.pages import FreePages, PagesExhaustedError
from shared.kv.prefix_hash import BlockHash, HashFn, blake2b_hash, block_bytes


@dataclasses.dataclass(slots=True)
class _Entry:
    page: int
    serial: int  # unique for the pool's life: a page reused later gets a new one
    parent: int  # the previous block's entry serial; 0 for the first block
    tokens: bytes  # the block's tokens (block_bytes), checked on every match
    key: BlockHash | None  # None: a partial block (found through its parent only)


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
    hit_tokens: int  # positions whose KV is reused: the whole pages, then a copied part
    copy_from: int | None = None  # page to copy into pages[hit_pages] before computing


class PrefixPagePool:
    def __init__(
        self,
        num_pages: int,
        page_size: int,
        root: bytes,
        capacity_pages: int,
        hash_fn: HashFn = blake2b_hash,
    ) -> None:
        self._free = FreePages(num_pages)
        self.num_pages, self.page_size = num_pages, page_size
        self.capacity_pages = max(0, capacity_pages)
        self._root, self._hash = root, hash_fn
        self._refs: dict[int, int] = {}  # page -> running prefills that list it
        self._by_hash: dict[BlockHash, _Entry] = {}  # whole blocks
        self._cached: dict[int, _Entry] = {}  # cached page -> its entry (whole or partial)
        self._children: dict[int, _Blocks] = {}  # parent serial -> the blocks under it
        self._serials = 0
        # Idle cached pages, least recently used first.
        self._idle: OrderedDict[int, None] = OrderedDict()
        self.stats = PrefixCacheStats()

    @property
    def enabled(self) -> bool:
        return self.capacity_pages > 0

    # Admission ---------------------------------------------------------------------------

    def acquire(self, tokens: Sequence[int] | np.ndarray) -> Lookup:
        """Pages for a prompt: the longest verified cached prefix (whole blocks, then part
        of one; never the whole prompt: its last token is always computed, for the first
        token's logits), then new pages for the rest; when free plus
        evictable pages do not cover it (PagesExhaustedError); nothing changes then."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        total = -(-len(ids) // self.page_size)
        limit = (len(ids) - 1) // self.page_size
        hits, parent = self._match(ids, limit) if self.enabled else ([], 0)
        start = len(hits) * self.page_size
        lender, lent = (
            self._best_partial(parent, ids[start : len(ids) - 1]) if self.enabled else (None, 0)
        )
        needed = total - len(hits)
        # The matched pages (and the page lending its first tokens) cannot be evicted to
        # make room for the rest of this prompt.
        keep = {*hits, lender}
        evictable = sum(1 for p in self._idle if p not in keep)
        if needed > len(self._free) + evictable:
            raise PagesExhaustedError(
                needed,
                len(self._free) + evictable,
                self._free.total,
                "prefill pool",
            )
        for page in hits:
            self._ref(page)
        if lender is not None:
            self._ref(lender)
        fresh = [self._take() for _ in range(needed)]
        for page in fresh:
            self._refs[page] = 1
        if lender is not None:
            # Its tokens are copied before this prompt's first chunk runs (the caller does
            # it right away); it need not stay referenced after that.
            self._unref(lender)
        hit_tokens = start + lent
        self.stats.hit_tokens += hit_tokens
        self.stats.miss_tokens += len(ids) - hit_tokens
        return Lookup(tuple(hits) + tuple(fresh), len(hits), hit_tokens, lender)

    def publish(self, tokens: Sequence[int] | np.ndarray, lookup: Lookup, computed: int) -> None:
        """The first `computed` positions of a running prefill hold their final KV: cache
        its whole blocks among them now, so that prompts arriving meanwhile with the same
        beginning reuse them (they stay referenced, so not evictable, until `release`)."""
        if self.enabled:
            ids = np.asarray(tokens, dtype=np.int64).reshape(-1)[:computed]
            self._insert(ids, lookup)

    def finish(self, tokens: Sequence[int] | np.ndarray, lookup: Lookup) -> None:
        """The prefill is done (its KV was read out): cache its whole blocks and its
        partial last block, release every page it referenced. An abandoned prefill calls
        `release` instead: only the whole blocks `publish`ed (computed) are cached then."""
        if self.enabled:
            ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
            parent = self._insert(ids, lookup)
            tail = len(ids) % self.page_size
            if parent is not None and tail:
                self._add_entry(
                    lookup.pages[len(ids) // self.page_size],
                    parent,
                    block_bytes(ids[len(ids) - tail :]),
                    None,
                )
        self.release(lookup)

    def cached_blocks(self, tokens: Sequence[int] | np.ndarray) -> int:
        """How many leading whole blocks of `tokens` `acquire` would reuse now."""
        if not self.enabled:
            return 0
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        return len(self._match(ids, limit=(len(ids) - 1) // self.page_size)[0])

    def release(self, lookup: Lookup) -> None:
        """Drop this prefill's references; uncached pages go back to the pool."""
        for page in reversed(lookup.pages):  # the prompt's end is evicted first
            self._unref(page)
        self._trim()

    # Introspection -----------------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def cached_pages(self) -> int:
        """Pages holding cached blocks (whole or partial), idle or in use."""
        return len(self._cached)

    @property
    def idle_cached_pages(self) -> int:
        return len(self._idle)

    @property
    def referenced_pages(self) -> int:
        return len(self._refs)

    def check(self) -> None:
        """Raise AssertionError if a page is lost, counted twice or out of range."""
        self._free.check_partition(list(self._refs), list(self._idle))
        assert not set(self._idle) & set(self._refs), "an idle page is referenced"
        assert set(self._cached) <= set(self._idle) | set(self._refs), "a free page is cached"
        children = [p for blocks in self._children.values() for p in blocks.pages_held()]
        assert sorted(children) == sorted(self._cached), "a cached page is not its parent's"
        whole = {e.page for e in self._by_hash.values()}
        assert whole == {p for p, e in self._cached.items() if e.key is not None}

    # Internals ---------------------------------------------------------------------------

    def _match(self, ids: np.ndarray, limit: int) -> tuple[list[int], int]:
        """The pages of the longest verified run of whole blocks (at most `limit`), and
        the serial of the last one's entry (0: none)."""
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
        return pages, parent

    def _best_partial(self, parent: int, rest: np.ndarray) -> tuple[int | None, int]:
        """Among the cached blocks following `parent`, one sharing the most leading tokens
        with `rest` (at most a block): (its page, how many), or (None, 0)."""
        children = self._children.get(parent)
        if children is None:
            return None, 0
        return children.longest_shared(rest[: self.page_size])

    def _insert(self, ids: np.ndarray, lookup: Lookup) -> int | None:
        """Cache the whole blocks of `ids` in `lookup`'s pages; the serial of the last
        one's entry (0: no whole block), or None when the chain could not be cached."""
        parent_hash, parent = self._root, 0
        for i in range(len(ids) // self.page_size):
            page = lookup.pages[i]
            block = block_bytes(ids[i * self.page_size : (i + 1) * self.page_size])
            key = self._hash(parent_hash, block)
            entry = self._by_hash.get(key)
            if entry is None and page not in self._cached:
                entry = self._add_entry(page, parent, block, key)
            elif entry is None or entry.page != page:
                # The key is taken (the same prefix computed twice at once, or a collision):
                # keep the older entry; this prompt's later blocks would chain from a page
                # no entry names, so they could not be found either. Stop.
                return None
            parent_hash, parent = key, entry.serial
        return parent

    def _add_entry(self, page: int, parent: int, tokens: bytes, key: BlockHash | None) -> _Entry:
        self._serials += 1
        entry = _Entry(page, self._serials, parent, tokens, key)
        self._cached[page] = entry
        if parent not in self._children:
            self._children[parent] = _Blocks(self.page_size)
        self._children[parent].add(page, np.frombuffer(tokens, dtype="<i4"))
        if key is not None:
            self._by_hash[key] = entry
        return entry

    def _ref(self, page: int) -> None:
        self._idle.pop(page, None)
        self._refs[page] = self._refs.get(page, 0) + 1

    def _unref(self, page: int) -> None:
        refs = self._refs.get(page, 0) - 1
        if refs > 0:
            self._refs[page] = refs
            return
        self._refs.pop(page, None)
        if page in self._cached:
            self._idle[page] = None  # most recently used end
        else:
            self._free.give([page])

    def _take(self) -> int:
        if not self._free:
            self._evict_one()
        return self._free.take()[0]

    def _evict_one(self) -> None:
        page, _ = self._idle.popitem(last=False)
        entry = self._cached.pop(page)
        if entry.key is not None:
            del self._by_hash[entry.key]
        children = self._children[entry.parent]
        children.remove(page)
        if not children:
            del self._children[entry.parent]
        self.stats.evictions += 1
        self._free.give([page])

    def _trim(self) -> None:
        while len(self._idle) > self.capacity_pages:
            self._evict_one()


class _Blocks:
    """The cached blocks under one parent entry as rows of a token table, so that the one
    sharing the most leading tokens with a prompt is found by one vectorized comparison
    (however many blocks follow a parent: the root may have thousands)."""

    def __init__(self, width: int) -> None:
        self._tokens = np.full((4, width), -1, np.int32)  # -1 pads a partial block's row
        self._pages = np.zeros(4, np.int64)
        self._row_of: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._row_of)

    def pages_held(self) -> list[int]:
        return list(self._row_of)

    def add(self, page: int, tokens: np.ndarray) -> None:
        row = len(self._row_of)
        if row == len(self._pages):  # grow by doubling
            self._tokens = np.concatenate([self._tokens, np.full_like(self._tokens, -1)])
            self._pages = np.concatenate([self._pages, np.zeros_like(self._pages)])
        self._tokens[row] = -1
        self._tokens[row, : len(tokens)] = tokens
        self._pages[row] = page
        self._row_of[page] = row

    def remove(self, page: int) -> None:
        row, last = self._row_of.pop(page), len(self._row_of)
        if row != last:  # the last row fills the hole
            self._tokens[row] = self._tokens[last]
            self._pages[row] = self._pages[last]
            self._row_of[int(self._pages[row])] = row

    def longest_shared(self, want: np.ndarray) -> tuple[int | None, int]:
        n, rows = len(want), len(self._row_of)
        if n == 0 or rows == 0:
            return None, 0
        differ = self._tokens[:rows, :n] != np.asarray(want, np.int32)[None, :]
        # The leading run of equal tokens: up to the first difference, or all n.
        shared = np.where(differ.any(axis=1), differ.argmax(axis=1), n)
        best = int(np.argmax(shared))
        if shared[best] == 0:
            return None, 0
        return int(self._pages[best]), int(shared[best])

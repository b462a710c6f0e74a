"""Which prefill worker probably holds which prompt prefix: the orchestrator's guess at
the workers' prefix caches, built from what it routed and corrected by what they answer.

A prefill worker keeps the KV of recent prompts in pages keyed by the chained hashes of
their whole page-sized blocks (shared/kv/prefix_hash.py) and reuses a new prompt's longest
cached prefix. The orchestrator cannot see those caches, so it keeps its own approximate
copy: per worker, a bounded LRU set of block hashes.

* `record`: a prefill on that worker succeeded; the worker caches every whole block of the
  prompt, so all its hashes are (re)marked most recently used. They go in deepest block
  first, so the LRU end drops a prompt's deep blocks before its first ones: a chain is
  never cut in the middle by our own bound.
* `match`: how many leading blocks of a prompt the worker probably holds. Hashes chain, so
  block i present means the whole prefix up to i matched; we count the leading run.
* `forget`: the worker was ejected, restarted or removed: assume nothing about it.
* `refresh`: correct the guess with the worker's answer, `PrefillTimings.cached_tokens`
  (the prompt tokens it served from its cache). The rule:

  - The worker never serves the prompt's last token from its cache (it computes it for the
    first token's logits), so of the `predicted` leading blocks we expected it to hold, the
    most it can report whole is
    `expected = min(predicted, (prompt_tokens - 1) // block)` blocks. A prompt wholly
    cached (page-aligned, every block predicted) so reports one block short: that is not
    an eviction, and its last block stays predicted.
  - It reported `confirmed = cached_tokens // block` whole blocks (past them it may have
    reused part of a block, which says nothing about a block we predicted whole).
    If `confirmed < expected`, block `confirmed` was missing when the worker looked: it was
    evicted (a block is recorded only after a prefill that cached it finished, so this is
    never a race with a concurrent prefill of the same prefix: `predicted` is taken when
    the request is routed). That block, the predicted ones after it (unreachable without
    it), and every hash we hold for that worker *less recently used* than it are dropped:
    the worker's cache is an LRU too, so whatever it kept for a shorter time than a block
    it already evicted is gone as well. This trims our copy to the worker's real budget
    (which may be smaller than `--prefix-index-blocks`, or shared with other orchestrator
    replicas' traffic, which makes it evict sooner). Then `record` re-adds the prompt's
    blocks, which the worker has just cached again.
  - A worker running with its cache off (or one whose cache keeps nothing we send) reports
    0 every time. After `COLD_ANSWERS` answers in a row that report 0 where a hit was
    expected, the worker is marked cacheless: its hashes are dropped, nothing more is
    recorded for it and it matches nothing, so it is ranked by load alone. No affinity is
    kept for it on purpose: sending a conversation back to a worker that will recompute
    it anyway only concentrates load. Any answer reporting cached tokens (a prompt routed
    there by load that happened to hit) clears the mark; so does `forget`.

The block size is the prefill workers' page size, learnt from their load reports
(orchestrator/prefix_blocks.py; `use_block_tokens`), so blocks begin and end where the
workers' cache pages do; until one has reported, nothing is hashed and every prompt is
routed by load. The hashes' root is a namespace of the model the orchestrator serves and
the block size; it only has to be consistent within this index (the workers' own roots
may differ: they report tokens, never hashes). Memory: about 150 bytes per held hash
(16-byte digest, OrderedDict entry), i.e. ~10 MiB per worker at the default 65,536 blocks.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from shared.kv.prefix_hash import BlockHash, block_hashes, namespace

# Answers in a row reporting no cached token where one was expected before a worker is
# treated as running without a prefix cache.
COLD_ANSWERS = 3


@dataclasses.dataclass(slots=True)
class _WorkerBlocks:
    lru: OrderedDict[BlockHash, None] = dataclasses.field(default_factory=OrderedDict)
    cold: int = 0  # consecutive answers with no cached token where a hit was expected
    cacheless: bool = False


class PrefixIndex:
    def __init__(self, block_tokens: int | None, blocks_per_worker: int, model: str = "") -> None:
        """`block_tokens`: the workers' page size; None: learnt later (`use_block_tokens`)."""
        if blocks_per_worker <= 0:
            raise ValueError(f"blocks_per_worker={blocks_per_worker} must be > 0")
        self.capacity, self._model = blocks_per_worker, model
        self.block_tokens: int | None = None
        self._root = b""
        self._workers: dict[str, _WorkerBlocks] = {}
        if block_tokens is not None:
            self.use_block_tokens(block_tokens)

    def use_block_tokens(self, block_tokens: int) -> None:
        """Hash in blocks of `block_tokens` from now on; a change forgets every worker
        (hashes of blocks of another size name nothing they hold)."""
        if block_tokens <= 0:
            raise ValueError(f"block_tokens={block_tokens} must be > 0")
        if block_tokens == self.block_tokens:
            return
        self.block_tokens = block_tokens
        self._root = namespace("pdserve-orchestrator-prefix-index", self._model, block_tokens)
        self._workers.clear()

    def hashes(self, prompt: Sequence[int]) -> tuple[BlockHash, ...]:
        """The chained hashes of the prompt's whole blocks (none before the block size is
        known)."""
        if self.block_tokens is None:
            return ()
        return tuple(block_hashes(prompt, self.block_tokens, self._root))

    # Queries ------------------------------------------------------------------------------

    def match(self, worker: str, hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks of `hashes` `worker` probably holds (the longest run of
        the chain present); does not touch the LRU order."""
        held = self._workers.get(worker)
        if held is None or held.cacheless:
            return 0
        count = 0
        for h in hashes:
            if h not in held.lru:
                break
            count += 1
        return count

    def expected_blocks(self, prompt_tokens: int, predicted: int) -> int:
        """Of `predicted` leading blocks held, how many the worker can serve from its cache:
        never the prompt's last token."""
        if self.block_tokens is None:
            return 0
        return max(0, min(predicted, (prompt_tokens - 1) // self.block_tokens))

    def blocks(self, worker: str) -> int:
        held = self._workers.get(worker)
        return 0 if held is None else len(held.lru)

    def cacheless(self, worker: str) -> bool:
        held = self._workers.get(worker)
        return held is not None and held.cacheless

    def workers(self) -> list[str]:
        return list(self._workers)

    # Updates ------------------------------------------------------------------------------

    def record(self, worker: str, hashes: Sequence[BlockHash]) -> None:
        """A prefill of these blocks succeeded on `worker`: it holds them now."""
        held = self._workers.setdefault(worker, _WorkerBlocks())
        if held.cacheless:
            return
        lru = held.lru
        for h in reversed(hashes):  # the first block ends most recent: evicted last
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > self.capacity:
            lru.popitem(last=False)

    def refresh(
        self,
        worker: str,
        hashes: Sequence[BlockHash],
        prompt_tokens: int,
        predicted: int,
        cached_tokens: int,
    ) -> int:
        """Correct `worker`'s entry from its answer to a prompt of `prompt_tokens` whose
        blocks are `hashes`, routed when we predicted it held `predicted` leading blocks
        (the module docstring has the rule). Returns how many hashes were dropped."""
        held = self._workers.setdefault(worker, _WorkerBlocks())
        if cached_tokens > 0:
            held.cold, held.cacheless = 0, False
        expected = self.expected_blocks(prompt_tokens, predicted)
        if expected == 0:
            return 0
        if cached_tokens <= 0:
            held.cold += 1
            if held.cold >= COLD_ANSWERS:
                dropped = len(held.lru)
                held.lru.clear()
                held.cacheless = True
                return dropped
        confirmed = max(0, cached_tokens) // (self.block_tokens or 1)
        if confirmed >= expected:
            return 0
        lru, before = held.lru, len(held.lru)
        missing = {h for h in hashes[confirmed:predicted] if h in lru}
        while missing:  # everything up to and including the missing blocks, oldest first
            h, _ = lru.popitem(last=False)
            missing.discard(h)
        return before - len(lru)

    def forget(self, worker: str) -> None:
        self._workers.pop(worker, None)

    def retain(self, workers: Iterable[str]) -> list[str]:
        """Forget every worker not in `workers`; returns those forgotten."""
        keep = set(workers)
        gone = [w for w in self._workers if w not in keep]
        for w in gone:
            del self._workers[w]
        return gone

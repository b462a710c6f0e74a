"""`DecodeBatch`: one engine's decode state with the host bookkeeping that goes with it.

The engine's jitted functions see arrays only; this object decides what goes in them:
which slots are live (the rows of a step, padded to a compiled batch bucket), which pages
each slot owns (shared/kv/pages.py), and when a slot needs its next page. The decode
worker's engine thread owns one; so do `generate-local` and the tests.

A step:
1. every live slot gets the page its next token will be written to, if it has none yet;
2. when the pool is dry, the youngest live slots are preempted (released, pages freed)
   until every remaining slot has its page: the caller ends their requests, which resume
   elsewhere exactly (the orchestrator's resume path: sampling depends only on seed and
   position);
3. the engine steps the live rows only, padded to the smallest bucket that holds them.
   When a live slot asked for logprobs, the step computes them for every row (one
   log-softmax and one top-k on the logits it has) and `last_logprobs` gets those slots'
   rows, cut to each one's own count; otherwise the step skips that work entirely.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import numpy as np

from shared.engine.chunked_prefill import ChunkedPrefill, ChunkOutput, PackedChunks
from shared.engine.engine import DecodeState, Engine, Params
from shared.engine.sampling import token_logprob
from shared.kv.pages import PageAllocator, PagesExhaustedError
from shared.kv.prefix import Prefix
from shared.logprobs import TokenLogprob, check_top_logprobs


class DecodeBatch:
    def __init__(self, engine: Engine, pages: PageAllocator | None = None) -> None:
        """`pages`: the allocator admission already promises pages from (the decode
        worker's); by default a new one over the engine's pool."""
        self.engine = engine
        config = engine.config
        self.pages = pages or PageAllocator(
            config.total_pages, config.page_size, config.max_pages_per_slot
        )
        self.state: DecodeState = engine.init_decode_state()
        self._lengths: dict[int, int] = {}  # live slot -> tokens in its cache (next position)
        self._admitted: dict[int, int] = {}  # live slot -> admission order (preemption)
        self._order = itertools.count()
        # Pages allocated on the host whose page-table entry the device has not recorded
        # yet: the next `generate` writes them (slot -> page for its current position).
        self._pending: dict[int, int] = {}
        self._logprobs: dict[int, int] = {}  # live slot -> alternatives it asked for
        # The last step's logprobs, for the slots that asked for them.
        self.last_logprobs: dict[int, TokenLogprob] = {}
        self.preemptions = 0

    @property
    def live_slots(self) -> list[int]:
        return sorted(self._lengths)

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    def insert(
        self,
        prefixes: Sequence[Prefix],
        slots: Sequence[int],
        keys: Sequence[str] | None = None,
        logprobs: Sequence[int | None] | None = None,
    ) -> None:
        """Give each slot the pages its prefix (and its first step) needs, then write the
        prefixes. `keys` name the page promises admission made (consumed here). `logprobs`:
        per slot, None or how many alternatives its steps report (`last_logprobs`). All or
        nothing: PagesExhaustedError leaves every slot as it was."""
        slots = [int(s) for s in slots]
        wanted = list(logprobs) if logprobs is not None else [None] * len(slots)
        if len(wanted) != len(slots):
            raise ValueError(f"{len(slots)} slots but {len(wanted)} logprobs counts")
        for count in wanted:
            check_top_logprobs(count)
        assigned: list[list[int]] = []
        try:
            for i, (prefix, slot) in enumerate(zip(prefixes, slots, strict=True)):
                key = keys[i] if keys is not None else None
                # Positions 0..L: the prefix and the first token, written by the first step.
                assigned.append(self.pages.assign(slot, prefix.true_length + 1, key))
        except PagesExhaustedError:
            for slot in slots[: len(assigned)]:
                self.pages.release(slot)
            raise
        self.state = self.engine.bulk_insert(
            prefixes, self.state, np.asarray(slots, np.int32), assigned
        )
        for prefix, slot, count in zip(prefixes, slots, wanted, strict=True):
            self._lengths[slot] = prefix.true_length
            self._admitted[slot] = next(self._order)
            if count is not None:
                self._logprobs[slot] = count

    def release(self, slot: int) -> None:
        """End `slot`: it leaves the batch and its pages go back to the pool. Idempotent."""
        if self._lengths.pop(slot, None) is not None:
            self._admitted.pop(slot, None)
            self._pending.pop(slot, None)
            self._logprobs.pop(slot, None)
            self.state = self.engine.release(self.state, slot)
        self.pages.release(slot)

    def step(self, params: Params) -> tuple[dict[int, int], list[int]]:
        """One token for every live slot -> ({slot: token}, preempted slots); the tokens'
        logprobs, for the slots that asked, in `last_logprobs`."""
        tokens, preempted, _ = self._step(params, None)
        return tokens, preempted

    def step_beside(
        self, params: Params, prefill: ChunkedPrefill, chunks: PackedChunks
    ) -> tuple[dict[int, int], list[int], ChunkOutput]:
        """`step`, and a call of `prefill`'s chunks in the same engine call (a mixed
        batch: shared/engine/mixed.py) -> (tokens, preempted, the chunks' output). With no
        live slot left (all preempted), or no mixed program compiled for these shapes, the
        chunks run by themselves."""
        return self._step(params, (prefill, chunks))  # type: ignore[return-value]

    def _step(
        self, params: Params, beside: tuple[ChunkedPrefill, PackedChunks] | None
    ) -> tuple[dict[int, int], list[int], ChunkOutput | None]:
        self.last_logprobs = {}
        preempted = self._grow_or_preempt()
        rows = self.live_slots
        if not rows:
            alone = None if beside is None else beside[0].run_packed(params, beside[1])
            return {}, preempted, alone
        new_pages = self._new_pages(rows)
        self._pending.clear()  # recorded in the device page table by this step
        wanted = [(i, slot) for i, slot in enumerate(rows) if slot in self._logprobs]
        chunk_output = None
        if beside is not None and not self.engine.mixed.is_ready(len(rows), beside[1]):
            # Not compiled (yet): the two programs one after the other, on this thread.
            chunk_output = beside[0].run_packed(params, beside[1])
            beside = None
        if beside is None:
            self.state, tokens, step_logprobs = self.engine.generate(
                params, self.state, rows, new_pages, logprobs=bool(wanted)
            )
        else:
            prefill, chunks = beside
            out = self.engine.mixed.step(
                params, self.state, rows, new_pages, bool(wanted), prefill.pool, chunks
            )
            self.state, tokens, step_logprobs, prefill.pool = (
                out.state,
                out.tokens,
                out.logprobs,
                out.pool,
            )
            chunk_output = chunks.output(out.first, out.chunk_logits, out.chunk_logprobs)
        if wanted:  # one transfer for the tokens and their logprobs
            tokens, (chosen, ids, values) = jax.device_get((tokens, step_logprobs))
            self.last_logprobs = {
                slot: token_logprob(chosen[i], ids[i], values[i], self._logprobs[slot])
                for i, slot in wanted
            }
        tokens = np.asarray(tokens)
        for slot in rows:
            self._lengths[slot] += 1
        return {slot: int(tokens[i]) for i, slot in enumerate(rows)}, preempted, chunk_output

    def logits(self, params: Params, slots: Sequence[int]) -> np.ndarray:
        """The logits the next step samples from for `slots` [len(slots), V] (tests and
        debugging; nothing is stepped)."""
        for slot in slots:
            page = self.pages.grow(slot, self._lengths[slot])
            if page is not None:
                self._pending[slot] = page
        return self.engine.decode_logits(params, self.state, slots, self._new_pages(slots))

    def _new_pages(self, rows: Sequence[int]) -> np.ndarray:
        return np.asarray([self._pending.get(slot, -1) for slot in rows], np.int32)

    def _grow_or_preempt(self) -> list[int]:
        """Every live slot gets the page for its next position; youngest out when dry."""
        preempted: list[int] = []
        for slot in sorted(self._lengths, key=self._admitted.__getitem__):
            while slot in self._lengths:
                try:
                    page = self.pages.grow(slot, self._lengths[slot])
                except PagesExhaustedError:
                    victim = max(self._lengths, key=self._admitted.__getitem__)
                    self.release(victim)
                    preempted.append(victim)
                    self.preemptions += 1
                    continue
                if page is not None:
                    self._pending[slot] = page
                break
        return preempted


def chunk_rows_beside(batch_tokens: int, live: int, chunk: int, max_rows: int) -> int:
    """How many prefill chunk rows a mixed call takes beside `live` decode rows: decode rows
    first (one token each), then whole chunks of `chunk` tokens while the call stays within
    `batch_tokens`, as a power of two (the compiled row buckets) of at most `max_rows`; at
    least one, so prefill always progresses (0 budget: one)."""
    fits = max(1, min(max_rows, (batch_tokens - live) // chunk))
    return 1 << (fits.bit_length() - 1)

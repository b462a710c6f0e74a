"""The prefill worker's prefix cache: the page pool's bookkeeping (no JAX), and served
prompts that reuse cached pages giving the very same logits, KV and tokens as a cold
prefill."""

from __future__ import annotations

import asyncio

import jax
import numpy as np
import pytest

from prefill_server.loop import PrefillLoop
from shared.config import PrefillSettings
from shared.engine.chunked_prefill import ChunkedPrefill, ChunkRow
from shared.engine.engine import Engine, Params
from shared.kv.pages import PagesExhaustedError
from shared.kv.prefix import Prefix
from shared.kv.prefix_cache import PrefixPagePool
from shared.kv.prefix_hash import block_hashes, namespace
from shared.sampling_params import SamplingParams
from shared.transport.types import PrefillRequest
from tests.worker_harness import start_prefill_loop

ROOT = namespace("tiny", "test")


def constant_hash(parent: bytes, block: bytes) -> bytes:
    """Every block collides with every other."""
    return b"same"


def block_only_hash(parent: bytes, block: bytes) -> bytes:
    """Ignores the chain: the same block after different prefixes collides."""
    return block


# The pool's bookkeeping -----------------------------------------------------------------


def test_hits_whole_blocks_then_part_of_one_but_never_the_whole_prompt():
    pool = PrefixPagePool(num_pages=32, page_size=4, root=ROOT, capacity_pages=16)
    first = pool.acquire(range(10))  # 3 pages, nothing cached
    assert first.hit_pages == first.hit_tokens == 0 and len(first.pages) == 3
    assert first.copy_from is None
    pool.finish(range(10), first)  # blocks [0..3], [4..7] cached, and the partial [8, 9]
    pool.check()
    assert pool.cached_pages == 3
    again = pool.acquire(range(10))  # 2 whole blocks, then 8 of the partial (9 computed)
    assert again.hit_pages == 2 and again.pages[:2] == first.pages[:2]
    assert again.hit_tokens == 9 and again.copy_from == first.pages[2]
    assert again.pages[2] != first.pages[2]  # copied into a page of its own
    pool.release(again)
    exact = pool.acquire(range(8))  # block [4..7] lends 3 tokens: the last is computed
    assert (exact.hit_pages, exact.hit_tokens, exact.copy_from) == (1, 7, first.pages[1])
    pool.release(exact)
    longer = pool.acquire([*range(10), 11, 12])  # the partial lends [8, 9]
    assert (longer.hit_pages, longer.hit_tokens, longer.copy_from) == (2, 10, first.pages[2])
    pool.release(longer)
    other = pool.acquire([0, 1, 2, 3, 9, 9, 9, 9, 9])  # shares the first block only
    assert (other.hit_pages, other.hit_tokens, other.copy_from) == (1, 4, None)
    pool.release(other)
    assert pool.stats.hit_tokens == 9 + 7 + 10 + 4
    pool.check()


def test_a_colliding_hash_never_reuses_other_tokens():
    pool = PrefixPagePool(32, 4, ROOT, 16, hash_fn=constant_hash)
    a = pool.acquire([1, 2, 3, 4, 5])
    pool.finish([1, 2, 3, 4, 5], a)
    b = pool.acquire([7, 7, 7, 7, 5])  # same hash, other tokens
    assert b.hit_pages == 0
    pool.release(b)
    pool.check()


def test_a_block_after_another_prefix_is_not_reused():
    pool = PrefixPagePool(32, 2, ROOT, 16, hash_fn=block_only_hash)
    a = pool.acquire([1, 2, 3, 4, 0])
    pool.finish([1, 2, 3, 4, 0], a)
    # Block [3, 4] hashes the same after [9, 9], but its KV was computed after [1, 2].
    b = pool.acquire([9, 9, 3, 4, 0])
    assert b.hit_pages == 0
    pool.release(b)
    pool.check()


def test_hashes_depend_on_the_namespace_and_the_whole_prefix():
    tokens = list(range(32))
    a = block_hashes(tokens, 8, namespace("fp-1", "float32", 8))
    assert a != block_hashes(tokens, 8, namespace("fp-2", "float32", 8))
    assert a != block_hashes(tokens, 8, namespace("fp-1", "bfloat16", 8))
    changed = block_hashes([99, *tokens[1:]], 8, namespace("fp-1", "float32", 8))
    assert all(x != y for x, y in zip(a, changed, strict=True))  # the chain carries it


def test_budget_evicts_least_recent_chain_ends_first_and_never_in_use_pages():
    pool = PrefixPagePool(num_pages=9, page_size=2, root=ROOT, capacity_pages=4)
    a = pool.acquire([1, 1, 2, 2, 3, 3, 0])  # 4 pages
    pool.finish([1, 1, 2, 2, 3, 3, 0], a)  # 3 whole blocks and the partial [0] cached, idle
    assert pool.idle_cached_pages == 4 and pool.stats.evictions == 0
    b = pool.acquire([5, 5, 6, 6, 7])  # 3 pages
    pool.finish([5, 5, 6, 6, 7], b)  # 3 more cached: over budget, the oldest ends go
    assert pool.idle_cached_pages == 4 and pool.stats.evictions == 3
    # a's chain lost its end (the partial block first), kept its beginning.
    probe = pool.acquire([1, 1, 2, 2, 3, 3, 0])
    assert probe.hit_pages == 1 and probe.hit_tokens == 2
    # Hold a's first block in use; now take every other page.
    held = probe
    assert pool.free_pages + pool.idle_cached_pages == 8 - len(held.pages)
    with pytest.raises(PagesExhaustedError):
        pool.acquire(list(range(2 * (9 - len(held.pages)))))
    pool.check()
    pool.release(held)
    pool.check()


def test_published_blocks_of_a_running_prefill_are_shared_and_survive_its_abandon():
    pool = PrefixPagePool(num_pages=16, page_size=4, root=ROOT, capacity_pages=8)
    running = pool.acquire(range(14))
    pool.publish(range(14), running, computed=9)  # two whole blocks computed so far
    other = pool.acquire([*range(8), 50, 51])
    assert other.hit_pages == 2 and other.pages[:2] == running.pages[:2]
    pool.release(running)  # abandoned: its computed blocks stay, the rest is freed
    pool.release(other)
    assert pool.idle_cached_pages == 2 and pool.referenced_pages == 0
    pool.check()


@pytest.mark.parametrize("hash_fn", [None, block_only_hash], ids=["blake2b", "colliding"])
def test_random_operations_keep_every_page_accounted_for_and_reuse_only_true_prefixes(hash_fn):
    """400 random acquires, finishes and abandons. Besides the page accounting, each page's
    contents are simulated: position i of a prompt holds the KV of its first i + 1 tokens.
    Every position a prompt reuses (whole pages, or part of one copied) must hold exactly
    its own prefix's, with a chain-ignoring hash too."""
    rng = np.random.default_rng(7)
    kw = {} if hash_fn is None else {"hash_fn": hash_fn}
    pool = PrefixPagePool(num_pages=24, page_size=2, root=ROOT, capacity_pages=6, **kw)
    content: dict[int, list] = {page: [None, None] for page in range(24)}
    live, lent = [], 0
    for _ in range(400):
        if live and rng.random() < 0.15:  # a running prompt has computed part of itself
            tokens, lookup = live[int(rng.integers(len(live)))]
            pool.publish(tokens, lookup, int(rng.integers(lookup.hit_tokens, len(tokens) + 1)))
        elif live and rng.random() < 0.5:
            tokens, lookup = live.pop(int(rng.integers(len(live))))
            if rng.random() < 0.7:
                pool.finish(tokens, lookup)
            else:
                pool.release(lookup)
        else:
            tokens = rng.integers(0, 3, rng.integers(1, 12)).tolist()
            try:
                lookup = pool.acquire(tokens)
            except PagesExhaustedError:
                continue
            if lookup.copy_from is not None:
                lent += 1
                content[lookup.pages[lookup.hit_pages]] = list(content[lookup.copy_from])
            assert lookup.hit_tokens < len(tokens)
            for i in range(len(tokens)):
                page = lookup.pages[i // 2]
                if i < lookup.hit_tokens:
                    assert content[page][i % 2] == tuple(tokens[: i + 1])
                else:  # computed: only ever into the prompt's own pages
                    assert i // 2 >= lookup.hit_pages
                    content[page][i % 2] = tuple(tokens[: i + 1])
            live.append((tokens, lookup))
        pool.check()
    for _, lookup in live:
        pool.release(lookup)
    pool.check()
    assert pool.referenced_pages == 0
    assert lent > 20  # partial reuse was exercised


# Served prompts: cache hits are exact -----------------------------------------------------

PAGE = 8  # the session engine's page size


def prefill_in_chunks(
    device: ChunkedPrefill, pool: PrefixPagePool, params: Params, tokens: list[int], chunk: int
) -> tuple[np.ndarray, dict, int]:
    """One prompt through the pool and the chunked engine, as the prefill loop runs it:
    (last position's logits, its KV [KV, L, H] leaves, pages reused)."""
    lookup = pool.acquire(tokens)
    done = lookup.hit_pages * PAGE
    logits = None
    while done < len(tokens):
        n = min(chunk, len(tokens) - done)
        row = ChunkRow(np.asarray(tokens[done : done + n]), done, lookup.pages, SamplingParams())
        logits = np.asarray(device.run(params, [row], False).logits[0])
        done += n
    kv = jax.tree.map(
        lambda a: np.asarray(a)[:, : len(tokens)], device.gather(lookup.pages, len(tokens))
    )
    pool.finish(tokens, lookup)
    return logits, kv, lookup.hit_pages


@pytest.fixture(scope="module")
def device(engine: Engine) -> ChunkedPrefill:
    return ChunkedPrefill(engine, num_pages=48, chunk=12, max_rows=2)  # rows may be shorter


PROMPT = [int(t) for t in np.random.default_rng(3).integers(1, 250, 30)]


@pytest.mark.parametrize("chunk", [8, 5, 12])  # chunk ends at page edges, and inside pages
@pytest.mark.parametrize(
    "earlier, hits",
    [
        (None, 0),  # cold
        (PROMPT[:9] + [1] * 8, 1),  # one page shared
        (PROMPT[:20], 2),  # two of three whole pages
        (PROMPT, 3),  # all three whole pages (the partial tail is computed)
        ([*PROMPT[:24], 5, 5, 5, 5, 5, 5], 3),  # all whole pages, a different tail
    ],
)
def test_a_cache_hit_gives_the_cold_logits_and_kv(device, engine, params, chunk, earlier, hits):
    cold_pool = PrefixPagePool(48, PAGE, ROOT, capacity_pages=0)
    cold_logits, cold_kv, _ = prefill_in_chunks(device, cold_pool, params, PROMPT, chunk)
    reference = engine.reference_logits(params, PROMPT)[-1]
    np.testing.assert_allclose(cold_logits, reference, atol=1e-4)

    pool = PrefixPagePool(48, PAGE, ROOT, capacity_pages=32)
    if earlier is not None:
        prefill_in_chunks(device, pool, params, earlier, chunk)
    logits, kv, reused = prefill_in_chunks(device, pool, params, PROMPT, chunk)
    assert reused == hits
    np.testing.assert_allclose(logits, cold_logits, atol=1e-5, rtol=0)
    assert int(np.argmax(logits)) == int(np.argmax(cold_logits))
    for a, b in zip(jax.tree.leaves(kv), jax.tree.leaves(cold_kv), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    pool.check()


def test_whole_page_prompt_seen_twice_recomputes_only_its_last_page(device, params):
    pool = PrefixPagePool(48, PAGE, ROOT, capacity_pages=32)
    tokens = PROMPT[:24]
    first, _, _ = prefill_in_chunks(device, pool, params, tokens, 8)
    again, _, reused = prefill_in_chunks(device, pool, params, tokens, 8)
    assert reused == 2  # 3 whole pages; the last one holds the token whose logits we need
    np.testing.assert_allclose(again, first, atol=1e-5, rtol=0)


class RecordingSink:
    """A KvSink that keeps what it was given, in order."""

    def __init__(self) -> None:
        self.pushed: list[tuple[str, Prefix]] = []

    async def push(self, request: PrefillRequest, prefix: Prefix) -> int:
        self.pushed.append((request.request_id, prefix.trimmed()))
        return 0


def serve_prompts(
    engine: Engine,
    params: Params,
    prompts: list[list[int]],
    settings: PrefillSettings,
) -> tuple[list, RecordingSink, PrefillLoop]:
    """Each prompt through a prefill loop, one after another -> results, sink, loop."""
    sink = RecordingSink()

    async def body() -> list:
        loop = start_prefill_loop(
            engine, params, sink, pytest.fail, max_queue=16, settings=settings
        )
        results = []
        try:
            for i, prompt in enumerate(prompts):
                request = PrefillRequest(
                    f"r{i}", tuple(prompt), SamplingParams(), "d:1", "l", logprobs=5
                )
                results.append(await loop.submit(request))
        finally:
            loop.stop()
        return results, loop

    results, loop = asyncio.run(body())
    return results, sink, loop


def test_a_conversation_served_with_hits_equals_it_served_cold(engine, params):
    """Turns of one chat (each prompt extends the last) through the prefill loop with the
    cache on and off: same first tokens, logprobs and KV; the hits are reported. Each turn
    reuses the last one's whole pages and then the tokens of its partial last page (3 of
    turn 1's 27, 2 of turn 2's 34), copied into a page of its own."""
    rng = np.random.default_rng(11)
    system = rng.integers(1, 250, 21).tolist()
    turns = [system + rng.integers(1, 250, 6).tolist()]
    for _ in range(2):
        turns.append(turns[-1] + rng.integers(1, 250, 7).tolist())
    on = PrefillSettings(chunk=8, max_rows=2, prefix_cache_bytes=1 << 20)
    off = PrefillSettings(chunk=8, max_rows=2, prefix_cache_bytes=0)
    warm, warm_sink, warm_loop = serve_prompts(engine, params, turns, on)
    cold, cold_sink, _ = serve_prompts(engine, params, turns, off)
    assert [r.timings.cached_tokens for r in cold] == [0, 0, 0]
    assert [len(t) for t in turns] == [27, 34, 41] and PAGE == 8
    assert [r.timings.cached_tokens for r in warm] == [0, 27, 34]
    for w, c in zip(warm, cold, strict=True):
        assert w.first_token == c.first_token
        assert [t for t, _ in w.first_logprob.top] == [t for t, _ in c.first_logprob.top]
        np.testing.assert_allclose(
            [v for _, v in w.first_logprob.top], [v for _, v in c.first_logprob.top], atol=1e-5
        )
    for (_, w), (_, c) in zip(warm_sink.pushed, cold_sink.pushed, strict=True):
        for a, b in zip(jax.tree.leaves(w.cache), jax.tree.leaves(c.cache), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    stats = warm_loop.pool.stats
    assert stats.hit_tokens == 61 and stats.miss_tokens == sum(map(len, turns)) - 61
    warm_loop.pool.check()
    assert warm_loop.pool.referenced_pages == 0


def test_a_tiny_budget_keeps_serving_exactly(engine, params):
    """Two pages of cache for prompts of up to 4 pages: evictions all along, every answer
    equal to the cold one."""
    rng = np.random.default_rng(5)
    base = rng.integers(1, 250, 16).tolist()
    prompts = [base + rng.integers(1, 250, int(n)).tolist() for n in rng.integers(1, 14, 8)]
    page_bytes = engine.kv_bytes_per_token * PAGE
    small = PrefillSettings(chunk=8, max_rows=2, prefix_cache_bytes=2 * page_bytes)
    warm, _, loop = serve_prompts(engine, params, prompts, small)
    cold, _, _ = serve_prompts(
        engine, params, prompts, PrefillSettings(chunk=8, prefix_cache_bytes=0)
    )
    assert [r.first_token for r in warm] == [r.first_token for r in cold]
    assert loop.pool.stats.evictions > 0
    assert loop.pool.stats.hit_tokens > 0
    assert loop.pool.idle_cached_pages <= 2
    loop.pool.check()

"""Chunked prefill: the scheduling policy, a 4k-token prompt that is exact and does not
hold a short one back, packed calls equal to one-at-a-time ones."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from prefill_server.scheduler import ChunkScheduler, PrefillWork
from shared.config import EngineConfig, ModelConfig, PrefillSettings
from shared.engine.engine import Engine
from shared.kv.prefix import Prefix
from shared.kv.prefix_cache import PrefixPagePool
from shared.kv.prefix_hash import namespace
from shared.sampling_params import SamplingParams
from shared.transport.types import PrefillRequest, StatusCode, TransportError
from tests.worker_harness import start_prefill_loop


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scheduler(
    max_rows: int, pages: int = 64, aging_s: float = 5.0, cache_pages: int = 0
) -> tuple[ChunkScheduler, Clock]:
    clock = Clock()
    pool = PrefixPagePool(pages, 4, namespace("t"), capacity_pages=cache_pages)
    return ChunkScheduler(pool, chunk=8, max_rows=max_rows, aging_s=aging_s, clock=clock), clock


def work(n: int, arrived: float, name: str) -> PrefillWork:
    return PrefillWork(np.arange(n), arrived, name)


def run(s: ChunkScheduler) -> list[tuple[str, int, int]]:
    """One call: the chunks chosen, marked done as the loop does."""
    chunks = s.next_chunks()
    for c in chunks:
        c.work.done += c.count
        s.pool.publish(c.work.tokens, c.work.lookup, c.work.done)
        if c.work.finished:
            s.remove(c.work, cache=True)
    return [(c.work.payload, c.start, c.count) for c in chunks]


def test_shortest_remaining_first_lets_a_short_prompt_pass_a_long_one():
    s, clock = scheduler(max_rows=1)
    s.add(work(100, 0.0, "long"))
    assert run(s) == [("long", 0, 8)]
    s.add(work(5, 0.1, "short"))
    clock.now = 0.2
    assert run(s) == [("short", 0, 5)]  # done after one call, before the long one
    assert run(s) == [("long", 8, 8)]


def test_aging_bounds_how_long_short_prompts_can_starve_a_long_one():
    s, clock = scheduler(max_rows=1, aging_s=5.0)
    s.add(work(100, 0.0, "long"))
    for i in range(3):
        s.add(work(3, clock.now, f"short{i}"))
        assert run(s)[0][0] == f"short{i}"
        clock.now += 1.0
    clock.now = 5.0  # the long prompt has waited its aging bound: it goes first now
    s.add(work(3, clock.now, "late"))
    assert run(s)[0][0] == "long"


def test_packing_fills_rows_and_a_prompt_without_pages_waits():
    s, _ = scheduler(max_rows=3, pages=9)  # 8 usable pages of 4 positions
    s.add(work(20, 0.0, "a"))  # 5 pages: no room beside the other two
    s.add(work(12, 0.1, "b"))  # 3 pages
    s.add(work(16, 0.2, "c"))  # 4 pages
    assert run(s) == [("b", 0, 8), ("c", 0, 8)]  # shortest first, packed; a waits
    assert s.waiting == 1
    assert run(s) == [("b", 8, 4), ("c", 8, 8)]  # both finish, their pages come back
    assert run(s) == [("a", 0, 8)]


def test_a_finishing_short_prompt_is_not_packed_beside_a_far_reaching_long_one():
    """Packing a 5-token prompt with chunks of a long prompt already 40 positions in would
    make its call attend 48 positions deep: the long one waits for the next call, unless it
    has aged."""
    s, clock = scheduler(max_rows=2, aging_s=5.0)
    s.add(work(100, 0.0, "long"))
    for _ in range(5):
        run(s)  # the long prompt is 40 positions in
    s.add(work(5, 0.1, "short"))
    assert run(s) == [("short", 0, 5)]  # alone: its call reaches 5, not 48
    assert run(s) == [("long", 40, 8)]
    s.add(work(5, 0.2, "short2"))
    clock.now = 5.0  # the long prompt has aged: it is packed whatever its reach
    assert run(s) == [("long", 48, 8), ("short2", 0, 5)]


def test_a_burst_sharing_a_system_prompt_computes_it_once():
    """Three prompts with one 16-token beginning arrive together: the first computes it,
    the others wait for its blocks and reuse them (cache on); aged ones do not wait."""
    s, clock = scheduler(max_rows=3, cache_pages=32, aging_s=5.0)
    system = list(range(100, 116))
    for i, name in enumerate(["a", "b", "c"]):
        s.add(PrefillWork(np.array([*system, i, i, i]), 0.0, name))
    assert run(s) == [("a", 0, 8)]  # b and c wait: a is computing what they share
    assert run(s) == [("a", 8, 8)]  # a's first 16 positions are published now
    chunks = run(s)
    assert chunks == [("a", 16, 3), ("b", 16, 3), ("c", 16, 3)]  # the rest only
    assert s.pool.stats.hit_tokens == 32
    s.add(PrefillWork(np.array([*system, 200, 201, 202, 203, 9, 9]), clock.now, "d"))
    s.add(PrefillWork(np.array([*system, 200, 201, 202, 203, 7, 7]), clock.now, "e"))
    assert [name for name, _, _ in run(s)] == ["d"]  # e shares d's unpublished 5th block
    clock.now = 10.0  # e has waited past the aging bound: it no longer waits
    assert "e" in [name for name, _, _ in run(s)]


# A 4k-token prompt on the tiny model ------------------------------------------------------

LONG = 4000


@pytest.fixture(scope="module")
def long_engine() -> Engine:
    config = EngineConfig(
        max_slots=1, prefill_buckets=(16, 64), max_seq_len=4096 + 64, page_size=16
    )
    return Engine(ModelConfig.tiny(), config)


class OrderSink:
    def __init__(self) -> None:
        self.order: list[str] = []
        self.prefixes: dict[str, Prefix] = {}

    async def push(self, request: PrefillRequest, prefix: Prefix) -> int:
        self.order.append(request.request_id)
        self.prefixes[request.request_id] = prefix.trimmed()
        return 0


@pytest.mark.timeout(300)
def test_a_4k_prompt_is_exact_and_a_short_one_behind_it_finishes_first(long_engine):
    engine = long_engine
    params = engine.init_params(seed=0)
    rng = np.random.default_rng(4)
    long_prompt = tuple(int(t) for t in rng.integers(1, 250, LONG))
    short_prompt = tuple(int(t) for t in rng.integers(1, 250, 20))
    sink = OrderSink()
    settings = PrefillSettings(chunk=256, max_rows=1, prefix_cache_bytes=0)

    async def body() -> dict[str, object]:
        loop = start_prefill_loop(engine, params, sink, pytest.fail, max_queue=8, settings=settings)
        loop.compile()
        try:
            greedy = SamplingParams()
            long = asyncio.create_task(
                loop.submit(PrefillRequest("long", long_prompt, greedy, "d:1", "l1", logprobs=3))
            )
            await asyncio.sleep(0.05)  # the long prompt is being prefilled
            started = time.perf_counter()
            short = await loop.submit(PrefillRequest("short", short_prompt, greedy, "d:1", "l2"))
            short_s = time.perf_counter() - started
            return {"long": await long, "short": short, "short_s": short_s}
        finally:
            loop.stop()

    out = asyncio.run(body())
    assert sink.order == ["short", "long"]
    # Every prompt length ran in the one chunk shape: nothing compiled per length.
    chunks = {k: n for k, n in engine.compile_counts.items() if k.startswith("chunk")}
    assert chunks == {"chunk[1x256]": 1}
    reference = engine.reference_logits(params, long_prompt)[-1]
    assert out["long"].first_token == int(np.argmax(reference))
    top = out["long"].first_logprob.top
    expected = reference - np.log(np.sum(np.exp(reference - reference.max()))) - reference.max()
    np.testing.assert_allclose([v for _, v in top], np.sort(expected)[::-1][:3], atol=1e-4)
    assert sink.prefixes["long"].true_length == LONG
    short_ref = engine.reference_logits(params, short_prompt)[-1]
    assert out["short"].first_token == int(np.argmax(short_ref))


def test_a_prompt_with_no_room_to_generate_is_invalid_argument(long_engine):
    engine = long_engine
    sink = OrderSink()

    async def body() -> None:
        settings = PrefillSettings(chunk=256, max_rows=1, prefix_cache_bytes=0)
        loop = start_prefill_loop(
            engine, engine.init_params(seed=0), sink, pytest.fail, max_queue=8, settings=settings
        )
        try:
            too_long = (1,) * engine.config.max_seq_len
            with pytest.raises(TransportError) as err:
                await loop.submit(PrefillRequest("x", too_long, SamplingParams(), "d:1", "l"))
            assert err.value.code is StatusCode.INVALID_ARGUMENT
            assert "max_seq_len" in err.value.message
        finally:
            loop.stop()
        loop.pool.check()
        assert loop.pool.referenced_pages == 0

    asyncio.run(body())

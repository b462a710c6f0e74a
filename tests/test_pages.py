"""Paged KV: the page allocator's invariants, exactness of paged decode over many steps
with slots filling and emptying, pool exhaustion (admission refusal, preemption of the
youngest, exact resumption), and pages freed on every way a request ends."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from decode_server.loop import DecodeLoop
from decode_server.scheduler import DecodeBatch
from decode_server.slots import SlotState, SlotTable
from shared.engine.engine import Engine, Params
from shared.kv.pages import PageAllocator, PagesExhaustedError, pages_for
from shared.metrics import WorkerMetrics
from shared.sampling_params import SamplingParams
from shared.transport.types import DecodeFinish, GenerationLimits
from tests.reference import reference_greedy
from tests.test_decode_loop import Collector, wait_no_pages_held

# Lengths around the test engine's page edges (page_size 8) and prefill buckets (8, 16, 32).
EDGE_LENGTHS = (1, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32)


def prompt_of(length: int, salt: int) -> list[int]:
    return [(31 * i + 7 * salt + length) % 250 + 1 for i in range(length)]


def assert_greedy(engine: Engine, params: Params, prompt: list[int], tokens: list[int]) -> None:
    """`tokens` are the greedy continuation of `prompt`: one uncached forward over the whole
    sequence (teacher forcing) gives the argmax after every prefix."""
    logits = engine.reference_logits(params, [*prompt, *tokens[:-1]])
    expected = np.argmax(logits[len(prompt) - 1 :], axis=-1).tolist()
    assert tokens == expected


# The allocator ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_random_reserve_assign_grow_release_never_leaks_or_double_owns(seed: int):
    """A model of who owns how many pages, driven by random operations; after every one
    the allocator's own invariant check runs and its counts match the model."""
    rng = random.Random(seed)
    page_size, per_slot = rng.choice([(4, 8), (8, 6), (16, 4)])
    slots = 5
    allocator = PageAllocator(rng.randint(3, slots * per_slot), page_size, per_slot)
    total = allocator.num_pages - 1
    owned: dict[int, int] = {}  # slot -> tokens it holds positions for
    promises: dict[str, int] = {}  # key -> pages promised
    for step in range(400):
        op = rng.random()
        free_slots = [s for s in range(slots) if s not in owned]
        if op < 0.25:
            key, tokens = f"k{step}", rng.randint(1, per_slot * page_size)
            needed = pages_for(tokens, page_size)
            in_use = sum(pages_for(t, page_size) for t in owned.values())
            available = total - in_use - sum(promises.values())
            if needed > available:
                with pytest.raises(PagesExhaustedError):
                    allocator.reserve(key, tokens)
            else:
                allocator.reserve(key, tokens)
                promises[key] = needed
        elif op < 0.45 and promises and free_slots:
            key = rng.choice(sorted(promises))
            slot = rng.choice(free_slots)
            tokens = rng.randint(1, promises[key] * page_size)  # within the promise
            pages = allocator.assign(slot, tokens, key)
            assert len(pages) == pages_for(tokens, page_size)
            promises.pop(key)
            owned[slot] = tokens
        elif op < 0.55 and promises:
            key = rng.choice(sorted(promises))
            allocator.unreserve(key)
            promises.pop(key)
        elif op < 0.85 and owned:
            _grow(allocator, owned, rng.choice(sorted(owned)))
        elif owned:
            slot = rng.choice(sorted(owned))
            assert allocator.release(slot) == pages_for(owned.pop(slot), page_size)
            assert allocator.release(slot) == 0  # idempotent
        _check_against_the_model(allocator, owned, promises)
    for slot in list(owned):
        allocator.release(slot)
    for key in list(promises):
        allocator.unreserve(key)
    allocator.check()
    assert allocator.counts().free == total


def _grow(allocator: PageAllocator, owned: dict[int, int], slot: int) -> None:
    """One more position for `slot` (unless it is full): a page exactly when its last one
    is full, or PagesExhaustedError only when every free page is promised."""
    page_size = allocator.page_size
    if owned[slot] >= allocator.max_pages_per_slot * page_size:
        return
    before = len(allocator.pages_of(slot))
    try:
        added = allocator.grow(slot, owned[slot])
    except PagesExhaustedError:
        counts = allocator.counts()
        assert counts.free <= counts.reserved
        return
    needs_page = owned[slot] % page_size == 0
    assert (added is not None) == needs_page
    assert len(allocator.pages_of(slot)) == before + needs_page
    owned[slot] += 1


def _check_against_the_model(
    allocator: PageAllocator, owned: dict[int, int], promises: dict[str, int]
) -> None:
    """The allocator's own invariant check, and its counts equal the model's."""
    allocator.check()
    counts = allocator.counts()
    assert counts.used == sum(pages_for(t, allocator.page_size) for t in owned.values())
    assert counts.free == allocator.num_pages - 1 - counts.used
    assert counts.reserved == sum(promises.values())


def test_assign_is_refused_past_a_slots_page_table():
    allocator = PageAllocator(num_pages=20, page_size=4, max_pages_per_slot=3)
    with pytest.raises(ValueError, match="13 tokens need 4 pages; a slot holds 3"):
        allocator.assign(0, 13)
    allocator.check()
    assert allocator.counts().used == 0


# Paged decode exactness ---------------------------------------------------------------------


def test_two_hundred_steps_with_slots_filling_and_emptying_equal_the_reference(
    engine: Engine, params: Params
):
    """Mixed prompt lengths (many at page edges) come and go in every slot for 200 steps;
    every request's tokens equal the uncached greedy reference, and all pages come back."""
    rng = random.Random(7)
    config = engine.config
    batch = DecodeBatch(engine)
    live: dict[int, tuple[list[int], list[int], int]] = {}  # slot -> (prompt, tokens, max)
    finished = 0

    def admit(slot: int, salt: int) -> None:
        length = rng.choice(EDGE_LENGTHS)
        max_tokens = rng.randint(2, config.max_seq_len - length)
        prompt = prompt_of(length, salt)
        prefix = engine.prefill(params, prompt)
        batch.insert([prefix], [slot])
        live[slot] = (prompt, [prefix.first_token], max_tokens)

    for slot in range(config.max_slots):
        admit(slot, slot)
    for step in range(200):
        tokens, preempted = batch.step(params)
        assert not preempted  # the default pool holds every slot at max_seq_len
        assert set(tokens) == set(live)
        for slot, token in tokens.items():
            live[slot][1].append(token)
        for slot in [s for s, (_, out, limit) in live.items() if len(out) >= limit]:
            prompt, out, _ = live.pop(slot)
            assert_greedy(engine, params, prompt, out)
            batch.release(slot)
            finished += 1
            if step < 190:
                admit(slot, 100 + step)
        batch.pages.check()
    for slot, (prompt, out, _) in live.items():
        assert_greedy(engine, params, prompt, out)
        batch.release(slot)
    assert finished >= 8  # slots really did empty and refill
    batch.pages.check()
    assert batch.pages.counts().used == 0


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(engine: Engine, params: Params):
    sampling = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=11)
    prompt = prompt_of(15, 3)

    def sample(neighbours: int) -> list[int]:
        batch = DecodeBatch(engine)
        for s in range(neighbours):
            batch.insert([engine.prefill(params, prompt_of(9 + s, s))], [s + 1])
        prefix = engine.prefill(params, prompt, sampling=sampling)
        batch.insert([prefix], [0])
        out = [prefix.first_token]
        for _ in range(20):
            out.append(batch.step(params)[0][0])
        return out

    assert sample(0) == sample(3)


# Pool exhaustion ----------------------------------------------------------------------------


def _unpreempted(
    engine: Engine, params: Params, prompt: list[int], sampling: SamplingParams, steps: int
) -> list[int]:
    batch = DecodeBatch(engine)
    prefix = engine.prefill(params, prompt, sampling=sampling)
    batch.insert([prefix], [0])
    return [prefix.first_token] + [batch.step(params)[0][0] for _ in range(steps - 1)]


def test_dry_pool_preempts_the_youngest_and_resuming_it_is_exact(engine: Engine, params: Params):
    """Fewer pages than the batch grows into: the youngest request is preempted (its pages
    freed, the others untouched), and resuming it from prompt + generated tokens (what the
    orchestrator does) gives the same tokens as a run that was never preempted, for greedy
    and for seeded sampling."""
    page = engine.config.page_size
    steps = 30
    requests = [
        (prompt_of(9, 1), SamplingParams()),
        (prompt_of(16, 2), SamplingParams(temperature=0.9, top_k=30, seed=5)),
        (prompt_of(7, 3), SamplingParams(temperature=0.7, top_p=0.8, seed=9)),
    ]

    expected = [_unpreempted(engine, params, p, s, steps) for p, s in requests]
    assert expected[0] == reference_greedy(engine, params, requests[0][0], steps)

    # 9 pages: enough for the three prefixes, not for thirty more tokens each.
    allocator = PageAllocator(10, page, engine.config.max_pages_per_slot)
    batch = DecodeBatch(engine, allocator)
    outputs: dict[int, list[int]] = {}
    for slot, (prompt, sampling) in enumerate(requests):
        prefix = engine.prefill(params, prompt, sampling=sampling)
        batch.insert([prefix], [slot])
        outputs[slot] = [prefix.first_token]
    order = []  # slots in the order they were preempted
    waiting: list[int] = []
    for _ in range(120):
        if all(len(out) >= steps for out in outputs.values()):
            break
        # A finished request leaves; a preempted one comes back when pages allow.
        for slot in [s for s in batch.live_slots if len(outputs[s]) >= steps]:
            batch.release(slot)
        for slot in list(waiting):
            prompt, sampling = requests[slot]
            history = prompt + outputs[slot]
            needed = pages_for(len(history) + 1, page)
            if allocator.counts().free < needed:
                break
            resumed = engine.prefill(params, history, sampling=sampling, allow_long=True)
            batch.insert([resumed], [slot])
            outputs[slot].append(resumed.first_token)
            waiting.remove(slot)
        tokens, preempted = batch.step(params)
        for slot in preempted:
            assert slot not in batch.live_slots and allocator.pages_of(slot) == []
            order.append(slot)
            waiting.append(slot)
        for slot, token in tokens.items():
            if len(outputs[slot]) < steps:
                outputs[slot].append(token)
        allocator.check()
    assert order, "the pool never ran dry: the test does not test preemption"
    assert order[0] == 2  # the youngest live request goes first
    assert batch.preemptions == len(order)
    for slot in outputs:
        assert outputs[slot][:steps] == expected[slot], f"request {slot}"


def test_admission_refuses_when_pages_are_short_and_holds_nothing(engine: Engine):
    page = engine.config.page_size
    allocator = PageAllocator(4, page, engine.config.max_pages_per_slot)  # 3 pages
    table = SlotTable(engine.config.max_slots)
    metrics = WorkerMetrics(CollectorRegistry(), "decode")
    loop = DecodeLoop(engine, None, table, Collector(), metrics, lambda e: None, allocator)
    first = loop.reserve(
        "a", GenerationLimits(4), 10.0, None, prompt_length=2 * page
    )  # 17 positions: 3 pages
    with pytest.raises(PagesExhaustedError, match="2 needed, 0 free of 3"):
        loop.reserve("b", GenerationLimits(4), 10.0, None, prompt_length=page)
    # The refused request holds neither a slot nor a promise.
    assert table.counts()[SlotState.FREE] == engine.config.max_slots - 1
    assert allocator.counts().reserved == 3
    failures = metrics.page_allocation_failures.labels("admission")._value.get()
    assert failures == 1
    table.free(first.lease_id)
    allocator.unreserve(first.lease_id)
    loop.reserve("c", GenerationLimits(4), 10.0, None, prompt_length=page)


# Pages freed on every end ------------------------------------------------------------------


@pytest.fixture
def running(engine: Engine, params: Params):
    table = SlotTable(engine.config.max_slots)
    collector = Collector()
    fatal: list[BaseException] = []
    metrics = WorkerMetrics(CollectorRegistry(), "decode")
    loop = DecodeLoop(engine, params, table, collector, metrics, fatal.append)
    loop.start()
    yield loop, table, collector
    loop.stop()
    assert not fatal


def _start(loop: DecodeLoop, engine: Engine, params: Params, limits, deadline=None, **kw):
    prompt = prompt_of(kw.pop("length", 9), 0)
    lease = loop.reserve("r", limits, kw.pop("ttl_s", 10.0), deadline, prompt_length=len(prompt))
    loop.submit(lease.lease_id, engine.prefill(params, prompt))
    return lease


def wait_for_tokens(collector: Collector, lease_id: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not collector.events.get(lease_id):
        assert time.monotonic() < deadline, "no token arrived"
        time.sleep(0.005)


@pytest.mark.parametrize(
    "end", ["eos", "length", "stop", "cancel", "deadline", "lease_expiry", "error"]
)
def test_pages_come_back_however_a_request_ends(running, engine: Engine, params: Params, end):
    loop, table, collector = running
    prompt = prompt_of(9, 0)
    greedy = [engine.prefill(params, prompt).first_token]
    batch = DecodeBatch(engine)
    batch.insert([engine.prefill(params, prompt)], [0])
    greedy += [batch.step(params)[0][0] for _ in range(5)]
    if end == "lease_expiry":  # reserved, its KV never arrives: the promise is withdrawn
        lease = loop.reserve("r", GenerationLimits(5), 0.2, None, prompt_length=9)
        expected = DecodeFinish.LEASE_EXPIRED
    elif end == "deadline":
        limits = GenerationLimits(5000, stop_on_eos=False)
        lease = _start(loop, engine, params, limits, deadline=time.monotonic() + 600)
        wait_for_tokens(collector, lease.lease_id)
        # The deadline passes mid-stream (moved once tokens flow, so that the test does not
        # depend on how fast a step is).
        lease.deadline = time.monotonic()
        expected = DecodeFinish.DEADLINE
    elif end == "cancel":
        lease = _start(loop, engine, params, GenerationLimits(5000, stop_on_eos=False))
        wait_for_tokens(collector, lease.lease_id)
        loop.finish(lease.lease_id, DecodeFinish.CANCELLED)
        expected = DecodeFinish.CANCELLED
    elif end == "error":  # a rejected KV transfer ends the lease with ERROR
        lease = loop.reserve("r", GenerationLimits(5), 10.0, None, prompt_length=9)
        loop.finish(lease.lease_id, DecodeFinish.ERROR, "KV rejected")
        expected = DecodeFinish.ERROR
    elif end == "stop":
        limits = GenerationLimits(10, (greedy[3],), stop_on_eos=False)
        lease = _start(loop, engine, params, limits)
        expected = DecodeFinish.STOP
    elif end == "eos":
        # Make the 4th greedy token this loop's EOS id (the tiny model's own EOS is not a
        # token these prompts produce); EOS and stop tokens share the STOP finish.
        loop._eos = greedy[3]
        lease = _start(loop, engine, params, GenerationLimits(10, stop_on_eos=True))
        expected = DecodeFinish.STOP
    else:
        lease = _start(loop, engine, params, GenerationLimits(5, stop_on_eos=False))
        expected = DecodeFinish.LENGTH
    collector.wait_finished(lease.lease_id, timeout=20)
    finish = collector.finish_of(lease.lease_id)
    assert finish is expected
    if end in ("eos", "stop"):
        assert collector.wait_finished(lease.lease_id) == greedy[1:3]
    assert table.counts()[SlotState.FREE] == engine.config.max_slots
    wait_no_pages_held(loop)

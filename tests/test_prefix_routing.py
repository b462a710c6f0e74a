"""Prefix-aware prefill routing (orchestrator/prefix_index.py, orchestrator/placement.py).

1. The index: leading-chain matches, the LRU bound, the refresh from a worker's
   `cached_tokens` (evictions, a wholly cached prompt, a worker without a cache), forget.
2. The policy: the longest predicted prefix wins within the queue bound; an overloaded
   holder loses to load; ties by fewest outstanding, then address; no match is least
   loaded; workers no longer up are forgotten.

End to end, through the orchestrator to two prefill workers: tests/test_prefix_routing_e2e.py.
"""

from __future__ import annotations

import pytest

from orchestrator.app import placement_policy
from orchestrator.config import parse_orchestrator_args
from orchestrator.placement import LeastLoadedPolicy, PrefixAwarePolicy, RouteOutcome
from orchestrator.prefix_index import COLD_ANSWERS, PrefixIndex
from orchestrator.registry import Health, Worker, WorkerRole
from shared.config import ConfigError
from shared.transport.types import (
    PrefillResult,
    PrefillTimings,
)

B = 8  # tokens per block in these tests (the test engine's page size)
PREFILL = frozenset({WorkerRole.PREFILL})


def prompt(*blocks: int, extra: int = 0) -> list[int]:
    """Whole blocks of B tokens, block k all `k`, then `extra` tokens of a partial block."""
    return [t for b in blocks for t in [b] * B] + [999] * extra


def result(cached_tokens: int) -> PrefillResult:
    return PrefillResult(7, PrefillTimings(0.0, 0.0, 0.0, 0, cached_tokens))


def prefill_worker(address: str, outstanding: int = 0) -> Worker:
    worker = Worker(address, PREFILL, decode=None, prefill=None, health=Health.UP)
    worker.outstanding = outstanding
    return worker


# 1. The index --------------------------------------------------------------------------------


def test_match_is_the_leading_run_of_whole_blocks():
    index = PrefixIndex(B, 100)
    index.record("a", index.hashes(prompt(1, 2, 3, extra=5)))
    assert index.blocks("a") == 3  # the partial block is never hashed
    assert index.match("a", index.hashes(prompt(1, 2, 3, 4))) == 3
    assert index.match("a", index.hashes(prompt(1, 2, 9))) == 2  # diverges at block 2
    assert index.match("a", index.hashes(prompt(9, 2, 3))) == 0  # chained: 2, 3 differ too
    assert index.match("b", index.hashes(prompt(1, 2, 3))) == 0
    assert index.match("a", index.hashes([1] * (B - 1))) == 0


def test_the_bound_drops_least_recent_prompts_deepest_blocks_first():
    index = PrefixIndex(B, 4)
    old, new = index.hashes(prompt(1, 2, 3)), index.hashes(prompt(5, 6, 7))
    index.record("a", old)
    index.record("a", new)
    assert index.blocks("a") == 4
    # The old prompt lost its two deepest blocks, never its first: the chain is intact.
    assert index.match("a", old) == 1 and index.match("a", new) == 3
    index.record("a", old[:1])  # touched: now the most recent
    index.record("a", index.hashes(prompt(8)))
    assert index.match("a", old) == 1 and index.match("a", new) == 2


def test_a_wholly_cached_prompt_reported_one_block_short_is_not_an_eviction():
    """The worker always computes the prompt's last token, so a page-aligned prompt held
    in full is served one block short: nothing is dropped."""
    index = PrefixIndex(B, 100)
    hashes = index.hashes(prompt(1, 2, 3, 4))
    index.record("a", hashes)
    assert index.expected_blocks(4 * B, predicted=4) == 3
    assert index.refresh("a", hashes, 4 * B, predicted=4, cached_tokens=3 * B) == 0
    assert index.match("a", hashes) == 4
    # Not page-aligned: every predicted block can be served.
    longer = index.hashes(prompt(1, 2, 3, 4, extra=1))
    assert index.refresh("a", longer, 4 * B + 1, predicted=4, cached_tokens=4 * B) == 0
    assert index.match("a", hashes) == 4


def test_an_eviction_drops_the_missing_blocks_and_everything_less_recent():
    """The worker served fewer blocks than predicted: the first missing one was evicted;
    its LRU evicts oldest first, so whatever we hold that is older went too."""
    index = PrefixIndex(B, 100)
    older, conversation, newer = (index.hashes(prompt(k, k + 1, k + 2)) for k in (10, 20, 30))
    for hashes in (older, conversation, newer):
        index.record("a", hashes)
    dropped = index.refresh("a", conversation, 3 * B + 2, predicted=3, cached_tokens=B)
    assert dropped == 3 + 2  # all of `older`, and the conversation's blocks 1 and 2
    assert index.match("a", older) == 0
    assert index.match("a", conversation) == 1
    assert index.match("a", newer) == 3
    # The worker has just cached the prompt again: recording restores it.
    index.record("a", conversation)
    assert index.match("a", conversation) == 3


def test_a_worker_that_never_reports_cached_tokens_stops_being_predicted():
    """A worker with its cache off reports 0 every time: after COLD_ANSWERS such answers
    where a hit was expected it matches nothing (no affinity: load decides) and nothing is
    recorded for it, until an answer reports cached tokens, or it is forgotten."""
    index = PrefixIndex(B, 100)
    hashes = index.hashes(prompt(1, 2, extra=3))
    index.record("a", hashes)
    for _ in range(COLD_ANSWERS - 1):
        index.refresh("a", hashes, 2 * B + 3, predicted=2, cached_tokens=0)
        assert not index.cacheless("a")
        index.record("a", hashes)  # the prefill succeeded: recorded again
        assert index.match("a", hashes) == 2
    # Answers where no hit was expected say nothing either way.
    index.refresh("a", index.hashes(prompt(5)), B + 1, predicted=0, cached_tokens=0)
    index.refresh("a", hashes, 2 * B + 3, predicted=2, cached_tokens=0)
    assert index.cacheless("a")
    index.record("a", hashes)
    assert index.match("a", hashes) == 0 and index.blocks("a") == 0
    # A prompt sent there by load that hit: the cache is on after all.
    index.refresh("a", hashes, 2 * B + 3, predicted=0, cached_tokens=B)
    assert not index.cacheless("a")
    index.record("a", hashes)
    assert index.match("a", hashes) == 2
    # A hit in between resets the count.
    for _ in range(COLD_ANSWERS - 1):
        index.refresh("a", hashes, 2 * B + 3, predicted=2, cached_tokens=0)
        index.record("a", hashes)
    index.refresh("a", hashes, 2 * B + 3, predicted=2, cached_tokens=2 * B)
    index.refresh("a", hashes, 2 * B + 3, predicted=2, cached_tokens=0)
    assert not index.cacheless("a")


def test_forget_and_retain():
    index = PrefixIndex(B, 100)
    hashes = index.hashes(prompt(1, 2))
    for worker in ("a", "b", "c"):
        index.record(worker, hashes)
    index.forget("a")
    assert index.match("a", hashes) == 0 and index.match("b", hashes) == 2
    assert index.retain(["b"]) == ["c"]
    assert index.workers() == ["b"]


# 2. The policy -------------------------------------------------------------------------------


def prefix_policy(max_queue_gap: int = 2) -> PrefixAwarePolicy:
    return PrefixAwarePolicy(PrefixIndex(B, 1000), max_queue_gap)


def test_the_longest_predicted_prefix_wins():
    policy = prefix_policy()
    a, b, c = prefill_worker("a:1"), prefill_worker("b:1", 1), prefill_worker("c:1", 2)
    policy.index.record("a:1", policy.index.hashes(prompt(1)))
    policy.index.record("b:1", policy.index.hashes(prompt(1, 2)))
    policy.index.record("c:1", policy.index.hashes(prompt(1, 2, 3)))
    routes = policy.rank_prefill([a, b, c], prompt(1, 2, 3, extra=4))
    assert [r.worker for r in routes] == [c, b, a]
    first = routes[0]
    assert first.outcome is RouteOutcome.AFFINITY
    assert first.predicted_blocks == 3 and first.predicted_tokens == 3 * B
    assert [r.predicted_blocks for r in routes] == [3, 2, 1]


def test_an_overloaded_holder_loses_to_load():
    """Affinity holds while the holder's queue exceeds the least-loaded worker's by at most
    the bound; past it the next-best eligible holder wins, else the least loaded."""
    policy = prefix_policy(max_queue_gap=2)
    held = prompt(1, 2, 3, extra=1)
    holder, half, idle = prefill_worker("a:1"), prefill_worker("b:1"), prefill_worker("c:1")
    policy.index.record("a:1", policy.index.hashes(held))
    policy.index.record("b:1", policy.index.hashes(prompt(1)))
    holder.outstanding = 2  # at the bound: still wins
    assert policy.rank_prefill([idle, half, holder], held)[0].worker is holder
    holder.outstanding = 3  # past it: the next-best holder within the bound
    routes = policy.rank_prefill([idle, half, holder], held)
    assert [r.worker for r in routes] == [half, idle, holder]
    assert routes[0].outcome is RouteOutcome.LOAD and routes[0].predicted_blocks == 1
    half.outstanding = 3  # both holders overloaded: the least loaded, however cold
    routes = policy.rank_prefill([idle, half, holder], held)
    assert routes[0].worker is idle and routes[0].outcome is RouteOutcome.LOAD
    assert routes[0].predicted_tokens == 0


def test_ties_go_to_fewest_outstanding_then_address():
    policy = prefix_policy()
    workers = [prefill_worker(f"p{i}:1", n) for i, n in enumerate((1, 0, 0, 1))]
    for w in workers:
        policy.index.record(w.address, policy.index.hashes(prompt(1, 2)))
    routes = policy.rank_prefill(workers, prompt(1, 2, 3))
    assert [r.worker.address for r in routes] == ["p1:1", "p2:1", "p0:1", "p3:1"]
    assert routes[0].outcome is RouteOutcome.AFFINITY


def test_no_match_is_least_loaded():
    policy, plain = prefix_policy(), LeastLoadedPolicy()
    workers = [prefill_worker(f"p{i}:1", n) for i, n in enumerate((3, 0, 1, 0))]
    policy.index.record("p0:1", policy.index.hashes(prompt(5)))  # another prompt
    routes = policy.rank_prefill(workers, prompt(1, 2))
    assert [r.worker for r in routes] == [r.worker for r in plain.rank_prefill(workers, [1])]
    assert [r.worker.address for r in routes] == ["p1:1", "p3:1", "p2:1", "p0:1"]
    assert routes[0].outcome is RouteOutcome.NONE and routes[0].predicted_tokens == 0
    assert policy.rank_prefill([], prompt(1)) == []


def test_what_a_prefill_teaches_and_forgetting_workers_no_longer_up():
    policy = prefix_policy()
    a, b = prefill_worker("a:1"), prefill_worker("b:1")
    turn1 = prompt(1, 2, extra=3)
    route = policy.rank_prefill([a, b], turn1)[0]
    assert route.worker is a and route.outcome is RouteOutcome.NONE
    policy.prefilled(route, result(cached_tokens=0))
    turn2 = prompt(1, 2, 3, 4, extra=1)  # turn 1's blocks, then more
    route = policy.rank_prefill([b, a], turn2)[0]
    assert route.worker is a and route.outcome is RouteOutcome.AFFINITY
    assert route.predicted_tokens == 2 * B
    # The worker says it held only the first block: the second was evicted.
    policy.prefilled(route, result(cached_tokens=B))
    assert policy.index.match("a:1", policy.index.hashes(turn2)) == 4  # re-cached by turn 2
    # `a` is ejected: the flow retains only the workers up; a returns with nothing known.
    policy.retain([b])
    route = policy.rank_prefill([a, b], turn2)[0]
    assert route.worker is a and route.outcome is RouteOutcome.NONE  # address tie-break


def test_flags_and_the_default_policy():
    base = ["--prefill", "p:1", "--decode", "d:1"]
    config = parse_orchestrator_args(base)
    assert config.prefill_routing == "prefix"
    assert config.prefix_affinity_max_queue == 4 and config.prefix_index_blocks == 65536
    policy = placement_policy(config)
    assert isinstance(policy, PrefixAwarePolicy) and policy.max_queue_gap == 4
    # The block size is the prefill workers' page size, learnt from their load reports.
    assert policy.index.block_tokens is None and policy.index.capacity == 65536
    config = parse_orchestrator_args([*base, "--prefill-routing", "least-loaded"])
    assert type(placement_policy(config)) is LeastLoadedPolicy
    for bad in (
        ["--prefix-index-blocks", "0"],
        ["--prefix-affinity-max-queue", "-1"],
    ):
        with pytest.raises(ConfigError):
            parse_orchestrator_args([*base, *bad])
    with pytest.raises(SystemExit):
        parse_orchestrator_args([*base, "--prefill-routing", "random"])

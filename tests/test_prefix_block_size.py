"""The prefix block size comes from the prefill workers (orchestrator/prefix_blocks.py).

1. The registry learns it from the workers' load reports; a worker whose page size
   disagrees with the others' is refused from prefix routing (ERROR log naming both sizes
   and the fix, a gauge), and let back in once it runs with the agreed size; when no worker
   at the agreed size is left, the size follows the workers that are.
2. The index cuts prompts where the worker's prefix cache cuts pages: for the same prompts,
   the blocks it predicts a worker holds are the blocks that worker's cache reuses.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from orchestrator.placement import PrefillRoute, PrefixAwarePolicy, RouteOutcome
from orchestrator.prefix_index import PrefixIndex
from orchestrator.registry import Health, Sources, Worker, WorkerRegistry, WorkerRole
from shared.kv.prefix_cache import PrefixPagePool
from shared.kv.prefix_hash import namespace
from shared.metrics import OrchestratorMetrics
from shared.transport.types import LoadReport, PrefillResult, PrefillTimings

B = 8  # the session cluster's page size


class FakePrefill:
    """A prefill worker's load report: its page size, settable."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size

    async def get_load(self) -> LoadReport:
        return LoadReport(4, 4, 0, 0, page_size=self.page_size)

    async def close(self) -> None:
        pass


class Network:
    """Prefill workers at the given page sizes, all healthy until `down`."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.clients = {address: FakePrefill(size) for address, size in sizes.items()}
        self.down: set[str] = set()

    def decode_client(self, address: str) -> None:
        raise AssertionError("no decode workers here")

    def prefill_client(self, address: str) -> FakePrefill:
        return self.clients[address]

    async def healthy(self, address: str, timeout: float) -> bool:
        return address not in self.down


def refused_gauge(metrics: OrchestratorMetrics) -> float:
    return metrics.prefix_refused_workers._value.get()


def worker(registry: WorkerRegistry, address: str) -> Worker:
    (found,) = [w for w in registry.all() if w.address == address]
    return found


def answer(cached_tokens: int) -> PrefillResult:
    return PrefillResult(7, PrefillTimings(0.0, 0.0, 0.0, 0, cached_tokens))


def test_the_block_size_is_the_workers_and_a_disagreeing_worker_is_refused(caplog):
    """Two workers at page size 8, one at 16: blocks are 8 tokens; the one at 16 is refused,
    logged at ERROR with both sizes and the fix, and counted; a prompt it prefilled earns it
    no affinity, while the same on an agreeing worker does."""

    async def body() -> None:
        net = Network({"p0:1": B, "p1:1": B, "p2:1": 2 * B})
        metrics = OrchestratorMetrics(CollectorRegistry())
        reg = WorkerRegistry(
            net, Sources(prefill=tuple(net.clients)), metrics, health_interval_s=3600
        )
        with caplog.at_level(logging.ERROR, logger="orchestrator.prefix_blocks"):
            await reg.start()
        try:
            assert reg.prefix_blocks.block_tokens == B
            refused = {w.address: w.prefix_refused for w in reg.all()}
            assert refused == {"p0:1": False, "p1:1": False, "p2:1": True}
            assert refused_gauge(metrics) == 1
            (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
            message = record.getMessage()
            assert "p2:1 has --page-size 16, the other prefill workers 8" in message
            assert "same --page-size (8)" in message
            await reg.check_all()  # a second round: the refusal is not logged again
            assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1

            policy = PrefixAwarePolicy(PrefixIndex(None, 1000), max_queue_gap=4)
            workers = reg.up(WorkerRole.PREFILL)
            turn1 = [1] * B + [2] * B + [3]
            turn2 = [*turn1, 4, 5, 6, 7, 8, 9, 10, 11]
            assert policy.index.hashes(turn1) == ()  # no size yet: nothing is hashed
            policy.rank_prefill(workers, turn1)  # learns it from the workers
            for address in ("p0:1", "p2:1"):
                route = PrefillRoute(worker(reg, address), len(turn1), policy.index.hashes(turn1))
                policy.prefilled(route, answer(0))
            routes = policy.rank_prefill(workers, turn2)
            assert policy.index.block_tokens == B  # learnt from the workers' reports
            assert routes[0].worker.address == "p0:1"
            assert routes[0].outcome is RouteOutcome.AFFINITY
            assert routes[0].predicted_tokens == 2 * B
            assert {r.worker.address: r.predicted_blocks for r in routes} == {
                "p0:1": 2,
                "p1:1": 0,
                "p2:1": 0,  # it was sent the prompt, but its blocks are not ours
            }
            assert policy.index.blocks("p2:1") == 0
        finally:
            await reg.stop()

    asyncio.run(body())


def test_a_refused_worker_restarted_at_the_agreed_size_is_let_back_in():
    async def body() -> None:
        net = Network({"p0:1": B, "p1:1": 2 * B})
        metrics = OrchestratorMetrics(CollectorRegistry())
        reg = WorkerRegistry(
            net, Sources(prefill=tuple(net.clients)), metrics, health_interval_s=3600
        )
        await reg.start()
        try:
            # A tie: the smaller size wins, deterministically.
            assert reg.prefix_blocks.block_tokens == B
            assert worker(reg, "p1:1").prefix_refused and refused_gauge(metrics) == 1
            net.clients["p1:1"].page_size = B  # restarted with the fix
            await reg.check_all()
            assert not worker(reg, "p1:1").prefix_refused and refused_gauge(metrics) == 0
        finally:
            await reg.stop()

    asyncio.run(body())


def test_with_no_worker_at_the_agreed_size_left_the_size_follows_the_others():
    async def body() -> None:
        net = Network({"p0:1": B, "p1:1": B, "p2:1": 2 * B})
        metrics = OrchestratorMetrics(CollectorRegistry())
        reg = WorkerRegistry(
            net, Sources(prefill=tuple(net.clients)), metrics, health_interval_s=3600
        )
        await reg.start()
        try:
            policy = PrefixAwarePolicy(PrefixIndex(None, 1000))
            prompt = [5] * (3 * B)
            policy.rank_prefill(reg.up(WorkerRole.PREFILL), prompt)  # learns B
            route = PrefillRoute(worker(reg, "p0:1"), len(prompt), policy.index.hashes(prompt))
            policy.prefilled(route, answer(0))
            assert policy.index.blocks("p0:1") == 3
            for address in ("p0:1", "p1:1"):
                reg.eject(worker(reg, address), "test: gone")
            assert reg.prefix_blocks.block_tokens == 2 * B
            assert not worker(reg, "p2:1").prefix_refused and refused_gauge(metrics) == 0
            (routed,) = policy.rank_prefill(reg.up(WorkerRole.PREFILL), prompt)
            assert policy.index.block_tokens == 2 * B
            assert policy.index.workers() == []  # blocks of 8 name nothing at 16
            assert routed.worker.address == "p2:1" and routed.outcome is RouteOutcome.NONE
            assert worker(reg, "p0:1").health is Health.DOWN
        finally:
            await reg.stop()

    asyncio.run(body())


def test_the_index_predicts_exactly_the_blocks_the_workers_cache_reuses():
    """The same prompts through a worker's prefix cache (page size 8) and the index: for
    each new prompt, the blocks the index predicts the worker serves from its cache are the
    whole blocks the cache reuses."""
    pool = PrefixPagePool(num_pages=64, page_size=B, root=namespace("w"), capacity_pages=48)
    index = PrefixIndex(B, 1000)
    system = list(range(100, 100 + 2 * B))  # a shared system prompt of two blocks
    prompts = [
        [*system, 1, 2, 3],
        [*system, 1, 2, 3, *range(20, 30)],  # the previous prompt, then more
        [*system, 9, 9],  # the system prompt only
        [100, 101, *range(40, 60)],  # shares less than a block
        list(range(100, 100 + 2 * B)),  # exactly the system prompt: one block short
        [*system, *range(200, 200 + 3 * B)],
    ]
    predictions, reused = [], []
    for prompt in prompts:
        hashes = index.hashes(prompt)
        predictions.append(index.expected_blocks(len(prompt), index.match("w", hashes)))
        reused.append(pool.cached_blocks(prompt))
        lookup = pool.acquire(prompt)
        assert lookup.hit_pages == reused[-1]
        pool.finish(prompt, lookup)
        index.record("w", hashes)
    assert predictions == reused == [0, 2, 2, 0, 1, 2]

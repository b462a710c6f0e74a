"""The orchestrator's swappable pieces, each on its own: policy, text, registry, queue."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from orchestrator.admission import QueueFullError, SlotBroker
from orchestrator.placement import LeastLoadedPolicy
from orchestrator.registry import Health, Sources, Worker, WorkerRegistry, WorkerRole, resolve
from orchestrator.text import TextStream
from shared.metrics import OrchestratorMetrics
from shared.tokenizer import ByteTokenizer
from shared.transport.types import (
    GenerationLimits,
    Lease,
    LoadReport,
    ReserveRequest,
    StatusCode,
    TransportError,
)

DECODE = frozenset({WorkerRole.DECODE})


def decode_worker(
    address: str, total: int, free: int, leases: int = 0, pages: tuple[int, int] | None = None
) -> Worker:
    """`pages`: (free, total) KV pages of 16 positions; None: a worker without pages."""
    worker = Worker(address, DECODE, decode=None, prefill=None, health=Health.UP)
    worker.leases = leases
    free_pages, total_pages = pages or (0, 0)
    page_size = 16 if pages else 0
    worker.set_load(LoadReport(free, total, 0, total - free, free_pages, total_pages, page_size))
    return worker


# Policy -------------------------------------------------------------------------------------


def test_decode_goes_to_the_most_free_slots_ties_by_address():
    a = decode_worker("a:1", total=8, free=2)
    b = decode_worker("b:1", total=8, free=6)
    c = decode_worker("c:1", total=8, free=6)
    full = decode_worker("d:1", total=8, free=0)
    assert LeastLoadedPolicy().rank_decode([a, full, c, b], prompt_length=10) == [b, c, a]


def test_decode_goes_to_the_largest_free_share_of_kv_pages():
    """Pages, not slots, are what decode capacity is made of: a worker with fewer free
    slots but a larger free share of its pool goes first; one without the pages the prompt
    needs (prompt + first token) is left out, whatever its slots."""
    roomy = decode_worker("a:1", total=8, free=2, pages=(90, 100))
    busy = decode_worker("b:1", total=8, free=7, pages=(30, 100))
    big_pool = decode_worker("c:1", total=8, free=7, pages=(300, 1000))
    short = decode_worker("d:1", total=8, free=8, pages=(2, 100))
    policy = LeastLoadedPolicy()
    assert policy.rank_decode([short, busy, big_pool, roomy], prompt_length=40) == [
        roomy,
        busy,
        big_pool,
    ]
    # 2 free pages hold 32 positions: a 31-token prompt and its first token fit, 32 do not.
    assert short in policy.rank_decode([short], prompt_length=31)
    assert policy.rank_decode([short], prompt_length=32) == []


def test_pages_promised_since_the_last_report_count_at_once():
    w = decode_worker("a:1", total=4, free=4, pages=(10, 10))
    w.granted(prompt_length=40)  # 41 positions: 3 pages
    assert w.free_pages == 7 and w.free_slots == 3
    w.set_load(LoadReport(3, 4, 0, 1, free_pages=7, total_pages=10, page_size=16))
    assert w.free_pages == 7  # the report includes the promise; not counted twice
    w.mark_full()  # Reserve said RESOURCE_EXHAUSTED: no pages until the next report
    assert w.free_pages == 0 and not w.fits(1)


def test_our_own_leases_count_at_once_and_others_at_each_report():
    w = decode_worker("a:1", total=4, free=4)
    w.leases = 3  # granted since the report
    assert w.free_slots == 1
    w.set_load(LoadReport(free_slots=0, total_slots=4, queue_depth=0, live_requests=4))
    assert w.others == 1 and w.free_slots == 0  # one slot is someone else's
    w.leases = 1  # two of ours finished
    assert w.free_slots == 2
    w.mark_full()
    assert w.free_slots == 0


def test_prefill_goes_to_the_fewest_outstanding():
    workers = [Worker(f"p{i}:1", frozenset({WorkerRole.PREFILL}), None, None) for i in range(3)]
    for w, n in zip(workers, (3, 0, 1), strict=True):
        w.outstanding = n
    assert [r.worker.address for r in LeastLoadedPolicy().rank_prefill(workers, [1, 2])] == [
        "p1:1",
        "p2:1",
        "p0:1",
    ]


# Text ---------------------------------------------------------------------------------------


def feed(stream: TextStream, text: str) -> list[str]:
    return [stream.push([b]) for b in text.encode()]


def test_stop_string_spanning_tokens_cuts_before_it():
    stream = TextStream(ByteTokenizer(320), [], ["END"])
    pieces = feed(stream, "abcEN") + feed(stream, "Dxyz")
    assert "".join(pieces) == "abc"
    assert stream.stopped and stream.finish() == ""


def test_text_held_back_for_a_possible_stop_is_released_at_the_end():
    stream = TextStream(ByteTokenizer(320), [], ["END"])
    assert "".join(feed(stream, "xxEN")) == "xx"  # "EN" might start "END"
    assert stream.finish() == "EN"


def test_first_of_several_stop_strings_wins_and_utf8_is_never_split():
    stream = TextStream(ByteTokenizer(320), [], ["é!", "zz"])
    pieces = feed(stream, "aé") + feed(stream, "é!zz")
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "aé"


# Registry -----------------------------------------------------------------------------------


class Network:
    """Addresses that answer health checks (a hand-computable Connector)."""

    def __init__(self, up: set[str]) -> None:
        self.up = up

    def decode_client(self, address: str) -> FakeDecode:
        return FakeDecode(address, self)

    def prefill_client(self, address: str) -> None:
        return None

    async def healthy(self, address: str, timeout: float) -> bool:
        return address in self.up


class FakeDecode:
    """Grants leases while it has room; answers load reports."""

    def __init__(self, address: str, network: Network, total: int = 2) -> None:
        self.address, self.network, self.total, self.leases = address, network, total, set()

    async def get_load(self) -> LoadReport:
        return LoadReport(self.total - len(self.leases), self.total, 0, len(self.leases))

    async def reserve(self, request: ReserveRequest) -> Lease:
        if len(self.leases) >= self.total:
            raise TransportError(StatusCode.RESOURCE_EXHAUSTED, "full")
        lease = Lease(f"{self.address}/{request.request_id}", len(self.leases), 0.0)
        self.leases.add(lease.lease_id)
        return lease

    async def cancel(self, lease_id: str) -> bool:
        return self.leases.discard(lease_id) is None

    async def close(self) -> None:
        pass


def test_failed_worker_is_ejected_and_readmitted_when_healthy():
    async def body() -> None:
        net = Network({"d1:1", "d2:1"})
        metrics = OrchestratorMetrics(CollectorRegistry())
        reg = WorkerRegistry(net, Sources(decode=("d1:1", "d2:1")), metrics, health_interval_s=0.05)
        await reg.start()
        try:
            assert {w.address for w in reg.up(WorkerRole.DECODE)} == {"d1:1", "d2:1"}
            d1 = next(w for w in reg.all() if w.address == "d1:1")
            net.up.discard("d1:1")
            reg.eject(d1, "call failed")
            assert [w.address for w in reg.up(WorkerRole.DECODE)] == ["d2:1"]
            await asyncio.sleep(0.2)
            assert d1.health is Health.DOWN  # still failing its checks
            net.up.add("d1:1")
            await asyncio.sleep(0.2)
            assert d1.health is Health.UP
            assert metrics.workers_up.labels("decode")._value.get() == 2
        finally:
            await reg.stop()

    asyncio.run(body())


def test_dns_names_resolve_to_every_address():
    async def body() -> None:
        assert await resolve("localhost:7000") in (
            ["127.0.0.1:7000"],
            ["127.0.0.1:7000", "[::1]:7000"],
            ["[::1]:7000", "127.0.0.1:7000"],
        )
        assert await resolve("no-such-host.invalid:7000") == []
        net = Network({"127.0.0.1:7000"})
        reg = WorkerRegistry(
            net, Sources(decode_dns=("localhost:7000",)), OrchestratorMetrics(CollectorRegistry())
        )
        await reg.start()
        try:
            assert "127.0.0.1:7000" in [w.address for w in reg.up(WorkerRole.DECODE)]
        finally:
            await reg.stop()

    asyncio.run(body())


# Admission ----------------------------------------------------------------------------------


def test_queue_is_fifo_bounded_and_waits_for_a_release():
    async def body() -> None:
        net = Network({"d:1"})
        metrics = OrchestratorMetrics(CollectorRegistry())
        reg = WorkerRegistry(net, Sources(decode=("d:1",)), metrics, health_interval_s=10)
        await reg.start()
        broker = SlotBroker(reg, LeastLoadedPolicy(), metrics, max_queue=2)
        broker.start()
        limits = GenerationLimits(4)

        def request(i: int) -> ReserveRequest:
            return ReserveRequest(f"r{i}", 3, limits, ttl_seconds=10)

        try:
            first = [await broker.acquire(request(i)) for i in range(2)]  # the two slots
            waiting = [asyncio.create_task(broker.acquire(request(i))) for i in (2, 3)]
            await asyncio.sleep(0.05)
            assert broker.depth == 2
            with pytest.raises(QueueFullError, match=r"full \(2 requests waiting"):
                await broker.acquire(request(4))
            worker, lease = first[0]
            await worker.decode.cancel(lease.lease_id)
            broker.release(worker)
            granted = await asyncio.wait_for(waiting[0], 2)  # arrival order
            assert granted[1].lease_id.endswith("/r2") and not waiting[1].done()
        finally:
            for task in waiting:
                task.cancel()
            await broker.stop()
            await reg.stop()

    asyncio.run(body())


def test_a_slow_health_check_does_not_eject_but_repeated_failures_do():
    async def body() -> None:
        net = Network({"d:1"})
        reg = WorkerRegistry(
            net,
            Sources(decode=("d:1",)),
            OrchestratorMetrics(CollectorRegistry()),
            health_interval_s=3600,
        )
        await reg.start()
        try:
            (worker,) = reg.all()
            net.up.discard("d:1")
            for expected in (Health.UP, Health.UP, Health.DOWN):
                assert not await reg.check(worker)
                assert worker.health is expected
            net.up.add("d:1")
            assert await reg.check(worker) and worker.health is Health.UP
        finally:
            await reg.stop()

    asyncio.run(body())

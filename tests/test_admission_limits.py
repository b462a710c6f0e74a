"""Admission refuses what no decode worker could ever hold, and queues what only an idle one
can (orchestrator/admission.py).

1. The broker on its own, with hand-built load reports: a request over every worker's
   max_seq_len, or over every whole KV pool, is refused at once naming the limits; with no
   worker having both, too; a waiting request is refused when the workers that could hold
   it go.
2. A real tiny cluster on loopback (prefill, decode with a 16-page pool, orchestrator with
   the HTTP API): over max_seq_len and over the whole pool are refused at once through
   gRPC (INVALID_ARGUMENT) and HTTP (400, OpenAI's error shape), nothing is held after and
   the next request is served exactly; a prompt that fits the idle worker but not the busy
   one waits in the queue (counted, not timed) and is served once the worker frees.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from orchestrator.admission import RequestTooLarge, SlotBroker
from orchestrator.placement import LeastLoadedPolicy
from orchestrator.registry import Sources, WorkerRegistry, WorkerRole
from shared.client.generator import AsyncGeneratorClient, Chunk, GenerateError
from shared.engine.engine import Engine, Params
from shared.metrics import OrchestratorMetrics
from shared.transport.grpc_transport import GrpcDecodeClient
from shared.transport.types import (
    GenerationLimits,
    Lease,
    LoadReport,
    ReserveRequest,
    StatusCode,
    TransportConfig,
    TransportError,
)
from tests.cluster_harness import spawn_orchestrator
from tests.reference import reference_greedy, scrape
from tests.worker_harness import spawn_worker

# 1. The broker ------------------------------------------------------------------------------


class FakeDecode:
    """A decode worker's load report (sizes settable; always idle) and a Reserve that
    answers RESOURCE_EXHAUSTED while `full` is set (busy with another replica's work that
    its reports have not shown yet)."""

    def __init__(self, max_seq_len: int, total_pages: int, page_size: int = 8) -> None:
        self.max_seq_len, self.total_pages, self.page_size = max_seq_len, total_pages, page_size
        self.full = False
        self.reserves = 0

    async def get_load(self) -> LoadReport:
        pages = self.total_pages
        return LoadReport(4, 4, 0, 0, pages, pages, self.page_size, self.max_seq_len)

    async def reserve(self, request: ReserveRequest) -> Lease:
        self.reserves += 1
        if self.full:
            raise TransportError(StatusCode.RESOURCE_EXHAUSTED, "full")
        return Lease(f"lease-{self.reserves}", 0, 0.0)

    async def cancel(self, lease_id: str) -> bool:
        return True

    async def close(self) -> None:
        pass


class Network:
    def __init__(self, workers: dict[str, FakeDecode]) -> None:
        self.workers = workers
        self.down: set[str] = set()

    def decode_client(self, address: str) -> FakeDecode:
        return self.workers[address]

    def prefill_client(self, address: str) -> None:
        return None

    async def healthy(self, address: str, timeout: float) -> bool:
        return address not in self.down


def reserve(prompt: int, max_tokens: int) -> ReserveRequest:
    return ReserveRequest("r", prompt, GenerationLimits(max_tokens), ttl_seconds=10)


def run_broker(workers: dict[str, FakeDecode], body) -> None:
    async def main() -> None:
        net = Network(workers)
        metrics = OrchestratorMetrics(CollectorRegistry())
        registry = WorkerRegistry(
            net, Sources(decode=tuple(workers)), metrics, health_interval_s=3600
        )
        await registry.start()
        broker = SlotBroker(registry, LeastLoadedPolicy(), metrics, max_queue=4)
        broker.start()
        try:
            await body(net, registry, broker)
        finally:
            await broker.stop()
            await registry.stop()

    asyncio.run(main())


def test_a_request_over_every_limit_is_refused_naming_the_limits():
    workers = {"a:1": FakeDecode(64, 20), "b:1": FakeDecode(128, 16)}  # pools: 160, 128

    async def body(net, registry, broker) -> None:
        with pytest.raises(RequestTooLarge) as err:
            await broker.acquire(reserve(150, 20))
        message = str(err.value)
        assert "prompt_tokens (150) + max_tokens (20) = 170 tokens" in message
        assert "largest max_seq_len, b:1: 170 exceeds this worker's max_seq_len (128)" in message
        assert "largest KV pool, a:1: 170 exceeds its whole pool (20 pages of 8 = 160" in message
        assert broker.depth == 0 and sum(w.reserves for w in workers.values()) == 0
        # 128 positions: b holds them exactly (max_seq_len 128, 16 pages); a, too short
        # however idle, is never tried.
        worker, lease = await broker.acquire(reserve(100, 28))
        assert worker.address == "b:1" and lease.lease_id == "lease-1"
        assert workers["a:1"].reserves == 0

    run_broker(workers, body)


def test_over_the_pool_alone_and_over_no_single_worker():
    """A worker that reports no max_seq_len is bounded by its pool; two workers each with
    only one of the limits large enough hold nothing larger than both."""
    workers = {"a:1": FakeDecode(0, 8), "b:1": FakeDecode(256, 4, page_size=16)}

    async def body(net, registry, broker) -> None:
        with pytest.raises(RequestTooLarge) as err:
            await broker.acquire(reserve(60, 10))  # 70 > a's 64-token pool, b's 64 too
        message = str(err.value)
        assert "largest KV pool, a:1: 70 exceeds its whole pool (8 pages of 8 = 64" in message
        assert "max_seq_len, b:1" not in message  # 70 is within b's max_seq_len
        # a: max_seq_len 128, pool 64 tokens; b: max_seq_len 48, pool 512 tokens.
        workers["a:1"].max_seq_len = 128
        workers["b:1"].total_pages, workers["b:1"].max_seq_len = 32, 48
        await registry.check_all()
        with pytest.raises(RequestTooLarge, match="none has both the max_seq_len and the KV"):
            await broker.acquire(reserve(60, 10))

    run_broker(workers, body)


def test_a_waiting_request_is_refused_when_the_workers_that_could_hold_it_go():
    """It fits only the big worker, which is full: it waits; the big worker is ejected and
    only the small one is left, which never could: the waiter is refused."""
    big, small = FakeDecode(128, 16), FakeDecode(32, 4)
    big.full = True
    workers = {"big:1": big, "small:1": small}

    async def body(net, registry, broker) -> None:
        await registry.check_all()
        waiting = asyncio.create_task(broker.acquire(reserve(60, 10)))
        while big.reserves < 3:  # placed on the big worker round after round, never small
            assert not waiting.done()
            await asyncio.sleep(0.01)
        assert not waiting.done() and broker.depth == 1 and small.reserves == 0
        net.down.add("big:1")
        (worker,) = [w for w in registry.all() if w.address == "big:1"]
        registry.eject(worker, "test: gone")
        with pytest.raises(RequestTooLarge, match="70 exceeds this worker's max_seq_len \\(32"):
            await asyncio.wait_for(waiting, 5)
        assert broker.depth == 0
        assert [w.address for w in registry.up(WorkerRole.DECODE)] == ["small:1"]

    run_broker(workers, body)


# 2. A real cluster ---------------------------------------------------------------------------

KV_PAGES = 17  # 16 pages of 8 (128 tokens) and the scratch page; max_seq_len stays 64
# A bound, not a speed: a refusal needs no model work, and the request it replaces waited
# for its deadline.
REFUSED_WITHIN_S = 15.0


class Cluster:
    """A prefill and a decode process (the harness's test engine, then KV_PAGES) and an
    orchestrator with the HTTP API, started one after the other from the test thread."""

    def __init__(self) -> None:
        self.processes: list = []
        try:
            self.prefill = self._spawn(spawn_worker("prefill"))
            self.decode = self._spawn(spawn_worker("decode", "--kv-pages", str(KV_PAGES)))
            self.orchestrator = self._spawn(
                spawn_orchestrator(
                    "--prefill",
                    self.prefill.address,
                    "--decode",
                    self.decode.address,
                    "--http-port",
                    "0",
                )
            )
        except BaseException:
            self.close()
            raise
        self.http = f"http://127.0.0.1:{self.orchestrator.http_port}"

    def _spawn(self, process):
        self.processes.append(process)
        return process

    async def generate(
        self, prompt: list[int], timeout: float = 120.0, **options: object
    ) -> list[Chunk]:
        async with AsyncGeneratorClient(self.orchestrator.address) as client:
            return [c async for c in client.generate(prompt, timeout=timeout, **options)]

    def decode_client(self) -> GrpcDecodeClient:
        return GrpcDecodeClient(self.decode.address, TransportConfig(rpc_timeout_s=10.0))

    def queue_depth(self) -> float:
        return scrape(self.orchestrator.metrics_port)["pdserve_queue_depth{}"]

    def close(self) -> None:
        for process in reversed(self.processes):
            process.proc.kill()
            process.proc.wait(10)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.close()


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=REFUSED_WITHIN_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def decode_load(cluster: Cluster) -> LoadReport:
    client = cluster.decode_client()
    try:
        return await client.get_load()
    finally:
        await client.close()


async def served_exactly(cluster: Cluster, engine: Engine, params: Params) -> None:
    prompt = [256, 5, 6, 7, 8, 9]
    chunks = await cluster.generate(prompt, max_tokens=4, ignore_eos=True)
    assert [t for c in chunks for t in c.token_ids] == reference_greedy(engine, params, prompt, 4)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("prompt_tokens", "max_tokens", "limits"),
    [
        pytest.param(50, 20, ["70 exceeds this worker's max_seq_len (64)"], id="over-max-seq-len"),
        pytest.param(
            300,
            4,
            [
                "304 exceeds this worker's max_seq_len (64)",
                "304 exceeds its whole pool (16 pages of 8 = 128 tokens)",
            ],
            id="over-the-whole-pool",
        ),
    ],
)
def test_what_no_worker_can_hold_is_refused_at_once(
    cluster, engine, params, prompt_tokens, max_tokens, limits
):
    """Refused at once through both APIs: within the call's deadline of REFUSED_WITHIN_S
    (without the refusal it would wait in the queue past it, DEADLINE_EXCEEDED); nothing
    held afterwards; the next request is exact."""
    prompt = [256, *([7] * (prompt_tokens - 1))]
    total = prompt_tokens + max_tokens
    head = f"prompt_tokens ({prompt_tokens}) + max_tokens ({max_tokens}) = {total} tokens"

    async def body() -> None:
        with pytest.raises(GenerateError) as err:
            await cluster.generate(prompt, REFUSED_WITHIN_S, max_tokens=max_tokens, ignore_eos=True)
        assert err.value.code == "INVALID_ARGUMENT"
        assert head in err.value.message
        for limit in limits:
            assert limit in err.value.message
        status, answer = post(
            f"{cluster.http}/v1/completions",
            {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens},
        )
        assert status == 400, answer
        error = answer["error"]
        assert error["type"] == "invalid_request_error" and head in error["message"]
        assert set(error) >= {"message", "type", "param", "code"}
        load = await decode_load(cluster)
        assert load.free_slots == load.total_slots and load.free_pages == load.total_pages
        assert cluster.queue_depth() == 0
        await served_exactly(cluster, engine, params)

    asyncio.run(body())


@pytest.mark.timeout(240)
def test_a_prompt_that_fits_only_the_idle_worker_waits_then_is_served(cluster, engine, params):
    """Two leases taken on the decode worker directly (another orchestrator replica's, say)
    hold 11 of its 16 pages; a 40-token prompt needs 6 at admission: it fits the idle
    worker, so it is not refused, and waits in the queue (its depth is counted); once one
    lease ends it is served, exactly."""
    prompt = [256, *range(100, 139)]  # 40 tokens: 6 pages of 8 with the first token

    async def body() -> None:
        client = cluster.decode_client()
        try:
            big = await client.reserve(ReserveRequest("hold-big", 63, GenerationLimits(1), 60))
            held = await client.reserve(ReserveRequest("hold-small", 20, GenerationLimits(1), 60))
            load = await client.get_load()
            assert load.free_pages == 16 - 8 - 3
            waiting = asyncio.create_task(cluster.generate(prompt, max_tokens=8, ignore_eos=True))
            deadline = time.monotonic() + 60
            while cluster.queue_depth() != 1:
                assert not waiting.done(), waiting
                assert time.monotonic() < deadline, "the request never queued"
                await asyncio.sleep(0.05)
            assert not waiting.done()
            assert await client.cancel(big.lease_id)
            chunks = await waiting
            tokens = [t for c in chunks for t in c.token_ids]
            assert tokens == reference_greedy(engine, params, prompt, 8)
            assert cluster.queue_depth() == 0
            assert await client.cancel(held.lease_id)
        finally:
            await client.close()

    asyncio.run(body())
    asyncio.run(served_exactly(cluster, engine, params))

"""Prefix-aware prefill routing (orchestrator/prefix_index.py, orchestrator/placement.py).

1. The index: leading-chain matches, the LRU bound, the refresh from a worker's
   `cached_tokens` (evictions, a wholly cached prompt, a worker without a cache), forget.
2. The policy: the longest predicted prefix wins within the queue bound; an overloaded
   holder loses to load; ties by fewest outstanding, then address; no match is least
   loaded; workers no longer up are forgotten.
3. End to end (issue 14, test 4): a multi-turn conversation through the orchestrator to
   TWO prefill workers lands every turn on the same prefill worker; with that worker
   overloaded (prefills held on it), the next turn goes to the other. Over the fake
   transport and over real loopback gRPC, on the `tiny` model.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from decode_server.worker import build_decode_worker
from orchestrator.app import build_orchestrator, placement_policy
from orchestrator.config import parse_orchestrator_args
from orchestrator.connect import GrpcConnector
from orchestrator.placement import LeastLoadedPolicy, PrefixAwarePolicy, RouteOutcome
from orchestrator.prefix_index import COLD_ANSWERS, PrefixIndex
from orchestrator.registry import Health, Worker, WorkerRole
from prefill_server.kv_push import RemoteKvSink
from prefill_server.loop import PrefillLoop
from prefill_server.service import PrefillService
from shared.config import ConfigError
from shared.engine.engine import Engine, Params
from shared.metrics import WorkerMetrics
from shared.serving.runtime import ModelRuntime
from shared.serving.worker_config import Role, parse_worker_args
from shared.transport.base import PrefillClient
from shared.transport.fake import FakeNetwork
from shared.transport.grpc_transport import GrpcDecodeClient
from shared.transport.server import RunningServer, decode_service, prefill_service, start_server
from shared.transport.types import (
    PrefillRequest,
    PrefillResult,
    PrefillTimings,
    TransportConfig,
)
from shared.weights.model_info import load_model_info
from tests.cluster_harness import FakeConnector, InProcessApi
from tests.reference import metric_samples, reference_greedy
from tests.worker_harness import ENGINE_FLAGS, TRANSPORT

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


# 3. End to end -------------------------------------------------------------------------------


class Recorder:
    """Wraps the orchestrator's prefill clients: which worker got which prompt, and what it
    answered; a worker's calls can be held (its gate closed) to overload it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.cached: dict[tuple[int, ...], int] = {}
        self.gates: dict[str, asyncio.Event] = {}

    def wrap(self, address: str, client: PrefillClient) -> PrefillClient:
        return _RecordingClient(self, address, client)

    def worker_of(self, prompt_ids: list[int]) -> str:
        (address,) = [a for a, p in self.calls if p == tuple(prompt_ids)]
        return address

    def entered(self, address: str) -> int:
        return sum(1 for a, _ in self.calls if a == address)


class _RecordingClient:
    def __init__(self, recorder: Recorder, address: str, inner: PrefillClient) -> None:
        self._recorder, self._address, self._inner = recorder, address, inner

    async def prefill(self, request: PrefillRequest, timeout: float | None = None) -> PrefillResult:
        self._recorder.calls.append((self._address, request.prompt_token_ids))
        gate = self._recorder.gates.get(self._address)
        if gate is not None:
            await gate.wait()
        answer = await self._inner.prefill(request, timeout=timeout)
        self._recorder.cached[request.prompt_token_ids] = answer.timings.cached_tokens
        return answer

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class RecordingFakeConnector(FakeConnector):
    def __init__(self, network: FakeNetwork, recorder: Recorder) -> None:
        super().__init__(network)
        self.recorder = recorder

    def prefill_client(self, address: str):
        return self.recorder.wrap(address, super().prefill_client(address))


class RecordingGrpcConnector(GrpcConnector):
    def __init__(self, config: TransportConfig, recorder: Recorder) -> None:
        super().__init__(config)
        self.recorder = recorder

    def prefill_client(self, address: str):
        return self.recorder.wrap(address, super().prefill_client(address))


PREFILL_ADDRESSES = ("prefill-0:1", "prefill-1:1")  # the fake transport's


class TwoPrefillCluster:
    """One decode worker, two prefill workers and the orchestrator (prefix routing, blocks
    of the engine's page size as the workers report it, affinity bound 1) in this event
    loop, over the fake transport or real loopback gRPC."""

    def __init__(self, engine: Engine, params: Params, fingerprint: str, grpc: bool) -> None:
        self.engine, self.params, self.fingerprint, self.grpc = engine, params, fingerprint, grpc
        self.recorder = Recorder()
        self.fatal: list[BaseException] = []
        self.servers: list[RunningServer] = []
        self.loops: list[PrefillLoop] = []
        self.sinks: list[RemoteKvSink] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        runtime = ModelRuntime(self.engine, self.params, self.fingerprint, None)
        config = parse_worker_args(["--port", "0", *ENGINE_FLAGS], Role.DECODE)
        self.decode = build_decode_worker(
            runtime, config, WorkerMetrics(CollectorRegistry(), "decode"), self.fatal.append
        )
        self.decode.start(loop)
        network = FakeNetwork()
        if self.grpc:
            server = await start_server(
                "127.0.0.1:0", [decode_service(self.decode.service)], TransportConfig()
            )
            self.servers.append(server)
            decode_address = f"127.0.0.1:{server.port}"

            def connect(address: str) -> GrpcDecodeClient:
                return GrpcDecodeClient(address, TRANSPORT)

        else:
            decode_address = "decode-0:1"
            network.serve(decode_address, self.decode.service)
            connect = network.decode_client
        self.prefill: list[str] = []
        for i in range(2):
            sink = RemoteKvSink(TRANSPORT, self.fingerprint, connect)
            prefill_loop = PrefillLoop(
                self.engine,
                self.params,
                sink,
                WorkerMetrics(CollectorRegistry(), "prefill"),
                max_queue=64,
                on_fatal=self.fatal.append,
            )
            prefill_loop.start(loop)
            self.sinks.append(sink)
            self.loops.append(prefill_loop)
            service = PrefillService(prefill_loop, self.fingerprint, 64)
            if self.grpc:
                server = await start_server(
                    "127.0.0.1:0", [prefill_service(service)], TransportConfig()
                )
                self.servers.append(server)
                self.prefill.append(f"127.0.0.1:{server.port}")
            else:
                network.serve(PREFILL_ADDRESSES[i], service)
                self.prefill.append(PREFILL_ADDRESSES[i])
        flags = [
            "--prefill",
            ",".join(self.prefill),
            "--decode",
            decode_address,
            "--health-interval-s",
            "0.5",
            "--prefix-affinity-max-queue",
            "1",
        ]
        connector = (
            RecordingGrpcConnector(TransportConfig(), self.recorder)
            if self.grpc
            else RecordingFakeConnector(network, self.recorder)
        )
        self.connector, self.network = connector, network
        self.registry = CollectorRegistry()
        config = parse_orchestrator_args(flags)
        self.policy = placement_policy(config)
        assert isinstance(self.policy, PrefixAwarePolicy)
        self.orchestrator = build_orchestrator(
            config, connector, load_model_info("tiny"), self.registry, self.policy
        )
        await self.orchestrator.start()
        self.api = InProcessApi(self.orchestrator)

    def metric(self, name: str) -> float:
        return metric_samples(generate_latest(self.registry).decode()).get(name, 0.0)

    def routed(self, outcome: str) -> float:
        return self.metric(f"pdserve_prefill_routing_total{{outcome={outcome}}}")

    async def close(self) -> None:
        for gate in self.recorder.gates.values():
            gate.set()
        await self.orchestrator.stop()
        if isinstance(self.connector, GrpcConnector):
            await self.connector.close()
        for prefill_loop in self.loops:
            prefill_loop.stop()
        await self.decode.drain(0.0)
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                await sink.close()
        for server in self.servers:
            await server.stop(None)
        assert not self.fatal, self.fatal


async def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run_cluster(
    engine: Engine,
    params: Params,
    fingerprint: str,
    grpc: bool,
    body: Callable[[TwoPrefillCluster], Awaitable[None]],
) -> None:
    async def main() -> None:
        cluster = TwoPrefillCluster(engine, params, fingerprint, grpc)
        await cluster.start()
        try:
            await body(cluster)
        finally:
            await cluster.close()

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["fake", "grpc"])
def test_a_conversation_stays_on_one_prefill_worker_until_it_is_overloaded(
    transport, engine, params, tiny_fingerprint
):
    """Issue 14, test 4. Turn 1 lands on the second prefill worker (the first is busy);
    turns 2 and 3 follow it there by affinity though the first is as idle and sorts
    first by address; then, with two prefills held on it (the bound is 1), turn 4 goes to
    the other worker, and every turn's tokens equal the reference."""
    generated = 3

    def turn(history: list[int], reply: list[int], new: list[int]) -> list[int]:
        return history + reply + new

    async def ask(cluster: TwoPrefillCluster, ids: list[int]) -> list[int]:
        chunks = await cluster.api.generate(ids, max_tokens=generated, ignore_eos=True)
        out = [t for c in chunks for t in c.token_ids]
        assert out == reference_greedy(engine, params, ids, generated)
        return out

    async def body(cluster: TwoPrefillCluster) -> None:
        first, second = sorted(cluster.prefill)  # `first` wins address tie-breaks
        rec = cluster.recorder
        # The block size came from the workers' load reports (no flag sets it).
        assert cluster.orchestrator.registry.prefix_blocks.block_tokens == B
        # Turn 1 while `first` is busy with another prompt: least loaded is `second`.
        rec.gates[first] = asyncio.Event()
        busy = asyncio.create_task(ask(cluster, [256, 1, 2, 3, 4, 5, 6, 7, 8]))
        await wait_for(lambda: rec.entered(first) == 1)
        turn1 = [256, 40, 41, 42, 43, 44, 45, 46, 47]  # 9 tokens: one whole block
        reply = await ask(cluster, turn1)
        assert rec.worker_of(turn1) == second
        rec.gates.pop(first).set()
        await busy
        assert cluster.routed("affinity") == 0
        # Turns 2 and 3: both workers idle, `first` sorts first; the cached prefix wins.
        turn2 = turn(turn1, reply, [50, 51, 52, 53])  # 16 tokens
        reply = await ask(cluster, turn2)
        turn3 = turn(turn2, reply, [60, 61, 62, 63])  # 23 tokens
        reply = await ask(cluster, turn3)
        assert rec.worker_of(turn2) == rec.worker_of(turn3) == second
        assert cluster.routed("affinity") == 2
        # Overload `second`: two prefills sharing the conversation's prefix are held there.
        rec.gates[second] = asyncio.Event()
        held = [
            asyncio.create_task(ask(cluster, turn(turn3, reply, [70 + i, 71, 72])))
            for i in range(2)
        ]
        await wait_for(lambda: rec.entered(second) == 5)  # turns 1-3 + the two held
        turn4 = turn(turn3, reply, [80, 81, 82])  # 29 tokens
        await ask(cluster, turn4)
        assert rec.worker_of(turn4) == first
        assert cluster.routed("load") == 1
        rec.gates.pop(second).set()
        await asyncio.gather(*held)
        # Predicted: turn 2 one block, turn 3 and the held prompts two, turn 4 none.
        assert cluster.metric("pdserve_prefix_predicted_tokens_total{}") == B + 3 * 2 * B
        # The worker's own answers: turn 3 reused turn 2's two blocks from its prefix
        # cache (the orchestrator's blocks are the worker's pages); turn 4's worker never
        # saw them (at most its first token, 256, lent by the busy prompt's first block).
        assert cluster.policy.index.block_tokens == B
        assert rec.cached[tuple(turn3)] == 2 * B and rec.cached[tuple(turn4)] in (0, 1)
        cached = cluster.metric("pdserve_prefix_cached_tokens_total{}")
        assert cached == sum(rec.cached.values())

    run_cluster(engine, params, tiny_fingerprint, transport == "grpc", body)


def test_a_worker_no_longer_up_is_forgotten(engine, params, tiny_fingerprint):
    """The flow forgets a prefill worker that is not up when it routes (ejected, failing
    health checks, gone from DNS): it may come back restarted, its cache empty."""

    async def body(cluster: TwoPrefillCluster) -> None:
        first, second = sorted(cluster.prefill)
        orch, policy = cluster.orchestrator, cluster.policy
        conversation = [256, *range(10, 30)]
        await cluster.api.generate(conversation, max_tokens=2, ignore_eos=True)
        assert cluster.recorder.worker_of(conversation) == first
        assert policy.index.blocks(first) == len(conversation) // B
        (worker,) = [w for w in orch.registry.all() if w.address == first]
        await cluster.network.kill(first)  # it dies: health checks keep it out
        orch.registry.eject(worker, "test: a failed call")
        other = [256, *range(100, 110)]
        await cluster.api.generate(other, max_tokens=2, ignore_eos=True)
        assert cluster.recorder.worker_of(other) == second
        assert policy.index.blocks(first) == 0 and policy.index.blocks(second) == 1

    run_cluster(engine, params, tiny_fingerprint, False, body)

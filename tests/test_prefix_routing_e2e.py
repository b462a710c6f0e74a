"""Prefix-aware prefill routing end to end: a multi-turn conversation through the
orchestrator to TWO prefill workers lands every turn on the same prefill worker; with that
worker overloaded (prefills held on it), the next turn goes to the other; a worker no
longer up is forgotten. Over the fake transport and over real loopback gRPC, on the `tiny`
model. The index and the policy alone: tests/test_prefix_routing.py."""

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
from orchestrator.placement import PrefixAwarePolicy
from prefill_server.kv_push import RemoteKvSink
from prefill_server.loop import PrefillLoop
from prefill_server.service import PrefillService
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
    TransportConfig,
)
from shared.weights.model_info import load_model_info
from tests.cluster_harness import FakeConnector, InProcessApi
from tests.reference import metric_samples, reference_greedy
from tests.worker_harness import ENGINE_FLAGS, TRANSPORT, start_prefill_loop

B = 8  # tokens per block in these tests (the test engine's page size)


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
        self.network = FakeNetwork()
        self.prefill: list[str] = []

    async def start(self) -> None:
        decode_address, connect = await self._start_decode_worker()
        for i in range(2):
            self.prefill.append(await self._start_prefill_worker(i, connect))
        flags = ["--prefill", ",".join(self.prefill), "--decode", decode_address]
        flags += ["--health-interval-s", "0.5", "--prefix-affinity-max-queue", "1"]
        self.connector = (
            RecordingGrpcConnector(TransportConfig(), self.recorder)
            if self.grpc
            else RecordingFakeConnector(self.network, self.recorder)
        )
        self.registry = CollectorRegistry()
        config = parse_orchestrator_args(flags)
        self.policy = placement_policy(config)
        assert isinstance(self.policy, PrefixAwarePolicy)
        self.orchestrator = build_orchestrator(
            config, self.connector, load_model_info("tiny"), self.registry, self.policy
        )
        await self.orchestrator.start()
        self.api = InProcessApi(self.orchestrator)

    async def _serve(self, service: object, fake_address: str) -> str:
        """`service` on loopback gRPC (a decode or prefill handler) or on the fake network
        at `fake_address`; the address it is served at."""
        if not self.grpc:
            self.network.serve(fake_address, service)
            return fake_address
        wrap = decode_service if fake_address.startswith("decode") else prefill_service
        server = await start_server("127.0.0.1:0", [wrap(service)], TransportConfig())
        self.servers.append(server)
        return f"127.0.0.1:{server.port}"

    async def _start_decode_worker(self) -> tuple[str, Callable]:
        """The decode worker, served; its address and how a prefill worker connects."""
        runtime = ModelRuntime(self.engine, self.params, self.fingerprint, None)
        config = parse_worker_args(["--port", "0", *ENGINE_FLAGS], Role.DECODE)
        self.decode = build_decode_worker(
            runtime, config, WorkerMetrics(CollectorRegistry(), "decode"), self.fatal.append
        )
        self.decode.start(asyncio.get_running_loop())
        address = await self._serve(self.decode.service, "decode-0:1")
        if not self.grpc:
            return address, self.network.decode_client
        return address, lambda target: GrpcDecodeClient(target, TRANSPORT)

    async def _start_prefill_worker(self, i: int, connect: Callable) -> str:
        """Prefill worker `i`, pushing its KV through `connect`, served; its address."""
        sink = RemoteKvSink(TRANSPORT, self.fingerprint, connect)
        prefill_loop = start_prefill_loop(self.engine, self.params, sink, self.fatal.append)
        self.sinks.append(sink)
        self.loops.append(prefill_loop)
        service = PrefillService(prefill_loop, self.fingerprint, 64)
        return await self._serve(service, PREFILL_ADDRESSES[i])

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


GENERATED = 3  # tokens each turn asks for


def turn(history: list[int], reply: list[int], new: list[int]) -> list[int]:
    return history + reply + new


async def ask(cluster: TwoPrefillCluster, ids: list[int]) -> list[int]:
    """One turn through the orchestrator; its tokens, checked against the reference."""
    chunks = await cluster.api.generate(ids, max_tokens=GENERATED, ignore_eos=True)
    out = [t for c in chunks for t in c.token_ids]
    assert out == reference_greedy(cluster.engine, cluster.params, ids, GENERATED)
    return out


async def three_turns_on_second(cluster: TwoPrefillCluster) -> tuple[list[int], list[int]]:
    """Turn 1 while `first` is busy (so it lands on `second`), turns 2 and 3 with both idle
    (they follow it by affinity though `first` sorts first): turn 3 and its reply."""
    first, second = sorted(cluster.prefill)  # `first` wins address tie-breaks
    rec = cluster.recorder
    rec.gates[first] = asyncio.Event()
    busy = asyncio.create_task(ask(cluster, [256, 1, 2, 3, 4, 5, 6, 7, 8]))
    await wait_for(lambda: rec.entered(first) == 1)
    turn1 = [256, 40, 41, 42, 43, 44, 45, 46, 47]  # 9 tokens: one whole block
    reply = await ask(cluster, turn1)
    assert rec.worker_of(turn1) == second
    rec.gates.pop(first).set()
    await busy
    assert cluster.routed("affinity") == 0
    turn2 = turn(turn1, reply, [50, 51, 52, 53])  # 16 tokens
    reply = await ask(cluster, turn2)
    turn3 = turn(turn2, reply, [60, 61, 62, 63])  # 23 tokens
    reply = await ask(cluster, turn3)
    assert rec.worker_of(turn2) == rec.worker_of(turn3) == second
    assert cluster.routed("affinity") == 2
    return turn3, reply


@pytest.mark.parametrize("transport", ["fake", "grpc"])
def test_a_conversation_stays_on_one_prefill_worker_until_it_is_overloaded(
    transport, engine, params, tiny_fingerprint
):
    """Turn 1 lands on the second prefill worker (the first is busy); turns 2 and 3
    follow it there by affinity though the first is as idle and sorts first by address;
    then, with two prefills held on it (the bound is 1), turn 4 goes to the other worker,
    and every turn's tokens equal the reference."""

    async def body(cluster: TwoPrefillCluster) -> None:
        first, second = sorted(cluster.prefill)
        rec = cluster.recorder
        # The block size came from the workers' load reports (no flag sets it).
        assert cluster.orchestrator.registry.prefix_blocks.block_tokens == B
        turn3, reply = await three_turns_on_second(cluster)
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

"""A whole cluster (orchestrator + workers) two ways, for the same end-to-end tests.

* `ProcessCluster`: `pdserve orchestrator` + worker processes on loopback (started by
  shared/cluster's `Cluster` from `process_cluster_spec`), called through the public gRPC
  API with the real client.
* `InProcessCluster`: the orchestrator's `Frontend` and the worker assemblies in this
  process, linked by the fake transport; called with the same requests (built by the
  client's `build_request` and read by the servicer's `input_from_proto`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from prometheus_client import CollectorRegistry

from decode_server.worker import DecodeWorker, build_decode_worker
from orchestrator.admission import QueueFullError
from orchestrator.app import Orchestrator, build_orchestrator
from orchestrator.config import parse_orchestrator_args
from orchestrator.flow import RequestFailed
from orchestrator.frontend import GenerateOutput, InvalidRequest
from orchestrator.servicer import input_from_proto
from prefill_server.kv_push import RemoteKvSink
from prefill_server.service import PrefillService
from shared.client.generator import AsyncGeneratorClient, Chunk, GenerateError, build_request
from shared.cluster.cluster import Cluster, ClusterSpec, orchestrator_argv
from shared.cluster.metrics import metrics_text, scrape
from shared.cluster.processes import Child, kill
from shared.engine.engine import Engine, Params
from shared.kv.pages import PageAllocator
from shared.metrics import WorkerMetrics
from shared.serving.runtime import ModelRuntime
from shared.serving.worker_config import Role, parse_worker_args
from shared.transport.fake import FakeNetwork
from shared.transport.types import TransportError
from shared.weights.model_info import ModelInfo, load_model_info
from tests.worker_harness import (
    ENGINE_FLAGS,
    TRANSPORT,
    ProcessWorkers,
    process_env,
    spawn_pdserve,
    start_prefill_loop,
)

# The orchestrator of a test: health checks every 0.5 s, so a worker's death or return is
# seen within a test's patience.
ORCHESTRATOR_FLAGS = ("--health-interval-s", "0.5")


def spawn_orchestrator(*flags: str, timeout: float = 120.0) -> Child:
    """`pdserve orchestrator` on a free loopback port; `flags` name its workers."""
    argv = orchestrator_argv({}, *ORCHESTRATOR_FLAGS, *flags)
    return spawn_pdserve("orchestrator", argv, timeout)


def process_cluster_spec(
    prefill: int = 1,
    decode: int = 1,
    worker_flags: Sequence[str] = (),
    orchestrator_flags: Sequence[str] = (),
) -> ClusterSpec:
    """A process cluster with the test engine (ENGINE_FLAGS, then `worker_flags`) and the
    test orchestrator's flags (then `orchestrator_flags`), in the test environment."""
    return ClusterSpec(
        prefill=prefill,
        decode=decode,
        worker_flags=(*ENGINE_FLAGS, *worker_flags),
        orchestrator_flags=(*ORCHESTRATOR_FLAGS, *orchestrator_flags),
        env=process_env(),
        startup_timeout_s=180.0,
    )


class ProcessCluster:
    """`pdserve orchestrator` + one prefill and one decode process (shared/cluster; `spec`
    default: `process_cluster_spec()`); conftest's session fixture `process_cluster` shares
    one among the modules (tests that kill or reconfigure a worker start their own)."""

    def __init__(self, spec: ClusterSpec | None = None) -> None:
        self.cluster = Cluster.start(spec or process_cluster_spec())
        self.workers = ProcessWorkers(self.cluster)
        self.orchestrator = self.cluster.orchestrator
        self.api = ProcessApi(self.cluster.target)

    async def all_free(self) -> bool:
        client = self.workers.decode_client()
        try:
            load = await client.get_load()
        finally:
            await client.close()
        return load.free_slots == load.total_slots and load.live_requests == 0

    def metrics_text(self) -> str:
        return metrics_text(self.orchestrator.metrics_port)

    def tokens_generated(self) -> float:
        """Tokens the decode worker generated so far, all requests together."""
        return scrape(self.workers.decode.metrics_port)["pdserve_tokens_generated_total{}"]

    def close(self) -> None:
        for child in reversed(self.cluster.children()):  # the orchestrator first
            kill(child)


class ProcessApi:
    """The public API over gRPC."""

    def __init__(self, target: str, token: str | None = None) -> None:
        self.target, self.token = target, token

    async def stream(self, prompt: str | Sequence[int], **options: object) -> AsyncIterator[Chunk]:
        async with AsyncGeneratorClient(self.target, self.token) as client:
            timeout = options.pop("call_timeout", None)
            async for chunk in client.generate(prompt, timeout=timeout, **options):
                yield chunk

    async def generate(self, prompt: str | Sequence[int], **options: object) -> list[Chunk]:
        return [c async for c in self.stream(prompt, **options)]


class InProcessApi:
    """The same requests, into the orchestrator's Frontend directly."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator

    async def stream(self, prompt: str | Sequence[int], **options: object) -> AsyncIterator[Chunk]:
        timeout = options.pop("call_timeout", None)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            request = input_from_proto(build_request(prompt, **options))
            stream = self.orchestrator.frontend.generate(request, timeout)
            async with contextlib.aclosing(stream):
                while True:
                    # What gRPC does with a call deadline: the handler is cancelled at
                    # expiry. Only around the handler's own work, never around our yield.
                    if deadline is not None and loop.time() >= deadline:
                        raise TimeoutError
                    async with asyncio.timeout_at(deadline):
                        out = await anext(stream, None)
                    if out is None:
                        break
                    yield _chunk(out)
        except TimeoutError:
            raise GenerateError("DEADLINE_EXCEEDED", "Deadline Exceeded") from None
        except InvalidRequest as err:
            raise GenerateError("INVALID_ARGUMENT", str(err)) from None
        except QueueFullError as err:
            raise GenerateError("RESOURCE_EXHAUSTED", str(err)) from None
        except RequestFailed as err:
            raise GenerateError(err.code.name, err.message) from None

    async def generate(self, prompt: str | Sequence[int], **options: object) -> list[Chunk]:
        return [c async for c in self.stream(prompt, **options)]


def _chunk(out: GenerateOutput) -> Chunk:
    finish = out.finish.value if out.finish else None
    return Chunk(
        out.request_id,
        out.token_ids,
        out.text,
        finish,
        out.prompt_tokens,
        out.completion_tokens,
        out.logprobs,
    )


class FakeConnector:
    """The orchestrator's Connector over a FakeNetwork: healthy = being served."""

    def __init__(self, network: FakeNetwork) -> None:
        self.network = network

    def decode_client(self, address: str):
        return self.network.decode_client(address, TRANSPORT)

    def prefill_client(self, address: str):
        return self.network.prefill_client(address, TRANSPORT)

    async def healthy(self, address: str, timeout: float) -> bool:
        try:
            self.network.server(address)
        except TransportError:
            return False
        return True


class InProcessCluster:
    """Prefill + N decode workers + orchestrator in this event loop, fake-linked."""

    def __init__(
        self,
        engine: Engine,
        params: Params,
        fingerprint: str,
        decode_workers: int = 1,
        orchestrator_flags: Sequence[str] = (),
        decode_pages: int | None = None,
        model_info: ModelInfo | None = None,
    ) -> None:
        """`decode_pages`: each decode worker hands out only this many KV pages (a small
        pool that runs dry), instead of the engine's whole pool."""
        self.network = FakeNetwork()
        self.fatal: list[BaseException] = []
        self.decode: dict[str, DecodeWorker] = {}
        self.decode_registries: dict[str, CollectorRegistry] = {}
        runtime = ModelRuntime(engine, params, fingerprint, None)
        for i in range(decode_workers):
            self._serve_decode_worker(f"decode-{i}:1", runtime, decode_pages)
        self.sink = RemoteKvSink(TRANSPORT, fingerprint, self.network.decode_client)
        self.prefill_loop = start_prefill_loop(engine, params, self.sink, self.fatal.append)
        self.network.serve("prefill-0:1", PrefillService(self.prefill_loop, fingerprint, 64))
        workers = ["--prefill", "prefill-0:1", "--decode", ",".join(self.decode)]
        self.config = parse_orchestrator_args([*workers, *ORCHESTRATOR_FLAGS, *orchestrator_flags])
        self.registry = CollectorRegistry()
        self.orchestrator = build_orchestrator(
            self.config,
            FakeConnector(self.network),
            model_info or load_model_info("tiny"),
            self.registry,
        )
        self.api = InProcessApi(self.orchestrator)

    def _serve_decode_worker(self, address: str, runtime: ModelRuntime, pages: int | None) -> None:
        """A decode worker (handing out only `pages` KV pages, if given) served at
        `address`, its metrics in `decode_registries[address]`."""
        config = parse_worker_args(["--port", "0", *ENGINE_FLAGS], Role.DECODE)
        allocator = None
        if pages is not None:
            c = runtime.engine.config
            allocator = PageAllocator(pages + 1, c.page_size, c.max_pages_per_slot)
        registry = CollectorRegistry()
        worker = build_decode_worker(
            runtime, config, WorkerMetrics(registry, "decode"), self.fatal.append, allocator
        )
        worker.start(asyncio.get_running_loop())
        self.network.serve(address, worker.service)
        self.decode[address] = worker
        self.decode_registries[address] = registry

    async def start(self) -> None:
        await self.orchestrator.start()

    async def kill_decode(self, address: str) -> None:
        """The decode process at `address` dies."""
        await self.network.kill(address)
        worker = self.decode.pop(address)
        worker.service.draining = True
        worker.loop.stop()

    async def close(self) -> None:
        await self.orchestrator.stop()
        self.prefill_loop.stop()
        for worker in self.decode.values():
            await worker.drain(0.0)
        with contextlib.suppress(Exception):
            await self.sink.close()
        assert not self.fatal, self.fatal

"""Two ways to run prefill + decode workers for the same tests, and the test engine's flags.

* `ProcessWorkers`: real `pdserve worker` processes on loopback (started by
  shared/cluster), talked to over gRPC.
* `InProcessWorkers`: the same worker assemblies built in this process and event loop,
  talked to through the in-process fake transport; `start_prefill_loop` is the one place
  a test builds a prefill worker's loop.

Both expose the same clients and controls, so one test body proves both. `spawn_pdserve`
/ `spawn_worker` start one process with the test environment (CPU, simulated devices).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from decode_server.worker import DecodeWorker, build_decode_worker
from prefill_server.kv_push import RemoteKvSink
from prefill_server.loop import KvSink, PrefillLoop
from prefill_server.service import PrefillService
from shared.cluster.cluster import Cluster, worker_argv
from shared.cluster.processes import Child, kill, start
from shared.config import PrefillSettings
from shared.engine.engine import Engine, Params
from shared.metrics import WorkerMetrics
from shared.sampling_params import SamplingParams
from shared.serving.flags import for_role
from shared.serving.runtime import ModelRuntime
from shared.serving.worker_config import Role, parse_worker_args
from shared.transport.base import DecodeClient, PrefillClient
from shared.transport.fake import FakeNetwork
from shared.transport.grpc_transport import GrpcDecodeClient, GrpcPrefillClient
from shared.transport.types import (
    GenerationLimits,
    PrefillRequest,
    ReserveRequest,
    StatusCode,
    TokenBatch,
    TransportConfig,
    TransportError,
)

REPO = Path(__file__).resolve().parent.parent
# The test engine's layout (tests/conftest.py), as worker flags.
ENGINE_FLAGS = (
    "--slots",
    "4",
    "--prefill-buckets",
    "8,16,32",
    "--max-seq-len",
    "64",
    "--page-size",
    "8",
)
TRANSPORT = TransportConfig(rpc_timeout_s=10.0, transfer_timeout_s=20.0)
# A test's processes compute on the CPU, whatever this machine has.
TEST_ENV = {"JAX_PLATFORMS": "cpu"}
WorkerProcess = Child  # a started `pdserve ...` process (shared/cluster/processes.py)


def process_env(
    devices: int | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment variables a test's process gets on top of ours: the CPU platform,
    `devices` simulated CPU devices (default: one) and `extra`."""
    env = {**TEST_ENV, **(extra or {})}
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def spawn_pdserve(
    name: str,
    argv: list[str],
    timeout: float,
    devices: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> Child:
    """Start `pdserve ARGV` (which must bind loopback port 0); return once it serves.
    `devices`: simulated CPU devices for the process (default: one); `extra_env`: more
    environment variables for it."""
    return start(name, argv, timeout, env=process_env(devices, extra_env), cwd=REPO)


def spawn_worker(
    role: str, *flags: str, timeout: float = 180.0, devices: int | None = None
) -> Child:
    """Start `pdserve worker --role ROLE` (the test engine's flags, then `flags`) on a free
    loopback port; return once it serves."""
    engine = for_role(role, ENGINE_FLAGS)  # e.g. no --slots for a prefill worker
    return spawn_pdserve(role, worker_argv(role, *engine, *flags), timeout, devices)


def stop_worker(worker: Child) -> None:
    """SIGKILL it (a test's process need not drain)."""
    kill(worker)


class ProcessWorkers:
    """The prefill and decode process of a started cluster (conftest's `process_cluster`),
    with clients for them."""

    kind = "process"

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.prefill = cluster.workers["prefill-0"]
        self.decode = cluster.workers["decode-0"]
        self.decode_address = self.decode.address

    def decode_client(self, address: str | None = None) -> DecodeClient:
        return GrpcDecodeClient(address or self.decode_address, TRANSPORT)

    def prefill_client(self) -> PrefillClient:
        return GrpcPrefillClient(self.prefill.address, TRANSPORT)


class InProcessWorkers:
    """The same assemblies in this process, behind the fake transport. Build it inside the
    test's event loop; `close()` it before the loop ends."""

    kind = "fake"
    decode_address = "decode-0"
    prefill_address = "prefill-0"

    def __init__(self, engine: Engine, params: Params, fingerprint: str) -> None:
        self.network = FakeNetwork()
        argv = ["--host", "127.0.0.1", "--port", "0", *ENGINE_FLAGS]
        config = parse_worker_args(argv, Role.DECODE)
        runtime = ModelRuntime(engine, params, fingerprint, None)
        self.fatal: list[BaseException] = []
        self.decode: DecodeWorker = build_decode_worker(
            runtime, config, WorkerMetrics(CollectorRegistry(), "decode"), self.fatal.append
        )
        self.decode.start(asyncio.get_running_loop())
        self.sink = RemoteKvSink(TRANSPORT, fingerprint, self.network.decode_client)
        self.prefill_loop = start_prefill_loop(engine, params, self.sink, self.fatal.append)
        self.network.serve(self.decode_address, self.decode.service)
        self.network.serve(self.prefill_address, PrefillService(self.prefill_loop, fingerprint, 64))

    def decode_client(self, address: str | None = None) -> DecodeClient:
        return self.network.decode_client(address or self.decode_address, TRANSPORT)

    def prefill_client(self) -> PrefillClient:
        return self.network.prefill_client(self.prefill_address, TRANSPORT)

    async def close(self) -> None:
        self.prefill_loop.stop()
        await self.decode.drain(0.0)
        assert not self.fatal, self.fatal


def start_prefill_loop(
    engine: Engine,
    params: Params,
    sink: KvSink,
    on_fatal: Callable[[BaseException], None],
    *,
    max_queue: int = 64,
    settings: PrefillSettings | None = None,
    registry: CollectorRegistry | None = None,
) -> PrefillLoop:
    """A prefill worker's loop in this process, started in the running event loop; its
    metrics in `registry` (default: a registry of its own). `stop()` it when done."""
    metrics = WorkerMetrics(registry or CollectorRegistry(), "prefill")
    loop = PrefillLoop(
        engine, params, sink, metrics, max_queue=max_queue, on_fatal=on_fatal, settings=settings
    )
    loop.start(asyncio.get_running_loop())
    return loop


# Driving a request the way the orchestrator will -----------------------------------------


async def reserve_with_retry(
    decode: DecodeClient, request: ReserveRequest, timeout: float = 60.0
) -> str:
    """Reserve, waiting while every slot is taken (the orchestrator's queue does this)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return (await decode.reserve(request)).lease_id
        except TransportError as err:
            if err.code is not StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def collect(stream: AsyncIterator[TokenBatch]) -> list[TokenBatch]:
    return [batch async for batch in stream]


async def generate(
    decode: DecodeClient,
    prefill: PrefillClient,
    decode_target: str,
    prompt: Sequence[int],
    max_tokens: int,
    *,
    request_id: str = "req",
    sampling: SamplingParams | None = None,
) -> tuple[list[int], list[TokenBatch]]:
    """Reserve -> open the token stream -> prefill -> all tokens (first one included)."""
    limits = GenerationLimits(max_tokens, stop_on_eos=False)
    lease_id = await reserve_with_retry(
        decode, ReserveRequest(request_id, len(prompt), limits, ttl_seconds=30.0)
    )
    stream = asyncio.create_task(collect(decode.stream_tokens(lease_id)))
    try:
        result = await prefill.prefill(
            PrefillRequest(
                request_id, tuple(prompt), sampling or SamplingParams(), decode_target, lease_id
            )
        )
    except BaseException:
        stream.cancel()
        with contextlib.suppress(BaseException):
            await stream
        raise
    batches = await stream
    return [result.first_token, *(t for b in batches for t in b.token_ids)], batches

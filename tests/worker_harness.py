"""Two ways to run prefill + decode workers for the same tests.

* `ProcessWorkers`: real `pdserve prefill` / `pdserve decode` processes on loopback, talked
  to over gRPC.
* `InProcessWorkers`: the same worker assemblies built in this process and event loop,
  talked to through the in-process fake transport.

Both expose the same clients and controls, so one test body proves both.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from decode_server.worker import DecodeWorker, build_decode_worker
from prefill_server.kv_push import RemoteKvSink
from prefill_server.loop import PrefillLoop
from prefill_server.service import PrefillService
from shared.engine.engine import Engine, Params
from shared.metrics import WorkerMetrics
from shared.sampling_params import SamplingParams
from shared.serving.lifetime import child_environment
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
SERVING = re.compile(r"serving on (\S+):(\d+) metrics_port=(-?\d+)")
TRANSPORT = TransportConfig(rpc_timeout_s=10.0, transfer_timeout_s=20.0)


@dataclasses.dataclass
class WorkerProcess:
    role: str
    proc: subprocess.Popen
    address: str
    metrics_port: int
    output: list[str]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)


def spawn_pdserve(
    name: str,
    argv: list[str],
    timeout: float,
    devices: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> WorkerProcess:
    """Start `pdserve ARGV` (which must bind loopback port 0); return once it serves.
    `devices`: simulated CPU devices for the process (default: one); `extra_env`: more
    environment variables for it."""
    cmd = [sys.executable, "-m", "pdserve_cli", *argv]
    # child_environment: the process dies with this one (pytest), however pytest ends.
    env = child_environment(
        {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    )
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    ready = threading.Event()
    found: list[re.Match] = []

    def pump() -> None:  # keep reading, so the child never blocks on a full pipe
        for line in proc.stdout:
            output.append(line)
            if not found and (match := SERVING.search(line)):
                found.append(match)
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout) or not found:
        proc.kill()
        raise RuntimeError(f"{name} did not start:\n{''.join(output)}")
    match = found[0]
    return WorkerProcess(name, proc, f"127.0.0.1:{match[2]}", int(match[3]), output)


def spawn_worker(
    role: str, *flags: str, timeout: float = 180.0, devices: int | None = None
) -> WorkerProcess:
    """Start `pdserve worker --role ROLE` on a free loopback port; return once SERVING."""
    argv = [
        "worker",
        "--role",
        role,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        *ENGINE_FLAGS,
        *flags,
    ]
    return spawn_pdserve(role, argv, timeout, devices)


def stop_worker(worker: WorkerProcess) -> None:
    if worker.proc.poll() is None:
        worker.signal(signal.SIGKILL)
        worker.proc.wait(10)


class ProcessWorkers:
    """One prefill and one decode process, shared by a module's tests."""

    kind = "process"

    def __init__(self) -> None:
        self.prefill = spawn_worker("prefill")
        self.decode = spawn_worker("decode")
        self.decode_address = self.decode.address

    def decode_client(self, address: str | None = None) -> DecodeClient:
        return GrpcDecodeClient(address or self.decode_address, TRANSPORT)

    def prefill_client(self) -> PrefillClient:
        return GrpcPrefillClient(self.prefill.address, TRANSPORT)

    def close(self) -> None:
        for worker in (self.prefill, self.decode):
            stop_worker(worker)


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
        self.prefill_loop = PrefillLoop(
            engine,
            params,
            self.sink,
            WorkerMetrics(CollectorRegistry(), "prefill"),
            max_queue=64,
            on_fatal=self.fatal.append,
        )
        self.prefill_loop.start(asyncio.get_running_loop())
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

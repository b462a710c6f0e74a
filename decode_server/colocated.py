"""`pdserve worker --role colocated`: prefill and decode in one process, one engine.

The baseline for every disaggregation benchmark. It serves both internal services, so the
orchestrator drives it exactly like a prefill + decode pair (it names this worker as the
decode target), but a prefix goes from the prefill engine thread's output straight into
the decode loop's insert queue: no encoding, no checksums, no copy to host memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from decode_server.service import DecodeService
from decode_server.worker import build_decode_worker
from prefill_server.loop import PrefillLoop, compile_prefill_loop
from prefill_server.service import PrefillService
from shared.kv.prefix import Prefix
from shared.metrics import WorkerMetrics
from shared.serving.runtime import ModelRuntime, run_worker
from shared.serving.worker_config import Role, WorkerConfig
from shared.serving.worker_server import WorkerServer, wait_until
from shared.transport.server import decode_service, prefill_service
from shared.transport.types import PrefillRequest


class LocalKvSink:
    """`KvSink` into this process's own decode loop; `decode_target` is not dialled."""

    def __init__(self, decode: DecodeService) -> None:
        self._decode = decode

    async def push(self, request: PrefillRequest, prefix: Prefix) -> int:
        self._decode.accept_local_prefix(request.lease_id, prefix)
        return 0  # nothing crossed a wire


async def serve(config: WorkerConfig, runtime: ModelRuntime) -> int:
    registry = CollectorRegistry()
    server = WorkerServer(config, registry)
    metrics = WorkerMetrics(registry, "colocated")
    decode = build_decode_worker(runtime, config, metrics, server.fatal)
    prefill_loop = PrefillLoop(
        runtime.engine,
        runtime.params,
        LocalKvSink(decode.service),
        metrics,
        max_queue=config.max_queue,
        on_fatal=server.fatal,
        settings=config.prefill,
        fingerprint=runtime.fingerprint,
    )
    prefill = PrefillService(prefill_loop, runtime.fingerprint, config.max_queue)
    await asyncio.to_thread(compile_prefill_loop, prefill_loop)
    decode.start(asyncio.get_running_loop())
    prefill_loop.start(asyncio.get_running_loop())

    async def drain(grace_s: float) -> None:
        prefill.draining = True
        await wait_until(lambda: prefill_loop.live_requests == 0, grace_s)
        prefill_loop.stop()
        await decode.drain(grace_s)

    services = [prefill_service(prefill), decode_service(decode.service)]
    return await server.serve(services, drain)


def main(argv: Sequence[str]) -> int:
    return run_worker(argv, Role.COLOCATED, serve)

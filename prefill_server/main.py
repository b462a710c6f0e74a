"""`pdserve prefill`: a prefill worker process."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from prefill_server.kv_push import RemoteKvSink
from prefill_server.loop import PrefillLoop, compile_prefill_loop
from prefill_server.service import PrefillService
from shared.metrics import WorkerMetrics
from shared.serving.runtime import ModelRuntime, run_worker
from shared.serving.worker_config import Role, WorkerConfig
from shared.serving.worker_server import WorkerServer, wait_until
from shared.transport.server import prefill_service


async def serve(config: WorkerConfig, runtime: ModelRuntime) -> int:
    registry = CollectorRegistry()
    server = WorkerServer(config, registry)
    metrics = WorkerMetrics(registry, "prefill")
    sink = RemoteKvSink(config.transport, runtime.fingerprint)
    loop = PrefillLoop(
        runtime.engine,
        runtime.params,
        sink,
        metrics,
        max_queue=config.max_queue,
        on_fatal=server.fatal,
        settings=config.prefill,
        fingerprint=runtime.fingerprint,
    )
    service = PrefillService(loop, runtime.fingerprint, config.max_queue)
    await asyncio.to_thread(compile_prefill_loop, loop)
    loop.start(asyncio.get_running_loop())

    async def drain(grace_s: float) -> None:
        service.draining = True
        await wait_until(lambda: loop.live_requests == 0, grace_s)
        loop.stop()
        await sink.close()

    return await server.serve([prefill_service(service)], drain)


def main(argv: Sequence[str]) -> int:
    return run_worker(argv, Role.PREFILL, serve)

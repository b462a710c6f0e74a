"""`pdserve prefill`: a prefill worker process."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from prefill_server.kv_push import RemoteKvSink
from shared.checkpoint import CheckpointError
from shared.config import ConfigError
from shared.metrics import WorkerMetrics
from shared.prefill_loop import PrefillLoop, PrefillService
from shared.transport.server import prefill_service
from shared.worker_config import Role, WorkerConfig, parse_worker_args
from shared.worker_runtime import (
    ModelRuntime,
    WorkerServer,
    configure_logging,
    load_runtime,
    wait_until,
    warm_up,
)


async def serve(config: WorkerConfig, runtime: ModelRuntime) -> int:
    registry = CollectorRegistry()
    server = WorkerServer(config, registry)
    metrics = WorkerMetrics(registry, "prefill")
    sink = RemoteKvSink(config.transport, runtime.fingerprint)
    loop = PrefillLoop(
        runtime.engine, runtime.params, sink, metrics,
        max_queue=config.max_queue, on_fatal=server.fatal,
    )  # fmt: skip
    service = PrefillService(loop, runtime.fingerprint, config.max_queue)
    loop.start(asyncio.get_running_loop())

    async def drain(grace_s: float) -> None:
        service.draining = True
        await wait_until(lambda: loop.live_requests == 0, grace_s)
        loop.stop()
        await sink.close()

    return await server.serve([prefill_service(service)], drain)


def main(argv: Sequence[str]) -> int:
    configure_logging()
    try:
        config = parse_worker_args(argv, Role.PREFILL)
        runtime = load_runtime(config)
    except (ConfigError, CheckpointError) as err:
        print(f"pdserve prefill: error: {err}", file=sys.stderr)
        return 2
    warm_up(runtime, prefill=True, decode=False)
    return asyncio.run(serve(config, runtime))

"""`pdserve decode`: a decode worker process."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from decode_server.worker import build_decode_worker
from shared.metrics import WorkerMetrics
from shared.serving.runtime import ModelRuntime, run_worker
from shared.serving.worker_config import Role, WorkerConfig
from shared.serving.worker_server import WorkerServer
from shared.transport.server import decode_service


async def serve(config: WorkerConfig, runtime: ModelRuntime) -> int:
    registry = CollectorRegistry()
    server = WorkerServer(config, registry)
    worker = build_decode_worker(runtime, config, WorkerMetrics(registry, "decode"), server.fatal)
    worker.start(asyncio.get_running_loop())
    return await server.serve([decode_service(worker.service)], worker.drain)


def main(argv: Sequence[str]) -> int:
    return run_worker(argv, Role.DECODE, serve)

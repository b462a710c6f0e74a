"""`pdserve decode`: a decode worker process."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from decode_server.worker import build_decode_worker
from shared.checkpoint import CheckpointError
from shared.config import ConfigError
from shared.metrics import WorkerMetrics
from shared.transport.server import decode_service
from shared.worker_config import Role, WorkerConfig, parse_worker_args
from shared.worker_runtime import (
    ModelRuntime,
    WorkerServer,
    configure_logging,
    load_runtime,
    warm_up,
)


async def serve(config: WorkerConfig, runtime: ModelRuntime) -> int:
    registry = CollectorRegistry()
    server = WorkerServer(config, registry)
    worker = build_decode_worker(runtime, config, WorkerMetrics(registry, "decode"), server.fatal)
    worker.start(asyncio.get_running_loop())
    return await server.serve([decode_service(worker.service)], worker.drain)


def main(argv: Sequence[str]) -> int:
    configure_logging()
    try:
        config = parse_worker_args(argv, Role.DECODE)
        runtime = load_runtime(config)
    except (ConfigError, CheckpointError) as err:
        print(f"pdserve decode: error: {err}", file=sys.stderr)
        return 2
    warm_up(runtime, prefill=False, decode=True)
    return asyncio.run(serve(config, runtime))

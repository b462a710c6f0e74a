"""`pdserve orchestrator`: the public Generate API in front of the workers.

1. Load the model's config and tokenizer (no weights) and find the workers.
2. Serve `pdserve.v1.Generator` (+ health + reflection), `/metrics`, and with
   `--http-port` the OpenAI-compatible HTTP API in the same event loop (one `Frontend`:
   one admission queue, one auth token, the same metrics).
3. SIGTERM/SIGINT: NOT_SERVING, refuse new requests, let live ones finish within
   `--drain-grace-s`, then stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from orchestrator.app import build_orchestrator
from orchestrator.auth import BearerTokenInterceptor
from orchestrator.connect import GrpcConnector
from orchestrator.http_server import HttpServer
from orchestrator.openai_api import build_openai_app
from orchestrator.servicer import GeneratorServicer
from shared.config import ConfigError
from shared.metrics import MetricsServer
from shared.rpc.pdserve.v1 import generate_pb2, generate_pb2_grpc
from shared.serving.orchestrator_config import OrchestratorConfig, parse_orchestrator_args
from shared.transport.server import Service, start_server
from shared.transport.types import TransportConfig
from shared.weights.checkpoint import CheckpointError
from shared.weights.model_info import load_model_info

log = logging.getLogger("pdserve.orchestrator")


def generator_service(servicer: GeneratorServicer) -> Service:
    name = generate_pb2.DESCRIPTOR.services_by_name["Generator"].full_name
    return Service(name, lambda s: generate_pb2_grpc.add_GeneratorServicer_to_server(servicer, s))


async def serve(config: OrchestratorConfig) -> int:
    model_info = load_model_info(config.model)
    transport = TransportConfig()
    connector = GrpcConnector(transport)
    registry = CollectorRegistry()
    orch = build_orchestrator(config, connector, model_info, registry)
    await orch.start()
    token = config.auth_token()
    interceptors = [BearerTokenInterceptor(token)] if token else []
    server = await start_server(
        config.address, [generator_service(GeneratorServicer(orch.frontend))], transport,
        interceptors,
    )  # fmt: skip
    metrics = (
        MetricsServer(registry, config.metrics_port, config.host)
        if config.metrics_port >= 0
        else None
    )
    http = None
    if config.http_port >= 0:
        app = build_openai_app(orch.frontend, config.model_name, token, orch.metrics)
        http = HttpServer(app, config.host, config.http_port)
        await http.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(
        f"pdserve orchestrator serving on {config.host}:{server.port} "
        f"metrics_port={metrics.port if metrics else -1} http_port={http.port if http else -1}",
        flush=True,
    )
    await stop.wait()
    print("[pdserve] orchestrator: draining", file=sys.stderr, flush=True)
    orch.frontend.draining = True
    await server.set_serving(False)
    deadline = time.monotonic() + config.drain_grace_s
    while orch.frontend.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await server.stop(grace=1.0)
    if http:
        await http.stop()
    await orch.stop()
    await connector.close()
    if metrics:
        metrics.stop()
    return 0


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = parse_orchestrator_args(argv)
        return asyncio.run(serve(config))
    except (ConfigError, CheckpointError) as err:
        print(f"pdserve orchestrator: error: {err}", file=sys.stderr)
        return 2

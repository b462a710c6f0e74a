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
from orchestrator.config import OrchestratorConfig, parse_orchestrator_args
from orchestrator.connect import GrpcConnector
from orchestrator.frontend import Frontend
from orchestrator.http_server import HttpServer
from orchestrator.limits import StreamsPerConnection
from orchestrator.openai_api import build_openai_app
from orchestrator.servicer import GeneratorServicer, generator_service
from shared.cluster.ready import format_ready_line
from shared.config import ConfigError
from shared.metrics import MetricsServer, OrchestratorMetrics
from shared.transport.server import RunningServer, start_server
from shared.weights.hf_config import CheckpointError
from shared.weights.model_info import load_model_info

log = logging.getLogger("pdserve.orchestrator")


async def start_public_server(config: OrchestratorConfig, frontend: Frontend) -> RunningServer:
    """The public port: Generator (+ health, reflection) with TLS and client certificates
    and/or the bearer token as configured, and every limit of `config.public_transport()`."""
    token = config.auth_token()
    interceptors = [BearerTokenInterceptor(token)] if token else []
    servicer = GeneratorServicer(frontend, StreamsPerConnection(config.max_streams_per_connection))
    return await start_server(
        config.address,
        [generator_service(servicer)],
        config.public_transport(),
        interceptors,
        health_address=config.health_address,
    )


async def start_http_server(
    config: OrchestratorConfig, frontend: Frontend, metrics: OrchestratorMetrics
) -> HttpServer | None:
    """The OpenAI-compatible HTTP API (None without --http-port): the same bearer token,
    and the public port's TLS and client-certificate requirement (HTTPS)."""
    if config.http_port < 0:
        return None
    app = build_openai_app(frontend, config.model_name, config.auth_token(), metrics)
    http = HttpServer(app, config.host, config.http_port, config.public_tls())
    await http.start()
    return http


async def serve(config: OrchestratorConfig) -> int:
    model_info = load_model_info(config.model)
    connector = GrpcConnector(config.internal_transport())
    registry = CollectorRegistry()
    orch = build_orchestrator(config, connector, model_info, registry)
    await orch.start()
    server = await start_public_server(config, orch.frontend)
    metrics = (
        MetricsServer(registry, config.metrics_port, config.host)
        if config.metrics_port >= 0
        else None
    )
    http = await start_http_server(config, orch.frontend, orch.metrics)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    ready = format_ready_line(
        "orchestrator",
        config.host,
        server.port,
        metrics_port=metrics.port if metrics else -1,
        health_port=server.health_port,
        http_port=http.port if http else -1,
    )
    print(ready, flush=True)
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

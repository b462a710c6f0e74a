"""Build a grpc.aio server the way every pdserve process serves: the given services, the
standard `grpc.health.v1` health service and server reflection (so `grpcurl` works),
message-size, keepalive and connection-age options from `TransportConfig`, bound to one
address, with TLS (reloading certificates, client certificates when required) or, for
local runs, plaintext (logged loudly when the address is not loopback).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.rpc.pdserve.v1 import worker_pb2, worker_pb2_grpc
from shared.transport.base import DecodeHandler, PrefillHandler
from shared.transport.grpc_servicers import DecodeServicer, PrefillServicer
from shared.transport.tls import plaintext_warning, server_credentials
from shared.transport.types import TransportConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True, frozen=True)
class Service:
    """One gRPC service to serve: its full name (for health and reflection) and how to
    register its servicer on a server."""

    name: str  # e.g. "pdserve.v1.DecodeWorker"
    register: Callable[[grpc.aio.Server], None]


def decode_service(handler: DecodeHandler) -> Service:
    name = worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name
    servicer = DecodeServicer(handler)
    return Service(name, lambda s: worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, s))


def prefill_service(handler: PrefillHandler) -> Service:
    name = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name
    servicer = PrefillServicer(handler)
    return Service(name, lambda s: worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, s))


def server_options(config: TransportConfig) -> list[tuple[str, int]]:
    receive = config.max_receive_bytes or config.max_message_bytes
    options = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", receive),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        # gRPC core (1.85) never fires keepalive_timeout: an unanswered ping is timed by
        # ping_timeout, 60 s by default (grpc/grpc#39239); tests/test_keepalive.py.
        ("grpc.http2.ping_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        # Let clients ping as often as their keepalive does, even between calls; the
        # default (5 min) would answer their pings with GOAWAY "too_many_pings". A client
        # pinging faster than half that is sent GOAWAY after 2 strikes (ping floods).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(config.keepalive_time_s * 500)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.http2.max_pings_without_data", 0),
        # Old connections are sent GOAWAY (clients reconnect: a fresh TLS handshake picks
        # up rotated certificates); calls still running after the grace are ended.
        ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_s * 1000)),
    ]
    if config.max_concurrent_streams:
        options.append(("grpc.max_concurrent_streams", config.max_concurrent_streams))
    return options


@dataclasses.dataclass(slots=True)
class RunningServer:
    server: grpc.aio.Server
    port: int  # the bound port (the real one when asked for port 0)
    health: health.aio.HealthServicer
    services: tuple[str, ...]
    health_server: grpc.aio.Server | None = None  # the plaintext health-only port, if any
    health_port: int = -1

    async def set_serving(self, serving: bool) -> None:
        """Every service's health (and the server's, ""): SERVING or NOT_SERVING."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.services):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(None)


async def start_server(
    address: str,
    services: Sequence[Service],
    config: TransportConfig,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    health_address: str | None = None,
) -> RunningServer:
    """Serve `services` on `address` ("127.0.0.1:0" picks a free port), healthy at once.

    `health_address`: also serve `grpc.health.v1` alone, in plaintext, there (the same
    statuses). Kubernetes' gRPC probes cannot speak TLS, let alone present a client
    certificate; health statuses are not secret, and nothing else is served there."""
    server = grpc.aio.server(options=server_options(config), interceptors=list(interceptors))
    for service in services:
        service.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(s.name for s in services)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((*names, health_name, reflection.SERVICE_NAME), server)
    if config.tls is not None:
        port = server.add_secure_port(address, server_credentials(config.tls))
    else:
        if (warning := plaintext_warning(address)) is not None:
            log.warning("!" * 20 + " %s " + "!" * 20, warning)
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    running = RunningServer(server, port, health_servicer, names)
    if health_address is not None:
        running.health_server = grpc.aio.server(options=server_options(config))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, running.health_server)
        running.health_port = running.health_server.add_insecure_port(health_address)
        if running.health_port == 0:
            raise OSError(f"could not bind {health_address}")
        await running.health_server.start()
    await running.set_serving(True)
    return running

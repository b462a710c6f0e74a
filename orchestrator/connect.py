"""The orchestrator's gRPC `Connector`: worker clients and grpc.health.v1 checks, over
the internal transport (mTLS when configured)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.transport.channels import RotatingChannel
from shared.transport.grpc_transport import GrpcDecodeClient, GrpcPrefillClient
from shared.transport.types import TransportConfig


class GrpcConnector:
    def __init__(self, config: TransportConfig) -> None:
        self._config = config
        self._health: dict[str, RotatingChannel[health_pb2_grpc.HealthStub]] = {}

    def decode_client(self, address: str) -> GrpcDecodeClient:
        return GrpcDecodeClient(address, self._config)

    def prefill_client(self, address: str) -> GrpcPrefillClient:
        return GrpcPrefillClient(address, self._config)

    async def healthy(self, address: str, timeout: float) -> bool:
        channel = self._health.get(address)
        if channel is None:
            channel = RotatingChannel(address, self._config, health_pb2_grpc.HealthStub)
            self._health[address] = channel
        try:
            with channel.call() as stub:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        for channel in self._health.values():
            await channel.close()

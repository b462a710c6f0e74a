"""The orchestrator's gRPC `Connector`: worker clients and grpc.health.v1 checks."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.transport.grpc_transport import GrpcDecodeClient, GrpcPrefillClient, channel_options
from shared.transport.types import TransportConfig


class GrpcConnector:
    def __init__(self, config: TransportConfig) -> None:
        self._config = config
        self._health: dict[str, health_pb2_grpc.HealthStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def decode_client(self, address: str) -> GrpcDecodeClient:
        return GrpcDecodeClient(address, self._config)

    def prefill_client(self, address: str) -> GrpcPrefillClient:
        return GrpcPrefillClient(address, self._config)

    async def healthy(self, address: str, timeout: float) -> bool:
        stub = self._health.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=channel_options(self._config))
            self._channels.append(channel)
            stub = self._health[address] = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

"""Pushes a prefix to the decode worker a request names, over gRPC (TransferKV)."""

from __future__ import annotations

from collections.abc import Callable

from shared.kv.prefix import Prefix
from shared.kv_transfer.codec import encode_prefix
from shared.transport.base import DecodeClient
from shared.transport.grpc_transport import GrpcDecodeClient
from shared.transport.types import PrefillRequest, TransportConfig

Connect = Callable[[str], DecodeClient]


class RemoteKvSink:
    """`KvSink` to another process; one client per decode worker, reused across requests.
    `connect` makes a client for an address (gRPC by default; tests pass the fake's)."""

    def __init__(
        self, config: TransportConfig, fingerprint: str, connect: Connect | None = None
    ) -> None:
        self._config, self._fingerprint = config, fingerprint
        self._connect = connect or (lambda address: GrpcDecodeClient(address, config))
        self._clients: dict[str, DecodeClient] = {}

    async def push(self, request: PrefillRequest, prefix: Prefix) -> int:
        payload = encode_prefix(
            prefix,  # encoding cuts every leaf to the true length: no padding travels
            fingerprint=self._fingerprint,
            request_id=request.request_id,
            lease_id=request.lease_id,
            chunk_bytes=self._config.kv_chunk_bytes,
        )
        client = self._clients.get(request.decode_target)
        if client is None:
            client = self._connect(request.decode_target)
            self._clients[request.decode_target] = client
        await client.transfer_kv(payload.messages())
        return payload.nbytes

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

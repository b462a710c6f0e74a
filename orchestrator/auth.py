"""Bearer-token check on the public API (health and reflection stay open for probes)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

PROTECTED_PREFIX = "/pdserve.v1.Generator/"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if not details.method.startswith(PROTECTED_PREFIX):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return await continuation(details)
        message = "missing bearer token" if not given else "wrong bearer token"
        return _deny(message)


def _deny(message: str) -> grpc.RpcMethodHandler:
    async def abort(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # Generate is server-streaming; the handler kind must match the method's.
    return grpc.unary_stream_rpc_method_handler(abort)

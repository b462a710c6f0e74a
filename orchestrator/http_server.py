"""uvicorn inside the orchestrator's event loop, beside the gRPC server.

The orchestrator owns the process's signals (SIGTERM drains both APIs), so uvicorn's own
signal capture is turned off; the socket is bound here, so `--http-port 0` reports the
port the kernel chose. With a `TlsConfig` it serves HTTPS with the public port's
certificate (and client-certificate requirement), reloaded when the files change
(shared/transport/tls.py); plaintext off loopback is logged loudly, as for gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import uvicorn

from shared.transport.tls import plaintext_warning, server_ssl_context
from shared.transport.types import TlsConfig

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the orchestrator handles SIGTERM/SIGINT and stops us


class HttpServer:
    """Start with `await start()`; `port` is then bound. `await stop()` closes it."""

    def __init__(self, app: object, host: str, port: int, tls: TlsConfig | None = None) -> None:
        # timeout_graceful_shutdown: streams still open at stop are cut after it (the
        # orchestrator's drain has already waited for live requests).
        factory = None
        if tls is not None:
            # Built here, not in uvicorn's factory, so that unusable files fail at start.
            context = server_ssl_context(tls)
            factory = lambda _config, _default: context  # noqa: E731
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=1,
            ssl_context_factory=factory,
        )
        self._socket = config.bind_socket()
        self.port: int = self._socket.getsockname()[1]
        self.scheme = "https" if tls is not None else "http"
        if tls is None and (warning := plaintext_warning(f"{host}:{self.port}", "HTTP")):
            log.warning("!" * 20 + " %s " + "!" * 20, warning)
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._socket.close()

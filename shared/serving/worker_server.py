"""A worker's gRPC server and `/metrics`, from its ready line to its drain.

`WorkerServer.serve` starts the role's services (+ health + reflection) and `/metrics`,
prints the one ready line with the bound ports (tests and `pdserve serve` read it), then
waits for SIGTERM/SIGINT or a fatal error: health goes NOT_SERVING, the role's `drain`
stops new work and lets live work finish within `--drain-grace-s`, and the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import CollectorRegistry

from shared.cluster.ready import format_ready_line
from shared.metrics import MetricsServer
from shared.serving.worker_config import WorkerConfig
from shared.transport.server import RunningServer, Service, start_server

log = logging.getLogger("pdserve.worker")


def progress(message: str) -> None:
    """Startup progress on stderr, so a starting worker is never silent."""
    print(f"[pdserve] {message}", file=sys.stderr, flush=True)


Drain = Callable[[float], Awaitable[None]]


class WorkerServer:
    """Runs one worker's gRPC server and `/metrics` until a signal or a fatal error."""

    def __init__(self, config: WorkerConfig, registry: CollectorRegistry) -> None:
        self.config = config
        self.registry = registry
        self._stop = asyncio.Event()
        self._server: RunningServer | None = None
        self.fatal_error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def fatal(self, error: BaseException) -> None:
        """An engine thread died (called from that thread): NOT_SERVING, loudly."""
        log.critical("engine thread died; this worker is NOT_SERVING: %r", error)
        self.fatal_error = error
        if self._loop is not None and self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.set_serving(False), self._loop)

    async def serve(self, services: Sequence[Service], drain: Drain) -> int:
        self._loop = asyncio.get_running_loop()
        metrics = None
        if self.config.metrics_port >= 0:
            metrics = MetricsServer(self.registry, self.config.metrics_port, self.config.host)
        self._server = await start_server(
            self.config.address,
            services,
            self.config.transport,
            health_address=self.config.health_address,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._stop.set)
        metrics_port = metrics.port if metrics else -1
        ready = format_ready_line(
            self.config.role.value,
            self.config.host,
            self._server.port,
            metrics_port=metrics_port,
            health_port=self._server.health_port,
        )
        print(ready, flush=True)
        await self._stop.wait()
        progress(f"{self.config.role.value}: draining (grace {self.config.drain_grace_s}s)")
        await self._server.set_serving(False)
        await drain(self.config.drain_grace_s)
        await self._server.stop(grace=1.0)
        if metrics:
            metrics.stop()
        progress(f"{self.config.role.value}: stopped")
        return 1 if self.fatal_error is not None else 0

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def port(self) -> int | None:
        """The bound gRPC port, once serving."""
        return None if self._server is None else self._server.port


async def wait_until(condition: Callable[[], bool], timeout: float, poll: float = 0.02) -> bool:
    """Poll `condition` until true or `timeout`; True if it became true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll)
    return True


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

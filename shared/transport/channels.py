"""One address's grpc.aio channel, replaced when its TLS files change.

gRPC fixes a channel's credentials when the channel is made. When cert-manager rotates a
client's certificate, the next call gets a new channel (new connection, new handshake)
while calls already running finish on the old one, which is closed once its last call
ends: a rotation never cuts a live stream. Plaintext channels are never replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import grpc

from shared.transport.tls import ChannelTls
from shared.transport.types import TransportConfig

Stub = TypeVar("Stub")


def channel_options(config: TransportConfig) -> list[tuple[str, Any]]:
    backoff_ms = int(config.reconnect_backoff_s * 1000)
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        # gRPC core (1.85) never fires keepalive_timeout: an unanswered ping is timed by
        # ping_timeout, 60 s by default (grpc/grpc#39239); tests/test_keepalive.py.
        ("grpc.http2.ping_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", backoff_ms),
        ("grpc.min_reconnect_backoff_ms", backoff_ms),
        # Short: a restarted peer is found again within ~2 backoffs, not after 10.
        ("grpc.max_reconnect_backoff_ms", backoff_ms * 2),
    ]


@dataclasses.dataclass(eq=False)
class _Open(Generic[Stub]):
    channel: grpc.aio.Channel
    stub: Stub
    calls: int = 0
    retired: bool = False


class RotatingChannel(Generic[Stub]):
    """The channel (and stub) calls to one address go through. Create and use it on one
    event loop."""

    def __init__(
        self, address: str, config: TransportConfig, make_stub: Callable[[grpc.aio.Channel], Stub]
    ) -> None:
        self.address = address
        self._options = channel_options(config)
        self._tls = ChannelTls(config.tls) if config.tls is not None else None
        self._make_stub = make_stub
        self._closing: set[asyncio.Task] = set()
        self._current = self._open()

    def _open(self) -> _Open[Stub]:
        if self._tls is None:
            channel = grpc.aio.insecure_channel(self.address, options=self._options)
        else:
            options = self._options + self._tls.options()
            channel = grpc.aio.secure_channel(self.address, self._tls.credentials(), options)
        return _Open(channel, self._make_stub(channel))

    @contextlib.contextmanager
    def call(self) -> Iterator[Stub]:
        """The stub for one call; hold it for the whole call (a stream: until it ends)."""
        if self._tls is not None and self._tls.changed():
            old, self._current = self._current, self._open()
            old.retired = True
            self._close_if_idle(old)
        entry = self._current
        entry.calls += 1
        try:
            yield entry.stub
        finally:
            entry.calls -= 1
            self._close_if_idle(entry)

    def _close_if_idle(self, entry: _Open[Stub]) -> None:
        if entry.retired and entry.calls == 0:
            task = asyncio.get_running_loop().create_task(entry.channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def connected(self, timeout: float) -> bool:
        """Whether the current channel is (or within `timeout` becomes) connected; starts a
        connection attempt when idle, waits out a reconnect backoff otherwise."""
        channel = self._current.channel
        if channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
            return True
        try:
            # asyncio.timeout, not wait_for, which on Python 3.11 can lose a cancel that
            # arrives just as the channel connects (the push would go on after its caller
            # gave up).
            async with asyncio.timeout(timeout):
                await channel.channel_ready()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Close every channel; calls in flight are cancelled. Idempotent."""
        await self._current.channel.close()
        await asyncio.gather(*self._closing, return_exceptions=True)

"""Concurrent Generate streams per client connection on the public port.

HTTP/2's own cap (SETTINGS_MAX_CONCURRENT_STREAMS) makes a client's extra streams wait in
its transport without a word; this one refuses them with RESOURCE_EXHAUSTED saying which
limit, so the server sets its HTTP/2 cap above this one. A connection is named by its
peer address (one TCP connection: one client ip:port).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class TooManyStreams(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this connection already has {limit} Generate streams open, the limit per "
            "connection; wait for one to end or open another connection"
        )


class StreamsPerConnection:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, connection: str) -> Iterator[None]:
        """One stream on `connection` for the duration; TooManyStreams past the limit."""
        count = self._open.get(connection, 0)
        if count >= self.limit:
            raise TooManyStreams(self.limit)
        self._open[connection] = count + 1
        try:
            yield
        finally:
            left = self._open[connection] - 1
            if left:
                self._open[connection] = left
            else:
                del self._open[connection]

    @property
    def connections(self) -> int:
        return len(self._open)

"""The ready line: what a pdserve process prints once it serves, and what starts it reads.

    pdserve ROLE serving on HOST:PORT metrics_port=N health_port=N [http_port=N]

Workers (shared/serving/worker_server.py) and the orchestrator (orchestrator/main.py)
print it through `format_ready_line`; `parse_ready_line` reads it back (shared/cluster/
processes.py). A port of -1 means that listener is off. Only the standard library is
imported, so the serving layer may print it without importing the cluster harness.
"""

from __future__ import annotations

import dataclasses
import re

_LINE = re.compile(r"pdserve (\S+) serving on (\S+):(\d+)((?: \w+=-?\d+)*)")
_FIELD = re.compile(r"(\w+)=(-?\d+)")
# Addresses a process binds to but a client cannot dial: dial loopback instead.
_ANY_HOST = ("0.0.0.0", "::", "[::]", "")


@dataclasses.dataclass(frozen=True)
class ReadyLine:
    """A parsed ready line. `address` is HOST:PORT as printed (the bound address)."""

    role: str
    address: str
    port: int
    metrics_port: int = -1
    health_port: int = -1
    http_port: int = -1

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def dial_address(self) -> str:
        """The address a client on this machine dials (loopback for a wildcard bind)."""
        host = "127.0.0.1" if self.host in _ANY_HOST else self.host
        return f"{host}:{self.port}"


def format_ready_line(
    role: str,
    host: str,
    port: int,
    *,
    metrics_port: int,
    health_port: int,
    http_port: int | None = None,
) -> str:
    """The line a process prints (flushed) once every listener is bound. `http_port` is
    the orchestrator's OpenAI-compatible API; None leaves the field out (workers)."""
    line = (
        f"pdserve {role} serving on {host}:{port} "
        f"metrics_port={metrics_port} health_port={health_port}"
    )
    return line if http_port is None else f"{line} http_port={http_port}"


def parse_ready_line(line: str) -> ReadyLine | None:
    """The ready line in `line` (which may carry a prefix), or None when it holds none."""
    match = _LINE.search(line)
    if match is None:
        return None
    fields = {key: int(value) for key, value in _FIELD.findall(match[4])}
    return ReadyLine(
        role=match[1],
        address=f"{match[2]}:{match[3]}",
        port=int(match[3]),
        metrics_port=fields.get("metrics_port", -1),
        health_port=fields.get("health_port", -1),
        http_port=fields.get("http_port", -1),
    )

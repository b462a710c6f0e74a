"""Starting one `pdserve ...` command as a child process and knowing when it serves.

* `launch` starts it (it dies with this process, however this one ends) and reads its
  output on a thread: relayed to stderr with a `[name]` prefix, or kept in `Child.output`.
* `wait_ready` returns once its ready line (shared/cluster/ready.py) is read; `start` is
  both.
* `stop` / `stop_all`: SIGTERM (the process drains), then SIGKILL after a timeout.

Only commands are started: no server package and no JAX is imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path

from shared.cluster.ready import ReadyLine, parse_ready_line
from shared.serving.lifetime import child_environment

KEEP_LINES = 5000  # of a child's output, at least (the most recent)


@dataclasses.dataclass
class Child:
    """One started process. `ready` is its ready line once read; `output` the lines it
    printed (None when they are relayed instead)."""

    name: str
    proc: subprocess.Popen[str]
    output: list[str] | None = None
    ready: ReadyLine | None = None
    _seen: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

    @property
    def address(self) -> str:
        """HOST:PORT to dial it on this machine ("" until ready)."""
        return self.ready.dial_address if self.ready else ""

    @property
    def metrics_port(self) -> int:
        return self.ready.metrics_port if self.ready else -1

    @property
    def health_port(self) -> int:
        return self.ready.health_port if self.ready else -1

    @property
    def http_port(self) -> int:
        """The orchestrator's OpenAI-compatible API (-1: off)."""
        return self.ready.http_port if self.ready else -1

    def text(self) -> str:
        """What it printed so far (kept output only)."""
        return "".join(self.output or ())

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)


def pdserve_command(argv: Sequence[str]) -> list[str]:
    """The command line running `pdserve ARGV` with this interpreter."""
    return [sys.executable, "-m", "pdserve_cli", *argv]


def launch(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    relay: bool = False,
    cwd: Path | None = None,
    cpus: Collection[int] | None = None,
) -> Child:
    """Start `pdserve ARGV` and read its output; `env`: extra environment variables;
    `relay`: print its lines prefixed to stderr instead of keeping them; `cwd`: its
    working directory (default: ours, so relative paths in ARGV mean what they say);
    `cpus`: the cores it may run on (default: ours)."""
    # child_environment: the child dies with this process, even when it is SIGKILLed.
    environment = child_environment({**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    with _pinned(cpus):
        proc = subprocess.Popen(
            pdserve_command(argv),
            cwd=cwd,
            env=environment,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Its own session: a terminal's Ctrl-C reaches only us; we stop it in order.
            start_new_session=True,
        )
    child = Child(name, proc, output=None if relay else [])
    threading.Thread(target=_read_output, args=(child,), daemon=True).start()
    return child


@contextlib.contextmanager
def _pinned(cpus: Collection[int] | None) -> Iterator[None]:
    """Pin this thread while a child is forked: the child inherits the mask of the thread
    that forks it (pid 0 is the calling thread on Linux), from its first instruction."""
    if cpus is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def _read_output(child: Child) -> None:
    """Read every line (so the child never blocks on a full pipe); note the ready line."""
    assert child.proc.stdout is not None
    for line in child.proc.stdout:
        if child.ready is None and (ready := parse_ready_line(line)):
            child.ready = ready
            child._seen.set()
        if child.output is None:
            print(f"[{child.name}] {line}", end="", file=sys.stderr, flush=True)
        else:
            child.output.append(line)
            if len(child.output) > 2 * KEEP_LINES:  # a long run: keep the recent lines
                del child.output[:-KEEP_LINES]
    child._seen.set()  # it exited: nobody waits for a line that cannot come


def wait_ready(child: Child, timeout: float) -> Child:
    """Return `child` once it printed its ready line; kill it and raise if it exits or
    `timeout` seconds pass first."""
    if not child._seen.wait(timeout) or child.ready is None:
        child.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(10)
        tail = child.text()[-4000:]
        raise RuntimeError(f"{child.name} did not start (exit code {child.proc.poll()})\n{tail}")
    return child


def start(
    name: str,
    argv: Sequence[str],
    timeout: float,
    *,
    env: Mapping[str, str] | None = None,
    relay: bool = False,
    cwd: Path | None = None,
    cpus: Collection[int] | None = None,
) -> Child:
    """`launch` then `wait_ready`."""
    child = launch(name, argv, env=env, relay=relay, cwd=cwd, cpus=cpus)
    return wait_ready(child, timeout)


def stop(child: Child, timeout: float = 60.0) -> int | None:
    """SIGTERM (it drains), wait up to `timeout` seconds, then SIGKILL. Its exit code."""
    if child.proc.poll() is None:
        child.proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.proc.wait(timeout)
    return kill(child)


def kill(child: Child) -> int | None:
    """SIGKILL it if it still runs; its exit code."""
    if child.proc.poll() is None:
        child.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(10)
    return child.proc.poll()


def stop_all(children: Sequence[Child], timeout: float = 60.0) -> None:
    """`stop` each, last started first (the orchestrator before its workers, so it stops
    sending them work before they go)."""
    for child in reversed(children):
        stop(child, timeout)

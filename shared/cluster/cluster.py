"""A cluster of pdserve processes on loopback: workers and an orchestrator in front of them.

    spec = ClusterSpec(prefill=1, decode=2, worker_flags=["--model", "tiny"])
    with Cluster.start(spec) as cluster:
        ...  # cluster.target: the orchestrator's public gRPC address

1. The workers (`prefill` + `decode`, or `colocated`) start in parallel (each loads and
   compiles on its own), on loopback port 0 unless `fixed_ports` (ports chosen up front,
   so a worker stopped and started again comes back at the address the orchestrator
   already has: `restart`).
2. Once every one serves, the orchestrator starts with their addresses (and `extra`
   workers started elsewhere).
3. `stop()` (or leaving the `with`): the orchestrator first, then each worker; SIGTERM,
   SIGKILL after a timeout. Every process dies with this one anyway.

Only commands are started: no server package and no JAX is imported.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Collection, Mapping, Sequence

from shared.cluster.metrics import scrape
from shared.cluster.processes import Child, kill, launch, stop, stop_all, wait_ready
from shared.serving.flags import for_role

HOST = "127.0.0.1"
WORKER_ROLES = ("prefill", "decode", "colocated")


def free_port() -> int:
    """A loopback port free right now (for a process that must keep its port)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def listen_flags(port: int = 0, metrics_port: int = 0) -> list[str]:
    """A process's loopback listeners (0: a free port, read back from its ready line)."""
    return ["--host", HOST, "--port", str(port), "--metrics-port", str(metrics_port)]


def worker_argv(role: str, *flags: str, port: int = 0, metrics_port: int = 0) -> list[str]:
    """`pdserve worker --role ROLE` on loopback, then `flags`."""
    return ["worker", "--role", role, *listen_flags(port, metrics_port), *flags]


def orchestrator_argv(
    workers: Mapping[str, Sequence[str]], *flags: str, port: int = 0, metrics_port: int = 0
) -> list[str]:
    """`pdserve orchestrator` on loopback in front of `workers` (role -> addresses)."""
    argv = ["orchestrator", *listen_flags(port, metrics_port)]
    for role, addresses in workers.items():
        if addresses:
            argv += [f"--{role}", ",".join(addresses)]
    return [*argv, *flags]


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """What to start. Flags: `worker_flags` go to every worker (those its role reads),
    `role_flags[ROLE]` to that role's workers after them, `orchestrator_flags` to the
    orchestrator. `extra`: role -> addresses of workers started elsewhere, handed to the
    orchestrator too. `cpus`: worker name ("prefill-0") -> the cores it runs on. `env`:
    extra environment variables for every process. `orchestrator=False`: workers only."""

    prefill: int = 1
    decode: int = 1
    colocated: int = 0
    worker_flags: Sequence[str] = ()
    role_flags: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    orchestrator_flags: Sequence[str] = ()
    extra: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    cpus: Mapping[str, Collection[int]] = dataclasses.field(default_factory=dict)
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    orchestrator: bool = True
    fixed_ports: bool = False
    relay: bool = False  # print every process's output (prefixed) instead of keeping it
    startup_timeout_s: float = 600.0

    def worker_names(self) -> list[tuple[str, str]]:
        """(name, role) of each worker to start: prefill-0.., decode-0.., colocated-0.."""
        counts = {"prefill": self.prefill, "decode": self.decode, "colocated": self.colocated}
        return [(f"{role}-{i}", role) for role, n in counts.items() for i in range(n)]


class Cluster:
    """Started processes: `workers` (name -> Child, in start order) and `orchestrator`."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.workers: dict[str, Child] = {}
        self.orchestrator: Child | None = None
        self._argv: dict[str, list[str]] = {}

    @classmethod
    def start(cls, spec: ClusterSpec) -> Cluster:
        """Every worker, then the orchestrator; once all serve. On a failure, whatever was
        started is stopped and the error raised (with the failing process's output)."""
        cluster = cls(spec)
        try:
            for name, role in spec.worker_names():
                cluster._argv[name] = cluster._worker_argv(role)
                cluster.workers[name] = cluster._launch(name)
            for child in cluster.workers.values():
                wait_ready(child, spec.startup_timeout_s)
            if spec.orchestrator:
                cluster._argv["orchestrator"] = cluster._orchestrator_argv()
                cluster.orchestrator = wait_ready(
                    cluster._launch("orchestrator"), spec.startup_timeout_s
                )
        except BaseException:
            cluster.stop(timeout=10.0)
            raise
        return cluster

    def _worker_argv(self, role: str) -> list[str]:
        ports = (free_port(), free_port()) if self.spec.fixed_ports else (0, 0)
        # worker_flags are for every role: each gets the ones it reads (its parser refuses
        # the others, e.g. --slots for a prefill worker).
        flags = (*for_role(role, self.spec.worker_flags), *self.spec.role_flags.get(role, ()))
        return worker_argv(role, *flags, port=ports[0], metrics_port=ports[1])

    def _orchestrator_argv(self) -> list[str]:
        addresses = {
            role: [*(c.address for c in self.role(role)), *self.spec.extra.get(role, ())]
            for role in WORKER_ROLES
        }
        ports = (free_port(), free_port()) if self.spec.fixed_ports else (0, 0)
        flags = self.spec.orchestrator_flags
        return orchestrator_argv(addresses, *flags, port=ports[0], metrics_port=ports[1])

    def _launch(self, name: str) -> Child:
        spec = self.spec
        cpus = spec.cpus.get(name)
        return launch(name, self._argv[name], env=spec.env, relay=spec.relay, cpus=cpus)

    # What is running -----------------------------------------------------------------

    @property
    def target(self) -> str:
        """The orchestrator's public gRPC address."""
        assert self.orchestrator is not None, "started without an orchestrator"
        return self.orchestrator.address

    @property
    def http_url(self) -> str:
        """The orchestrator's OpenAI-compatible API (started with --http-port)."""
        assert self.orchestrator is not None and self.orchestrator.http_port >= 0
        return f"http://{HOST}:{self.orchestrator.http_port}"

    def role(self, role: str) -> list[Child]:
        return [c for c in self.workers.values() if c.name.startswith(f"{role}-")]

    def children(self) -> list[Child]:
        """Every process, in start order (the orchestrator last)."""
        return [*self.workers.values(), *([self.orchestrator] if self.orchestrator else [])]

    def arguments(self) -> dict[str, list[str]]:
        """Each process's `pdserve ...` arguments, by name."""
        return {name: list(argv) for name, argv in self._argv.items()}

    def metrics(self, name: str = "orchestrator") -> dict[str, float]:
        """`name`'s /metrics, parsed (`shared.cluster.metrics.metric_samples`)."""
        child = self.orchestrator if name == "orchestrator" else self.workers[name]
        assert child is not None
        return scrape(child.metrics_port)

    def alive(self) -> dict[str, bool]:
        return {c.name: c.proc.poll() is None for c in self.children()}

    # Stopping and starting again ---------------------------------------------------------

    def stop(self, timeout: float = 60.0) -> None:
        stop_all(self.children(), timeout)

    def kill(self, name: str) -> None:
        """SIGKILL worker `name` (a crash: no drain)."""
        kill(self.workers[name])

    def stop_worker(self, name: str, timeout: float = 120.0) -> int | None:
        """SIGTERM worker `name` (it drains) and wait for it; its exit code."""
        return stop(self.workers[name], timeout)

    def restart(self, name: str) -> Child:
        """Start worker `name` again with its arguments (at its address: `fixed_ports`);
        return once it serves. It must have exited."""
        assert self.spec.fixed_ports, "a port-0 worker would come back elsewhere"
        assert self.workers[name].proc.poll() is not None, f"{name} still runs"
        self.workers[name] = wait_ready(self._launch(name), self.spec.startup_timeout_s)
        return self.workers[name]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

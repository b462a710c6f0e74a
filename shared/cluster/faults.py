"""A process cluster that faults are injected into: workers killed, frozen, drained and
started again at their address, and the orchestrator asked when it uses them again.

`FaultCluster.start(spec)` needs `spec.fixed_ports` (a restarted worker must come back at
the address the orchestrator has). `TlsSetup` makes the certificates of a run: mTLS
between every process, TLS on the public port.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from shared.cluster.cluster import HOST, Cluster, ClusterSpec
from shared.cluster.processes import Child, kill


class FaultCluster(Cluster):
    """A `Cluster` whose workers can be killed, frozen (SIGSTOP) and started again."""

    def __init__(self, spec: ClusterSpec) -> None:
        assert spec.fixed_ports, "faults need fixed ports: a restarted worker keeps its address"
        super().__init__(spec)
        self.frozen: set[str] = set()

    @classmethod
    def start(cls, spec: ClusterSpec) -> FaultCluster:
        """Started, and every worker admitted by the orchestrator (healthy in its view)."""
        cluster = super().start(spec)
        assert isinstance(cluster, FaultCluster)
        try:
            cluster.wait_admitted()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def freeze(self, name: str) -> None:
        self.workers[name].signal(signal.SIGSTOP)
        self.frozen.add(name)

    def thaw(self, name: str) -> None:
        self.workers[name].signal(signal.SIGCONT)
        self.frozen.discard(name)

    def restart(self, name: str) -> Child:
        """Start `name` again at its address; return once the orchestrator uses it."""
        child = super().restart(name)
        self.wait_admitted()
        return child

    def drain_restart(self, name: str) -> None:
        """A rolling upgrade's step: SIGTERM (the worker drains), wait for it to exit 0,
        start it again, wait until the orchestrator uses it."""
        code = self.stop_worker(name, timeout=120.0)
        if code != 0:
            raise RuntimeError(f"{name} exited {code} after SIGTERM")
        self.restart(name)

    def stop(self, timeout: float = 60.0) -> None:
        """Everything killed at once: the run is over, nothing needs to drain."""
        for name in list(self.frozen):
            self.thaw(name)
        for child in reversed(self.children()):
            kill(child)

    # What the orchestrator sees ----------------------------------------------------------

    def running(self, role: str) -> list[Child]:
        """`role`'s workers of this cluster that are alive and not frozen."""
        return [c for c in self.role(role) if c.proc.poll() is None and c.name not in self.frozen]

    def available(self, role: str) -> int:
        """Workers of `role` that can serve: running ones plus the `extra` ones."""
        return len(self.running(role)) + len(self.spec.extra.get(role, ()))

    def workers_up(self) -> dict[str, int]:
        """The orchestrator's count of healthy workers per role."""
        samples = self.metrics()
        return {
            role: int(samples.get(f"pdserve_workers_up{{role={role}}}", 0))
            for role in ("prefill", "decode")
        }

    def wait_admitted(self, timeout: float = 60.0) -> None:
        """Until the orchestrator reports every available worker of each role healthy."""
        want = {role: self.available(role) for role in ("prefill", "decode")}
        deadline = time.monotonic() + timeout
        while True:
            up = self.workers_up()
            if all(up.get(role, 0) >= n for role, n in want.items()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not re-admitted: want {want}, up {up}")
            time.sleep(0.2)

    def rss(self) -> dict[str, int | None]:
        """Every process's resident memory, bytes (None: gone)."""
        return {c.name: rss_bytes(c) for c in self.children()}


def rss_bytes(child: Child) -> int | None:
    try:
        status = Path(f"/proc/{child.proc.pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match[1]) * 1024 if match else None


@dataclasses.dataclass(frozen=True)
class TlsSetup:
    """Certificate files for a run: one internal CA and one certificate every process
    shares (carrying INTERNAL_NAME), and a public CA with the orchestrator's certificate
    for its public port."""

    directory: Path
    internal_ca: Path
    public_ca: Path

    INTERNAL_NAME = "pdserve-internal.test"

    @classmethod
    def make(cls, directory: Path) -> TlsSetup:
        from shared.cluster.certificates import CertificateAuthority  # the test extra

        internal = CertificateAuthority(directory / "ca-internal", "internal-ca")
        public = CertificateAuthority(directory / "ca-public", "public-ca")
        internal.issue("internal", (cls.INTERNAL_NAME,), into=directory)
        public.issue("public", ("localhost", HOST), server=True, client=False, into=directory)
        return cls(directory, internal.cert, public.cert)

    def _files(self, name: str) -> tuple[Path, Path]:
        return self.directory / f"{name}.crt", self.directory / f"{name}.key"

    def worker_flags(self) -> list[str]:
        cert, key = self._files("internal")
        flags = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(self.internal_ca)]
        return [*flags, "--tls-server-name", self.INTERNAL_NAME]

    def orchestrator_flags(self, internal: bool) -> list[str]:
        """TLS on the public port; with `internal`, mTLS to the workers too."""
        public_cert, public_key = self._files("public")
        flags = ["--tls-cert", str(public_cert), "--tls-key", str(public_key)]
        if internal:
            cert, key = self._files("internal")
            flags += ["--internal-tls-cert", str(cert), "--internal-tls-key", str(key)]
            flags += ["--internal-tls-ca", str(self.internal_ca)]
            flags += ["--internal-tls-server-name", self.INTERNAL_NAME]
        return flags

    def client(self):  # -> shared.client.generator.ClientTls, for the public port
        from shared.client.generator import ClientTls

        return ClientTls.from_files(self.public_ca)

    def transport(self):  # -> TransportConfig, for calls to the workers
        from shared.transport.types import TlsConfig, TransportConfig

        cert, key = self._files("internal")
        tls = TlsConfig(cert, key, self.internal_ca, server_name=self.INTERNAL_NAME)
        return TransportConfig(tls=tls, rpc_timeout_s=5.0)


def tls_specs(tls: TlsSetup | None, internal: bool) -> tuple[Sequence[str], Sequence[str]]:
    """(worker flags, orchestrator flags) for `tls` (none when None)."""
    if tls is None:
        return (), ()
    return (tls.worker_flags() if internal else []), tls.orchestrator_flags(internal)

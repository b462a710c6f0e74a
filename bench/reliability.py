"""What bench/soak.py, bench/chaos.py and tests/test_chaos.py share: a cluster of pdserve
processes on loopback that faults can be injected into, a load of streams checked one by
one, and the end-of-run accounting (leaks, RSS, errors).

1. `Cluster` starts workers (in parallel) and an orchestrator, each on a fixed loopback
   port chosen up front, so a worker killed and started again comes back at the address
   the orchestrator already has; optionally with mTLS between all of them and TLS on the
   public port (certificates made for the run). Every process dies with this one.
2. `Load` runs streams through the public API: each request's outcome (tokens, finish, or
   the status it ended with) and client-side TTFT/TPOT.
3. `Cluster.leaks()` asks every decode worker what it still holds (slots, leases, KV
   pages used or promised) and the orchestrator what it still counts (slots in use, queue),
   once the load has stopped; `held()` says whether anything is. `rss()` reads every
   process's resident memory from /proc.

Loopback only: every address here is 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from shared.serving.lifetime import child_environment

REPO = Path(__file__).resolve().parent.parent
SERVING = re.compile(r"serving on (\S+):(\d+) metrics_port=(-?\d+)")
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Process:
    name: str
    role: str  # prefill, decode, orchestrator
    argv: list[str]
    port: int
    metrics_port: int
    proc: subprocess.Popen | None = None
    output: list[str] = dataclasses.field(default_factory=list)
    stopped: bool = False  # SIGSTOPped

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> threading.Event:
        env = child_environment({**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve_cli", *self.argv],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        ready = threading.Event()
        proc = self.proc

        def pump() -> None:  # keep reading: a child never blocks on a full pipe
            for line in proc.stdout:
                self.output.append(line)
                del self.output[:-400]
                if SERVING.search(line):
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        return ready

    def wait_serving(self, ready: threading.Event, timeout: float) -> None:
        if not ready.wait(timeout) or not self.alive:
            tail = "".join(self.output[-30:])
            raise RuntimeError(f"{self.name} did not start within {timeout}s:\n{tail}")

    def signal(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)
        self.stopped = sig == signal.SIGSTOP or (self.stopped and sig != signal.SIGCONT)

    def rss_bytes(self) -> int | None:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except (OSError, AttributeError):
            return None
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        return int(match[1]) * 1024 if match else None


@dataclasses.dataclass(frozen=True)
class TlsSetup:
    """Certificate files for a run: one internal CA, one certificate per component (all
    carrying INTERNAL_NAME), and a public CA with the orchestrator's certificate."""

    directory: Path
    internal_ca: Path
    public_ca: Path

    INTERNAL_NAME = "pdserve-internal.test"

    def files(self, name: str) -> tuple[Path, Path]:
        return self.directory / f"{name}.crt", self.directory / f"{name}.key"

    @classmethod
    def make(cls, directory: Path, names: Sequence[str]) -> TlsSetup:
        from tests.tls_certs import CertificateAuthority  # cryptography: the test extra

        internal = CertificateAuthority(directory / "ca-internal", "internal-ca")
        public = CertificateAuthority(directory / "ca-public", "public-ca")
        for name in names:
            internal.issue(name, (cls.INTERNAL_NAME,), into=directory)
        public.issue("public", ("localhost", HOST), server=True, client=False, into=directory)
        return cls(directory, internal.cert, public.cert)

    def worker_flags(self, name: str) -> list[str]:
        cert, key = self.files(name)
        return [
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--tls-ca",
            str(self.internal_ca),
            "--tls-server-name",
            self.INTERNAL_NAME,
        ]

    def orchestrator_flags(self, internal: bool) -> list[str]:
        cert, key = self.files("orchestrator")
        public_cert, public_key = self.files("public")
        flags = ["--tls-cert", str(public_cert), "--tls-key", str(public_key)]
        if internal:
            flags += [
                "--internal-tls-cert",
                str(cert),
                "--internal-tls-key",
                str(key),
                "--internal-tls-ca",
                str(self.internal_ca),
                "--internal-tls-server-name",
                self.INTERNAL_NAME,
            ]
        return flags

    def client(self):  # -> shared.client.ClientTls
        from shared.client.generator import ClientTls

        return ClientTls.from_files(self.public_ca)

    def transport(self, name: str):  # -> TransportConfig, for calls to workers
        from shared.transport.types import TlsConfig, TransportConfig

        cert, key = self.files(name)
        tls = TlsConfig(cert, key, self.internal_ca, server_name=self.INTERNAL_NAME)
        return TransportConfig(tls=tls, rpc_timeout_s=5.0)


class Cluster:
    """`prefill` + `decode` workers and an orchestrator, as processes on loopback.

    `tls`: "all" (mTLS between every process, TLS on the public port), "public" (the
    public port only) or "none". `shared_prefill`/`shared_decode`: addresses of workers
    started elsewhere (plaintext; the test suite's session cluster) to use as well; they
    are never faulted."""

    def __init__(
        self,
        prefill: int,
        decode: int,
        worker_flags: Sequence[str],
        orchestrator_flags: Sequence[str] = (),
        *,
        tls: str = "none",
        startup_timeout_s: float = 600.0,
        shared_prefill: Sequence[str] = (),
        shared_decode: Sequence[str] = (),
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="pdserve-reliability-")
        names = [f"prefill-{i}" for i in range(prefill)] + [f"decode-{i}" for i in range(decode)]
        assert tls in ("all", "public", "none"), tls
        assert tls != "all" or not (shared_prefill or shared_decode), "shared workers: plaintext"
        directory = Path(self._tmp.name)
        names_tls = [*names, "orchestrator", "bench"]
        self.tls = TlsSetup.make(directory, names_tls) if tls != "none" else None
        self.internal_tls = tls == "all"
        self.shared = {"prefill": list(shared_prefill), "decode": list(shared_decode)}
        self.timeout = startup_timeout_s
        self.workers: dict[str, Process] = {}
        for name in names:
            port, metrics = free_port(), free_port()
            argv = [
                "worker",
                "--role",
                name.split("-")[0],
                "--host",
                HOST,
                "--port",
                str(port),
                "--metrics-port",
                str(metrics),
                *worker_flags,
            ]
            if self.internal_tls:
                argv += self.tls.worker_flags(name)
            self.workers[name] = Process(name, name.split("-")[0], argv, port, metrics)
        port, metrics = free_port(), free_port()
        argv = [
            "orchestrator",
            "--host",
            HOST,
            "--port",
            str(port),
            "--metrics-port",
            str(metrics),
            "--health-interval-s",
            "0.5",
            *orchestrator_flags,
        ]
        for role in ("prefill", "decode"):
            addresses = [w.address for w in self.workers.values() if w.role == role]
            argv += [f"--{role}", ",".join([*addresses, *self.shared[role]])]
        if self.tls:
            argv += self.tls.orchestrator_flags(internal=self.internal_tls)
        self.orchestrator = Process("orchestrator", "orchestrator", argv, port, metrics)

    # Lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        readiness = [(w, w.start()) for w in self.workers.values()]  # load + compile in parallel
        for worker, ready in readiness:
            worker.wait_serving(ready, self.timeout)
        self.orchestrator.wait_serving(self.orchestrator.start(), self.timeout)
        self.wait_admitted()

    def close(self) -> None:
        for process in [self.orchestrator, *self.workers.values()]:
            if process.alive:
                process.signal(signal.SIGCONT)
                process.proc.kill()
                process.proc.wait(30)
        self._tmp.cleanup()

    @property
    def target(self) -> str:
        return self.orchestrator.address

    def processes(self) -> list[Process]:
        return [self.orchestrator, *self.workers.values()]

    # Faults ----------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        worker = self.workers[name]
        worker.signal(signal.SIGKILL)
        worker.proc.wait(30)

    def restart(self, name: str) -> None:
        """Start a worker again at its address; return once the orchestrator uses it."""
        worker = self.workers[name]
        worker.wait_serving(worker.start(), self.timeout)
        self.wait_admitted()

    def drain_restart(self, name: str) -> None:
        """A rolling upgrade's step: SIGTERM (the worker drains), wait for it to exit, start
        it again, wait until the orchestrator uses it."""
        worker = self.workers[name]
        worker.signal(signal.SIGTERM)
        code = worker.proc.wait(120)
        if code != 0:
            raise RuntimeError(f"{name} exited {code} after SIGTERM")
        self.restart(name)

    def wait_admitted(self, timeout: float = 60.0) -> None:
        """Until the orchestrator reports every live, running worker of each role healthy."""
        want = {role: len(addresses) for role, addresses in self.shared.items()}
        for worker in self.workers.values():
            if worker.alive and not worker.stopped:
                want[worker.role] = want.get(worker.role, 0) + 1
        deadline = time.monotonic() + timeout
        while True:
            up = self.workers_up()
            if all(up.get(role, 0) >= n for role, n in want.items()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not re-admitted: want {want}, up {up}")
            time.sleep(0.2)

    def available(self, role: str) -> int:
        own = sum(w.alive and not w.stopped for w in self.workers.values() if w.role == role)
        return own + len(self.shared[role])

    # Accounting --------------------------------------------------------------------------

    def metrics(self, process: Process) -> dict[str, float]:
        url = f"http://{HOST}:{process.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}"] = sample.value
        return out

    def workers_up(self) -> dict[str, int]:
        samples = self.metrics(self.orchestrator)
        return {
            role: int(samples.get(f"pdserve_workers_up{{role={role}}}", 0))
            for role in ("prefill", "decode")
        }

    def rss(self) -> dict[str, int | None]:
        return {p.name: p.rss_bytes() for p in self.processes()}

    async def _decode_loads(self) -> dict[str, object]:
        from shared.transport.grpc_transport import GrpcDecodeClient
        from shared.transport.types import TransportConfig

        plain = TransportConfig(rpc_timeout_s=5.0)
        own = self.tls.transport("bench") if self.internal_tls else plain
        targets = [
            (w.address, own) for w in self.workers.values() if w.role == "decode" and w.alive
        ]
        targets += [(address, plain) for address in self.shared["decode"]]
        loads = {}
        for address, config in targets:
            client = GrpcDecodeClient(address, config)
            try:
                loads[address] = await client.get_load()
            finally:
                await client.close()
        return loads

    def leaks(self, settle_s: float = 15.0) -> dict[str, object]:
        """What is still held once the load is over (waits up to `settle_s` for lease
        cancels and step boundaries). `pages`: KV pages every live decode worker still has
        used or promised (GetLoad: total_pages - free_pages, where free_pages excludes the
        promised ones), the sum over workers; `pages_by_worker` says which worker holds
        them, split into used and reserved from its /metrics where this cluster started it
        (a shared worker's metrics port is not known here)."""
        deadline = time.monotonic() + settle_s
        while True:
            loads = asyncio.run(self._decode_loads())
            orch = self.metrics(self.orchestrator)
            slots = sum(load.total_slots - load.free_slots for load in loads.values())
            leases = sum(load.live_requests for load in loads.values())
            pages = sum(load.total_pages - load.free_pages for load in loads.values())
            in_use = int(orch.get("pdserve_decode_slots_in_use{}", 0))
            queued = int(orch.get("pdserve_queue_depth{}", 0))
            idle = (slots, leases, pages, in_use, queued) == (0, 0, 0, 0, 0)
            if idle or time.monotonic() > deadline:
                return {
                    "slots": slots,
                    "leases": leases,
                    "pages": pages,
                    "pages_total": sum(load.total_pages for load in loads.values()),
                    "pages_by_worker": self._pages_by_worker(loads),
                    "orchestrator_slots_in_use": in_use,
                    "orchestrator_queue": queued,
                }
            time.sleep(0.5)

    def _pages_by_worker(self, loads: dict[str, object]) -> dict[str, dict[str, int]]:
        own = {w.address: w for w in self.workers.values() if w.role == "decode"}
        out: dict[str, dict[str, int]] = {}
        for address, load in loads.items():
            entry = {"held": load.total_pages - load.free_pages, "total": load.total_pages}
            if address in own:
                samples = self.metrics(own[address])
                for state in ("used", "reserved"):
                    entry[state] = int(samples.get(f"pdserve_kv_pages{{state={state}}}", 0))
            out[address] = entry
        return out


# Counts in `Cluster.leaks()`'s report that must all be zero at the end of a run (the rest
# of it is detail: the pool sizes, which worker holds what).
LEAK_COUNTS = ("slots", "leases", "pages", "orchestrator_slots_in_use", "orchestrator_queue")


def held(leaked: dict[str, object]) -> dict[str, object]:
    """The nonzero leak counts of a `leaks()` report; empty when nothing leaked. A count
    that is missing or None (not measured) counts as held: a pass mark never passes on
    what it did not measure."""
    return {k: leaked.get(k) for k in LEAK_COUNTS if leaked.get(k) != 0}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# The load -------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """One request, as its client saw it."""

    index: int
    prompt: tuple[int, ...]
    max_tokens: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish: str | None = None
    code: str | None = None  # the status it failed with
    message: str = ""
    ttft_s: float | None = None
    tpot_s: float | None = None
    intent: str = "complete"  # complete | cancel | deadline
    started: float = 0.0
    ended: float = 0.0


async def run_stream(
    client,
    outcome: Outcome,
    *,
    cancel_after: int | None = None,
    timeout_s: float | None = None,
    **options,
) -> Outcome:
    """One request through `client` (an AsyncGeneratorClient); never raises."""
    from shared.client.generator import GenerateError

    start = outcome.started = time.perf_counter()
    times: list[float] = []
    stream = client.generate(
        list(outcome.prompt), max_tokens=outcome.max_tokens, timeout=timeout_s, **options
    )
    try:
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                if chunk.token_ids:
                    times.extend([time.perf_counter()] * len(chunk.token_ids))
                    outcome.tokens.extend(chunk.token_ids)
                if chunk.finish_reason:
                    outcome.finish = chunk.finish_reason
                if cancel_after is not None and len(outcome.tokens) >= cancel_after:
                    outcome.finish = "client_cancelled"
                    break
    except GenerateError as err:
        outcome.code, outcome.message = err.code, err.message
    outcome.ended = time.perf_counter()
    if times:
        outcome.ttft_s = times[0] - start
    if len(times) > 1:
        outcome.tpot_s = (times[-1] - times[0]) / (len(times) - 1)
    return outcome


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def client_pool(target: str, connections: int, tls=None) -> list:
    """`connections` clients, each on its own HTTP/2 connection (a local subchannel pool:
    by default gRPC shares one connection between channels to the same target), as many
    frontends would; the public port limits streams per connection."""
    from shared.client.generator import AsyncGeneratorClient

    options = [("grpc.use_local_subchannel_pool", 1)]
    return [AsyncGeneratorClient(target, None, tls, options) for _ in range(connections)]


def greedy_references(
    prompts: Sequence[tuple[int, ...]], max_tokens: int, worker_flags: Sequence[str]
) -> dict[tuple[int, ...], list[int]]:
    """Each prompt's greedy continuation from one engine in this process (the tiny preset
    with seed 0, the workers' engine shape: buckets, max_seq_len, page size): the
    single-engine reference the cluster's output must equal token for token."""
    from shared.config import ModelConfig
    from shared.engine.engine import Engine
    from shared.serving.worker_config import Role, parse_worker_args

    config = parse_worker_args(["--port", "0", *worker_flags], Role.DECODE)
    # One slot, a pool for it at max_seq_len (0: every slot full); the workers' pool size
    # is sized from their memory and does not change what a request generates.
    shape = config.engine_config(1, config.max_seq_len, 0)
    engine = Engine(ModelConfig.tiny(), shape)
    return engine_references(engine, engine.init_params(seed=0), prompts, max_tokens)


def engine_references(engine, params, prompts: Sequence[tuple[int, ...]], max_tokens: int):
    """`greedy_references` with an engine already built (and compiled): prefill, insert
    into slot 0 of a DecodeBatch, step."""
    from decode_server.scheduler import DecodeBatch

    out = {}
    for prompt in dict.fromkeys(prompts):
        prefix = engine.prefill(params, list(prompt))
        batch = DecodeBatch(engine)
        batch.insert([prefix], [0])
        tokens = [prefix.first_token]
        while len(tokens) < max_tokens:
            tokens.append(batch.step(params)[0][0])
        out[prompt] = tokens
    return out

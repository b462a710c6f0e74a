"""Which workers exist, which are healthy, and how loaded each one is.

Workers come from static address lists and from DNS names re-resolved every
`dns_refresh_s` (a Kubernetes headless Service: one A/AAAA record per pod). Every worker is
health-checked (`grpc.health.v1`) every `health_interval_s` and asked for its load report:
a decode worker's slots and pages (placement), a prefill worker's page size (the prefix
block size, orchestrator/prefix_blocks.py). A worker whose call failed is ejected at once
(DOWN) and re-admitted when its health check passes again. A colocated worker is one
address in both roles.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import socket
from collections.abc import Iterable
from typing import Protocol

from orchestrator.prefix_blocks import BlockSizeAgreement
from shared.metrics import OrchestratorMetrics
from shared.transport.base import DecodeClient, PrefillClient
from shared.transport.types import LoadReport, TransportError

log = logging.getLogger(__name__)


FAILED_CHECKS_TO_EJECT = 3


class WorkerRole(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class Health(enum.Enum):
    UNKNOWN = "unknown"  # not checked yet: not used
    UP = "up"
    DOWN = "down"


class Connector(Protocol):
    """Makes clients for an address and checks its health (gRPC, or the fake)."""

    def decode_client(self, address: str) -> DecodeClient: ...

    def prefill_client(self, address: str) -> PrefillClient: ...

    async def healthy(self, address: str, timeout: float) -> bool: ...


@dataclasses.dataclass(eq=False)
class Worker:
    address: str
    roles: frozenset[WorkerRole]
    decode: DecodeClient | None
    prefill: PrefillClient | None
    health: Health = Health.UNKNOWN
    load: LoadReport | None = None  # the decode side's last report
    leases: int = 0  # decode leases our requests hold on it now
    others: int = 0  # slots busy with work that is not ours, as of the last report
    outstanding: int = 0  # our prefill calls in flight on it now
    failed_checks: int = 0  # consecutive failed health checks
    pending_pages: int = 0  # pages our leases were promised since the last load report
    released_since_report: bool = False  # a lease of ours ended since the last report
    prefill_page_size: int = 0  # a prefill-only worker's, from its last report (0: unknown)
    prefix_refused: bool = False  # its page size disagrees: no prefix routing to it

    @property
    def free_slots(self) -> int:
        """Our estimate, exact for our own leases and refreshed for everyone else's (other
        orchestrator replicas) at each load report."""
        if self.load is None:
            return 0
        return max(0, self.load.total_slots - self.leases - self.others)

    @property
    def free_pages(self) -> int | None:
        """KV pages free for new requests, as of the last report minus what our leases were
        promised since; None when the worker reports no pages."""
        if self.load is None or not self.load.total_pages:
            return None
        return max(0, self.load.free_pages - self.pending_pages)

    def pages_for(self, prompt_length: int) -> int:
        """Pages a request of `prompt_length` takes at admission (prompt + first token)."""
        return self.load.pages_for(prompt_length + 1) if self.load is not None else 0

    def could_ever_hold(self, positions: int) -> bool:
        """Whether a request of `positions` (prompt + max_tokens) fits this worker when it is
        idle: within its max_seq_len and its whole KV pool (True where it reports neither)."""
        load = self.load
        if load is None:
            return True  # not reported yet: it may
        if load.max_seq_len and positions > load.max_seq_len:
            return False
        return not load.total_pages or load.pages_for(positions) <= load.total_pages

    def fits(self, prompt_length: int) -> bool:
        free = self.free_pages
        return self.free_slots > 0 and (free is None or free >= self.pages_for(prompt_length))

    def granted(self, prompt_length: int) -> None:
        """A lease was granted here: count its slot and its promised pages."""
        self.leases += 1
        self.pending_pages += self.pages_for(prompt_length)

    def set_load(self, load: LoadReport) -> None:
        self.load = load
        self.others = max(0, load.total_slots - load.free_slots - self.leases)
        self.pending_pages = 0  # the report counts every promise made so far
        self.released_since_report = False

    def mark_full(self) -> None:
        """Reserve said RESOURCE_EXHAUSTED: assume no room until the next report."""
        if self.load is not None:
            self.others = max(0, self.load.total_slots - self.leases)
            self.pending_pages = self.load.free_pages


@dataclasses.dataclass(slots=True, frozen=True)
class Sources:
    """Static addresses and DNS names (NAME:PORT) per kind of worker."""

    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    colocated: tuple[str, ...] = ()
    prefill_dns: tuple[str, ...] = ()
    decode_dns: tuple[str, ...] = ()
    colocated_dns: tuple[str, ...] = ()


_ROLES = {
    "prefill": frozenset({WorkerRole.PREFILL}),
    "decode": frozenset({WorkerRole.DECODE}),
    "colocated": frozenset({WorkerRole.PREFILL, WorkerRole.DECODE}),
}


class WorkerRegistry:
    def __init__(
        self,
        connector: Connector,
        sources: Sources,
        metrics: OrchestratorMetrics,
        *,
        health_interval_s: float = 2.0,
        dns_refresh_s: float = 10.0,
        health_timeout_s: float = 5.0,
    ) -> None:
        self._connector, self._sources, self._metrics = connector, sources, metrics
        self._health_interval, self._dns_refresh = health_interval_s, dns_refresh_s
        self._health_timeout = health_timeout_s
        self._workers: dict[str, Worker] = {}
        self._tasks: list[asyncio.Task] = []
        self.changed = asyncio.Event()  # set whenever health or load changes
        self.prefix_blocks = BlockSizeAgreement(metrics)

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve and check every worker once, then keep doing it in the background."""
        for kind, addresses in self._static().items():
            self._sync(kind, addresses, keep_others=True)
        await self._resolve_all()
        await self.check_all()
        self._tasks = [
            asyncio.create_task(self._every(self._health_interval, self.check_all)),
            asyncio.create_task(self._every(self._dns_refresh, self._resolve_all)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in list(self._workers.values()):
            await self._close(worker)
        self._workers.clear()

    # Queries --------------------------------------------------------------------------------

    def up(self, role: WorkerRole) -> list[Worker]:
        return [w for w in self._workers.values() if role in w.roles and w.health is Health.UP]

    def all(self) -> list[Worker]:
        return list(self._workers.values())

    # Health ---------------------------------------------------------------------------------

    def eject(self, worker: Worker, reason: str) -> None:
        """A call to `worker` failed: stop using it until a health check passes."""
        if worker.health is not Health.DOWN:
            log.warning("ejecting worker %s: %s", worker.address, reason)
        worker.health = Health.DOWN
        self._publish()

    async def check(self, worker: Worker) -> bool:
        page_size = worker.prefill_page_size
        ok = await self._connector.healthy(worker.address, self._health_timeout)
        if ok:
            ok = await self._read_load(worker)
        was = worker.health
        worker.failed_checks = 0 if ok else worker.failed_checks + 1
        if ok:
            worker.health = Health.UP
        elif was is not Health.UP or worker.failed_checks >= FAILED_CHECKS_TO_EJECT:
            # One slow answer from a busy worker is not a failure; calls that fail eject it
            # at once through `eject`.
            worker.health = Health.DOWN
        if was is not worker.health:
            log.info("worker %s is %s", worker.address, worker.health.value)
        if page_size not in (0, worker.prefill_page_size):
            # Restarted at another page size: agree again before it is routed to. (Not on
            # its first report: the first round of checks agrees once, over all of them.)
            self._agree_block_size()
        return ok

    async def refresh_load(self, worker: Worker) -> None:
        """Re-read a decode worker's load now (its page estimate is stale); its health is
        left to the health checks: a failure here changes nothing."""
        if worker.decode is not None and worker.health is Health.UP:
            await self._read_load(worker)

    async def _read_load(self, worker: Worker) -> bool:
        """GetLoad into `worker` (its decode side's; a prefill-only worker's page size);
        False when it failed or timed out."""
        client = worker.decode if worker.decode is not None else worker.prefill
        if client is None:
            return True
        try:
            # asyncio.timeout, not wait_for: see SlotBroker._dispatch (a cancel lost here
            # would keep the refresh loop running and stop() waiting for it).
            async with asyncio.timeout(self._health_timeout):
                load = await client.get_load()
        except (TransportError, TimeoutError):
            return False
        if worker.decode is not None:
            worker.set_load(load)
        else:
            worker.prefill_page_size = load.page_size
        return True

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in list(self._workers.values())))
        self._publish()

    def _publish(self) -> None:
        for role in WorkerRole:
            self._metrics.workers_up.labels(role.value).set(len(self.up(role)))
        decode = [w for w in self.up(WorkerRole.DECODE) if w.load is not None]
        total = sum(w.load.total_slots for w in decode)
        self._metrics.decode_slots_total.set(total)
        self._metrics.decode_slots_in_use.set(total - sum(w.free_slots for w in decode))
        self._metrics.decode_pages_total.set(sum(w.load.total_pages for w in decode))
        self._metrics.decode_pages_free.set(sum(w.free_pages or 0 for w in decode))
        self._agree_block_size()
        self.changed.set()

    def _agree_block_size(self) -> None:
        # Colocated workers prefill only for their own slots: never prefix-routed.
        self.prefix_blocks.update([w for w in self.up(WorkerRole.PREFILL) if len(w.roles) == 1])

    # Discovery ------------------------------------------------------------------------------

    def _static(self) -> dict[str, tuple[str, ...]]:
        s = self._sources
        return {"prefill": s.prefill, "decode": s.decode, "colocated": s.colocated}

    async def _resolve_all(self) -> None:
        s = self._sources
        for kind, names in (
            ("prefill", s.prefill_dns),
            ("decode", s.decode_dns),
            ("colocated", s.colocated_dns),
        ):
            if not names:
                continue
            addresses: list[str] = []
            for name in names:
                addresses += await resolve(name)
            self._sync(kind, [*self._static()[kind], *addresses], keep_others=False)

    def _sync(self, kind: str, addresses: Iterable[str], keep_others: bool) -> None:
        """Make the workers of `kind` exactly `addresses` (plus others when keep_others)."""
        roles = _ROLES[kind]
        wanted = set(addresses)
        for address in wanted - set(self._workers):
            self._workers[address] = Worker(
                address,
                roles,
                self._connector.decode_client(address) if WorkerRole.DECODE in roles else None,
                self._connector.prefill_client(address) if WorkerRole.PREFILL in roles else None,
            )
            log.info("discovered %s worker %s", kind, address)
        if keep_others:
            return
        for address, worker in list(self._workers.items()):
            if worker.roles == roles and address not in wanted:
                log.info("worker %s is gone from DNS", address)
                del self._workers[address]
                asyncio.get_running_loop().create_task(self._close(worker))

    async def _close(self, worker: Worker) -> None:
        for client in (worker.decode, worker.prefill):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()

    @staticmethod
    async def _every(seconds: float, job) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:  # a failed round must not end the loop
                log.exception("background worker refresh failed")


async def resolve(name: str) -> list[str]:
    """NAME:PORT -> every address DNS gives for NAME, as HOST:PORT ([v6]:PORT)."""
    host, _, port = name.rpartition(":")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM
        )
    except socket.gaierror as err:
        log.warning("cannot resolve %s: %s", name, err)
        return []
    out = []
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        out.append(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(set(out))

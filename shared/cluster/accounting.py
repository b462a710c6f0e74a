"""The end of a run's accounting: what decode workers and the orchestrator still hold once
the load has stopped. A run passes only when `held(leaks(...))` is empty."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from shared.cluster.cluster import Cluster

# Counts in a `leaks()` report that must all be zero at the end of a run (the rest of it is
# detail: the pool sizes, which worker holds what).
LEAK_COUNTS = ("slots", "leases", "pages", "orchestrator_slots_in_use", "orchestrator_queue")


def held(leaked: dict[str, object]) -> dict[str, object]:
    """The nonzero leak counts of a `leaks()` report; empty when nothing leaked. A count
    that is missing or None (not measured) counts as held: a pass mark never passes on
    what it did not measure."""
    return {k: leaked.get(k) for k in LEAK_COUNTS if leaked.get(k) != 0}


async def decode_loads(cluster: Cluster, transport: Any = None) -> dict[str, Any]:
    """GetLoad of every live decode worker: the cluster's own (called with `transport`, a
    TransportConfig; default plaintext) and its `extra` ones (plaintext), by address."""
    from shared.transport.grpc_transport import GrpcDecodeClient
    from shared.transport.types import TransportConfig

    plain = TransportConfig(rpc_timeout_s=5.0)
    own = [c.address for c in cluster.role("decode") if c.proc.poll() is None]
    targets = [(address, transport or plain) for address in own]
    targets += [(address, plain) for address in cluster.spec.extra.get("decode", ())]
    loads = {}
    for address, config in targets:
        client = GrpcDecodeClient(address, config)
        try:
            loads[address] = await client.get_load()
        finally:
            await client.close()
    return loads


def leaks(cluster: Cluster, transport: Any = None, settle_s: float = 15.0) -> dict[str, object]:
    """What is still held once the load is over (waits up to `settle_s` for lease cancels
    and step boundaries). `pages`: KV pages every live decode worker still has used or
    promised (GetLoad: total_pages - free_pages, where free_pages excludes the promised
    ones), summed; `pages_by_worker` says which worker holds them, split into used and
    reserved from its /metrics where this cluster started it."""
    deadline = time.monotonic() + settle_s
    while True:
        loads = asyncio.run(decode_loads(cluster, transport))
        orch = cluster.metrics()
        report = {
            "slots": sum(load.total_slots - load.free_slots for load in loads.values()),
            "leases": sum(load.live_requests for load in loads.values()),
            "pages": sum(load.total_pages - load.free_pages for load in loads.values()),
            "orchestrator_slots_in_use": int(orch.get("pdserve_decode_slots_in_use{}", 0)),
            "orchestrator_queue": int(orch.get("pdserve_queue_depth{}", 0)),
        }
        if not held(report) or time.monotonic() > deadline:
            report["pages_total"] = sum(load.total_pages for load in loads.values())
            report["pages_by_worker"] = _pages_by_worker(cluster, loads)
            return report
        time.sleep(0.5)


def _pages_by_worker(cluster: Cluster, loads: dict[str, Any]) -> dict[str, dict[str, int]]:
    own = {c.address: c.name for c in cluster.role("decode")}
    out: dict[str, dict[str, int]] = {}
    for address, load in loads.items():
        entry = {"held": load.total_pages - load.free_pages, "total": load.total_pages}
        if address in own:
            samples = cluster.metrics(own[address])
            for state in ("used", "reserved"):
                entry[state] = int(samples.get(f"pdserve_kv_pages{{state={state}}}", 0))
        out[address] = entry
    return out

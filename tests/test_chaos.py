"""A small chaos run in the suite: one decode worker SIGKILLed while 32 greedy streams run
(bench/chaos.py's machinery). The cluster: the session's prefill and decode workers, one
more decode worker of this test's own (the one killed), and an orchestrator of its own
serving TLS on its public port, so the TLS flags are proven through a real process too
(mTLS between processes is the 10-minute bench run's; README "Reliability"). Every stream
completes with exactly its single-engine reference tokens; the dead worker's streams
resume on the other one; nothing is held at the end."""

from __future__ import annotations

import asyncio

import pytest

from bench import chaos
from bench.reliability import Cluster, engine_references, held
from shared.transport.grpc_transport import GrpcDecodeClient
from shared.transport.types import GenerationLimits, ReserveRequest
from tests.worker_harness import ENGINE_FLAGS, TRANSPORT


@pytest.mark.timeout(240)
def test_one_kill_during_32_streams_loses_nothing(process_cluster, engine, params) -> None:
    shared = process_cluster.workers
    cluster = Cluster(
        0,
        1,
        ENGINE_FLAGS,
        tls="public",
        startup_timeout_s=200,
        shared_prefill=[shared.prefill.address],
        shared_decode=[shared.decode_address],
    )
    try:
        cluster.start()
        result = asyncio.run(
            chaos.run(
                cluster,
                duration_s=120,
                concurrency=32,
                seed=1,
                max_streams=32,
                one_kill=True,
                references=lambda prompts, n: engine_references(engine, params, prompts, n),
            )
        )
    finally:
        cluster.close()
    assert result["kills"] == 1 and result["faults"][0]["worker"] == "decode-0"
    assert result["orchestrator_retries"]["decode_resume"] >= 1  # it was serving streams
    assert result["streams"] == 32
    assert result["completed"] == 32, (result["errors_by_status"], result["error_samples"])
    assert result["mismatched_streams"] == 0, result["mismatched_indices"]
    assert result["unexplained_errors"] == 0
    leaked = result["leaked"]
    assert (leaked["slots"], leaked["leases"], leaked["pages"]) == (0, 0, 0), leaked
    assert (leaked["orchestrator_slots_in_use"], leaked["orchestrator_queue"]) == (0, 0)
    assert result["leaks"] == {}
    # Pages were measured, not assumed: the shared decode worker's pool is there, whole.
    assert leaked["pages_total"] > 0
    assert all(w["held"] == 0 for w in leaked["pages_by_worker"].values()), leaked


@pytest.mark.timeout(150)
def test_leak_accounting_sees_a_held_lease_and_its_pages(process_cluster) -> None:
    """The end-of-run accounting can fail: a lease reserved on the session's decode worker
    and never given its KV holds a slot and the KV pages promised to it, and `leaks()`
    reports exactly those (and the pass mark's `held()` names them) until it is cancelled."""
    shared = process_cluster.workers
    cluster = Cluster(
        0,
        0,
        ENGINE_FLAGS,
        startup_timeout_s=100,
        shared_prefill=[shared.prefill.address],
        shared_decode=[shared.decode_address],
    )
    prompt_length = 20  # with its first token: 21 positions, 3 pages of 8 (ENGINE_FLAGS)

    async def reserve() -> str:
        client = GrpcDecodeClient(shared.decode_address, TRANSPORT)
        try:
            limits = GenerationLimits(4, stop_on_eos=False)
            request = ReserveRequest("leak-probe", prompt_length, limits, ttl_seconds=60.0)
            return (await client.reserve(request)).lease_id
        finally:
            await client.close()

    async def cancel(lease_id: str) -> None:
        client = GrpcDecodeClient(shared.decode_address, TRANSPORT)
        try:
            assert await client.cancel(lease_id)
        finally:
            await client.close()

    try:
        cluster.start()
        lease_id = asyncio.run(reserve())
        try:
            leaked = cluster.leaks(settle_s=1.0)
        finally:
            asyncio.run(cancel(lease_id))
        assert (leaked["slots"], leaked["leases"], leaked["pages"]) == (1, 1, 3), leaked
        found = held(leaked)
        assert {k: found.get(k) for k in ("slots", "leases", "pages")} == {
            "slots": 1,
            "leases": 1,
            "pages": 3,
        }
        # The orchestrator counts the slot too once its load poll (every 0.5 s) saw it.
        assert set(found) <= {"slots", "leases", "pages", "orchestrator_slots_in_use"}
        assert leaked["pages_by_worker"][shared.decode_address]["held"] == 3
        after = cluster.leaks()
        assert (after["slots"], after["leases"], after["pages"]) == (0, 0, 0), after
        assert held(after) == {}
    finally:
        cluster.close()

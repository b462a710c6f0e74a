"""A small chaos run in the suite: one decode worker SIGKILLed while 32 greedy streams run.

The cluster: the session's prefill and decode workers, one more decode worker of this
test's own (the one killed), and an orchestrator of its own serving TLS on its public port,
so the TLS flags are proven through a real process too (mTLS between processes is
bench/chaos.py's). Every stream completes with exactly its single-engine reference tokens;
the dead worker's streams resume on the other one; nothing is held at the end."""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
from pathlib import Path

import pytest

from shared.client.generator import AsyncGeneratorClient
from shared.cluster.accounting import held, leaks
from shared.cluster.cluster import ClusterSpec
from shared.cluster.faults import FaultCluster, TlsSetup
from shared.transport.grpc_transport import GrpcDecodeClient
from shared.transport.types import GenerationLimits, LoadReport, ReserveRequest
from tests.cluster_harness import ORCHESTRATOR_FLAGS
from tests.reference import reference_greedy
from tests.worker_harness import ENGINE_FLAGS, TRANSPORT, process_env

STREAMS = 32
MAX_TOKENS = 40
# Killed once this many tokens have streamed: 5 a stream on average, far from the 40 each
# needs, so the kill lands while every stream still has most of its tokens to go.
KILL_AFTER_TOKENS = 5 * STREAMS


@contextlib.contextmanager
def cluster_beside(process_cluster, decode: int, tls: TlsSetup | None = None):
    """`decode` decode workers and an orchestrator of this test's own (fixed ports), in
    front of them and the session's prefill and decode worker (plaintext)."""
    shared = process_cluster.workers
    spec = ClusterSpec(
        prefill=0,
        decode=decode,
        worker_flags=ENGINE_FLAGS,
        orchestrator_flags=(*ORCHESTRATOR_FLAGS, *(tls.orchestrator_flags(False) if tls else ())),
        extra={"prefill": [shared.prefill.address], "decode": [shared.decode_address]},
        env=process_env(),
        fixed_ports=True,
        startup_timeout_s=200.0,
    )
    cluster = FaultCluster.start(spec)
    try:
        yield cluster
    finally:
        cluster.stop()


def prompts(count: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [
        tuple([256, *(rng.randrange(256) for _ in range(rng.randint(1, 15)))]) for _ in range(count)
    ]


def _decoding(load: LoadReport) -> int:
    """Requests in the worker's decode batch: its leased slots less those still waiting
    for (or inserting) their KV."""
    return load.live_requests - load.queue_depth


async def streams_with_one_kill(cluster: FaultCluster, tls: TlsSetup, work: list) -> dict:
    """Every prompt of `work` streamed at once; decode-0 SIGKILLed once KILL_AFTER_TOKENS
    tokens have streamed and it holds live requests. Each stream's tokens and finish (or
    error)."""
    tokens: list[list[int]] = [[] for _ in work]
    finish: list[str | None] = [None] * len(work)
    async with AsyncGeneratorClient(cluster.target, None, tls.client()) as client:

        async def stream(i: int) -> None:
            chunks = client.generate(
                list(work[i]), max_tokens=MAX_TOKENS, ignore_eos=True, timeout=120
            )
            async for chunk in chunks:
                tokens[i] += chunk.token_ids
                finish[i] = chunk.finish_reason or finish[i]

        async def kill_when_flowing() -> int:
            # Once the streams flow, and while decode-0 is decoding some of them (under load
            # the placement may have sent it none yet, or only leases still waiting for
            # their KV, whose loss retries the prefill instead): its streams must resume
            # elsewhere.
            victim = GrpcDecodeClient(cluster.workers["decode-0"].address, TRANSPORT)
            try:
                while sum(map(len, tokens)) < KILL_AFTER_TOKENS or not _decoding(
                    await victim.get_load()
                ):
                    await asyncio.sleep(0.01)
            finally:
                await victim.close()
            streamed = sum(map(len, tokens))
            await asyncio.to_thread(cluster.kill, "decode-0")
            return streamed

        outcomes = await asyncio.gather(
            kill_when_flowing(), *(stream(i) for i in range(len(work))), return_exceptions=True
        )
    return {"tokens": tokens, "finish": finish, "killed_at": outcomes[0], "errors": outcomes[1:]}


@pytest.mark.timeout(240)
def test_one_kill_during_32_streams_loses_nothing(process_cluster, engine, params) -> None:
    work = prompts(STREAMS, seed=1)
    references = {p: reference_greedy(engine, params, p, MAX_TOKENS) for p in set(work)}
    with tempfile.TemporaryDirectory(prefix="pdserve-chaos-") as directory:
        tls = TlsSetup.make(Path(directory))
        with cluster_beside(process_cluster, decode=1, tls=tls) as cluster:
            result = asyncio.run(streams_with_one_kill(cluster, tls, work))
            assert cluster.workers["decode-0"].proc.poll() is not None  # it did die
            retries = cluster.metrics()["pdserve_retries_total{stage=decode_resume}"]
            leaked = leaks(cluster)
    assert [e for e in result["errors"] if e is not None] == []
    # The kill landed mid-run: far fewer tokens had streamed than the run streams in all.
    assert result["killed_at"] < STREAMS * MAX_TOKENS // 2
    assert retries >= 1  # it was serving streams, which resumed elsewhere
    assert result["finish"] == ["length"] * STREAMS
    mismatched = [i for i, p in enumerate(work) if result["tokens"][i] != references[p]]
    assert mismatched == []
    assert held(leaked) == {}, leaked
    # Pages were measured, not assumed: the shared decode worker's pool is there, whole.
    assert leaked["pages_total"] > 0
    assert all(w["held"] == 0 for w in leaked["pages_by_worker"].values()), leaked


async def _reserve(address: str, prompt_length: int) -> str:
    client = GrpcDecodeClient(address, TRANSPORT)
    try:
        limits = GenerationLimits(4, stop_on_eos=False)
        request = ReserveRequest("leak-probe", prompt_length, limits, ttl_seconds=60.0)
        return (await client.reserve(request)).lease_id
    finally:
        await client.close()


async def _cancel(address: str, lease_id: str) -> None:
    client = GrpcDecodeClient(address, TRANSPORT)
    try:
        assert await client.cancel(lease_id)
    finally:
        await client.close()


@pytest.mark.timeout(150)
def test_leak_accounting_sees_a_held_lease_and_its_pages(process_cluster) -> None:
    """The end-of-run accounting can fail: a lease reserved on the session's decode worker
    and never given its KV holds a slot and the KV pages promised to it, and `leaks()`
    reports exactly those (and the pass mark's `held()` names them) until it is cancelled."""
    decode = process_cluster.workers.decode_address
    prompt_length = 20  # with its first token: 21 positions, 3 pages of 8 (ENGINE_FLAGS)
    with cluster_beside(process_cluster, decode=0) as cluster:
        lease_id = asyncio.run(_reserve(decode, prompt_length))
        try:
            leaked = leaks(cluster, settle_s=1.0)
        finally:
            asyncio.run(_cancel(decode, lease_id))
        after = leaks(cluster)
    assert (leaked["slots"], leaked["leases"], leaked["pages"]) == (1, 1, 3), leaked
    found = held(leaked)
    assert {k: found.get(k) for k in ("slots", "leases", "pages")} == {
        "slots": 1,
        "leases": 1,
        "pages": 3,
    }
    # The orchestrator counts the slot too once its load poll (every 0.5 s) saw it.
    assert set(found) <= {"slots", "leases", "pages", "orchestrator_slots_in_use"}
    assert leaked["pages_by_worker"][decode]["held"] == 3
    assert (after["slots"], after["leases"], after["pages"]) == (0, 0, 0), after
    assert held(after) == {}

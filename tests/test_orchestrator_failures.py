"""Worker failures end to end: a decode worker killed mid-stream (the stream resumes
exactly on another one), a decode pool running dry (preempted and resumed exactly), the
only decode worker gone (UNAVAILABLE), and pages freed by a release admitting the next
request."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request

import pytest
from prometheus_client import generate_latest

from shared.client.generator import GenerateError
from shared.config import EngineConfig
from shared.engine.engine import Engine
from tests.cluster_harness import InProcessCluster, ProcessApi, spawn_orchestrator
from tests.e2e_support import tokens_of
from tests.reference import metric_samples, reference_greedy
from tests.worker_harness import spawn_worker, stop_worker


@pytest.mark.timeout(300)
def test_decode_killed_mid_stream_resumes_exactly_processes(process_cluster, tiny_config, params):
    prompt = [256, 3, 1, 4]
    # Longer sequences than the shared test engine holds: a reference engine of 256.
    long_engine = Engine(tiny_config, EngineConfig(1, (8,), 256))
    expected = reference_greedy(long_engine, params, prompt, 100)
    flags = ("--max-seq-len", "256", "--prefill-buckets", "8,16,32,64,128")
    decodes = [spawn_worker("decode", *flags), spawn_worker("decode", *flags)]
    prefill = spawn_worker("prefill", *flags)
    orch = spawn_orchestrator(
        "--prefill", prefill.address, "--decode", ",".join(d.address for d in decodes)
    )
    # Both idle with equal room: the policy's tie-break picks the smaller address.
    chosen = min(decodes, key=lambda d: d.address)

    async def body() -> None:
        chunks = []
        async for chunk in ProcessApi(orch.address).stream(prompt, max_tokens=100, ignore_eos=True):
            if not chunks:
                chosen.signal(signal.SIGSTOP)
                chosen.signal(signal.SIGKILL)
            chunks.append(chunk)
        assert tokens_of(chunks) == expected, (chunks[-2:], orch.output[-20:])
        assert chunks[-1].finish_reason == "length"
        text = urllib.request.urlopen(f"http://127.0.0.1:{orch.metrics_port}/metrics").read()
        assert b'pdserve_retries_total{stage="decode_resume"} 1.0' in text

    try:
        asyncio.run(body())
    finally:
        for w in (orch, prefill, *decodes):
            stop_worker(w)


@pytest.mark.parametrize("kill_after", [2, 40])
def test_decode_killed_mid_stream_resumes_exactly_in_process(
    engine, params, tiny_fingerprint, kill_after
):
    """Killed after 40 tokens, the resumed prompt (44+ tokens) is longer than the largest
    prefill bucket (32): the resume prefill takes the long path. 60 tokens leave the decode
    thread no room to finish before the kill (it runs at most a step or two ahead)."""
    prompt = [256, 3, 1, 4]
    expected = reference_greedy(engine, params, prompt, 60)

    async def body() -> None:
        cluster = InProcessCluster(engine, params, tiny_fingerprint, decode_workers=2)
        await cluster.start()
        try:
            chunks = []
            async for chunk in cluster.api.stream(prompt, max_tokens=60, ignore_eos=True):
                if len(tokens_of(chunks)) >= kill_after and "decode-0:1" in cluster.decode:
                    await cluster.kill_decode("decode-0:1")
                chunks.append(chunk)
            assert tokens_of(chunks) == expected
            resumes = generate_latest(cluster.registry).decode()
            assert 'pdserve_retries_total{stage="decode_resume"} 1.0' in resumes
        finally:
            await cluster.close()

    asyncio.run(body())


def test_pool_running_dry_preempts_and_resumes_exactly_in_process(engine, params, tiny_fingerprint):
    """A decode worker with 10 KV pages (page 8) and 4 slots: four requests growing to 50
    tokens each need 28 pages, so the youngest are preempted again and again and resumed
    through the orchestrator; every answer equals the unpreempted greedy reference, and
    all pages come back."""
    prompts = [[256, *range(1 + i, 9 + i)] for i in range(4)]
    expected = [reference_greedy(engine, params, p, 50) for p in prompts]

    async def body() -> None:
        cluster = InProcessCluster(engine, params, tiny_fingerprint, decode_pages=10)
        await cluster.start()
        try:
            results = await asyncio.gather(
                *(cluster.api.generate(p, max_tokens=50, ignore_eos=True) for p in prompts)
            )
            for chunks, want in zip(results, expected, strict=True):
                assert chunks[-1].finish_reason == "length"
                assert tokens_of(chunks) == want
            text = generate_latest(cluster.registry).decode()
            preempted = metric_samples(text)["pdserve_retries_total{stage=preempted}"]
            assert preempted >= 1
            ((address, worker),) = cluster.decode.items()
            assert worker.loop.pages.counts().used == 0
            worker.loop.pages.check()
            worker_text = generate_latest(cluster.decode_registries[address]).decode()
            assert metric_samples(worker_text)["pdserve_preemptions_total{}"] == preempted
        finally:
            await cluster.close()

    asyncio.run(body())


def test_a_prompt_past_the_largest_prefill_bucket_is_served_exactly(
    engine, params, tiny_fingerprint
):
    """Chunked prefill: a 45-token prompt (largest bucket 32, max_seq_len 64) is no longer
    refused; its tokens equal the uncached reference."""
    prompt = [256, *range(60, 104)]
    assert len(prompt) > engine.config.max_prompt_len

    async def body() -> None:
        cluster = InProcessCluster(engine, params, tiny_fingerprint)
        await cluster.start()
        try:
            chunks = await cluster.api.generate(prompt, max_tokens=10, ignore_eos=True)
            assert tokens_of(chunks) == reference_greedy(engine, params, prompt, 10)
        finally:
            await cluster.close()

    asyncio.run(body())


def test_pages_freed_by_a_release_admit_the_next_request_before_any_load_report(
    engine, params, tiny_fingerprint
):
    """A decode pool of 4 pages held whole by one request: the next request waits for its
    pages, which come back when it ends (or had ended before it asked). Load reports come
    every 60 s here; a request that finds no room has the load of workers whose estimate is
    stale re-read at once, instead of waiting for the next report."""
    first = [256, *range(1, 25)]  # 25 tokens + the first generated: all 4 pages of 8
    second = [256, *range(30, 37)]

    async def body() -> None:
        cluster = InProcessCluster(
            engine,
            params,
            tiny_fingerprint,
            decode_pages=4,
            orchestrator_flags=("--health-interval-s", "60"),
        )
        await cluster.start()
        try:
            a = asyncio.create_task(cluster.api.generate(first, max_tokens=5, ignore_eos=True))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            chunks = await cluster.api.generate(second, max_tokens=3, ignore_eos=True)
            waited = time.monotonic() - started
            assert tokens_of(chunks) == reference_greedy(engine, params, second, 3)
            assert tokens_of(await a) == reference_greedy(engine, params, first, 5)
            assert waited < 30  # not the 60 s until the next load report
        finally:
            await cluster.close()

    asyncio.run(body())


@pytest.mark.timeout(120)
def test_only_decode_worker_killed_gives_unavailable_processes(process_cluster):
    decode = spawn_worker("decode")
    orch = spawn_orchestrator(
        "--prefill", process_cluster.workers.prefill.address, "--decode", decode.address
    )

    async def body() -> None:
        start = None
        with pytest.raises(GenerateError) as err:
            async for _ in ProcessApi(orch.address).stream(
                [256, 5], max_tokens=60, ignore_eos=True
            ):
                if start is None:
                    start = time.monotonic()
                    decode.signal(signal.SIGKILL)
        assert err.value.code == "UNAVAILABLE"
        assert "no healthy decode worker is left" in err.value.message
        assert time.monotonic() - start < 10

    try:
        asyncio.run(body())
    finally:
        stop_worker(orch)
        stop_worker(decode)


def test_only_decode_worker_killed_gives_unavailable_in_process(engine, params, tiny_fingerprint):
    async def body() -> None:
        cluster = InProcessCluster(engine, params, tiny_fingerprint)
        await cluster.start()
        try:
            with pytest.raises(GenerateError) as err:
                async for _ in cluster.api.stream([256, 5], max_tokens=60, ignore_eos=True):
                    if cluster.decode:
                        await cluster.kill_decode("decode-0:1")
            assert err.value.code == "UNAVAILABLE"
        finally:
            await cluster.close()

    asyncio.run(asyncio.wait_for(body(), 30))

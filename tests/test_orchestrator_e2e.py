"""The public Generate API end to end: real processes on loopback, and all in one process
with the fake transport. Each test body runs against both."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request

import jax
import numpy as np
import pytest
from prometheus_client import generate_latest

from decode_server.scheduler import DecodeBatch
from shared.client.generator import GenerateError
from shared.config import EngineConfig
from shared.engine.engine import Engine, Params
from shared.sampling_params import SamplingParams
from shared.tokenizer import ByteTokenizer
from tests.cluster_harness import InProcessCluster, ProcessApi, ProcessCluster, spawn_orchestrator
from tests.reference import metric_samples, reference_greedy
from tests.worker_harness import spawn_worker, stop_worker

KINDS = ["process", "fake"]
TOKENIZER = ByteTokenizer(320)


class FakeClusterView:
    """InProcessCluster with the helpers the tests share with ProcessCluster."""

    def __init__(self, cluster: InProcessCluster) -> None:
        self.cluster, self.api = cluster, cluster.api

    async def all_free(self) -> bool:
        return all(w.all_free() for w in self.cluster.decode.values())

    def metrics_text(self) -> str:
        return generate_latest(self.cluster.registry).decode()


@pytest.fixture
def run(request: pytest.FixtureRequest, engine: Engine, params: Params, tiny_fingerprint: str):
    def runner(kind: str, body, **cluster_kwargs) -> None:
        if kind == "process":  # the module's cluster; a test needing other flags makes its own
            asyncio.run(body(request.getfixturevalue("process_cluster")))
            return

        async def in_process() -> None:
            cluster = InProcessCluster(engine, params, tiny_fingerprint, **cluster_kwargs)
            await cluster.start()
            try:
                await body(FakeClusterView(cluster))
            finally:
                await cluster.close()

        asyncio.run(in_process())

    return runner


def tokens_of(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text_of(chunks) -> str:
    return "".join(c.text for c in chunks)


async def wait_free(cluster, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cluster.all_free():
        assert time.monotonic() < deadline, "decode slots were not freed"
        await asyncio.sleep(0.02)


# 1. Exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_token_and_text_prompts_equal_the_reference(run, kind, engine, params):
    ids = [256, 10, 20, 30, 40, 50, 60]
    text = "Hello, pdserve"
    expected_ids = reference_greedy(engine, params, ids, 10)
    expected_text = reference_greedy(engine, params, TOKENIZER.encode(text), 10)

    async def body(cluster) -> None:
        chunks = await cluster.api.generate(ids, max_tokens=10, ignore_eos=True)
        assert tokens_of(chunks) == expected_ids
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].completion_tokens == 10 and chunks[-1].prompt_tokens == len(ids)
        assert all(c.finish_reason is None for c in chunks[:-1])
        chunks = await cluster.api.generate(text, max_tokens=10, ignore_eos=True)
        assert tokens_of(chunks) == expected_text
        assert text_of(chunks) == TOKENIZER.decode(expected_text)

    run(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_stop_string_across_tokens_ends_the_text_before_it(run, kind, engine, params):
    prompt = [256, 65, 66, 67]
    full = reference_greedy(engine, params, prompt, 40)
    # A stop string made of two consecutive generated ASCII tokens: it spans a boundary.
    i = next(k for k in range(3, 38) if all(32 <= t < 127 for t in full[k : k + 2]))
    stop = bytes(full[i : i + 2]).decode()
    before = TOKENIZER.decode(full)[: TOKENIZER.decode(full).index(stop)]

    async def body(cluster) -> None:
        chunks = await cluster.api.generate(prompt, max_tokens=40, stop=[stop], ignore_eos=True)
        assert text_of(chunks) == before
        assert chunks[-1].finish_reason == "stop"
        assert tokens_of(chunks) == full[: len(tokens_of(chunks))]

    run(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_stop_token_and_max_tokens(run, kind, engine, params):
    prompt = [256, 1, 2, 3]
    full = reference_greedy(engine, params, prompt, 12)
    stop_id = full[5]

    async def body(cluster) -> None:
        chunks = await cluster.api.generate(
            prompt, max_tokens=12, stop_token_ids=[stop_id], ignore_eos=True
        )
        assert tokens_of(chunks) == full[: full.index(stop_id)]
        assert chunks[-1].finish_reason == "stop"
        chunks = await cluster.api.generate(prompt, max_tokens=1, ignore_eos=True)
        assert tokens_of(chunks) == full[:1] and chunks[-1].finish_reason == "length"

    run(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_sampling_is_reproducible_and_matches_the_engine(run, kind, engine, params):
    prompt = [256, 9, 9, 9, 9]
    sampling = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=2**33 + 5)
    prefix = engine.prefill(params, prompt, sampling=sampling)
    batch = DecodeBatch(engine)
    batch.insert([prefix], [2])
    expected = [prefix.first_token]
    for _ in range(11):
        expected.append(batch.step(params)[0][2])
    options = dict(
        max_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=2**33 + 5, ignore_eos=True
    )

    async def body(cluster) -> None:
        first, second = await asyncio.gather(
            cluster.api.generate(prompt, **options), cluster.api.generate(prompt, **options)
        )
        assert tokens_of(first) == tokens_of(second) == expected

    run(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_logprobs_reach_the_stream_and_equal_the_reference(run, kind, engine, params):
    """Asked for: one logprob per token, the first one (from prefill) included, equal to the
    log-softmax of the reference logits (float32 on the wire), with the asked-for likeliest
    tokens; the same tokens as without them. Not asked for: none. Bad options: refused."""
    prompt = [256, 9, 8, 7]
    sampling = SamplingParams(temperature=0.9, seed=21)
    options = dict(max_tokens=8, temperature=0.9, seed=21, ignore_eos=True)
    batch = DecodeBatch(engine)
    prefix = engine.prefill(params, prompt, sampling=sampling)
    batch.insert([prefix], [1])
    expected = [prefix.first_token] + [batch.step(params)[0][1] for _ in range(7)]
    logits = engine.reference_logits(params, prompt + expected[:-1])[len(prompt) - 1 :]
    reference = np.asarray(jax.nn.log_softmax(logits, axis=-1))

    async def body(cluster) -> None:
        chunks = await cluster.api.generate(prompt, logprobs=True, top_logprobs=2, **options)
        plain = await cluster.api.generate(prompt, **options)
        assert tokens_of(chunks) == tokens_of(plain) == expected
        assert all(c.logprobs == () for c in plain)
        assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
        logprobs = [lp for c in chunks for lp in c.logprobs]
        for i, (token, lp) in enumerate(zip(expected, logprobs, strict=True)):
            assert abs(lp.logprob - reference[i, token]) <= 1e-5, i
            top = [t for t, _ in lp.top]
            assert top == list(np.argsort(-reference[i])[:2]), i
            np.testing.assert_allclose([v for _, v in lp.top], reference[i, top], atol=1e-5)
        bare = await cluster.api.generate(prompt, logprobs=True, **options)  # no alternatives
        assert [lp.top for c in bare for lp in c.logprobs] == [()] * len(expected)
        for bad, message in (
            (dict(logprobs=True, top_logprobs=21), "top_logprobs=21 must be in [0, 20]"),
            (dict(top_logprobs=2), "top_logprobs=2 needs logprobs=true"),
        ):
            with pytest.raises(GenerateError) as err:
                await cluster.api.generate(prompt, **bad, **options)
            assert err.value.code == "INVALID_ARGUMENT" and message in err.value.message
        await wait_free(cluster)

    run(kind, body)


# 2. Load ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.timeout(60)
def test_sixty_four_concurrent_streams_complete_and_leave_nothing_behind(run, kind, engine, params):
    rng = np.random.default_rng(64)
    cases = [
        ([256, *rng.integers(0, 256, int(rng.integers(1, 20)))], int(rng.integers(1, 16)))
        for _ in range(64)
    ]
    expected = {
        i: reference_greedy(engine, params, [int(t) for t in p], n)
        for i, (p, n) in enumerate(cases[:8])
    }

    async def body(cluster) -> None:
        results = await asyncio.gather(
            *(
                cluster.api.generate([int(t) for t in p], max_tokens=n, ignore_eos=True)
                for p, n in cases
            )
        )
        for i, (chunks, (_, n)) in enumerate(zip(results, cases, strict=True)):
            assert chunks[-1].finish_reason == "length" and len(tokens_of(chunks)) == n
            if i in expected:
                assert tokens_of(chunks) == expected[i]
        await wait_free(cluster)

    run(kind, body)


# 3. Deadline, cancel, admission, auth --------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_deadline_ends_the_stream_and_frees_the_slot(run, kind):
    async def body(cluster) -> None:
        chunks = await cluster.api.generate(
            [256, 1, 2], max_tokens=60, ignore_eos=True, timeout_seconds=0.01
        )
        assert chunks[-1].finish_reason == "deadline"
        assert len(tokens_of(chunks)) < 60
        await wait_free(cluster, timeout=2.0)
        # The call's own gRPC deadline is honoured too: the call ends, the slot is freed.
        with pytest.raises(GenerateError) as err:
            await cluster.api.generate(
                [256, 1, 2], max_tokens=60, ignore_eos=True, call_timeout=0.01
            )
        assert err.value.code in ("DEADLINE_EXCEEDED", "CANCELLED")
        await wait_free(cluster, timeout=2.0)

    run(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_client_cancel_frees_the_slot(run, kind):
    async def body(cluster) -> None:
        stream = cluster.api.stream([256, 7, 7], max_tokens=60, ignore_eos=True)
        await anext(stream)
        await stream.aclose()  # the caller goes away mid-stream
        await wait_free(cluster, timeout=2.0)

    run(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_admission_overflow_is_resource_exhausted(run, kind):
    async def body(cluster) -> None:
        orch = None
        api = cluster.api
        if isinstance(cluster, ProcessCluster):  # a second orchestrator, --max-queue 1
            orch = spawn_orchestrator(
                "--prefill",
                cluster.workers.prefill.address,
                "--decode",
                cluster.workers.decode_address,
                "--max-queue",
                "1",
            )
            api = ProcessApi(orch.address)
        try:
            results = await asyncio.gather(
                *(api.generate([256, i], max_tokens=50, ignore_eos=True) for i in range(12)),
                return_exceptions=True,
            )
        finally:
            if orch is not None:
                stop_worker(orch)
        refused = [r for r in results if isinstance(r, GenerateError)]
        served = [r for r in results if not isinstance(r, BaseException)]
        assert refused and served, results
        for err in refused:
            assert err.code == "RESOURCE_EXHAUSTED"
            assert "admission queue is full (1 requests waiting" in err.message
        assert all(c[-1].finish_reason == "length" for c in served)

    run(kind, body, orchestrator_flags=["--max-queue", "1"])


def test_bearer_token_is_checked(process_cluster, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    orch = spawn_orchestrator(
        "--prefill",
        process_cluster.workers.prefill.address,
        "--decode",
        process_cluster.workers.decode_address,
        "--auth-token-file",
        str(token_file),
    )

    async def body() -> None:
        for token, message in ((None, "missing bearer token"), ("wrong", "wrong bearer token")):
            with pytest.raises(GenerateError) as err:
                await ProcessApi(orch.address, token).generate([256, 1], max_tokens=2)
            assert err.value.code == "UNAUTHENTICATED" and message in err.value.message
        chunks = await ProcessApi(orch.address, "s3cret").generate([256, 1], max_tokens=2)
        assert chunks[-1].finish_reason in ("length", "stop")

    try:
        asyncio.run(body())
    finally:
        stop_worker(orch)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_tokens": 5000}, "max_tokens=5000 must be in [0, 4096]"),
        ({"temperature": -1.0}, "temperature=-1.0 must be a finite number >= 0"),
        ({"top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
        ({"stop": [""]}, "stop string '' must have 1 to 256 characters"),
        ({"stop_token_ids": [999]}, "stop_token_ids has token id 999"),
        ({"timeout_seconds": -1.0}, "timeout_seconds=-1.0 must be >= 0"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_invalid_requests(run, kind, options, message):
    async def body(cluster) -> None:
        with pytest.raises(GenerateError) as err:
            await cluster.api.generate([256, 1], **options)
        assert err.value.code == "INVALID_ARGUMENT" and message in err.value.message
        with pytest.raises(GenerateError) as err:
            await cluster.api.generate([256, 320])
        assert "tokens.ids has token id 320, outside the vocabulary [0, 320)" in err.value.message
        with pytest.raises(GenerateError) as err:
            await cluster.api.generate("")
        assert err.value.code == "INVALID_ARGUMENT"

    run(kind, body)


# 4. Failures --------------------------------------------------------------------------------


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


# 5. Metrics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_metrics_move_by_exactly_the_requests_sent(run, kind):
    prompts = [[256, 1, 2], [256, 3], [256, 4, 5, 6, 7]]

    async def body(cluster) -> None:
        before = metric_samples(cluster.metrics_text())
        for p in prompts:
            await cluster.api.generate(p, max_tokens=4, ignore_eos=True)
        after = metric_samples(cluster.metrics_text())

        def moved(key: str) -> float:
            return after.get(key, 0.0) - before.get(key, 0.0)

        assert moved("pdserve_requests_total{code=OK,finish_reason=length}") == 3
        assert moved("pdserve_prompt_tokens_total{}") == sum(len(p) for p in prompts)
        assert moved("pdserve_generation_tokens_total{}") == 12
        histograms = (
            "pdserve_time_to_first_token_seconds",
            "pdserve_e2e_request_latency_seconds",
            "pdserve_request_queue_seconds",
            "pdserve_time_per_output_token_seconds",
        )
        for histogram in histograms:
            assert moved(f"{histogram}_count{{}}") == 3, histogram
        assert after["pdserve_workers_up{role=decode}"] >= 1
        assert after["pdserve_workers_up{role=prefill}"] >= 1
        assert after["pdserve_decode_slots_total{}"] >= 4
        assert "pdserve_queue_depth{}" in after
        assert "pdserve_decode_slots_in_use{}" in after

    run(kind, body)


@pytest.mark.timeout(180)
def test_colocated_worker_serves_exactly_like_a_pair(engine, params):
    """`pdserve worker --role colocated` behind the orchestrator: the KV goes from its
    prefill straight into its own decode slots; the tokens equal the reference."""
    colocated = spawn_worker("colocated")
    orch = spawn_orchestrator("--colocated", colocated.address)
    prompt = [256, 2, 7, 1, 8]
    expected = reference_greedy(engine, params, prompt, 9)

    async def body() -> None:
        api = ProcessApi(orch.address)
        results = await asyncio.gather(
            *(api.generate(prompt, max_tokens=9, ignore_eos=True) for _ in range(6))
        )
        for chunks in results:
            assert tokens_of(chunks) == expected

    try:
        asyncio.run(body())
    finally:
        stop_worker(orch)
        stop_worker(colocated)

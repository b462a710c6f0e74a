"""The public Generate API end to end, exactness and load: real processes on loopback, and
all in one process with the fake transport (tests/e2e_support.py). Each test body runs
against both; requests that end early are tests/test_orchestrator_requests.py's, worker
failures tests/test_orchestrator_failures.py's."""

from __future__ import annotations

import asyncio
import time

import jax
import numpy as np
import pytest

from decode_server.scheduler import DecodeBatch
from shared.client.generator import GenerateError
from shared.engine.engine import Engine, Params
from shared.sampling_params import SamplingParams
from tests.cluster_harness import ProcessApi, spawn_orchestrator
from tests.e2e_support import KINDS, TOKENIZER, runner, text_of, tokens_of, wait_free
from tests.reference import metric_samples, reference_greedy
from tests.worker_harness import spawn_worker, stop_worker


@pytest.fixture
def run(request: pytest.FixtureRequest, engine: Engine, params: Params, tiny_fingerprint: str):
    return runner(request, engine, params, tiny_fingerprint)


# Exactness --------------------------------------------------------------------------------


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


# Metrics --------------------------------------------------------------------------------


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


@pytest.mark.timeout(240)
@pytest.mark.parametrize("prefill", ["mixed", "thread"])
def test_colocated_worker_serves_exactly_like_a_pair(engine, params, prefill):
    """`pdserve worker --role colocated` behind the orchestrator: the KV goes from its
    prefill straight into its own decode slots, its prefill calls mixed into the decode
    steps (once they are compiled) or on a thread of their own; the tokens equal the
    reference."""
    colocated = spawn_worker("colocated", "--colocated-prefill", prefill)
    if prefill == "mixed":
        deadline = time.monotonic() + 120
        while "every mixed batch compiled" not in colocated.text():
            assert time.monotonic() < deadline, colocated.text()
            time.sleep(0.2)
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

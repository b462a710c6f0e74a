"""Requests that end before their tokens do, end to end (process and fake kinds, see
tests/e2e_support.py): deadlines, a client that goes away, a full admission queue, a bad
bearer token, invalid requests.

The tests that wait for a slot to be freed use requests that cannot finish on their own
within the wait, and count the tokens the decode workers generated: in process, a cluster
of long sequences (LONG_TOKENS a request); in the fake kind, every decode step slowed by
e2e_support.STEP_S (SHORT_TOKENS take about three seconds)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from shared.client.generator import GenerateError
from shared.engine.engine import Engine, Params
from tests.cluster_harness import (
    ProcessApi,
    ProcessCluster,
    process_cluster_spec,
    spawn_orchestrator,
)
from tests.e2e_support import KINDS, STEP_S, runner, slow_decode_steps, tokens_of, wait_free
from tests.worker_harness import stop_worker

LONG_MAX_SEQ_LEN = 2048
LONG_TOKENS = 2000  # >= 1.6 s of decode steps at 0.8 ms a step
SHORT_TOKENS = 60  # the longest the session engine allows for these prompts (max_seq_len 64)
# Slots must be freed within this; the requests above take longer to finish on their own.
# (A loaded machine slows the cancel path too: the wait is well above its usual
# milliseconds, and well below what the rest of the request would take.)
FREED_WITHIN_S = 1.0
assert 2 * FREED_WITHIN_S < (SHORT_TOKENS - 2) * STEP_S


@pytest.fixture
def run(request: pytest.FixtureRequest, engine: Engine, params: Params, tiny_fingerprint: str):
    return runner(request, engine, params, tiny_fingerprint)


@pytest.fixture(scope="module")
def long_process_cluster() -> Iterator[ProcessCluster]:
    """Workers holding sequences of LONG_MAX_SEQ_LEN tokens (the session's hold 64)."""
    flags = ("--max-seq-len", str(LONG_MAX_SEQ_LEN))
    cluster = ProcessCluster(process_cluster_spec(worker_flags=flags))
    yield cluster
    cluster.close()


@pytest.fixture
def long_run(request: pytest.FixtureRequest, run, monkeypatch: pytest.MonkeyPatch):
    """`long_run(kind, body)`: `body(cluster, max_tokens)` with a request of `max_tokens`
    that cannot finish within FREED_WITHIN_S: the long process cluster, or the fake kind
    with slowed decode steps."""

    def long(kind: str, body) -> None:
        if kind == "process":
            cluster = request.getfixturevalue("long_process_cluster")
            asyncio.run(body(cluster, LONG_TOKENS))
            return
        slow_decode_steps(monkeypatch)
        run(kind, lambda cluster: body(cluster, SHORT_TOKENS))

    return long


@pytest.mark.parametrize("kind", KINDS)
def test_deadline_ends_the_stream_and_frees_the_slot(long_run, kind):
    """The request's own timeout ends the stream with "deadline"; the call's gRPC deadline
    ends the call. Either way the slot is freed and the decode worker stops generating for
    it, well before the request could have finished."""

    async def body(cluster, max_tokens: int) -> None:
        await wait_free(cluster)
        before = cluster.tokens_generated()
        chunks = await cluster.api.generate(
            [256, 1, 2], max_tokens=max_tokens, ignore_eos=True, timeout_seconds=0.01
        )
        assert chunks[-1].finish_reason == "deadline"
        assert len(tokens_of(chunks)) < max_tokens
        await wait_free(cluster, timeout=FREED_WITHIN_S)
        assert cluster.tokens_generated() - before < max_tokens / 2
        before = cluster.tokens_generated()
        with pytest.raises(GenerateError) as err:
            await cluster.api.generate(
                [256, 1, 2], max_tokens=max_tokens, ignore_eos=True, call_timeout=0.01
            )
        assert err.value.code in ("DEADLINE_EXCEEDED", "CANCELLED")
        await wait_free(cluster, timeout=FREED_WITHIN_S)
        assert cluster.tokens_generated() - before < max_tokens / 2

    long_run(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_client_cancel_frees_the_slot(long_run, kind):
    """A caller that goes away after its first token: the slot is freed and the decode
    worker stops generating for it, within a wait the request could not finish in."""

    async def body(cluster, max_tokens: int) -> None:
        await wait_free(cluster)
        before = cluster.tokens_generated()
        stream = cluster.api.stream([256, 7, 7], max_tokens=max_tokens, ignore_eos=True)
        await anext(stream)
        await stream.aclose()  # the caller goes away mid-stream
        await wait_free(cluster, timeout=FREED_WITHIN_S)
        assert cluster.tokens_generated() - before < max_tokens / 2

    long_run(kind, body)


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

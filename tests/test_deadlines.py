"""Short deadlines always end the call: the hang of a stream whose request timeout fired
while grpc.aio was writing a response (the timeout's cancellation reached grpc.aio, which
took it for the client's own cancel and never sent a status) must never come back."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from orchestrator.flow import FinishReason
from orchestrator.servicer import input_from_proto
from shared.client.generator import AsyncGeneratorClient, GenerateError, build_request
from tests.cluster_harness import InProcessCluster

DEADLINES_S = np.geomspace(0.001, 0.05, 12)  # 1 ms .. 50 ms
BOUND_S = 10.0  # every call ends well within this, whatever its deadline
PROMPT = [256, 1, 2]
MAX_TOKENS = 60  # the longest the test engine allows for this prompt (max_seq_len 64)


async def _wait_free(cluster, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cluster.all_free():
        assert time.monotonic() < deadline, "decode slots were not freed"
        await asyncio.sleep(0.02)


@pytest.mark.timeout(60)
def test_request_timeout_never_cancels_a_slow_reader(engine, params, tiny_fingerprint):
    """The reader is slow (as grpc.aio is while it writes): the request's own timeout must
    end the stream with a "deadline" response, never cancel the reader instead."""

    async def body() -> None:
        cluster = InProcessCluster(engine, params, tiny_fingerprint)
        await cluster.start()
        try:
            frontend = cluster.orchestrator.frontend
            warm_up = input_from_proto(build_request(PROMPT, max_tokens=2))
            assert [o async for o in frontend.generate(warm_up, None)][-1].finish
            # Long enough for tokens to flow first, so the timeout fires while the reader
            # sleeps on a token, not while the flow waits for one.
            for timeout in (0.2, 0.5):
                options = dict(max_tokens=MAX_TOKENS, ignore_eos=True, timeout_seconds=timeout)
                request = input_from_proto(build_request(PROMPT, **options))
                outputs = []
                async for out in frontend.generate(request, None):
                    outputs.append(out)
                    await asyncio.sleep(0.05)  # slower than the timeout
                assert outputs[-1].finish is FinishReason.DEADLINE
                assert 0 < len([t for o in outputs for t in o.token_ids]) < MAX_TOKENS
            assert frontend.in_flight == 0
            deadline = time.monotonic() + 10
            while not all(w.all_free() for w in cluster.decode.values()):
                assert time.monotonic() < deadline, "decode slots were not freed"
                await asyncio.sleep(0.02)
        finally:
            await cluster.close()

    asyncio.run(asyncio.wait_for(body(), 60))


@pytest.mark.timeout(120)
def test_short_call_deadlines_always_end_over_grpc(process_cluster):
    """The call's own gRPC deadline, 1-50 ms: every call ends with DEADLINE_EXCEEDED or
    CANCELLED within the bound. (A call that manages all its tokens before its deadline
    may end "length": that is an end too; the point is that none hangs.)"""

    async def one(client: AsyncGeneratorClient, deadline: float) -> str:
        try:
            chunks = [
                c
                async for c in client.generate(
                    PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, timeout=deadline
                )
            ]
        except GenerateError as err:
            return err.code
        assert sum(len(c.token_ids) for c in chunks) == MAX_TOKENS
        return chunks[-1].finish_reason

    async def body() -> None:
        outcomes: dict[str, int] = {}
        await _wait_free(process_cluster)
        before = process_cluster.tokens_generated()
        async with AsyncGeneratorClient(process_cluster.orchestrator.address) as client:
            for _ in range(5):
                for deadline in DEADLINES_S:
                    started = time.monotonic()
                    outcome = await asyncio.wait_for(one(client, float(deadline)), BOUND_S)
                    assert time.monotonic() - started < BOUND_S
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                # A few at once too: the deadline fires while other streams are written.
                together = await asyncio.wait_for(
                    asyncio.gather(*(one(client, float(d)) for d in DEADLINES_S)), BOUND_S
                )
                for outcome in together:
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert set(outcomes) <= {"DEADLINE_EXCEEDED", "CANCELLED", "length"}, outcomes
        assert outcomes.get("DEADLINE_EXCEEDED", 0) + outcomes.get("CANCELLED", 0) > 0
        await _wait_free(process_cluster)
        # The calls cut short stopped generating too: the decode worker made fewer tokens
        # than all calls run to their end would have (each one's first is the prefill's).
        calls = sum(outcomes.values())
        assert process_cluster.tokens_generated() - before < calls * (MAX_TOKENS - 1)

    asyncio.run(body())


@pytest.mark.timeout(120)
def test_short_request_timeouts_always_end_over_grpc(process_cluster):
    """`timeout_seconds` of 1-50 ms and no call deadline (the case that hung): every
    stream ends with a "deadline" response (or all its tokens) within the bound."""

    async def one(client: AsyncGeneratorClient, timeout: float) -> str:
        chunks = [
            c
            async for c in client.generate(
                PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, timeout_seconds=timeout
            )
        ]
        assert all(c.finish_reason is None for c in chunks[:-1])
        return chunks[-1].finish_reason

    async def body() -> None:
        outcomes: dict[str, int] = {}
        await _wait_free(process_cluster)
        before = process_cluster.tokens_generated()
        async with AsyncGeneratorClient(process_cluster.orchestrator.address) as client:
            for _ in range(5):
                runs = [one(client, float(t)) for t in DEADLINES_S]
                for outcome in await asyncio.wait_for(asyncio.gather(*runs), BOUND_S):
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert set(outcomes) <= {"deadline", "length"}, outcomes
        assert outcomes.get("deadline", 0) > 0
        await _wait_free(process_cluster)
        # The streams that ended "deadline" stopped generating: fewer decode tokens than all
        # streams run to their end would have made (each one's first is the prefill's).
        calls = sum(outcomes.values())
        assert process_cluster.tokens_generated() - before < calls * (MAX_TOKENS - 1)

    asyncio.run(body())

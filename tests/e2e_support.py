"""What the orchestrator end-to-end modules share: one test body run against the session's
process cluster and against an in-process cluster, and the helpers those bodies use.

* `runner(request, ...)`: what each module's `run` fixture returns: `run(kind, body,
  **cluster_kwargs)` runs `body(cluster)` on kind "process" (conftest's `process_cluster`)
  or "fake" (an `InProcessCluster` made for the test, with `cluster_kwargs`).
* `FakeClusterView`: an `InProcessCluster` with the helpers ProcessCluster has.
* `slow_decode_steps`: every in-process decode step takes at least STEP_S more, so a
  request cannot finish within a short wait (waits for something that must not happen).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import generate_latest

from decode_server.scheduler import DecodeBatch
from shared.engine.engine import Engine, Params
from shared.tokenizer import ByteTokenizer
from tests.cluster_harness import InProcessCluster
from tests.reference import metric_samples

KINDS = ["process", "fake"]
TOKENIZER = ByteTokenizer(320)
TOKENS_GENERATED = "pdserve_tokens_generated_total{}"
STEP_S = 0.05  # what slow_decode_steps adds to each decode step


class FakeClusterView:
    """InProcessCluster with the helpers the tests share with ProcessCluster."""

    def __init__(self, cluster: InProcessCluster) -> None:
        self.cluster, self.api = cluster, cluster.api

    async def all_free(self) -> bool:
        return all(w.all_free() for w in self.cluster.decode.values())

    def metrics_text(self) -> str:
        return generate_latest(self.cluster.registry).decode()

    def tokens_generated(self) -> float:
        """Tokens the decode workers generated so far, all requests together."""
        registries = self.cluster.decode_registries.values()
        return sum(
            metric_samples(generate_latest(r).decode())[TOKENS_GENERATED] for r in registries
        )


def runner(
    request: pytest.FixtureRequest, engine: Engine, params: Params, tiny_fingerprint: str
) -> Callable[..., None]:
    """`run(kind, body, **cluster_kwargs)`: `body(cluster)` on the process or fake kind."""

    def run(kind: str, body: Callable[..., Awaitable[None]], **cluster_kwargs: object) -> None:
        if kind == "process":  # the session's cluster; a test needing other flags makes its own
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

    return run


def slow_decode_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every DecodeBatch step in this process sleeps STEP_S first (the decode loop runs on
    its own thread, so the event loop goes on): N more tokens take at least N * STEP_S."""
    step = DecodeBatch.step

    def slow_step(self: DecodeBatch, params: Params) -> tuple[dict[int, int], list[int]]:
        time.sleep(STEP_S)
        return step(self, params)

    monkeypatch.setattr(DecodeBatch, "step", slow_step)


def tokens_of(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text_of(chunks) -> str:
    return "".join(c.text for c in chunks)


async def wait_free(cluster, timeout: float = 5.0) -> None:
    """Until every decode slot is free; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await cluster.all_free():
        assert time.monotonic() < deadline, "decode slots were not freed"
        await asyncio.sleep(0.02)

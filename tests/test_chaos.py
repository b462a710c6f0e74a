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
from bench.reliability import Cluster, engine_references
from tests.worker_harness import ENGINE_FLAGS


@pytest.mark.timeout(240)
def test_one_kill_during_32_streams_loses_nothing(process_cluster, engine, params) -> None:
    shared = process_cluster.workers
    cluster = Cluster(
        0, 1, ENGINE_FLAGS, tls="public", startup_timeout_s=200,
        shared_prefill=[shared.prefill.address], shared_decode=[shared.decode_address],
    )  # fmt: skip
    try:
        cluster.start()
        result = asyncio.run(
            chaos.run(
                cluster, duration_s=120, concurrency=32, seed=1, max_streams=32, one_kill=True,
                references=lambda prompts, n: engine_references(engine, params, prompts, n),
            )
        )  # fmt: skip
    finally:
        cluster.close()
    assert result["kills"] == 1 and result["faults"][0]["worker"] == "decode-0"
    assert result["orchestrator_retries"]["decode_resume"] >= 1  # it was serving streams
    assert result["streams"] == 32
    assert result["completed"] == 32, (result["errors_by_status"], result["error_samples"])
    assert result["mismatched_streams"] == 0, result["mismatched_indices"]
    assert result["unexplained_errors"] == 0
    leaked = result["leaked"]
    assert (leaked["slots"], leaked["leases"]) == (0, 0), leaked
    assert (leaked["orchestrator_slots_in_use"], leaked["orchestrator_queue"]) == (0, 0)

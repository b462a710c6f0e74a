"""The OpenAI-compatible API's statuses when things go wrong, over real processes
(tests/openai_support.py): a client that goes away mid-request frees its slot; a full
queue is 429 with Retry-After; draining is 503; no healthy decode worker is 503; a
timeout that passes is 504; the server keeps serving after each."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import signal
import socket
import time
from collections.abc import Callable

import httpx
import pytest

from shared.cluster.processes import Child
from shared.transport.grpc_transport import GrpcDecodeClient
from shared.transport.types import (
    GenerationLimits,
    ReserveRequest,
    StatusCode,
    TransportError,
)
from tests.cluster_harness import spawn_orchestrator
from tests.openai_support import (
    MAX_SEQ_LEN,
    MODEL,
    TOKEN,
    OpenAiCluster,
    error_body,
    http_base,
    post,
)
from tests.reference import scrape
from tests.worker_harness import TRANSPORT, stop_worker

pytestmark = pytest.mark.timeout(360)  # the first test may start the cluster


@pytest.fixture
def server(openai_cluster: OpenAiCluster) -> tuple[Child, str]:
    """(orchestrator process, base URL) of the session's OpenAI-API cluster."""
    return openai_cluster.orchestrator, openai_cluster.base


@pytest.fixture
def cluster(openai_cluster: OpenAiCluster) -> OpenAiCluster:
    return openai_cluster


# Disconnect frees the slot ------------------------------------------------------------


def cancelled_count(metrics_port: int) -> float:
    key = "pdserve_requests_total{code=CANCELLED,finish_reason=cancelled}"
    return scrape(metrics_port).get(key, 0.0)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_a_client_that_disconnects_mid_request_frees_its_slot(server, stream):
    base = server[1].removeprefix("http://")
    host, port = base.split(":")
    metrics_port = server[0].metrics_port
    before = cancelled_count(metrics_port)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    # ~500 decode steps: about a second of generation left when the client goes away.
    body = json.dumps(
        {
            "model": MODEL,
            "prompt": "x",
            "max_tokens": MAX_SEQ_LEN - 24,
            "stream": stream,
            "ignore_eos": True,
        }
    )
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/completions", body, headers)
    if stream:
        response = conn.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: ")  # the stream is live
    else:
        time.sleep(0.1)  # no bytes come back before the end: let it get going
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-request (a response
    conn.close()  # object may still hold the socket's file: shut it down, not just close)
    deadline = time.monotonic() + 20
    while True:
        samples = scrape(metrics_port)
        freed = samples["pdserve_decode_slots_in_use{}"] == 0
        if cancelled_count(metrics_port) == before + 1 and freed:
            break
        assert time.monotonic() < deadline, {
            k: v for k, v in samples.items() if "slots" in k or "requests_total" in k
        }
        time.sleep(0.1)


# Statuses of a busy, draining or slow server: 429, 503, 504 ------------------------------


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def hold_every_slot(address: str) -> list[str]:
    """Lease every free slot of the decode worker at `address` directly (a long TTL and no
    KV ever sent): orchestrators in front of it see no room, so their requests wait in the
    admission queue until `release`."""

    async def run() -> list[str]:
        client = GrpcDecodeClient(address, TRANSPORT)
        leases: list[str] = []
        try:
            while True:
                request = ReserveRequest(f"hold-{len(leases)}", 1, GenerationLimits(1), 120.0)
                try:
                    leases.append((await client.reserve(request)).lease_id)
                except TransportError as err:
                    assert err.code is StatusCode.RESOURCE_EXHAUSTED, err
                    return leases
        finally:
            await client.close()

    return asyncio.run(run())


def release(address: str, leases: list[str]) -> None:
    async def run() -> None:
        client = GrpcDecodeClient(address, TRANSPORT)
        try:
            for lease in leases:
                await client.cancel(lease)
        finally:
            await client.close()

    if leases:
        asyncio.run(run())


@pytest.mark.timeout(180)
def test_a_full_queue_is_429_with_retry_after_and_draining_is_503(cluster):
    """An orchestrator of its own with `--max-queue 1` in front of the module's workers,
    whose decode slots are all held: one request waits in the queue, the next is 429 with
    `Retry-After`; after SIGTERM new requests are 503 while the queued one is still served
    once the slots free up, and the process then exits cleanly."""
    orch = spawn_orchestrator(
        "--prefill",
        cluster.prefill.address,
        "--decode",
        cluster.decode.address,
        "--model",
        str(cluster.model),
        "--served-model-name",
        MODEL,
        "--http-port",
        "0",
        "--max-queue",
        "1",
    )
    held: list[str] = []
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "temperature": 0}
    try:
        base = http_base(orch)
        assert post(base, body, token=None).status_code == 200  # serving, workers found
        held = hold_every_slot(cluster.decode.address)
        assert len(held) == 4  # tests/worker_harness.py ENGINE_FLAGS: --slots 4
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(post, base, body, None)
            wait_for(
                lambda: scrape(orch.metrics_port)["pdserve_queue_depth{}"] == 1,
                "a request waiting in the admission queue",
            )
            full = post(base, body, token=None)
            assert full.status_code == 429, full.text
            assert full.headers["Retry-After"] == "1"
            error = error_body(full)
            assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
            assert "admission queue is full" in error["message"]

            orch.signal(signal.SIGTERM)  # drain: the queued request is still in flight
            wait_for(lambda: httpx.get(base + "/health").status_code == 503, "draining")
            assert httpx.get(base + "/health").json() == {"status": "draining"}
            refused = post(base, body, token=None)
            assert refused.status_code == 503, refused.text
            error = error_body(refused)
            assert error["type"] == "service_unavailable" and "shutting down" in error["message"]
            assert not queued.done()

            release(cluster.decode.address, held)
            held = []
            answered = queued.result(timeout=60)
        assert answered.status_code == 200, answered.text
        assert answered.json()["usage"]["completion_tokens"] >= 1
        assert orch.wait(30) == 0
    finally:
        release(cluster.decode.address, held)
        stop_worker(orch)


def test_no_healthy_decode_worker_is_503(cluster):
    """An orchestrator whose only decode worker does not answer: 503, OpenAI-shaped."""
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    orch = spawn_orchestrator(
        "--prefill",
        cluster.prefill.address,
        "--decode",
        dead,
        "--model",
        str(cluster.model),
        "--served-model-name",
        MODEL,
        "--http-port",
        "0",
    )
    try:
        base = http_base(orch)
        response = post(base, {"model": MODEL, "prompt": "x", "max_tokens": 2}, token=None)
        assert response.status_code == 503, response.text
        error = error_body(response)
        assert error["type"] == "service_unavailable"
        assert "no healthy decode worker" in error["message"]
        assert httpx.get(base + "/health").status_code == 200  # up, just unable to serve
    finally:
        stop_worker(orch)


@pytest.mark.parametrize("stream", [False, True], ids=["no-stream", "stream"])
def test_a_timeout_that_passes_is_504_and_the_server_keeps_serving(server, stream):
    """`timeout_seconds` (1 ms) passes before the first token: 504, streamed or not (a
    stream's status is decided before any byte is sent)."""
    body = {
        "model": MODEL,
        "prompt": "x",
        "max_tokens": 200,
        "ignore_eos": True,
        "timeout_seconds": 0.001,
        "stream": stream,
    }
    response = post(server[1], body)
    assert response.status_code == 504, response.text
    error = error_body(response)
    assert error["type"] == "timeout" and "timeout" in error["message"]
    body.update(timeout_seconds=30, max_tokens=2)
    assert post(server[1], body).status_code == 200

"""Prefill and decode workers, over real processes on loopback and over the fake transport.

Every test body runs twice: against `pdserve prefill` + `pdserve decode` processes talking
gRPC, and against the same assemblies in this process behind the in-process fake.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable

import jax
import numpy as np
import pytest

from shared.engine.engine import Engine, Params
from shared.kv_transfer.codec import encode_prefix
from shared.sampling_params import SamplingParams
from shared.transport.types import (
    DecodeFinish,
    GenerationLimits,
    PrefillRequest,
    ReserveRequest,
    StatusCode,
    TransportError,
)
from shared.weights.checkpoint import load_model
from tests.reference import reference_greedy, scrape
from tests.worker_harness import (
    TRANSPORT,
    InProcessWorkers,
    ProcessWorkers,
    collect,
    generate,
    spawn_worker,
    stop_worker,
)

KINDS = ["process", "fake"]
Body = Callable[[object], Awaitable[None]]


@pytest.fixture
def process_workers(process_cluster) -> ProcessWorkers:
    """The session cluster's prefill and decode processes (its orchestrator idles)."""
    return process_cluster.workers


@pytest.fixture
def run(request: pytest.FixtureRequest, engine: Engine, params: Params, tiny_fingerprint: str):
    """run(kind, body): await body(workers) with workers of that kind."""

    def runner(kind: str, body: Body) -> None:
        if kind == "process":
            asyncio.run(body(request.getfixturevalue("process_workers")))
            return

        async def in_process() -> None:
            workers = InProcessWorkers(engine, params, tiny_fingerprint)
            try:
                await body(workers)
            finally:
                await workers.close()

        asyncio.run(in_process())

    return runner


async def wait_all_free(decode, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        load = await decode.get_load()
        if load.free_slots == load.total_slots:
            return
        assert time.monotonic() < deadline, f"slots still busy: {load}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_equal_single_engine_reference(run, kind, engine, params):
    prompt = [256, 72, 101, 108, 108, 111, 44, 32, 119]
    expected = reference_greedy(engine, params, prompt, 12)

    async def body(workers) -> None:
        tokens, batches = await generate(
            workers.decode_client(), workers.prefill_client(), workers.decode_address, prompt, 12
        )
        assert tokens == expected
        assert batches[-1].finish is DecodeFinish.LENGTH

    run(kind, body)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.timeout(60)
def test_sixteen_concurrent_requests_complete_exactly(run, kind, engine, params):
    rng = np.random.default_rng(16)
    cases = [
        (rng.integers(0, 256, int(rng.integers(1, 33))).tolist(), int(rng.integers(1, 20)))
        for _ in range(16)
    ]
    expected = [reference_greedy(engine, params, p, n) for p, n in cases]

    async def body(workers) -> None:
        decode, prefill = workers.decode_client(), workers.prefill_client()
        results = await asyncio.gather(
            *(
                generate(decode, prefill, workers.decode_address, p, n, request_id=f"r{i}")
                for i, (p, n) in enumerate(cases)
            )
        )
        for i, (tokens, _) in enumerate(results):
            assert tokens == expected[i], f"request {i}"
        await wait_all_free(decode)

    run(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_mid_stream_frees_the_slot_within_a_step(run, kind):
    async def body(workers) -> None:
        decode, prefill = workers.decode_client(), workers.prefill_client()
        limits = GenerationLimits(60, stop_on_eos=False)
        lease = await decode.reserve(ReserveRequest("c", 3, limits, ttl_seconds=30))
        stream = decode.stream_tokens(lease.lease_id)
        await prefill.prefill(
            PrefillRequest("c", (1, 2, 3), SamplingParams(), workers.decode_address, lease.lease_id)
        )
        await anext(stream)  # decoding is under way
        assert await decode.cancel(lease.lease_id)
        rest = await collect(stream)
        assert rest[-1].finish is DecodeFinish.CANCELLED
        # Cut short: far fewer than the 60 tokens asked for. (That it stops within one step
        # is asserted in test_decode_loop, where steps can be counted; here tokens already
        # in flight to a busy client may arrive after the cancel.)
        assert sum(len(b.token_ids) for b in rest) + 2 < 60
        await wait_all_free(decode, timeout=2.0)
        assert not await decode.cancel(lease.lease_id)  # idempotent: already over

    run(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_lease_expiry_frees_a_slot_that_never_got_its_kv(run, kind):
    async def body(workers) -> None:
        decode = workers.decode_client()
        lease = await decode.reserve(ReserveRequest("x", 4, GenerationLimits(4), ttl_seconds=0.3))
        batches = await asyncio.wait_for(collect(decode.stream_tokens(lease.lease_id)), 10)
        assert batches[-1].finish is DecodeFinish.LEASE_EXPIRED
        await wait_all_free(decode, timeout=2.0)

    run(kind, body)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fault", ["wrong_model", "corrupt_chunk"])
def test_bad_kv_is_rejected_slot_freed_server_keeps_serving(
    run, kind, fault, engine, params, tiny_fingerprint
):
    prompt = [5, 6, 7, 8, 9]
    prefix = engine.prefill(params, prompt)
    expected = reference_greedy(engine, params, prompt, 5)

    async def body(workers) -> None:
        decode, prefill = workers.decode_client(), workers.prefill_client()
        lease = await decode.reserve(ReserveRequest("bad", 5, GenerationLimits(5), 30))
        stream = asyncio.create_task(collect(decode.stream_tokens(lease.lease_id)))
        fingerprint = "some-other-model" if fault == "wrong_model" else tiny_fingerprint
        payload = encode_prefix(
            prefix,
            fingerprint=fingerprint,
            request_id="bad",
            lease_id=lease.lease_id,
            chunk_bytes=4096,
        )
        messages = list(payload.messages())
        if fault == "corrupt_chunk":
            data = bytearray(messages[2].chunk.data)
            data[7] ^= 0xFF
            messages[2].chunk.data = bytes(data)
        with pytest.raises(TransportError) as err:
            await decode.transfer_kv(messages)
        assert err.value.code in (
            (StatusCode.FAILED_PRECONDITION,) if fault == "wrong_model" else (StatusCode.DATA_LOSS,)
        )
        batches = await asyncio.wait_for(stream, 10)
        assert batches[-1].finish is DecodeFinish.ERROR
        assert "KV rejected" in batches[-1].detail
        await wait_all_free(decode, timeout=2.0)
        tokens, _ = await generate(decode, prefill, workers.decode_address, prompt, 5)
        assert tokens == expected

    run(kind, body)


def test_every_rejected_kv_stream_reports_its_own_status(process_workers, engine, params):
    """A stream refused at its manifest while the sender still writes: grpc.aio can lose the
    status to `INTERNAL: Internal error from Core` when the server answers first (under load
    about 1 in 200 here before the decode worker read rejected streams to their end)."""
    prefix = engine.prefill(params, list(range(5, 20)))

    async def body() -> list[StatusCode]:
        decode = process_workers.decode_client()
        codes = []
        for i in range(100):
            lease = await decode.reserve(ReserveRequest(f"r{i}", 15, GenerationLimits(2), 30))
            payload = encode_prefix(
                prefix,
                fingerprint="some-other-model",
                request_id=f"r{i}",
                lease_id=lease.lease_id,
                chunk_bytes=1024,
            )
            with pytest.raises(TransportError) as err:
                await decode.transfer_kv(payload.messages())
            codes.append(err.value.code)
        await wait_all_free(decode, timeout=5.0)
        return codes

    codes = asyncio.run(body())
    assert codes == [StatusCode.FAILED_PRECONDITION] * 100


@pytest.mark.timeout(90)
def test_prefill_reports_a_killed_decode_process_and_keeps_serving(
    process_workers: ProcessWorkers, engine, params
):
    """kill -9 of the decode process while the prefill worker pushes KV to it."""
    doomed = spawn_worker("decode")
    prompt = [9, 8, 7, 6]
    expected = reference_greedy(engine, params, prompt, 6)

    async def body() -> None:
        victim = process_workers.decode_client(doomed.address)
        prefill = process_workers.prefill_client()
        lease = await victim.reserve(ReserveRequest("k", 4, GenerationLimits(6), 30))
        doomed.signal(signal.SIGSTOP)  # frozen: the push cannot complete
        push = asyncio.create_task(
            prefill.prefill(
                PrefillRequest("k", tuple(prompt), SamplingParams(), doomed.address, lease.lease_id)
            )
        )
        await asyncio.sleep(0.5)
        assert not push.done()
        # The prefill queue keeps moving while that push hangs.
        tokens, _ = await generate(
            process_workers.decode_client(), prefill, process_workers.decode_address, prompt, 6
        )
        assert tokens == expected
        doomed.signal(signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(TransportError) as err:
            await asyncio.wait_for(push, 15)
        assert err.value.code is StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 10
        tokens, _ = await generate(
            process_workers.decode_client(), prefill, process_workers.decode_address, prompt, 6
        )
        assert tokens == expected

    try:
        asyncio.run(body())
    finally:
        stop_worker(doomed)


def test_prefill_reports_a_dead_decode_peer_in_process(engine, params, tiny_fingerprint):
    """The fake-transport twin of the kill -9 test: the peer dies mid-transfer."""
    from shared.transport.fake import FaultPlan

    prompt = [9, 8, 7, 6]
    expected = reference_greedy(engine, params, prompt, 6)

    async def body() -> None:
        workers = InProcessWorkers(engine, params, tiny_fingerprint)
        doomed = InProcessWorkers(engine, params, tiny_fingerprint)
        try:
            workers.network.serve("doomed", doomed.decode.service)
            stall = FaultPlan(delay_chunk=0, delay_seconds=30.0)
            connect = workers.network.decode_client
            workers.sink._connect = lambda a: connect(
                a, TRANSPORT, stall if a == "doomed" else None
            )
            victim = workers.network.decode_client("doomed", TRANSPORT)
            lease = await victim.reserve(ReserveRequest("k", 4, GenerationLimits(6), 30))
            prefill = workers.prefill_client()
            push = asyncio.create_task(
                prefill.prefill(
                    PrefillRequest("k", tuple(prompt), SamplingParams(), "doomed", lease.lease_id)
                )
            )
            await asyncio.sleep(0.3)
            assert not push.done()
            tokens, _ = await generate(
                workers.decode_client(), prefill, workers.decode_address, prompt, 6
            )
            assert tokens == expected
            await workers.network.kill("doomed")
            with pytest.raises(TransportError) as err:
                await asyncio.wait_for(push, 10)
            assert err.value.code is StatusCode.UNAVAILABLE
        finally:
            await doomed.close()
            await workers.close()

    asyncio.run(body())


@pytest.mark.timeout(90)
def test_sigterm_drains_live_work_then_exits_zero(process_workers: ProcessWorkers, engine, params):
    draining = spawn_worker("decode", "--drain-grace-s", "20")
    prompt = [4, 4, 4]
    expected = reference_greedy(engine, params, prompt, 30)

    async def body() -> None:
        decode = process_workers.decode_client(draining.address)
        prefill = process_workers.prefill_client()
        live = asyncio.create_task(generate(decode, prefill, draining.address, prompt, 30))
        while (await decode.get_load()).live_requests == 0:
            await asyncio.sleep(0.01)
        draining.signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        with pytest.raises(TransportError) as err:  # no new work while draining
            await decode.reserve(ReserveRequest("late", 3, GenerationLimits(3), 30))
        assert err.value.code is StatusCode.UNAVAILABLE
        tokens, batches = await asyncio.wait_for(live, 30)
        assert tokens == expected  # the live request ran to its end
        assert batches[-1].finish is DecodeFinish.LENGTH

    try:
        asyncio.run(body())
        assert draining.wait(30) == 0
    finally:
        stop_worker(draining)
    assert any("draining" in line for line in draining.output)


def test_drain_cancels_what_outlives_the_grace_period(engine, params, tiny_fingerprint):
    async def body() -> None:
        workers = InProcessWorkers(engine, params, tiny_fingerprint)
        decode, prefill = workers.decode_client(), workers.prefill_client()
        lease = await decode.reserve(ReserveRequest("d", 3, GenerationLimits(60, (), False), 30))
        stream = asyncio.create_task(collect(decode.stream_tokens(lease.lease_id)))
        await prefill.prefill(
            PrefillRequest("d", (1, 2, 3), SamplingParams(), workers.decode_address, lease.lease_id)
        )
        # No grace at all: 60 tiny decode steps can finish inside any real grace period
        # on a quiet machine, and this test is about what outlives it.
        await workers.decode.drain(0.0)
        batches = await asyncio.wait_for(stream, 10)
        assert batches[-1].finish is DecodeFinish.CANCELLED
        assert workers.decode.all_free()
        pages = workers.decode.loop.pages  # the drained request's KV pages came back
        assert pages.counts().used == 0 and pages.counts().reserved == 0
        pages.check()
        workers.prefill_loop.stop()
        assert not workers.fatal

    asyncio.run(body())


@pytest.mark.timeout(120)
def test_reserve_without_kv_pages_is_resource_exhausted_over_grpc():
    """A decode process with a pool of 4 pages of 8 positions (one request at max_seq_len
    32): a 20-token prompt (21 positions, 3 pages) is admitted; a second one finds 1 page and
    is refused RESOURCE_EXHAUSTED with the numbers, holding nothing; GetLoad reports the
    pages; once the first lease is cancelled the second is admitted."""
    flags = ("--prefill-buckets", "8,16", "--max-seq-len", "32", "--kv-pages", "5")
    decode = spawn_worker("decode", *flags)

    async def body() -> None:
        from shared.transport.grpc_transport import GrpcDecodeClient

        client = GrpcDecodeClient(decode.address, TRANSPORT)
        try:
            limits = GenerationLimits(8, (), False)
            first = await client.reserve(ReserveRequest("a", 20, limits, 30))
            load = await client.get_load()
            assert (load.free_pages, load.total_pages, load.page_size) == (1, 4, 8)
            with pytest.raises(TransportError) as refused:
                await client.reserve(ReserveRequest("b", 20, limits, 30))
            assert refused.value.code is StatusCode.RESOURCE_EXHAUSTED
            assert "KV pages exhausted: 3 needed, 1 free of 4" in refused.value.message
            assert (await client.get_load()).free_slots == 3  # the refusal held no slot
            assert await client.cancel(first.lease_id)
            deadline = time.monotonic() + 10
            while (await client.get_load()).free_pages < 4:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await client.reserve(ReserveRequest("c", 20, limits, 30))
        finally:
            await client.close()

    try:
        asyncio.run(body())
    finally:
        stop_worker(decode)


def test_params_of_processes_match_the_test_engine(engine, params, engine_config):
    """The processes load `tiny` through load_model; the reference uses init_params."""
    loaded = load_model("tiny", engine_config=engine_config, seed=0)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_health_and_metrics_of_worker_processes(process_workers: ProcessWorkers):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for worker in (process_workers.prefill, process_workers.decode):
        with grpc.insecure_channel(worker.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    decode_before = scrape(process_workers.decode.metrics_port)
    prefill_before = scrape(process_workers.prefill.metrics_port)

    async def body() -> None:
        await generate(
            process_workers.decode_client(),
            process_workers.prefill_client(),
            process_workers.decode_address,
            [1, 2, 3, 4, 5],
            6,
        )

    asyncio.run(body())
    decode = scrape(process_workers.decode.metrics_port)
    prefill = scrape(process_workers.prefill.metrics_port)

    def moved(after: dict, before: dict, key: str) -> float:
        return after[key] - before.get(key, 0.0)

    assert (
        moved(prefill, prefill_before, "pdserve_worker_requests_total{outcome=ok,role=prefill}")
        == 1
    )
    assert moved(prefill, prefill_before, "pdserve_prefill_seconds_count{}") == 1
    assert moved(prefill, prefill_before, "pdserve_kv_send_seconds_count{}") == 1
    assert moved(prefill, prefill_before, "pdserve_kv_sent_bytes_total{}") > 0
    assert "pdserve_prefill_queue_depth{}" in prefill
    assert moved(decode, decode_before, "pdserve_kv_received_bytes_total{}") == moved(
        prefill, prefill_before, "pdserve_kv_sent_bytes_total{}"
    )
    assert moved(decode, decode_before, "pdserve_kv_receive_seconds_count{}") == 1
    assert (
        moved(decode, decode_before, "pdserve_worker_requests_total{outcome=length,role=decode}")
        == 1
    )
    assert (
        moved(decode, decode_before, "pdserve_tokens_generated_total{}") == 5
    )  # first is prefill's
    assert moved(decode, decode_before, "pdserve_decode_step_seconds_count{}") >= 5
    assert moved(decode, decode_before, "pdserve_decode_batch_occupancy_count{}") >= 5
    assert decode["pdserve_decode_slots{state=free}"] == 4
    reserved = "pdserve_decode_slot_transitions_total{from_state=free,to_state=reserved}"
    assert moved(decode, decode_before, reserved) == 1
    for reason in ("checksum", "fingerprint", "too_large", "truncated"):
        assert f"pdserve_kv_rejections_total{{reason={reason}}}" in decode


def test_dead_engine_thread_turns_health_not_serving(engine, params, tiny_fingerprint):
    import threading

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from prometheus_client import CollectorRegistry

    from decode_server.worker import build_decode_worker
    from shared.metrics import WorkerMetrics
    from shared.serving.runtime import ModelRuntime
    from shared.serving.worker_config import Role, parse_worker_args
    from shared.serving.worker_server import WorkerServer
    from shared.transport.server import decode_service
    from tests.worker_harness import ENGINE_FLAGS

    config = parse_worker_args(
        ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", *ENGINE_FLAGS], Role.DECODE
    )
    runtime = ModelRuntime(engine, params, tiny_fingerprint, None)

    async def status(port: int) -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            return reply.status

    async def body() -> None:
        server = WorkerServer(config, CollectorRegistry())
        worker = build_decode_worker(
            runtime, config, WorkerMetrics(server.registry, "d"), server.fatal
        )
        worker.start(asyncio.get_running_loop())
        serving = asyncio.create_task(server.serve([decode_service(worker.service)], worker.drain))
        while server.port is None:
            await asyncio.sleep(0.01)
        assert await status(server.port) == health_pb2.HealthCheckResponse.SERVING
        dying = threading.Thread(target=server.fatal, args=(RuntimeError("engine died"),))
        dying.start()
        dying.join()
        await asyncio.sleep(0.1)
        assert await status(server.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert isinstance(server.fatal_error, RuntimeError)
        server.request_stop()
        assert await asyncio.wait_for(serving, 10) == 1  # a worker that broke exits non-zero

    asyncio.run(body())

"""Mixed batches: the colocated worker's one engine thread runs prefill chunks inside its
decode steps (decode_server/loop.py `host_prefill`, shared/engine/mixed.py).

Counted in engine calls, not seconds: while a request decodes, every call its engine
thread makes advances it by one token, however many prompts are being prefilled beside
it; and the tokens are those of the programs run one at a time.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client import CollectorRegistry

from decode_server.colocated import mixed_shapes
from decode_server.loop import DecodeLoop
from decode_server.scheduler import DecodeBatch, chunk_rows_beside
from decode_server.slots import SlotsExhaustedError, SlotTable
from prefill_server.loop import PrefillLoop
from shared.config import PrefillSettings
from shared.engine.engine import Engine, Params
from shared.kv.prefix import Prefix
from shared.metrics import WorkerMetrics
from shared.sampling_params import SamplingParams
from shared.transport.types import GenerationLimits, PrefillRequest, TokenBatch
from tests.reference import reference_greedy

CHUNK, MAX_ROWS = 8, 2
MAX_TOKENS = 12
# Prompts of 1 to 4 chunks: most need several calls, each beside the decode steps of the
# requests already decoding.
PROMPTS = [list(range(3 + i, 3 + i + n)) for i, n in enumerate([5, 29, 17, 9, 26, 12, 31])]
SAMPLED = SamplingParams(temperature=1.0, top_k=20, seed=11)


class CallLog:
    """Per lease, the engine calls (decode steps, prefill calls alone) made when each of
    its token batches was emitted; emission runs on the engine thread after each call."""

    def __init__(self) -> None:
        self.loop: DecodeLoop | None = None
        self.batches: dict[str, list[tuple[int, int, TokenBatch]]] = {}
        self.done = threading.Condition()

    def __call__(self, events: list[tuple[str, TokenBatch]]) -> None:
        assert self.loop is not None
        with self.done:
            for lease_id, batch in events:
                calls = (self.loop.steps, self.loop.prefill_calls_alone)
                self.batches.setdefault(lease_id, []).append((*calls, batch))
            self.done.notify_all()

    def tokens(self, lease_id: str) -> list[int]:
        return [t for _, _, b in self.batches[lease_id] for t in b.token_ids]


class LocalSink:
    def __init__(self, decode: DecodeLoop) -> None:
        self._decode = decode

    async def push(self, request: PrefillRequest, prefix: Prefix) -> int:
        self._decode.submit(request.lease_id, prefix)
        return 0


def plain_tokens(engine: Engine, params: Params, prompt: list[int], n: int) -> list[int]:
    """The sampled request through the programs one at a time: prefill, then steps alone."""
    prefix = engine.prefill(params, prompt, sampling=SAMPLED)
    batch = DecodeBatch(engine)
    batch.insert([prefix], [0])
    tokens = [prefix.first_token]
    while len(tokens) < n:
        tokens.append(batch.step(params)[0][0])
    return tokens


def test_chunk_rows_beside_fills_the_budget_after_the_decode_rows():
    assert chunk_rows_beside(160, 32, 128, 4) == 1  # the default: slots + one chunk
    assert chunk_rows_beside(300, 40, 64, 8) == 4  # 260 // 64 = 4
    assert chunk_rows_beside(300, 10, 64, 8) == 4  # 290 // 64 = 4
    assert chunk_rows_beside(400, 10, 64, 8) == 4  # 6 fit: the power of two below
    assert chunk_rows_beside(20, 32, 8, 4) == 1  # no room: still one, prefill progresses
    assert chunk_rows_beside(10_000, 0, 8, 4) == 4  # at most max_rows


@pytest.mark.timeout(240)
def test_decode_rows_advance_every_call_while_prompts_prefill_beside_them(
    engine: Engine, params: Params
):
    log = CallLog()
    fatal: list[BaseException] = []
    table = SlotTable(engine.config.max_slots)
    decode = DecodeLoop(
        engine, params, table, log, WorkerMetrics(CollectorRegistry(), "decode"), fatal.append
    )
    log.loop = decode
    prefill = PrefillLoop(
        engine,
        params,
        LocalSink(decode),
        WorkerMetrics(CollectorRegistry(), "prefill"),
        max_queue=64,
        on_fatal=fatal.append,
        settings=PrefillSettings(chunk=CHUNK, max_rows=MAX_ROWS, prefix_cache_bytes=0),
    )
    budget = engine.config.max_slots + 2 * CHUNK
    shapes = mixed_shapes(engine, prefill.device, budget)
    assert {rows for _, rows in shapes} == {1, 2}
    for bucket, rows in shapes:  # as the colocated worker does, before they are used
        engine.mixed.compile(
            params, bucket, prefill.device.pack([], False, rows), prefill.device.pool
        )
    compiled = dict(engine.compile_counts)

    async def request(i: int, prompt: list[int], sampling: SamplingParams) -> tuple[str, int]:
        limits = GenerationLimits(max_tokens=MAX_TOKENS, stop_on_eos=False)
        while True:  # 4 slots, 7 requests: wait for a free one, as the orchestrator does
            try:
                lease = decode.reserve(f"r{i}", limits, 60.0, None, prompt_length=len(prompt))
                break
            except SlotsExhaustedError:
                await asyncio.sleep(0.005)
        result = await prefill.submit(
            PrefillRequest(f"r{i}", tuple(prompt), sampling, "local", lease.lease_id)
        )
        await asyncio.to_thread(wait_finished, lease.lease_id)
        return lease.lease_id, result.first_token

    def wait_finished(lease_id: str) -> None:
        with log.done:
            assert log.done.wait_for(
                lambda: any(b.finish for _, _, b in log.batches.get(lease_id, [])), 60
            ), f"{lease_id} did not finish"

    async def body() -> list[tuple[str, int]]:
        decode.host_prefill(prefill, budget)
        prefill.host(asyncio.get_running_loop(), decode.wake)
        decode.start()
        try:
            first = asyncio.create_task(request(0, PROMPTS[0], SamplingParams()))
            while not log.batches:  # the first request decodes before the others arrive
                await asyncio.sleep(0.001)
            rest = [
                request(i, p, SAMPLED if i == 3 else SamplingParams())
                for i, p in enumerate(PROMPTS[1:], 1)
            ]
            return [await first, *await asyncio.gather(*rest)]
        finally:
            prefill.stop()
            decode.stop()

    results = asyncio.run(body())
    assert not fatal
    for i, (lease_id, first_token) in enumerate(results):
        got = [first_token, *log.tokens(lease_id)]
        if i == 3:
            assert got == plain_tokens(engine, params, PROMPTS[i], MAX_TOKENS)
        else:
            assert got == reference_greedy(engine, params, PROMPTS[i], MAX_TOKENS), i
        calls = log.batches[lease_id]
        steps = [step for step, _, _ in calls]
        # One token batch per decode step, in consecutive steps, and no prefill call by
        # itself in between: never a call that left it waiting.
        assert steps == list(range(steps[0], steps[0] + len(steps))), (i, steps)
        assert len({alone for _, alone, _ in calls}) == 1, (i, calls)
    assert decode.mixed_steps >= len(PROMPTS) - 1  # the later prompts ran beside decoding
    mixed = {k: v for k, v in engine.compile_counts.items() if k.startswith("mixed")}
    assert mixed == {k: v for k, v in compiled.items() if k.startswith("mixed")}, (
        "a mixed call compiled while serving"
    )
    counts = decode.pages.counts()
    assert counts.used == 0 and counts.reserved == 0  # every page came back

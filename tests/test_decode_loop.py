"""The decode engine thread over the slot table, without any transport."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from decode_server.loop import DecodeLoop
from decode_server.slots import SlotsExhaustedError, SlotState, SlotTable
from shared.engine.engine import Engine, Params
from shared.metrics import WorkerMetrics
from shared.transport.types import DecodeFinish, GenerationLimits, TokenBatch
from tests.reference import reference_greedy


class Collector:
    """Records every event per lease; lets a test wait for a lease's final event."""

    def __init__(self) -> None:
        self.events: dict[str, list[TokenBatch]] = {}
        self._cond = threading.Condition()

    def __call__(self, events: list[tuple[str, TokenBatch]]) -> None:
        with self._cond:
            for lease_id, event in events:
                self.events.setdefault(lease_id, []).append(event)
            self._cond.notify_all()

    def wait_finished(self, lease_id: str, timeout: float = 30.0) -> list[int]:
        with self._cond:
            assert self._cond.wait_for(
                lambda: any(e.finish for e in self.events.get(lease_id, [])), timeout
            ), f"lease {lease_id} did not finish"
            return [t for e in self.events[lease_id] for t in e.token_ids]

    def finish_of(self, lease_id: str) -> DecodeFinish | None:
        with self._cond:
            return self.events[lease_id][-1].finish


@pytest.fixture
def running(engine: Engine, params: Params):
    table = SlotTable(engine.config.max_slots)
    collector = Collector()
    fatal: list[BaseException] = []
    metrics = WorkerMetrics(CollectorRegistry(), "decode")
    loop = DecodeLoop(engine, params, table, collector, metrics, fatal.append)
    loop.start()
    yield loop, table, collector
    loop.stop()
    assert not fatal


def wait_no_pages_held(loop: DecodeLoop, timeout: float = 5.0) -> None:
    """Every page back in the pool and no promise left (a lease's end frees them in the
    same engine-thread iteration that closes its stream)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = loop.pages.counts()
        if counts.used == 0 and counts.reserved == 0:
            loop.pages.check()
            return
        assert time.monotonic() < deadline, counts
        time.sleep(0.01)


def test_tokens_equal_reference_and_slot_is_freed(running, engine: Engine, params: Params):
    loop, table, collector = running
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    limits = GenerationLimits(max_tokens=7, stop_on_eos=False)
    lease = loop.reserve("r1", limits, 10.0, None, prompt_length=len(prompt))
    prefix = engine.prefill(params, prompt).trimmed()
    loop.submit(lease.lease_id, prefix)
    streamed = collector.wait_finished(lease.lease_id)
    assert [prefix.first_token, *streamed] == reference_greedy(engine, params, prompt, 7)
    assert collector.finish_of(lease.lease_id) is DecodeFinish.LENGTH
    assert table.counts()[SlotState.FREE] == engine.config.max_slots
    wait_no_pages_held(loop)


def test_stop_token_ends_without_streaming_it(running, engine: Engine, params: Params):
    loop, _table, collector = running
    prompt = [7, 7, 7, 1]
    expected = reference_greedy(engine, params, prompt, 6)
    stop = expected[3]
    limits = GenerationLimits(10, (stop,), stop_on_eos=False)
    lease = loop.reserve("r", limits, 10.0, None, prompt_length=len(prompt))
    loop.submit(lease.lease_id, engine.prefill(params, prompt))
    streamed = collector.wait_finished(lease.lease_id)
    assert streamed == expected[1 : expected.index(stop)]
    assert collector.finish_of(lease.lease_id) is DecodeFinish.STOP
    wait_no_pages_held(loop)


def test_lease_expiry_frees_a_reserved_slot(running, engine: Engine):
    loop, table, collector = running
    lease = loop.reserve("r", GenerationLimits(4), ttl_s=0.2, deadline=None, prompt_length=4)
    assert collector.wait_finished(lease.lease_id, timeout=5) == []
    assert collector.finish_of(lease.lease_id) is DecodeFinish.LEASE_EXPIRED
    assert table.counts()[SlotState.FREE] == engine.config.max_slots
    wait_no_pages_held(loop)  # the page promise made at reserve is withdrawn


def test_cancel_mid_stream_frees_within_one_step(running, engine: Engine, params: Params):
    loop, table, collector = running
    lease = loop.reserve("r", GenerationLimits(50, stop_on_eos=False), 10.0, None, prompt_length=3)
    loop.submit(lease.lease_id, engine.prefill(params, [1, 2, 3]))
    deadline = time.monotonic() + 10
    while not collector.events.get(lease.lease_id) and time.monotonic() < deadline:
        time.sleep(0.01)
    steps = loop.steps
    loop.finish(lease.lease_id, DecodeFinish.CANCELLED)
    collector.wait_finished(lease.lease_id)
    assert collector.finish_of(lease.lease_id) is DecodeFinish.CANCELLED
    assert loop.steps - steps <= 1
    assert table.counts()[SlotState.FREE] == engine.config.max_slots
    wait_no_pages_held(loop)


def test_no_free_slot_is_resource_exhausted(engine: Engine):
    table = SlotTable(2)
    table.reserve("a", GenerationLimits(1), 10, None)
    table.reserve("b", GenerationLimits(1), 10, None)
    with pytest.raises(SlotsExhaustedError, match="all 2 decode slots are in use"):
        table.reserve("c", GenerationLimits(1), 10, None)


class BrokenEngine:
    """The real engine, except that its device 'fails' on the first decode step."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def generate(self, *args, **kwargs):
        raise RuntimeError("device lost")


def test_engine_thread_death_is_loud_and_fails_every_lease(engine: Engine, params: Params):
    table = SlotTable(engine.config.max_slots)
    collector = Collector()
    fatal: list[BaseException] = []
    metrics = WorkerMetrics(CollectorRegistry(), "decode")
    loop = DecodeLoop(BrokenEngine(engine), params, table, collector, metrics, fatal.append)
    loop.start()
    live = loop.reserve("a", GenerationLimits(5), 10.0, None, prompt_length=3)
    waiting = loop.reserve("b", GenerationLimits(5), 10.0, None, prompt_length=3)
    loop.submit(live.lease_id, engine.prefill(params, [1, 2, 3]))
    collector.wait_finished(live.lease_id)
    collector.wait_finished(waiting.lease_id)
    for lease in (live, waiting):
        assert collector.finish_of(lease.lease_id) is DecodeFinish.ERROR
        assert "device lost" in collector.events[lease.lease_id][-1].detail
    assert [str(e) for e in fatal] == ["device lost"]
    assert not loop.alive
    assert table.counts()[SlotState.FREE] == engine.config.max_slots
    wait_no_pages_held(loop)

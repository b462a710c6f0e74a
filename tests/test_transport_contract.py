"""One contract suite, run against both transports: the in-process fake and real gRPC over
loopback (127.0.0.1). The decode side is a small real handler around `KvInbox`.

Run as a script (`python tests/test_transport_contract.py --serve`), this module serves
that handler over gRPC and prints its port: the dead-peer test kills that process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tests.`, run as a script

import pytest

from shared.kv.prefix import Prefix
from shared.kv_transfer.codec import KvError, KvPayload, KvRejection, KvSpec, encode_prefix
from shared.kv_transfer.inbox import KvInbox
from shared.rpc.pdserve.v1 import kv_pb2
from shared.sampling_params import SamplingParams
from shared.serving.lifetime import child_environment, die_with_parent
from shared.transport.base import DecodeClient, PrefillClient
from shared.transport.fake import FakeNetwork, FaultPlan, apply_faults
from shared.transport.grpc_transport import GrpcDecodeClient, GrpcPrefillClient
from shared.transport.server import decode_service, prefill_service, start_server
from shared.transport.types import (
    DecodeFinish,
    GenerationLimits,
    KvReceipt,
    Lease,
    LoadReport,
    PrefillRequest,
    PrefillResult,
    PrefillTimings,
    ReserveRequest,
    StatusCode,
    TokenBatch,
    TransportConfig,
    TransportError,
)
from tests.kv_fixtures import CHUNK, FINGERPRINT, synthetic_prefix, synthetic_spec

CONFIG = TransportConfig(
    max_message_bytes=64 << 10, kv_chunk_bytes=CHUNK, rpc_timeout_s=5, transfer_timeout_s=10
)
BOUND_S = 10.0  # "no hang": every failure below must surface within this
TRANSPORTS = ["fake", "grpc"]


# The decode side: a small real handler around KvInbox --------------------------------------


class InboxDecodeHandler:
    """Leases over `slots` slots; KV through a KvInbox; on delivery, streams the first
    token and finishes LENGTH; on rejection, finishes ERROR."""

    def __init__(self, spec: KvSpec, slots: int = 2) -> None:
        self.inbox = KvInbox(spec, self._deliver, self._reject)
        self.slots = slots
        self.delivered: dict[str, Prefix] = {}
        self.rejected: dict[str, KvError] = {}
        self.live_transfers = 0
        self.finish_on_delivery = DecodeFinish.LENGTH
        self._streams: dict[str, asyncio.Queue[TokenBatch]] = {}  # every lease ever granted
        self._held: set[str] = set()  # leases holding a slot
        self._ids = itertools.count()

    async def reserve(self, request: ReserveRequest) -> Lease:
        if len(self._held) >= self.slots:
            raise TransportError(StatusCode.RESOURCE_EXHAUSTED, f"all {self.slots} slots held")
        lease_id = f"{request.request_id}/lease-{next(self._ids)}"
        self.inbox.open(lease_id)
        self._streams[lease_id] = asyncio.Queue()
        self._held.add(lease_id)
        return Lease(lease_id, len(self._held) - 1, time.time() + request.ttl_seconds)

    async def stream_tokens(self, lease_id: str) -> AsyncIterator[TokenBatch]:
        queue = self._streams.get(lease_id)
        if queue is None:
            raise TransportError(StatusCode.NOT_FOUND, f"lease {lease_id!r} is unknown")
        while True:
            batch = await queue.get()
            yield batch
            if batch.finish is not None:
                return

    async def transfer_kv(self, messages: AsyncIterator[kv_pb2.KvTransfer]) -> KvReceipt:
        self.live_transfers += 1
        try:
            return await self.inbox.receive(messages)
        finally:
            self.live_transfers -= 1

    async def cancel(self, lease_id: str) -> bool:
        found = self.inbox.close(lease_id)
        self._finish(lease_id, TokenBatch((), DecodeFinish.CANCELLED))
        return found

    async def get_load(self) -> LoadReport:
        held = len(self._held)
        # Pages as a paged decode worker reports them: 8 per lease of a 9-page pool.
        return LoadReport(
            self.slots - held,
            self.slots,
            self.inbox.receiving,
            held,
            free_pages=9 - 8 * held,
            total_pages=9,
            page_size=16,
        )

    def _deliver(self, lease_id: str, prefix: Prefix) -> None:
        self.delivered[lease_id] = prefix
        self._streams[lease_id].put_nowait(TokenBatch((prefix.first_token,)))
        self._finish(lease_id, TokenBatch((), self.finish_on_delivery))

    def _reject(self, lease_id: str, error: KvError) -> None:
        self.rejected[lease_id] = error
        self._finish(lease_id, TokenBatch((), DecodeFinish.ERROR, str(error)))

    def _finish(self, lease_id: str, batch: TokenBatch) -> None:
        if lease_id in self._held:
            self._held.discard(lease_id)
            self._streams[lease_id].put_nowait(batch)


class SumPrefillHandler:
    """Hand-computable prefill: first token = sum(prompt) % 320; sleeps `delay` first."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.seen: list[PrefillRequest] = []
        self.cancelled: list[str] = []

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        if not request.prompt_token_ids:
            raise TransportError(StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
        self.seen.append(request)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled.append(request.request_id)
            raise
        timings = PrefillTimings(0.25, 0.5, 0.125, 4096)
        return PrefillResult(sum(request.prompt_token_ids) % 320, timings)

    async def cancel(self, request_id: str) -> bool:
        return request_id in {r.request_id for r in self.seen}

    async def get_load(self) -> LoadReport:
        return LoadReport(1, 1, 0, len(self.seen))


# Harness ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Harness:
    kind: str
    decode: DecodeClient
    prefill: PrefillClient
    handler: InboxDecodeHandler
    prefill_handler: SumPrefillHandler
    dead_decode: DecodeClient  # points at an address nothing serves
    network: FakeNetwork | None = None


def _free_port() -> int:
    """A port that was free a moment ago and has nothing listening now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def harness(kind: str, spec: KvSpec | None = None) -> AsyncIterator[Harness]:
    handler, prefill_handler = InboxDecodeHandler(spec or synthetic_spec()), SumPrefillHandler()
    if kind == "fake":
        net = FakeNetwork()
        net.serve("decode:1", handler)
        net.serve("prefill:1", prefill_handler)
        yield Harness(
            kind,
            net.decode_client("decode:1", CONFIG),
            net.prefill_client("prefill:1", CONFIG),
            handler,
            prefill_handler,
            net.decode_client("decode:404", CONFIG),
            net,
        )
        return
    services = [decode_service(handler), prefill_service(prefill_handler)]
    server = await start_server("127.0.0.1:0", services, CONFIG)
    address = f"127.0.0.1:{server.port}"
    clients = (
        GrpcDecodeClient(address, CONFIG),
        GrpcPrefillClient(address, CONFIG),
        GrpcDecodeClient(f"127.0.0.1:{_free_port()}", CONFIG),
    )
    try:
        yield Harness(kind, clients[0], clients[1], handler, prefill_handler, clients[2])
    finally:
        for client in clients:
            await client.close()
        await server.stop(None)


def run(kind: str, body: Callable[[Harness], Awaitable[None]], spec: KvSpec | None = None) -> None:
    async def main() -> None:
        async with harness(kind, spec) as h:
            await asyncio.wait_for(body(h), 30)

    asyncio.run(main())


async def eventually(condition: Callable[[], bool], what: str, timeout: float = BOUND_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.01)


def reserve_request(request_id: str = "req") -> ReserveRequest:
    return ReserveRequest(
        request_id=request_id,
        prompt_length=11,
        limits=GenerationLimits(max_tokens=8, stop_token_ids=(7, 9), stop_on_eos=False),
        ttl_seconds=30.0,
        deadline=1_900_000_000.25,
    )


def encode(prefix: Prefix, lease_id: str, fingerprint: str = FINGERPRINT) -> KvPayload:
    return encode_prefix(
        prefix,
        fingerprint=fingerprint,
        request_id="req",
        lease_id=lease_id,
        chunk_bytes=CONFIG.kv_chunk_bytes,
    )


@dataclasses.dataclass
class StalledSender:
    """Sends the first `count` messages of a payload, then waits forever; records whether
    its cleanup ran (the sender's side released)."""

    payload: KvPayload
    count: int
    sent: int = 0
    closed: bool = False

    async def messages(self) -> AsyncIterator[kv_pb2.KvTransfer]:
        try:
            for message in itertools.islice(self.payload.messages(), self.count):
                yield message
                self.sent += 1
            await asyncio.Event().wait()
        finally:
            self.closed = True


# Round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("finish", [DecodeFinish.LENGTH, DecodeFinish.PREEMPTED])
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_kv_round_trip_and_token_stream(kind: str, finish: DecodeFinish) -> None:
    prefix = synthetic_prefix()

    async def body(h: Harness) -> None:
        h.handler.finish_on_delivery = finish
        lease = await h.decode.reserve(reserve_request())
        stream = h.decode.stream_tokens(lease.lease_id)  # opened before the KV is sent
        first = asyncio.ensure_future(anext(stream))
        payload = encode(prefix, lease.lease_id)
        receipt = await h.decode.transfer_kv(payload.messages())
        assert receipt == KvReceipt(lease.lease_id, payload.nbytes, payload.manifest.chunk_count)
        got = h.handler.delivered[lease.lease_id]
        for layer in (0, 1):
            for name in ("cache_k", "cache_v"):
                sent = prefix.cache["layers"][layer]["attn"][name][:, : prefix.true_length]
                assert (got.cache["layers"][layer]["attn"][name] == sent).all()
        assert (got.true_length, got.first_token, got.sampling) == (11, 42, prefix.sampling)
        batches = [await first] + [b async for b in stream]
        assert batches == [TokenBatch((42,)), TokenBatch((), finish)]
        assert h.handler.inbox.buffered_bytes == 0

    run(kind, body)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_engine_prefix_over_the_transport(kind: str, engine, params) -> None:
    """A real prefill cache (engine layout, bucket padding) arrives exactly."""
    prefix = engine.prefill(params, [5, 6, 7, 8, 9], sampling=SamplingParams(seed=7))
    spec = KvSpec.from_cache(prefix.cache, FINGERPRINT, 1 << 20)

    async def body(h: Harness) -> None:
        lease = await h.decode.reserve(reserve_request())
        await h.decode.transfer_kv(encode(prefix, lease.lease_id).messages())
        got = h.handler.delivered[lease.lease_id]
        for layer, leaves in prefix.cache["layers"].items():
            for name, leaf in leaves["attn"].items():
                expect = leaf[:, : prefix.true_length]
                assert (got.cache["layers"][layer]["attn"][name] == expect).all()

    run(kind, body, spec)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_unary_calls_carry_every_field(kind: str) -> None:
    async def body(h: Harness) -> None:
        request = PrefillRequest(
            request_id="p-1",
            prompt_token_ids=(100, 200, 30),
            sampling=SamplingParams(temperature=0.3, top_k=3, top_p=0.7, seed=2**64 - 1),
            decode_target="127.0.0.1:5000",
            lease_id="lease-9",
            deadline=1_900_000_000.5,
            model_fingerprint=FINGERPRINT,
        )
        result = await h.prefill.prefill(request)
        assert result == PrefillResult(330 % 320, PrefillTimings(0.25, 0.5, 0.125, 4096))
        assert h.prefill_handler.seen == [request]
        assert await h.prefill.cancel("p-1") and not await h.prefill.cancel("p-2")
        assert await h.prefill.get_load() == LoadReport(1, 1, 0, 1)
        lease = await h.decode.reserve(reserve_request())
        assert lease.slot == 0 and lease.expire_time > time.time() + 20
        load = await h.decode.get_load()
        assert load == LoadReport(1, 2, 0, 1, free_pages=1, total_pages=9, page_size=16)
        assert load.pages_for(17) == 2
        assert await h.decode.cancel(lease.lease_id)
        assert not await h.decode.cancel(lease.lease_id)  # idempotent

    run(kind, body)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_handler_errors_keep_their_status(kind: str) -> None:
    async def body(h: Harness) -> None:
        empty = PrefillRequest("p", (), SamplingParams(), "x:1", "lease")
        with pytest.raises(TransportError) as caught:
            await h.prefill.prefill(empty)
        assert caught.value.code is StatusCode.INVALID_ARGUMENT
        assert "prompt_token_ids is empty" in caught.value.message
        for i in range(2):
            await h.decode.reserve(reserve_request(f"r{i}"))
        with pytest.raises(TransportError) as caught:
            await h.decode.reserve(reserve_request("r3"))
        assert caught.value.code is StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(TransportError) as caught:
            await anext(h.decode.stream_tokens("no-such-lease"))
        assert caught.value.code is StatusCode.NOT_FOUND

    run(kind, body)


# Fail closed ---------------------------------------------------------------------------------


def _wrong_model(p: KvPayload) -> KvPayload:
    manifest = kv_pb2.KvManifest()
    manifest.CopyFrom(p.manifest)
    manifest.model_fingerprint = "another-model"
    return dataclasses.replace(p, manifest=manifest)


def _wrong_version(p: KvPayload) -> KvPayload:
    manifest = kv_pb2.KvManifest()
    manifest.CopyFrom(p.manifest)
    manifest.format_version = 99
    return dataclasses.replace(p, manifest=manifest)


def _edit_leaf(field: str, value: object) -> Callable[[KvPayload], KvPayload]:
    def edit(p: KvPayload) -> KvPayload:
        manifest = kv_pb2.KvManifest()
        manifest.CopyFrom(p.manifest)
        if field == "drop":
            manifest.leaves.pop()
        elif field == "shape":
            manifest.leaves[0].shape[0] = 3
        else:
            setattr(manifest.leaves[0], field, value)
        return dataclasses.replace(p, manifest=manifest)

    return edit


FAILS = {
    # name: (payload edit, faults, spec limit, reason, status)
    "format-version": (
        _wrong_version,
        FaultPlan(),
        None,
        KvRejection.FORMAT_VERSION,
        StatusCode.FAILED_PRECONDITION,
    ),
    "fingerprint": (
        _wrong_model,
        FaultPlan(),
        None,
        KvRejection.FINGERPRINT,
        StatusCode.FAILED_PRECONDITION,
    ),
    "unknown-leaf": (
        _edit_leaf("path", "layers/7/mlp"),
        FaultPlan(),
        None,
        KvRejection.UNKNOWN_LEAF,
        StatusCode.FAILED_PRECONDITION,
    ),
    "missing-leaf": (
        _edit_leaf("drop", None),
        FaultPlan(),
        None,
        KvRejection.MISSING_LEAF,
        StatusCode.FAILED_PRECONDITION,
    ),
    "dtype": (
        _edit_leaf("dtype", "int8"),
        FaultPlan(),
        None,
        KvRejection.DTYPE,
        StatusCode.FAILED_PRECONDITION,
    ),
    "shape": (
        _edit_leaf("shape", None),
        FaultPlan(),
        None,
        KvRejection.SHAPE,
        StatusCode.FAILED_PRECONDITION,
    ),
    "corrupt-chunk": (
        None,
        FaultPlan(corrupt_chunk=4),
        None,
        KvRejection.CHECKSUM,
        StatusCode.DATA_LOSS,
    ),
    "dropped-chunk": (
        None,
        FaultPlan(drop_chunk=2),
        None,
        KvRejection.SEQUENCE,
        StatusCode.DATA_LOSS,
    ),
    "reordered-chunk": (
        None,
        FaultPlan(reorder_chunk=5),
        None,
        KvRejection.SEQUENCE,
        StatusCode.DATA_LOSS,
    ),
    "dropped-last-chunk": (
        None,
        FaultPlan(drop_chunk=10),
        None,
        KvRejection.TRUNCATED,
        StatusCode.DATA_LOSS,
    ),
    "truncated": ("truncate", FaultPlan(), None, KvRejection.TRUNCATED, StatusCode.DATA_LOSS),
    "too-large": (None, FaultPlan(), 1000, KvRejection.TOO_LARGE, StatusCode.RESOURCE_EXHAUSTED),
}


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("edit, faults, limit, reason, status", FAILS.values(), ids=FAILS.keys())
def test_receiver_fails_closed(kind, edit, faults, limit, reason, status) -> None:
    spec = synthetic_spec(max_payload_bytes=limit or 1 << 20)

    async def body(h: Harness) -> None:
        lease = await h.decode.reserve(reserve_request())
        stream = h.decode.stream_tokens(lease.lease_id)
        payload = encode(synthetic_prefix(), lease.lease_id)
        messages = payload.messages()
        if edit == "truncate":
            messages = itertools.islice(messages, 6)  # manifest + 5 chunks, then the end
        elif edit is not None:
            messages = edit(payload).messages()
        started = time.monotonic()
        with pytest.raises(TransportError) as caught:
            await h.decode.transfer_kv(apply_faults(messages, faults))
        assert time.monotonic() - started < BOUND_S
        assert (caught.value.code, caught.value.kv_reason) == (status, reason), caught.value
        assert h.handler.delivered == {}  # nothing reached the engine
        assert h.handler.inbox.buffered_bytes == 0 and h.handler.inbox.receiving == 0
        assert h.handler.rejected[lease.lease_id].reason is reason
        batches = [b async for b in stream]  # the lease's stream ends with ERROR
        assert batches[-1].finish is DecodeFinish.ERROR and reason.value in batches[-1].detail

    run(kind, body, spec)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_unknown_and_duplicate_lease(kind: str) -> None:
    async def body(h: Harness) -> None:
        with pytest.raises(TransportError) as caught:
            await h.decode.transfer_kv(encode(synthetic_prefix(), "nope").messages())
        assert (caught.value.code, caught.value.kv_reason) == (
            StatusCode.NOT_FOUND,
            KvRejection.UNKNOWN_LEASE,
        )
        lease = await h.decode.reserve(reserve_request())
        sender = StalledSender(encode(synthetic_prefix(), lease.lease_id), 3)
        first = asyncio.ensure_future(h.decode.transfer_kv(sender.messages()))
        await eventually(lambda: h.handler.inbox.receiving == 1, "first transfer started")
        with pytest.raises(TransportError) as caught:
            await h.decode.transfer_kv(encode(synthetic_prefix(), lease.lease_id).messages())
        assert caught.value.kv_reason is KvRejection.DUPLICATE
        assert caught.value.code is StatusCode.ALREADY_EXISTS
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)

    run(kind, body)


# Cancellation and dead peers -----------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_sender_cancels_mid_transfer(kind: str) -> None:
    async def body(h: Harness) -> None:
        lease = await h.decode.reserve(reserve_request())
        sender = StalledSender(encode(synthetic_prefix(), lease.lease_id), count=5)
        task = asyncio.ensure_future(h.decode.transfer_kv(sender.messages()))
        inbox = h.handler.inbox
        await eventually(lambda: inbox.buffered_bytes > 0, "the receiver holds a buffer")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(
            lambda: inbox.buffered_bytes == 0 and inbox.receiving == 0,
            "the receiver released the transfer",
        )
        await eventually(lambda: h.handler.live_transfers == 0, "the handler's call ended")
        await eventually(lambda: sender.closed, "the sender's stream was closed")
        # grpc.aio ends the handler's request stream early (TRUNCATED); the fake cancels the
        # handler's task (CANCELLED). Either way nothing was delivered and nothing is held.
        reason = h.handler.rejected[lease.lease_id].reason
        assert reason in (KvRejection.CANCELLED, KvRejection.TRUNCATED)
        assert h.handler.delivered == {}

    run(kind, body)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_receiver_cancels_mid_transfer(kind: str) -> None:
    async def body(h: Harness) -> None:
        lease = await h.decode.reserve(reserve_request())
        sender = StalledSender(encode(synthetic_prefix(), lease.lease_id), count=5)
        task = asyncio.ensure_future(h.decode.transfer_kv(sender.messages()))
        inbox = h.handler.inbox
        await eventually(lambda: inbox.buffered_bytes > 0, "the receiver holds a buffer")
        assert await h.decode.cancel(lease.lease_id)  # the lease's owner ends it
        with pytest.raises(TransportError) as caught:
            await asyncio.wait_for(task, BOUND_S)
        assert caught.value.code is StatusCode.CANCELLED
        assert caught.value.kv_reason is KvRejection.CANCELLED
        assert inbox.buffered_bytes == 0 and inbox.receiving == 0
        await eventually(lambda: sender.closed, "the sender's stream was closed")
        await eventually(lambda: h.handler.live_transfers == 0, "the handler's call ended")
        assert h.handler.delivered == {}

    run(kind, body)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_transfer_to_an_address_nobody_serves(kind: str) -> None:
    async def body(h: Harness) -> None:
        started = time.monotonic()
        with pytest.raises(TransportError) as caught:
            await h.dead_decode.transfer_kv(encode(synthetic_prefix(), "lease").messages())
        assert caught.value.code is StatusCode.UNAVAILABLE
        with pytest.raises(TransportError) as caught:
            await h.dead_decode.reserve(reserve_request())
        assert caught.value.code is StatusCode.UNAVAILABLE
        assert time.monotonic() - started < BOUND_S

    run(kind, body)


@contextlib.contextmanager
def _peer_process() -> Iterator[tuple[subprocess.Popen, int]]:
    env = child_environment({**os.environ, "JAX_PLATFORMS": "cpu"})  # dies with pytest
    cwd = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, env=env, cwd=cwd, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT "), f"peer did not start: {line!r}"
        yield proc, int(line.split()[1])
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_peer_dies_mid_transfer(kind: str) -> None:
    """The decode peer's process dies while a transfer is in flight: UNAVAILABLE, no hang."""

    async def body(h: Harness) -> None:
        if h.network is not None:
            client = h.decode
            lease = await client.reserve(reserve_request())
            sender = StalledSender(encode(synthetic_prefix(), lease.lease_id), count=5)
            task = asyncio.ensure_future(client.transfer_kv(sender.messages()))
            await eventually(lambda: h.handler.inbox.buffered_bytes > 0, "transfer started")
            await h.network.kill("decode:1")
            await _expect_unavailable(task)
            assert h.handler.inbox.buffered_bytes == 0
            return
        with _peer_process() as (proc, port):
            client = GrpcDecodeClient(f"127.0.0.1:{port}", CONFIG)
            lease = await client.reserve(reserve_request())
            sender = StalledSender(encode(synthetic_prefix(), lease.lease_id), count=5)
            task = asyncio.ensure_future(client.transfer_kv(sender.messages()))
            await eventually(lambda: sender.sent == sender.count, "transfer started")
            await asyncio.sleep(0.2)  # let the messages reach the peer
            proc.send_signal(signal.SIGKILL)
            await _expect_unavailable(task)
            await client.close()

    run(kind, body)


async def _expect_unavailable(task: asyncio.Future) -> None:
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        await asyncio.wait_for(task, BOUND_S)
    assert caught.value.code is StatusCode.UNAVAILABLE, caught.value
    assert time.monotonic() - started < BOUND_S


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_caller_cancels_a_unary_call(kind: str) -> None:
    async def body(h: Harness) -> None:
        h.prefill_handler.delay = 60
        request = PrefillRequest("slow", (1,), SamplingParams(), "x:1", "lease")
        task = asyncio.ensure_future(h.prefill.prefill(request))
        await eventually(lambda: h.prefill_handler.seen, "the prefill started")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: h.prefill_handler.cancelled == ["slow"], "handler cancelled")

    run(kind, body)


def _serve_forever() -> None:
    async def main() -> None:
        server = await start_server(
            "127.0.0.1:0", [decode_service(InboxDecodeHandler(synthetic_spec()))], CONFIG
        )
        print(f"PORT {server.port}", flush=True)
        await server.server.wait_for_termination()

    asyncio.run(main())


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    die_with_parent()
    _serve_forever()

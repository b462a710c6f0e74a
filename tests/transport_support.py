"""The transport contract suite's harness: one body run against both transports (the
in-process fake and real gRPC over loopback), a small real decode handler around
`KvInbox`, a prefill handler that sums its prompt, and senders that stall.

Run as a script (`python tests/transport_support.py --serve`), this module serves the
decode handler over gRPC and prints its port: the dead-peer test kills that process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tests.`, run as a script


from shared.kv.prefix import Prefix
from shared.kv_transfer.codec import KvError, KvPayload, KvSpec, encode_prefix
from shared.kv_transfer.inbox import KvInbox
from shared.rpc.pdserve.v1 import kv_pb2
from shared.serving.lifetime import child_environment, die_with_parent
from shared.transport.base import DecodeClient, PrefillClient
from shared.transport.fake import FakeNetwork
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
from tests.kv_fixtures import CHUNK, FINGERPRINT, synthetic_spec

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


@contextlib.contextmanager
def peer_process() -> Iterator[tuple[subprocess.Popen, int]]:
    """This module serving its decode handler in another process (dies with pytest), and
    the port it serves on."""
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

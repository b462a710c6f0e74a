"""KvInbox: the decode worker's receiving side of KV transfers, one entry per lease.

The life of a lease's KV:
1. `open(lease_id)` when the lease is granted (Reserve): the entry EXPECTS a transfer.
2. A TransferKV stream arrives; `receive(messages)` reads its manifest, finds the entry by
   the manifest's lease id (unknown: UNKNOWN_LEASE; already receiving or delivered:
   DUPLICATE) and feeds every message to a `KvAssembler` (RECEIVING).
3. Only after the trailer checked out, `deliver(lease_id, prefix)` gets the whole prefix
   (DELIVERED) and `receive` returns the receipt.
4. Any failure, a `close(lease_id)` from the lease's owner (cancel, expiry) or the sender
   going away drops the assembler's buffer at once and the entry with it, and
   `reject(lease_id, error)` is told why. The lease cannot receive again: per the design,
   a rejected KV frees its slot.

All methods run on one event loop (the server's); none blocks it for long: a chunk is a
CRC and a copy of ~1 MiB.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from collections.abc import AsyncIterator, Callable

from shared.kv.prefix import Prefix
from shared.kv_transfer.assembler import KvAssembler
from shared.kv_transfer.codec import KvError, KvReceipt, KvRejection, KvSpec
from shared.rpc.pdserve.v1 import kv_pb2


class InboxState(enum.Enum):
    EXPECTING = enum.auto()
    RECEIVING = enum.auto()
    DELIVERED = enum.auto()


@dataclasses.dataclass(slots=True)
class _Entry:
    state: InboxState = InboxState.EXPECTING
    assembler: KvAssembler | None = None
    task: asyncio.Task | None = None  # the task running `receive` while RECEIVING
    closed: bool = False  # set by `close` before it cancels `task`


DeliverFn = Callable[[str, Prefix], None]
RejectFn = Callable[[str, KvError], None]


class KvInbox:
    def __init__(self, spec: KvSpec, deliver: DeliverFn, reject: RejectFn | None = None) -> None:
        self.spec = spec
        self._deliver = deliver
        self._reject = reject or (lambda lease_id, error: None)
        self._entries: dict[str, _Entry] = {}

    # Introspection (tests, load reports) ---------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """Bytes held by transfers in flight."""
        return sum(e.assembler.buffered_bytes for e in self._entries.values() if e.assembler)

    @property
    def receiving(self) -> int:
        return sum(e.state is InboxState.RECEIVING for e in self._entries.values())

    def state(self, lease_id: str) -> InboxState | None:
        entry = self._entries.get(lease_id)
        return entry.state if entry else None

    # Lease lifecycle -------------------------------------------------------------------

    def open(self, lease_id: str) -> None:
        if lease_id in self._entries:
            raise ValueError(f"lease {lease_id!r} is already open")
        self._entries[lease_id] = _Entry()

    def close(self, lease_id: str) -> bool:
        """Forget the lease; abort its transfer in flight (the sender gets CANCELLED).
        Idempotent; False if it was unknown."""
        entry = self._entries.pop(lease_id, None)
        if entry is None:
            return False
        entry.closed = True
        if entry.assembler is not None:
            entry.assembler.release()
        if entry.task is not None and entry.state is InboxState.RECEIVING:
            entry.task.cancel()  # wakes `receive` even while it waits for the next chunk
        return True

    # Receiving -------------------------------------------------------------------------

    async def receive(self, messages: AsyncIterator[kv_pb2.KvTransfer]) -> KvReceipt:
        """Consume one TransferKV stream; see the module docstring for what happens."""
        first = await anext(messages, None)
        if first is None or first.WhichOneof("message") != "manifest":
            raise KvError(KvRejection.MALFORMED, "a KV stream must start with its manifest")
        lease_id = first.manifest.lease_id
        entry = self._claim(lease_id)
        try:
            entry.assembler.feed(first)
            async for message in messages:
                entry.assembler.feed(message)
            prefix = entry.assembler.finish()
        except asyncio.CancelledError:
            error = self._on_cancelled(lease_id, entry)
            if error is None:
                raise  # the sender went away: the RPC is over, nobody reads an answer
            raise error from None
        except KvError as error:
            self._fail(lease_id, entry, error)
            raise
        entry.state, entry.task = InboxState.DELIVERED, None
        receipt = KvReceipt(lease_id, entry.assembler.received_bytes, first.manifest.chunk_count)
        entry.assembler = None  # the prefix's arrays now own the buffer
        self._deliver(lease_id, prefix)
        return receipt

    def _claim(self, lease_id: str) -> _Entry:
        entry = self._entries.get(lease_id)
        if entry is None:
            raise KvError(KvRejection.UNKNOWN_LEASE, f"lease {lease_id!r} is not open here")
        if entry.state is not InboxState.EXPECTING:
            raise KvError(
                KvRejection.DUPLICATE, f"lease {lease_id!r} is already {entry.state.name}"
            )
        entry.state = InboxState.RECEIVING
        entry.assembler = KvAssembler(self.spec)
        entry.task = asyncio.current_task()
        return entry

    def _on_cancelled(self, lease_id: str, entry: _Entry) -> KvError | None:
        """Returns the error to raise instead of the cancellation when it was ours."""
        if entry.closed:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # we cancelled it ourselves (close); the RPC itself goes on
            error = KvError(KvRejection.CANCELLED, f"lease {lease_id!r} was closed mid-transfer")
            self._fail(lease_id, entry, error)
            return error
        self._fail(lease_id, entry, KvError(KvRejection.CANCELLED, "the sender went away"))
        return None

    def _fail(self, lease_id: str, entry: _Entry, error: KvError) -> None:
        if entry.assembler is not None:
            entry.assembler.release()
        entry.assembler, entry.task = None, None
        if self._entries.get(lease_id) is entry:
            del self._entries[lease_id]
        self._reject(lease_id, error)

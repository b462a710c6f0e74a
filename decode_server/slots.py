"""The decode worker's slot table: which slot is where in its life, and under which lease.

    FREE --reserve--> RESERVED --KV arrives--> FILLING --inserted--> DECODING --finish--> FREE
                          |                        |
                          +--- TTL, cancel, bad KV +--> FREE

Invariant: a slot is FREE exactly when no lease names it; every transition happens under
the table's lock, is logged at debug level and counted in metrics. The engine thread and
the gRPC handlers both call in, so every method is thread-safe and cheap (no JAX here).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable

from shared.transport.types import GenerationLimits

log = logging.getLogger(__name__)


class SlotState(enum.Enum):
    FREE = "free"
    RESERVED = "reserved"  # leased, waiting for its KV
    FILLING = "filling"  # KV received and validated, waiting for the engine to insert it
    DECODING = "decoding"  # live in the decode batch


class SlotsExhaustedError(RuntimeError):
    def __init__(self, in_use: int, total: int) -> None:
        super().__init__(f"all {total} decode slots are in use ({in_use} leased); retry later")
        self.in_use, self.total = in_use, total


class UnknownLeaseError(KeyError):
    def __init__(self, lease_id: str) -> None:
        super().__init__(lease_id)
        self.lease_id = lease_id

    def __str__(self) -> str:
        return f"lease {self.lease_id!r} is unknown or already finished"


class LeaseStateError(RuntimeError):
    pass


@dataclasses.dataclass(slots=True)
class Lease:
    lease_id: str
    slot: int
    request_id: str
    limits: GenerationLimits
    expires_at: float  # time.monotonic(); only while RESERVED
    deadline: float | None  # time.monotonic(); None: no deadline
    state: SlotState = SlotState.RESERVED
    generated: int = 0  # tokens produced so far, the prefill's first token included
    prompt_length: int = 0  # known once the KV arrived
    logprobs: int | None = None  # None: no logprobs; N: each token's and N alternatives


TransitionHook = Callable[[SlotState, SlotState], None]


class SlotTable:
    def __init__(self, total: int, on_transition: TransitionHook | None = None) -> None:
        self.total = total
        self._lock = threading.Lock()
        self._free = list(range(total - 1, -1, -1))  # pop() hands out slot 0 first
        self._leases: dict[str, Lease] = {}
        self._on_transition = on_transition or (lambda _a, _b: None)
        self._ids = itertools.count()

    def reserve(
        self, request_id: str, limits: GenerationLimits, ttl_s: float, deadline: float | None
    ) -> Lease:
        with self._lock:
            if not self._free:
                raise SlotsExhaustedError(len(self._leases), self.total)
            slot = self._free.pop()
            lease_id = f"{uuid.uuid4().hex[:12]}-{next(self._ids)}"
            lease = Lease(lease_id, slot, request_id, limits, time.monotonic() + ttl_s, deadline)
            self._leases[lease_id] = lease
            self._transition(lease, SlotState.FREE, SlotState.RESERVED)
            return lease

    def get(self, lease_id: str) -> Lease:
        with self._lock:
            try:
                return self._leases[lease_id]
            except KeyError:
                raise UnknownLeaseError(lease_id) from None

    def advance(self, lease_id: str, expected: SlotState, to: SlotState) -> Lease:
        """Move a lease from `expected` to `to`; LeaseStateError if it is elsewhere."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                raise UnknownLeaseError(lease_id)
            if lease.state is not expected:
                raise LeaseStateError(
                    f"lease {lease_id} is {lease.state.value}, not {expected.value}"
                )
            self._transition(lease, expected, to)
            lease.state = to
            return lease

    def free(self, lease_id: str) -> Lease | None:
        """Release the lease and its slot. Idempotent: None when already gone."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                return None
            self._transition(lease, lease.state, SlotState.FREE)
            self._free.append(lease.slot)
            return lease

    def expired(self, now: float) -> list[Lease]:
        """Leases still RESERVED past their TTL, or past their deadline in any state."""
        with self._lock:
            return [
                lease
                for lease in self._leases.values()
                if (lease.state is SlotState.RESERVED and now >= lease.expires_at)
                or (lease.deadline is not None and now >= lease.deadline)
            ]

    def counts(self) -> dict[SlotState, int]:
        with self._lock:
            counts = dict.fromkeys(SlotState, 0)
            for lease in self._leases.values():
                counts[lease.state] += 1
            counts[SlotState.FREE] = len(self._free)
            return counts

    def leases(self) -> list[Lease]:
        with self._lock:
            return list(self._leases.values())

    def _transition(self, lease: Lease, old: SlotState, new: SlotState) -> None:
        log.debug("slot %d lease %s: %s -> %s", lease.slot, lease.lease_id, old.value, new.value)
        self._on_transition(old, new)

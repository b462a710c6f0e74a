"""Where a request goes: the placement policy, a small component to swap.

The default sends a request's decode to the worker with the most free slots, and its
prefill to the worker with the fewest of our requests in flight. Prefix-aware or
SLO-aware policies implement the same two methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from orchestrator.registry import Worker


class PlacementPolicy(Protocol):
    def rank_decode(self, workers: Sequence[Worker]) -> list[Worker]:
        """Decode workers to try for a new lease, best first; only those with room."""
        ...

    def rank_prefill(self, workers: Sequence[Worker]) -> list[Worker]:
        """Prefill workers to try, best first."""
        ...


class LeastLoadedPolicy:
    def rank_decode(self, workers: Sequence[Worker]) -> list[Worker]:
        # Ties go to the address, so the choice is deterministic.
        roomy = [w for w in workers if w.free_slots > 0]
        return sorted(roomy, key=lambda w: (-w.free_slots, w.address))

    def rank_prefill(self, workers: Sequence[Worker]) -> list[Worker]:
        return sorted(workers, key=lambda w: (w.outstanding, w.address))

"""Where a request goes: the placement policy, a small component to swap.

The default sends a request's decode to the worker with the most free KV pages (the
memory decode capacity is made of; the most free slots where workers report no pages)
among those with a free slot and the pages its prompt needs, and its prefill to the worker
with the fewest of our requests in flight. Prefix-aware or SLO-aware policies implement
the same two methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from orchestrator.registry import Worker


class PlacementPolicy(Protocol):
    def rank_decode(self, workers: Sequence[Worker], prompt_length: int) -> list[Worker]:
        """Decode workers to try for a new lease of `prompt_length` tokens, best first; only
        those with room (a free slot and the pages it needs)."""
        ...

    def rank_prefill(self, workers: Sequence[Worker]) -> list[Worker]:
        """Prefill workers to try, best first."""
        ...


class LeastLoadedPolicy:
    def rank_decode(self, workers: Sequence[Worker], prompt_length: int) -> list[Worker]:
        # Ties go to the address, so the choice is deterministic.
        roomy = [w for w in workers if w.fits(prompt_length)]
        return sorted(roomy, key=lambda w: (-_free_fraction(w), -w.free_slots, w.address))

    def rank_prefill(self, workers: Sequence[Worker]) -> list[Worker]:
        return sorted(workers, key=lambda w: (w.outstanding, w.address))


def _free_fraction(worker: Worker) -> float:
    """The share of the worker's decode capacity that is free: KV pages, else slots."""
    load, pages = worker.load, worker.free_pages
    if load is None:
        return 0.0
    if pages is not None:
        return pages / load.total_pages
    return worker.free_slots / max(1, load.total_slots)

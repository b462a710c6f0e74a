"""Where a request goes: the placement policy, a small component to swap.

Decode: a request's decode goes to the worker with the most free KV pages (the memory
decode capacity is made of; the most free slots where workers report no pages) among
those with a free slot and the pages its prompt needs. Both policies below do this.

Prefill (`--prefill-routing`):

* `least-loaded` (`LeastLoadedPolicy`): the worker with the fewest of our prefill calls in
  flight (`Worker.outstanding`), ties by address.
* `prefix` (`PrefixAwarePolicy`, the default): prefill workers keep a prefix cache (the KV
  of recent prompts, by chained hashes of whole page-sized blocks), so a prompt that
  starts like one a worker prefilled recently (the next turn of a conversation, a shared
  system prompt) costs that worker only its new tokens. The policy keeps an approximate
  index of which worker holds which blocks (orchestrator/prefix_index.py) and routes to
  the worker with the longest cached prefix of the prompt. Its blocks are the prefill
  workers' page size, from their load reports; a worker whose page size disagrees with
  the others' is refused from prefix routing (orchestrator/prefix_blocks.py) and ranked
  as if it held nothing.

  The trade-off is load against affinity: always following the cache would pile a popular
  prefix's traffic onto one worker while others idle, and queueing behind N prefills
  costs more than recomputing a prefix. So affinity is bounded: a worker is *eligible*
  while its queue (`outstanding`) exceeds the least-loaded worker's by at most
  `--prefix-affinity-max-queue` (default 4); the eligible worker with the longest
  predicted prefix wins, ties by fewest outstanding, then address (deterministic). With no
  prefix held anywhere that is exactly least-loaded; when the best holder is overloaded
  the prompt goes to the next-best eligible holder, else to the least loaded (which then
  caches the prefix too: a hot prefix spreads over workers as load demands). 0 makes
  affinity apply only between equally loaded workers; a large bound makes it absolute.

  Each decision is counted (`pdserve_prefill_routing_total{outcome}`): `affinity` (the
  longest predicted prefix of all won), `load` (a longer prefix was passed over for its
  queue), `none` (no worker holds any of it; also every `least-loaded` decision).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Protocol

from orchestrator.prefix_index import PrefixIndex
from orchestrator.registry import Worker
from shared.kv.prefix_hash import BlockHash
from shared.transport.types import PrefillResult


class RouteOutcome(enum.Enum):
    AFFINITY = "affinity"  # the longest predicted prefix of all won
    LOAD = "load"  # a longer predicted prefix was passed over for its queue
    NONE = "none"  # no worker holds any of the prompt (or the policy ignores prefixes)


@dataclasses.dataclass(slots=True, frozen=True)
class PrefillRoute:
    """A prefill worker for a prompt and what the policy predicted when it chose it;
    handed back to `prefilled` with the worker's answer."""

    worker: Worker
    prompt_tokens: int = 0
    hashes: tuple[BlockHash, ...] = ()  # the prompt's whole blocks (empty: not tracked)
    predicted_blocks: int = 0  # leading blocks of `hashes` the worker probably holds
    predicted_tokens: int = 0  # of the prompt, those it should serve from its cache
    outcome: RouteOutcome = RouteOutcome.NONE


class PlacementPolicy(Protocol):
    def rank_decode(self, workers: Sequence[Worker], prompt_length: int) -> list[Worker]:
        """Decode workers to try for a new lease of `prompt_length` tokens, best first; only
        those with room (a free slot and the pages it needs)."""
        ...

    def rank_prefill(self, workers: Sequence[Worker], prompt: Sequence[int]) -> list[PrefillRoute]:
        """Prefill workers to try for `prompt`, best first; the first route's `outcome`
        says why it is first."""
        ...

    def prefilled(self, route: PrefillRoute, result: PrefillResult) -> None:
        """The prefill of `route` succeeded with `result`."""
        ...

    def retain(self, workers: Sequence[Worker]) -> None:
        """Only these prefill workers are up: forget whatever was learnt about the others
        (ejected, restarted or removed workers come back with an empty cache)."""
        ...


class LeastLoadedPolicy:
    def rank_decode(self, workers: Sequence[Worker], prompt_length: int) -> list[Worker]:
        # Ties go to the address, so the choice is deterministic.
        roomy = [w for w in workers if w.fits(prompt_length)]
        return sorted(roomy, key=lambda w: (-_free_fraction(w), -w.free_slots, w.address))

    def rank_prefill(self, workers: Sequence[Worker], prompt: Sequence[int]) -> list[PrefillRoute]:
        ranked = sorted(workers, key=lambda w: (w.outstanding, w.address))
        return [PrefillRoute(w, len(prompt)) for w in ranked]

    def prefilled(self, route: PrefillRoute, result: PrefillResult) -> None:
        pass

    def retain(self, workers: Sequence[Worker]) -> None:
        pass


class PrefixAwarePolicy(LeastLoadedPolicy):
    """Prefill to the longest cached prefix within a load bound (the module docstring)."""

    def __init__(self, index: PrefixIndex, max_queue_gap: int = 4) -> None:
        if max_queue_gap < 0:
            raise ValueError(f"max_queue_gap={max_queue_gap} must be >= 0")
        self.index, self.max_queue_gap = index, max_queue_gap

    def rank_prefill(self, workers: Sequence[Worker], prompt: Sequence[int]) -> list[PrefillRoute]:
        if not workers:
            return []
        self._learn_block_size(workers)
        hashes = self.index.hashes(prompt)
        matched = {
            w.address: 0 if w.prefix_refused else self.index.match(w.address, hashes)
            for w in workers
        }
        least = min(w.outstanding for w in workers)

        def key(w: Worker) -> tuple:
            if w.outstanding - least <= self.max_queue_gap:
                return (0, -matched[w.address], w.outstanding, w.address)
            return (1, w.outstanding, -matched[w.address], w.address)  # overloaded: by load

        ranked = sorted(workers, key=key)
        best, longest = matched[ranked[0].address], max(matched.values())
        if longest == 0:
            first = RouteOutcome.NONE
        elif best == longest:
            first = RouteOutcome.AFFINITY
        else:
            first = RouteOutcome.LOAD
        routes = []
        block = self.index.block_tokens or 0
        for i, w in enumerate(ranked):
            blocks = matched[w.address]
            tokens = self.index.expected_blocks(len(prompt), blocks) * block
            outcome = first if i == 0 else RouteOutcome.NONE
            routes.append(PrefillRoute(w, len(prompt), hashes, blocks, tokens, outcome))
        return routes

    def prefilled(self, route: PrefillRoute, result: PrefillResult) -> None:
        if route.worker.prefix_refused:
            return  # its cache's blocks are not ours: nothing it says is about our hashes
        address = route.worker.address
        self.index.refresh(
            address,
            route.hashes,
            route.prompt_tokens,
            route.predicted_blocks,
            result.timings.cached_tokens,
        )
        self.index.record(address, route.hashes)

    def retain(self, workers: Sequence[Worker]) -> None:
        self.index.retain(w.address for w in workers)

    def _learn_block_size(self, workers: Sequence[Worker]) -> None:
        """The registry's agreement leaves one page size among the workers not refused
        (orchestrator/prefix_blocks.py): hash in blocks of it. Workers that reported none
        (hand-built in tests) leave the index's size as it is."""
        for w in workers:
            if w.prefill_page_size > 0 and not w.prefix_refused:
                self.index.use_block_tokens(w.prefill_page_size)
                return


def _free_fraction(worker: Worker) -> float:
    """The share of the worker's decode capacity that is free: KV pages, else slots."""
    load, pages = worker.load, worker.free_pages
    if load is None:
        return 0.0
    if pages is not None:
        return pages / load.total_pages
    return worker.free_slots / max(1, load.total_slots)

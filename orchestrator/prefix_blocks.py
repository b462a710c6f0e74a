"""One prefix block size for the orchestrator: its prefill workers' page size.

A prefill worker's prefix cache keys its pages by the chained hashes of whole page-sized
blocks (shared/kv/prefix_cache.py), so the orchestrator's guess at those caches
(orchestrator/prefix_index.py) must cut prompts at the same boundaries: its block size is
the workers' `--page-size`, read from their load reports, never a setting of its own that
could disagree.

The rule, applied whenever the registry publishes (after each round of health checks, or
an ejection) and when a worker reports a page size other than its last:

* Among the healthy prefill workers that reported a page size, the block size is kept
  while any of them still has it; otherwise (the first reports, or every worker at the old
  size is gone) it becomes the most common size, ties to the smallest.
* A worker whose page size differs is refused from prefix routing (`Worker.prefix_refused`:
  it matches no prefix and nothing is recorded for it; load alone routes to it), logged at
  ERROR once with both sizes and the fix, and counted in
  `pdserve_prefix_routing_refused_workers` while it stays so.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shared.metrics import OrchestratorMetrics

if TYPE_CHECKING:
    from orchestrator.registry import Worker

log = logging.getLogger(__name__)


class BlockSizeAgreement:
    """The prefix block size the prefill workers agree on, and who is refused."""

    def __init__(self, metrics: OrchestratorMetrics) -> None:
        self._metrics = metrics
        self.block_tokens: int | None = None  # None: no prefill worker has reported yet
        self._refused: dict[str, int] = {}  # address -> the page size it was refused for

    def update(self, workers: Sequence[Worker]) -> None:
        """`workers`: the healthy prefill-only workers; sets each one's `prefix_refused`."""
        sized = [w for w in workers if w.prefill_page_size > 0]
        counts = collections.Counter(w.prefill_page_size for w in sized)
        if counts and self.block_tokens not in counts:
            chosen = min(counts, key=lambda size: (-counts[size], size))
            if self.block_tokens is None:
                log.info("prefix routing: blocks of %d tokens (prefill --page-size)", chosen)
            else:
                log.warning(
                    "prefix routing: no healthy prefill worker has --page-size %d any more; "
                    "blocks are now %d tokens (what was learnt of the caches is dropped)",
                    self.block_tokens,
                    chosen,
                )
            self.block_tokens = chosen
        refused: dict[str, int] = {}
        for w in sized:
            w.prefix_refused = w.prefill_page_size != self.block_tokens
            if not w.prefix_refused:
                continue
            refused[w.address] = w.prefill_page_size
            if self._refused.get(w.address) != w.prefill_page_size:
                log.error(
                    "prefill worker %s has --page-size %d, the other prefill workers %d: it "
                    "is left out of prefix routing (routed by load only); run every prefill "
                    "worker with the same --page-size (%d)",
                    w.address,
                    w.prefill_page_size,
                    self.block_tokens,
                    self.block_tokens,
                )
        self._refused = refused
        self._metrics.prefix_refused_workers.set(len(refused))

"""What tests compare against: the single-engine greedy reference, and parsed /metrics
(the harness's own parser, shared/cluster/metrics.py, re-exported for the tests)."""

from __future__ import annotations

from collections.abc import Sequence

from shared.cluster.metrics import metric_samples, scrape
from shared.engine.engine import Engine, Params

__all__ = ["metric_samples", "reference_greedy", "scrape"]


def reference_greedy(engine: Engine, params: Params, prompt: Sequence[int], n: int) -> list[int]:
    """The next `n` greedy tokens by repeated uncached full-sequence forwards
    (shared/engine/reference.py)."""
    return engine.reference.greedy(params, prompt, n)

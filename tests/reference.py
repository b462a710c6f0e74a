"""What tests compare against: the single-engine greedy reference and parsed /metrics."""

from __future__ import annotations

import urllib.request
from collections.abc import Sequence

from prometheus_client.parser import text_string_to_metric_families

from shared.engine.engine import Engine, Params


def reference_greedy(engine: Engine, params: Params, prompt: Sequence[int], n: int) -> list[int]:
    """The next `n` greedy tokens by repeated uncached full-sequence forwards
    (shared/engine/reference.py)."""
    return engine.reference.greedy(params, prompt, n)


def metric_samples(text: str) -> dict[str, float]:
    """Prometheus text, parsed by prometheus_client, as {"name{label=value,...}": value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def scrape(port: int) -> dict[str, float]:
    """GET /metrics on a loopback port, parsed."""
    url = f"http://127.0.0.1:{port}/metrics"
    return metric_samples(urllib.request.urlopen(url, timeout=5).read().decode())

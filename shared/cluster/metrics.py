"""A process's /metrics, read over loopback and parsed: what benches and tests compare."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def metric_samples(text: str) -> dict[str, float]:
    """Prometheus text as {"name{label=value,...}": value} (labels sorted by name)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def metrics_text(port: int, host: str = "127.0.0.1") -> str:
    """GET /metrics on `host:port`."""
    url = f"http://{host}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """GET /metrics on `host:port`, parsed by `metric_samples`."""
    return metric_samples(metrics_text(port, host))

"""Every Prometheus metric of pdserve: names, buckets and labels, in one place.

Each process builds the metric groups it needs on an injected `CollectorRegistry` (never
the global default: tests build many servers in one process). Names start with
`pdserve_` and use base units (seconds, bytes).
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Latency buckets from 1 ms to ~1 min, roughly x2 apart.
SECONDS_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    60.0,
)
# Per-token latencies are short: finer at the low end.
TOKEN_SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
)
BYTES_BUCKETS = tuple(float(2**k) for k in range(10, 34, 2))  # 1 KiB .. 8 GiB
OCCUPANCY_BUCKETS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


class WorkerMetrics:
    """Metrics of a prefill, decode or colocated worker; `role` labels the requests."""

    def __init__(self, registry: CollectorRegistry, role: str) -> None:
        self.role = role
        self.requests = Counter(
            "pdserve_worker_requests",
            "Requests a worker finished, by role and outcome.",
            ["role", "outcome"],
            registry=registry,
        )
        # Prefill side.
        self.prefill_queue_depth = Gauge(
            "pdserve_prefill_queue_depth", "Prefill requests waiting.", registry=registry
        )
        self.prefill_queue_seconds = Histogram(
            "pdserve_prefill_queue_seconds",
            "Time a prefill request waited before the engine took it.",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.prefill_seconds = Histogram(
            "pdserve_prefill_seconds",
            "Prefill compute time, first token included.",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.prefill_tokens_computed = Counter(
            "pdserve_prefill_tokens_computed",
            "Prompt tokens the prefill engine computed (prefix-cache hits excluded).",
            registry=registry,
        )
        self.prefix_cache_tokens = Counter(
            "pdserve_prefix_cache_tokens",
            "Prompt tokens by prefix-cache result: hit (KV reused) or miss (computed).",
            ["result"],
            registry=registry,
        )
        self.prefix_cache_hit_rate = Gauge(
            "pdserve_prefix_cache_hit_rate",
            "Share of prompt tokens served from the prefix cache since start.",
            registry=registry,
        )
        self.prefix_cache_evictions = Counter(
            "pdserve_prefix_cache_evictions", "Cached prefix pages evicted.", registry=registry
        )
        self.prefix_cache_bytes = Gauge(
            "pdserve_prefix_cache_bytes",
            "Bytes of KV pages holding cached prefix blocks (idle or in use).",
            registry=registry,
        )
        self.kv_sent_bytes = Counter(
            "pdserve_kv_sent_bytes", "KV payload bytes sent.", registry=registry
        )
        self.kv_send_seconds = Histogram(
            "pdserve_kv_send_seconds",
            "KV transfer time on the sender, until the receipt.",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        # Decode side.
        self.kv_received_bytes = Counter(
            "pdserve_kv_received_bytes",
            "KV payload bytes received and accepted.",
            registry=registry,
        )
        self.kv_receive_seconds = Histogram(
            "pdserve_kv_receive_seconds",
            "KV transfer time on the receiver, first message to validated prefix.",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.kv_rejections = Counter(
            "pdserve_kv_rejections",
            "KV transfers rejected, by reason.",
            ["reason"],
            registry=registry,
        )
        self.slots = Gauge(
            "pdserve_decode_slots", "Decode slots by state.", ["state"], registry=registry
        )
        self.slot_transitions = Counter(
            "pdserve_decode_slot_transitions",
            "Decode slot state transitions.",
            ["from_state", "to_state"],
            registry=registry,
        )
        self.decode_step_seconds = Histogram(
            "pdserve_decode_step_seconds",
            "Time of one decode step over all slots (insert + generate).",
            buckets=TOKEN_SECONDS_BUCKETS,
            registry=registry,
        )
        self.batch_occupancy = Histogram(
            "pdserve_decode_batch_occupancy",
            "Fraction of slots live in a decode step.",
            buckets=OCCUPANCY_BUCKETS,
            registry=registry,
        )
        self.tokens_generated = Counter(
            "pdserve_tokens_generated", "Tokens generated (streamed).", registry=registry
        )
        self.kv_pages = Gauge(
            "pdserve_kv_pages",
            "KV cache pages of the decode pool by state: free, used, or reserved (promised "
            "to admitted requests whose KV has not arrived).",
            ["state"],
            registry=registry,
        )
        self.kv_pages_total = Gauge(
            "pdserve_kv_pages_total", "KV cache pages in the decode pool.", registry=registry
        )
        self.preemptions = Counter(
            "pdserve_preemptions",
            "Live requests preempted because the KV page pool ran dry (they resume elsewhere).",
            registry=registry,
        )
        self.page_allocation_failures = Counter(
            "pdserve_page_allocation_failures",
            "Times pages were not there: at admission (Reserve refused), or for a growing "
            "request (a preemption followed).",
            ["stage"],
            registry=registry,
        )
        for stage in ("admission", "growth"):
            self.page_allocation_failures.labels(stage)

    def finished(self, outcome: str) -> None:
        self.requests.labels(self.role, outcome).inc()


class MetricsServer:
    """`/metrics` over HTTP for one registry; `port` 0 picks a free port."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> None:
        server, thread = start_http_server(port, addr=host, registry=registry)
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.port: int = server.server_port

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class OrchestratorMetrics:
    """Metrics of the orchestrator: what frontends see."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ttft_seconds = Histogram(
            "pdserve_time_to_first_token_seconds",
            "From the request's arrival to its first token.",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.tpot_seconds = Histogram(
            "pdserve_time_per_output_token_seconds",
            "Mean time per generated token after the first, per request.",
            buckets=TOKEN_SECONDS_BUCKETS,
            registry=registry,
        )
        self.e2e_seconds = Histogram(
            "pdserve_e2e_request_latency_seconds",
            "From the request's arrival to its last response.",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "pdserve_request_queue_seconds",
            "Time a request waited in the admission queue for a decode slot.",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "pdserve_requests",
            "Finished Generate calls by finish reason and gRPC status code.",
            ["finish_reason", "code"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "pdserve_prompt_tokens", "Prompt tokens of admitted requests.", registry=registry
        )
        self.generated_tokens = Counter(
            "pdserve_generation_tokens", "Tokens streamed to frontends.", registry=registry
        )
        self.queue_depth = Gauge(
            "pdserve_queue_depth", "Requests waiting for a decode slot.", registry=registry
        )
        self.workers_up = Gauge(
            "pdserve_workers_up", "Healthy workers by role.", ["role"], registry=registry
        )
        self.decode_slots_in_use = Gauge(
            "pdserve_decode_slots_in_use",
            "Decode slots held, summed over healthy decode workers (last load reports).",
            registry=registry,
        )
        self.decode_slots_total = Gauge(
            "pdserve_decode_slots_total",
            "Decode slots of healthy decode workers.",
            registry=registry,
        )
        self.decode_pages_free = Gauge(
            "pdserve_decode_kv_pages_free",
            "Free KV pages, summed over healthy decode workers (last load reports).",
            registry=registry,
        )
        self.decode_pages_total = Gauge(
            "pdserve_decode_kv_pages_total",
            "KV pages of healthy decode workers.",
            registry=registry,
        )
        self.slow_consumers = Counter(
            "pdserve_slow_consumer_cancels",
            "Streams cancelled because their client left too many tokens unsent "
            "(--max-unsent-tokens).",
            registry=registry,
        )
        self.http_requests = Counter(
            "pdserve_http_requests",
            "Requests to the OpenAI-compatible HTTP API by path and HTTP status.",
            ["path", "status"],
            registry=registry,
        )
        self.retries = Counter(
            "pdserve_retries",
            "Work moved to another worker after a failure, by stage.",
            ["stage"],
            registry=registry,
        )
        self.prefill_routing = Counter(
            "pdserve_prefill_routing",
            "Prefill workers chosen, by why (--prefill-routing): affinity (the longest "
            "predicted cached prefix won), load (a longer one was passed over for its queue), "
            "none (no worker holds any of the prompt, or least-loaded routing).",
            ["outcome"],
            registry=registry,
        )
        self.prefix_predicted_tokens = Counter(
            "pdserve_prefix_predicted_tokens",
            "Prompt tokens the orchestrator expected the chosen prefill workers to serve "
            "from their prefix caches.",
            registry=registry,
        )
        self.prefix_cached_tokens = Counter(
            "pdserve_prefix_cached_tokens",
            "Prompt tokens prefill workers reported serving from their prefix caches.",
            registry=registry,
        )
        self.prefix_refused_workers = Gauge(
            "pdserve_prefix_routing_refused_workers",
            "Healthy prefill workers left out of prefix routing (routed by load only) "
            "because their --page-size differs from the other prefill workers'.",
            registry=registry,
        )
        for role in ("prefill", "decode"):
            self.workers_up.labels(role).set(0)
        for stage in ("prefill", "decode_resume", "preempted"):
            self.retries.labels(stage)
        for outcome in ("affinity", "load", "none"):
            self.prefill_routing.labels(outcome)

"""What bench/prefix_bench.py and bench/packing_bench.py share: a local process cluster
(orchestrator + one prefill + one decode worker, loopback gRPC) with per-role flags, the
prefill worker's counters read from its /metrics, one timed stream, and the machine's load.

The cluster is shared/cluster's `Cluster` (each process dies with this one); /metrics is
read with `Cluster.metrics`;
percentiles are `shared.client.loadgen.report.latency_stats_ms` (p50/p90/p99/mean, ms).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # inherited by every child process

from shared.client.generator import AsyncGeneratorClient, GenerateError  # noqa: E402
from shared.client.loadgen.report import latency_stats_ms  # noqa: E402
from shared.cluster.cluster import Cluster, ClusterSpec  # noqa: E402
from shared.serving.flags import for_role  # noqa: E402

# The prefill worker's counters the benches difference (before/after a measured run).
PREFILL_COUNTERS = {
    "tokens_computed": "pdserve_prefill_tokens_computed_total{}",
    "cache_hit_tokens": "pdserve_prefix_cache_tokens_total{result=hit}",
    "cache_miss_tokens": "pdserve_prefix_cache_tokens_total{result=miss}",
    "cache_evictions": "pdserve_prefix_cache_evictions_total{}",
    "prefill_seconds_sum": "pdserve_prefill_seconds_sum{}",
    "prefill_seconds_count": "pdserve_prefill_seconds_count{}",
}
PREFILL_GAUGES = {
    "cache_hit_rate": "pdserve_prefix_cache_hit_rate{}",
    "cache_bytes": "pdserve_prefix_cache_bytes{}",
}

__all__ = [
    "git_state",
    "latency_stats_ms",
    "machine",
    "prefill_delta",
    "prefill_metrics",
    "start_cluster",
    "stream_once",
]

# Vocabulary sizes of the presets the benches prompt (random token ids below them).
VOCAB = {"small": 32000, "tiny": 320}


def start_cluster(
    prefill_flags: Sequence[str],
    decode_flags: Sequence[str],
    model: str,
    timeout_s: float = 600.0,
) -> Cluster:
    """One prefill and one decode worker (loading and compiling in parallel), each with
    the flags of its list that its role reads, then the orchestrator for `model`; stopped
    on leaving its `with`."""
    spec = ClusterSpec(
        role_flags={
            "prefill": for_role("prefill", prefill_flags),
            "decode": for_role("decode", decode_flags),
        },
        orchestrator_flags=("--model", model),
        startup_timeout_s=timeout_s,
    )
    return Cluster.start(spec)


def prefill_metrics(cluster: Cluster) -> dict[str, float]:
    """The prefill worker's counters and gauges the benches report."""
    samples = cluster.metrics("prefill-0")
    names = PREFILL_COUNTERS | PREFILL_GAUGES
    return {key: samples.get(name, 0.0) for key, name in names.items()}


def prefill_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Counters differenced over a run; gauges as they were at its end."""
    out = {key: after[key] - before[key] for key in PREFILL_COUNTERS}
    out.update({key: after[key] for key in PREFILL_GAUGES})
    return out


@dataclasses.dataclass(slots=True)
class Stream:
    """One request as the client saw it; times in seconds of time.perf_counter()."""

    sent: float
    first: float | None = None
    end: float = 0.0
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish: str | None = None
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.sent


async def stream_once(
    client: AsyncGeneratorClient,
    prompt: Sequence[int],
    max_tokens: int,
    timeout_s: float,
    ignore_eos: bool = True,
) -> Stream:
    """Send one greedy request and read its whole stream (the answered token ids kept)."""
    s = Stream(time.perf_counter())
    try:
        async for chunk in client.generate(
            list(prompt), max_tokens=max_tokens, ignore_eos=ignore_eos, timeout=timeout_s
        ):
            if chunk.token_ids and s.first is None:
                s.first = time.perf_counter()
            s.tokens += chunk.token_ids
            if chunk.finish_reason:
                s.finish = chunk.finish_reason
        if s.finish not in ("length", "stop"):
            s.error = f"FINISH_{(s.finish or 'none').upper()}"
    except GenerateError as err:
        s.error = f"{err.code}: {err.message}"
    s.end = time.perf_counter()
    return s


def machine() -> dict:
    """The shared machine's state right now: load averages, cores, `uptime`'s line."""
    try:
        line = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        line = ""
    return {
        "loadavg_1_5_15": list(os.getloadavg()),
        "uptime": line.strip(),
        "cpus": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "unix_time": time.time(),
    }


def git_state() -> dict:
    """The commit the processes ran, and whether tracked files differed from it."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git("status", "--short", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "tracked_files_modified": dirty.splitlines()}

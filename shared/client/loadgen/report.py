"""Request records -> the numbers a benchmark reports.

* TTFT: send -> first output token. TPOT: mean gap between output tokens after the first,
  per request. E2E: send -> end. Percentiles are over successful requests only, with
  NumPy's linear interpolation (p50 of [1, 2, 3, 4] is 2.5).
* Throughput divides by the run's duration (t=0 to the end of the last request), so a
  run that leaves work queued at the end is charged for draining it.
* Goodput: successful requests per second whose TTFT <= the TTFT SLO and whose TPOT <=
  the TPOT SLO (a request with one token has no TPOT and meets that SLO); an SLO that is
  not given is not checked.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from shared.client.loadgen.runner import RequestRecord

PERCENTILES = (50, 90, 99)


@dataclasses.dataclass(slots=True, frozen=True)
class Slo:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met_by(self, record: RequestRecord) -> bool:
        if not record.ok:
            return False
        if self.ttft_ms is not None and (
            record.ttft_s is None or record.ttft_s * 1e3 > self.ttft_ms
        ):
            return False
        tpot = record.tpot_s
        return self.tpot_ms is None or tpot is None or tpot * 1e3 <= self.tpot_ms


def latency_stats_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """{"p50", "p90", "p99", "mean"} in milliseconds; all None when there are no values."""
    if not values_s:
        return {f"p{q}": None for q in PERCENTILES} | {"mean": None}
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    stats: dict[str, float | None] = {
        f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(ms, PERCENTILES), strict=True)
    }
    stats["mean"] = float(ms.mean())
    return stats


def build_report(records: Sequence[RequestRecord], duration_s: float, slo: Slo) -> dict:
    """The JSON-ready report of one run."""
    ok = [r for r in records if r.ok]
    errors = collections.Counter(r.error for r in records if not r.ok)
    good = sum(1 for r in records if slo.met_by(r))
    output_tokens = sum(r.output_tokens for r in ok)
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    return {
        "num_requests": len(records),
        "completed": len(ok),
        "errors": dict(sorted(errors.items())),
        # One message per code, so a failed run says why without the per-request rows.
        "error_examples": {r.error: r.error_message for r in records if not r.ok},
        "duration_s": duration_s,
        "output_tokens": output_tokens,
        "ttft_ms": latency_stats_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": latency_stats_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "e2e_ms": latency_stats_ms([r.e2e_s for r in ok]),
        "request_throughput": per_s(len(ok)),
        "output_token_throughput": per_s(output_tokens),
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "good_requests": good,
        "goodput": per_s(good),
    }


def records_json(records: Sequence[RequestRecord]) -> list[dict]:
    """Per-request rows for the JSON file (enough to redraw every plot)."""
    return [
        {
            "index": r.index,
            "start_s": r.start_s,
            "prompt_len": r.prompt_len,
            "output_len": r.output_len,
            "output_tokens": r.output_tokens,
            "ttft_ms": None if r.ttft_s is None else r.ttft_s * 1e3,
            "tpot_ms": None if r.tpot_s is None else r.tpot_s * 1e3,
            "e2e_ms": r.e2e_s * 1e3,
            "error": r.error,
            "error_message": r.error_message,
            "finish_reason": r.finish_reason,
        }
        for r in records
    ]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(report: dict) -> str:
    """A plain-text summary for the terminal."""
    lines = [f"{'metric':<12}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}"]
    for key, name in (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("e2e_ms", "E2E ms")):
        s = report[key]
        lines.append(
            f"{name:<12}{_fmt(s['p50']):>10}{_fmt(s['p90']):>10}{_fmt(s['p99']):>10}"
            f"{_fmt(s['mean']):>10}"
        )
    slo = report["slo"]
    lines += [
        f"requests: {report['completed']}/{report['num_requests']} ok in "
        f"{report['duration_s']:.2f}s; errors: {report['errors'] or 'none'}",
        *(f"  {code}: {message}" for code, message in report["error_examples"].items()),
        f"throughput: {report['request_throughput']:.2f} req/s, "
        f"{report['output_token_throughput']:.1f} output tok/s",
        f"goodput: {report['goodput']:.2f} req/s ({report['good_requests']} requests within "
        f"TTFT<={_fmt(slo['ttft_ms'])} ms, TPOT<={_fmt(slo['tpot_ms'])} ms)",
    ]
    return "\n".join(lines)

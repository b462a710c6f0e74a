"""Soak: the `tiny` cluster under 1,000 concurrent streams for 10 minutes; nothing leaks.

    python bench/soak.py --out FILE.json [--duration-s 600] [--concurrency 1000] [--seed 0]

1. One prefill and one decode worker process (the `tiny` preset, 64 decode slots) and an
   orchestrator on loopback (plaintext: bench/chaos.py runs the TLS cluster).
2. `--concurrency` streams at all times, over 32 client connections, a seeded mix:
   prompts of 1-40 tokens and 1-64 tokens to generate; 15 % cancelled by their client
   after a few tokens; 10 % with a `timeout_seconds` shorter than their generation (they
   end FINISH_REASON_DEADLINE); 5 % with a gRPC deadline that may pass first
   (DEADLINE_EXCEEDED, expected for those only); the rest run to their length.
3. RSS of every process at the start (workers serving, before any load), after a warm-up
   (a fifth of the run, at most 60 s) and at the end; then what the decode worker (slots,
   leases, KV pages used or promised) and the orchestrator still hold once the load
   stopped.

Report (JSON): completed, errors_by_status, unexplained_errors (every error but the
DEADLINE_EXCEEDED of the requests given a gRPC deadline), p99 TTFT/TPOT (client side),
RSS at start, warm-up and end per process, rss_growth_fraction (the largest growth from
warm-up to the end: the pass mark; from the start too, for information), leaked slots,
leases and pages. Pass (exit 0): no unexplained error, nothing leaked, RSS growth after
warm-up under 10 %. Bounded by --duration-s; loopback only. The README's "Reliability"
section records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.reliability import (
    Outcome,
    client_pool,
    fault_cluster,
    load_average,
    percentile,
    run_stream,
)
from shared.cluster.accounting import held, leaks
from shared.cluster.faults import FaultCluster

WORKER_FLAGS = ("--slots", "64", "--prefill-buckets", "16,32,64", "--max-seq-len", "128")
ORCHESTRATOR_FLAGS = ("--max-queue", "4096", "--max-concurrency", "4096")
CONNECTIONS = 32


def draw(rng: random.Random, index: int) -> tuple[Outcome, dict]:
    """One request of the mix and how its client behaves."""
    prompt = (256, *(rng.randrange(256) for _ in range(rng.randint(1, 40))))
    outcome = Outcome(index, prompt, rng.randint(1, 64))
    kind = rng.random()
    if kind < 0.15:
        outcome.intent = "cancel"
        return outcome, {"cancel_after": rng.randint(1, 4)}
    if kind < 0.25:
        outcome.intent = "deadline"
        return outcome, {"timeout_seconds": rng.uniform(0.01, 0.5)}
    if kind < 0.30:
        outcome.intent = "call_deadline"
        return outcome, {"timeout_s": rng.uniform(0.5, 5.0)}
    return outcome, {}


async def soak(cluster: FaultCluster, duration_s: float, concurrency: int, seed: int) -> dict:
    rng = random.Random(seed)
    clients = client_pool(cluster.target, CONNECTIONS)
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    rss_start = cluster.rss()  # serving, compiled, no request yet

    async def lane(lane_id: int) -> None:
        client = clients[lane_id % CONNECTIONS]
        while not stop.is_set():
            outcome, behaviour = draw(rng, len(outcomes))
            outcomes.append(outcome)
            await run_stream(client, outcome, ignore_eos=rng.random() < 0.5, **behaviour)

    lanes = [asyncio.create_task(lane(i)) for i in range(concurrency)]
    warm_up = min(60.0, duration_s / 5)
    await asyncio.sleep(warm_up)
    rss_warm = cluster.rss()
    await asyncio.sleep(max(0.0, duration_s - warm_up))
    stop.set()
    await asyncio.gather(*lanes)
    for client in clients:
        await client.close()
    rss_end = cluster.rss()
    leaked = await asyncio.to_thread(leaks, cluster)
    return summarize(outcomes, rss_start, rss_warm, rss_end, leaked, warm_up)


def growth(before: dict, after: dict) -> dict[str, float]:
    return {
        name: (after[name] - before[name]) / before[name]
        for name in before
        if before[name] and after.get(name)
    }


def summarize(
    outcomes: list[Outcome],
    rss_start: dict,
    rss_warm: dict,
    rss_end: dict,
    leaked: dict,
    warm_up: float,
) -> dict:
    # Finished by the server (stop, length, or the request's own deadline); a stream its
    # client cancelled is counted apart.
    completed = [
        o for o in outcomes if o.code is None and o.finish in ("stop", "length", "deadline")
    ]
    cancelled = sum(o.finish == "client_cancelled" for o in outcomes)
    errors = Counter(o.code for o in outcomes if o.code is not None)
    explained = sum(o.code == "DEADLINE_EXCEEDED" and o.intent == "call_deadline" for o in outcomes)
    after_warm_up, from_start = growth(rss_warm, rss_end), growth(rss_start, rss_end)
    finishes = Counter(o.finish for o in completed)
    samples = sorted({f"{o.intent} {o.code}: {o.message}" for o in outcomes if o.code})
    return {
        "requests": len(outcomes),
        "completed": len(completed),
        "completed_by_finish": dict(finishes),
        "cancelled_by_client": cancelled,
        "errors_by_status": dict(errors),
        "unexplained_errors": sum(errors.values()) - explained,
        "error_samples": samples[:10],
        "generated_tokens": sum(len(o.tokens) for o in outcomes),
        "ttft_p50_s": percentile([o.ttft_s for o in completed if o.ttft_s is not None], 50),
        "ttft_p99_s": percentile([o.ttft_s for o in completed if o.ttft_s is not None], 99),
        "tpot_p50_s": percentile([o.tpot_s for o in completed if o.tpot_s is not None], 50),
        "tpot_p99_s": percentile([o.tpot_s for o in completed if o.tpot_s is not None], 99),
        "warm_up_s": warm_up,
        "rss_bytes_start": rss_start,
        "rss_bytes_warm": rss_warm,
        "rss_bytes_end": rss_end,
        "rss_growth_by_process": {k: round(v, 4) for k, v in after_warm_up.items()},
        "rss_growth_fraction": max(after_warm_up.values()) if after_warm_up else None,
        "rss_growth_from_start_by_process": {k: round(v, 4) for k, v in from_start.items()},
        "leaked": leaked,
        "leaks": held(leaked),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--concurrency", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    load_before = load_average()
    started = time.time()
    with fault_cluster(1, 1, WORKER_FLAGS, ORCHESTRATOR_FLAGS) as run:
        result = asyncio.run(soak(run.cluster, args.duration_s, args.concurrency, args.seed))
    result = {
        "command": " ".join(["python", "bench/soak.py", *(argv or sys.argv[1:])]),
        "concurrency": args.concurrency,
        "duration_s": round(time.time() - started, 1),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        **result,
    }
    rss_growth = result["rss_growth_fraction"]
    result["passed"] = bool(
        not result["unexplained_errors"]
        and not result["leaks"]
        and rss_growth is not None
        and rss_growth < 0.10
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    keys = (
        "requests",
        "completed",
        "errors_by_status",
        "unexplained_errors",
        "ttft_p99_s",
        "tpot_p99_s",
        "rss_growth_fraction",
        "leaked",
        "leaks",
        "passed",
    )
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

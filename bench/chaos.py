"""Chaos: workers killed and frozen under steady load; nothing lost, nothing wrong.

    python bench/chaos.py --out FILE.json [--duration-s 600] [--concurrency 48] [--seed 0]
    python bench/chaos.py --out FILE.json --rolling-upgrade   # SIGTERM drain + start, each worker

1. Two prefill and two decode worker processes (the `tiny` preset) and an orchestrator on
   loopback, with mTLS between them and TLS on the public port (unless --plaintext).
2. `--concurrency` greedy streams at all times, each from a fixed set of prompts whose
   single-engine reference this process computes first.
3. Faults: every 15-30 s (seeded) one random worker is SIGKILLed and started again at its
   address, or SIGSTOPped for 2-5 s and continued; the next fault waits until the
   orchestrator has re-admitted it. With --rolling-upgrade instead: each worker in turn is
   sent SIGTERM (it drains), started again once it exited, and re-admitted.
4. Report (JSON): every stream either completed with exactly its reference tokens or ended
   with a status; `mismatched_streams` counts completed streams whose tokens differ;
   `unexplained_errors` counts every error except UNAVAILABLE while no worker of a role
   was available; `leaked` what decode workers (slots, leases, KV pages used or promised)
   and the orchestrator still hold at the end, `leaks` the nonzero ones;
   `rss_growth_fraction` over the processes that ran the whole time. Pass (exit 0): no
   mismatched stream, no unexplained error, nothing leaked.

Bounded: the run stops after --duration-s (or --max-streams), faults included. Loopback
only. The README's "Reliability" section records the figures of a run.
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
    Run,
    client_pool,
    fault_cluster,
    greedy_references,
    load_average,
    percentile,
    run_stream,
)
from shared.cluster.accounting import held, leaks
from shared.cluster.faults import FaultCluster

WORKER_FLAGS = (
    "--slots",
    "8",
    "--prefill-buckets",
    "8,16,32",
    "--max-seq-len",
    "64",
    "--drain-grace-s",
    "30",
)
MAX_TOKENS = 40


def prompts(count: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [
        tuple([256, *(rng.randrange(256) for _ in range(rng.randint(1, 15)))]) for _ in range(count)
    ]


class Timeline:
    """When each role had how many workers available (alive and not frozen)."""

    def __init__(self, cluster: FaultCluster) -> None:
        self._cluster = cluster
        self.points: list[tuple[float, dict[str, int]]] = []
        self.mark()

    def mark(self) -> None:
        counts = {role: self._cluster.available(role) for role in ("prefill", "decode")}
        self.points.append((time.perf_counter(), counts))

    def none_left(self, start: float, end: float) -> bool:
        """Whether some role had no worker available at some time in [start, end]."""
        state = self.points[0][1]
        for when, counts in self.points:
            if when <= start:
                state = counts
            elif when <= end and min(counts.values()) == 0:
                return True
        return min(state.values()) == 0


async def steady_load(
    run: Run,
    work: Sequence[tuple[int, ...]],
    concurrency: int,
    stop: asyncio.Event,
    max_streams: int | None,
    outcomes: list[Outcome],
) -> list[Outcome]:
    """`concurrency` streams at all times until `stop` (or `max_streams` started)."""
    clients = client_pool(run.cluster.target, max(1, concurrency // 32), run.client_tls())

    async def lane(lane_id: int) -> None:
        client = clients[lane_id % len(clients)]
        while not stop.is_set() and (max_streams is None or len(outcomes) < max_streams):
            outcome = Outcome(len(outcomes), work[len(outcomes) % len(work)], MAX_TOKENS)
            outcomes.append(outcome)
            await run_stream(client, outcome, ignore_eos=True)

    try:
        await asyncio.gather(*(lane(i) for i in range(concurrency)))
    finally:
        for client in clients:
            await client.close()
    return outcomes


async def fault_loop(
    cluster: FaultCluster,
    timeline: Timeline,
    stop: asyncio.Event,
    rng: random.Random,
    log: list[dict],
) -> None:
    """Every 15-30 s, a kill (then a restart) or a freeze of one random worker."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(15, 30))
            return
        except TimeoutError:
            pass
        name = rng.choice(sorted(cluster.workers))
        action = rng.choice(["kill", "stop"])
        at = time.perf_counter() - timeline.points[0][0]
        entry = {"worker": name, "action": action, "at_s": round(at, 1)}
        if action == "kill":
            await asyncio.to_thread(cluster.kill, name)
            timeline.mark()
            started = time.perf_counter()
            await asyncio.to_thread(cluster.restart, name)  # returns once re-admitted
            entry["readmitted_after_s"] = round(time.perf_counter() - started, 1)
        else:
            pause = rng.uniform(2, 5)
            cluster.freeze(name)
            timeline.mark()
            await asyncio.sleep(pause)
            cluster.thaw(name)
            entry["stopped_s"] = round(pause, 1)
            await asyncio.to_thread(cluster.wait_admitted)
        timeline.mark()
        entry["readmitted"] = True
        log.append(entry)


async def rolling_upgrade(cluster: FaultCluster, timeline: Timeline, log: list[dict]) -> None:
    """Every worker in turn: SIGTERM, wait for its drain and exit, start, re-admit."""
    await asyncio.sleep(5)  # the load is up
    for name in sorted(cluster.workers):
        started = time.perf_counter()
        await asyncio.to_thread(cluster.drain_restart, name)
        timeline.mark()
        log.append(
            {
                "worker": name,
                "action": "drain_restart",
                "readmitted_after_s": round(time.perf_counter() - started, 1),
            }
        )


def report(
    outcomes: list[Outcome],
    refs: dict,
    timeline: Timeline,
    faults: list[dict],
    leaked: dict,
    rss_start: dict,
    rss_end: dict,
    restarted: set[str],
) -> dict:
    completed = [o for o in outcomes if o.finish is not None and o.code is None]
    mismatched = [o.index for o in completed if o.tokens != refs[o.prompt][: o.max_tokens]]
    errors = Counter(o.code for o in outcomes if o.code is not None)
    explained = [
        o for o in outcomes if o.code == "UNAVAILABLE" and timeline.none_left(o.started, o.ended)
    ]
    growth = {
        name: (rss_end[name] - rss_start[name]) / rss_start[name]
        for name in rss_start
        if name not in restarted and rss_start[name] and rss_end.get(name)
    }
    return {
        "streams": len(outcomes),
        "completed": len(completed),
        "mismatched_streams": len(mismatched),
        "mismatched_indices": mismatched[:20],
        "errors_by_status": dict(errors),
        "unexplained_errors": sum(errors.values()) - len(explained),
        "error_samples": sorted({f"{o.code}: {o.message}" for o in outcomes if o.code})[:10],
        "kills": sum(f["action"] == "kill" for f in faults),
        "stops": sum(f["action"] == "stop" for f in faults),
        "drain_restarts": sum(f["action"] == "drain_restart" for f in faults),
        "readmitted": sum(bool(f.get("readmitted") or f.get("readmitted_after_s")) for f in faults),
        "faults": faults,
        "leaked": leaked,
        "leaks": held(leaked),
        "rss_bytes_start": rss_start,
        "rss_bytes_end": rss_end,
        "rss_growth_fraction": max(growth.values()) if growth else None,
        "rss_growth_by_process": {k: round(v, 4) for k, v in growth.items()},
        "ttft_p99_s": percentile([o.ttft_s for o in completed if o.ttft_s is not None], 99),
        "tpot_p99_s": percentile([o.tpot_s for o in completed if o.tpot_s is not None], 99),
    }


async def run(
    run: Run,
    *,
    duration_s: float,
    concurrency: int,
    seed: int,
    rolling: bool = False,
    max_streams: int | None = None,
) -> dict:
    """The whole run against a started cluster; the report (see the module docstring)."""
    cluster = run.cluster
    work = prompts(32, seed)
    refs = await asyncio.to_thread(greedy_references, work, MAX_TOKENS, WORKER_FLAGS)
    timeline = Timeline(cluster)
    faults: list[dict] = []
    stop = asyncio.Event()
    outcomes: list[Outcome] = []
    load = asyncio.create_task(steady_load(run, work, concurrency, stop, max_streams, outcomes))
    rss_start = cluster.rss()
    if rolling:
        chaos = asyncio.create_task(rolling_upgrade(cluster, timeline, faults))
    else:
        rng = random.Random(seed)
        chaos = asyncio.create_task(fault_loop(cluster, timeline, stop, rng, faults))
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline and not load.done() and not (rolling and chaos.done()):
        await asyncio.sleep(0.2)
    stop.set()
    await chaos
    await load
    restarted = {f["worker"] for f in faults if f["action"] != "stop"}
    rss_end = cluster.rss()
    leaked = await asyncio.to_thread(leaks, cluster, run.worker_transport())
    result = report(outcomes, refs, timeline, faults, leaked, rss_start, rss_end, restarted)
    samples = cluster.metrics()
    result["orchestrator_retries"] = {
        stage: int(samples.get(f"pdserve_retries_total{{stage={stage}}}", 0))
        for stage in ("prefill", "decode_resume")
    }
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--max-streams", type=int, help="stop after this many streams too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rolling-upgrade", action="store_true")
    p.add_argument("--plaintext", action="store_true", help="no TLS/mTLS")
    return p


# The report's lines printed at the end (the whole report goes to --out).
SUMMARY_KEYS = (
    "streams",
    "completed",
    "mismatched_streams",
    "errors_by_status",
    "unexplained_errors",
    "kills",
    "stops",
    "drain_restarts",
    "readmitted",
    "leaked",
    "leaks",
    "rss_growth_fraction",
    "passed",
)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_before = load_average()
    started = time.time()
    tls = "none" if args.plaintext else "all"
    with fault_cluster(2, 2, WORKER_FLAGS, ("--max-queue", "1024"), tls=tls) as cluster_run:
        result = asyncio.run(
            run(
                cluster_run,
                duration_s=args.duration_s,
                concurrency=args.concurrency,
                seed=args.seed,
                rolling=args.rolling_upgrade,
                max_streams=args.max_streams,
            )
        )
    result = {
        "command": " ".join(["python", "bench/chaos.py", *(argv or sys.argv[1:])]),
        "mode": "rolling_upgrade" if args.rolling_upgrade else "faults",
        "tls": not args.plaintext,
        "duration_s": round(time.time() - started, 1),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        **result,
    }
    result["passed"] = not (
        result["mismatched_streams"] or result["unexplained_errors"] or result["leaks"]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in SUMMARY_KEYS}, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

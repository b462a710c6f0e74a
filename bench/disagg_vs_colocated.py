"""Disaggregated vs colocated serving on the same cores, same workload, in one run.

    python bench/disagg_vs_colocated.py --out FILE.json [--model tiny|small] [--rate 8]

1. Disaggregated: one prefill worker process pinned to core 0, one decode worker process
   pinned to core 1, and an orchestrator in front (unpinned).
2. Colocated: one colocated worker process pinned to cores 0-1, and an orchestrator.
3. The same seeded open-loop workload (`shared.client.loadgen`: Poisson arrivals, fixed prompt
   and output lengths, ignore_eos) runs against each after a few warm-up requests; the
   table and the ratios (disaggregated / colocated) are printed and written as JSON.

Pinning: a child inherits the CPU affinity of the thread that forks it, so each worker is
launched (shared/cluster's `ClusterSpec.cpus`) while this thread is pinned to the worker's
cores, and the mask is restored right after; the child's mask is read back and recorded.
XLA's CPU thread pool sizes itself from the cores a process may use, so a worker pinned
to one core computes with one thread, and the colocated worker with two. The
orchestrator and this load generator are unpinned in both runs and share the same cores
with the workers: on a two-core machine nothing else is left to give them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # inherited by every child process

from shared.client.loadgen.cli import run_with_progress
from shared.client.loadgen.report import Slo, build_report, format_table
from shared.client.loadgen.runner import RunConfig
from shared.cluster.cluster import Cluster, ClusterSpec

# (report section, key, label) of each ratio, disaggregated / colocated.
RATIOS = (
    ("ttft_ms", "p50", "TTFT p50"),
    ("ttft_ms", "p99", "TTFT p99"),
    ("tpot_ms", "p50", "TPOT p50"),
    ("tpot_ms", "p99", "TPOT p99"),
    ("e2e_ms", "p50", "E2E p50"),
    ("e2e_ms", "p99", "E2E p99"),
    (None, "output_token_throughput", "output tok/s"),
    (None, "goodput", "goodput req/s"),
)


def start_cluster(
    workers: Sequence[tuple[str, set[int]]], engine_flags: Sequence[str], args: argparse.Namespace
) -> tuple[Cluster, dict[str, list[int]]]:
    """Workers (role, cores) and an orchestrator; the cluster and each process's CPU mask
    as read back from the kernel."""
    counts = {role: sum(r == role for r, _ in workers) for role in ("prefill", "decode")}
    counts["colocated"] = sum(r == "colocated" for r, _ in workers)
    spec = ClusterSpec(
        **counts,
        worker_flags=engine_flags,
        orchestrator_flags=("--model", args.model),
        cpus={f"{role}-0": cores for role, cores in workers},
        startup_timeout_s=args.startup_timeout_s,
    )
    cluster = Cluster.start(spec)
    masks = {c.name: sorted(os.sched_getaffinity(c.proc.pid)) for c in cluster.children()}
    return cluster, masks


def measure(
    name: str,
    workers: Sequence[tuple[str, set[int]]],
    engine_flags: Sequence[str],
    args: argparse.Namespace,
) -> dict:
    # The machine is shared: the 1-minute load average before each run says how quiet it was.
    loadavg = os.getloadavg()[0]
    cluster, masks = start_cluster(workers, engine_flags, args)
    with cluster:
        target = cluster.target
        if args.warmup:
            warm = RunConfig(target, concurrency=2, num_requests=args.warmup, seed=args.seed + 1)
            run_with_progress(warm, args, f"{name} warm-up")
        config = RunConfig(target, rate=args.rate, num_requests=args.num_requests, seed=args.seed)
        result = run_with_progress(config, args, name)
    report = build_report(
        result.records, result.duration_s, Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    )
    report["cpu_affinity"] = masks
    report["loadavg_1m_before"] = loadavg
    print(f"\n{name}\n{format_table(report)}", flush=True)
    return report


def ratios(disagg: dict, coloc: dict) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for section, key, label in RATIOS:
        a = disagg[section][key] if section else disagg[key]
        b = coloc[section][key] if section else coloc[key]
        out[label] = a / b if a is not None and b else None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="tiny", help="tiny (default) or small")
    p.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second")
    p.add_argument("--num-requests", type=int, default=40)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests first")
    p.add_argument("--slo-ttft-ms", type=float, default=250.0)
    p.add_argument("--slo-tpot-ms", type=float, default=10.0)
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        print("needs cores 0 and 1", file=sys.stderr)
        return 2
    # The knobs `run_with_progress` reads, as `pdserve bench` would have them.
    args.workload_file, args.vocab_max = None, 255 if args.model == "tiny" else 31999
    args.prompt_len, args.output_len = str(args.prompt_len), str(args.output_len)
    max_seq_len = int(args.prompt_len) + int(args.output_len) + 1
    engine_flags = ["--model", args.model, "--slots", str(args.slots)]
    engine_flags += ["--prefill-buckets", args.prompt_len, "--max-seq-len", str(max_seq_len)]
    disagg = measure("disaggregated", [("prefill", {0}), ("decode", {1})], engine_flags, args)
    coloc = measure("colocated", [("colocated", {0, 1})], engine_flags, args)
    result = {
        "workload": {
            "model": args.model,
            "rate": args.rate,
            "num_requests": args.num_requests,
            "prompt_len": int(args.prompt_len),
            "output_len": int(args.output_len),
            "slots": args.slots,
            "seed": args.seed,
            "warmup": args.warmup,
        },
        "disaggregated": disagg,
        "colocated": coloc,
        "ratios": ratios(disagg, coloc),
    }
    print("\ndisaggregated / colocated")
    for label, value in result["ratios"].items():
        print(f"  {label:<16}{'-' if value is None else f'{value:.2f}':>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The OpenAI-compatible HTTP API against the gRPC Generate API: same cluster, same load.

    python bench/openai_vs_grpc.py --out bench/results/openai_vs_grpc.json [--concurrency 32]

1. One tiny cluster: a prefill and a decode worker process (`--slots` = the concurrency,
   so no request queues for a slot) and an orchestrator serving both front doors
   (`--http-port 0`).
2. The same seeded closed-loop workload (`shared.client.loadgen`: N users, fixed prompt and
   output lengths, ignore_eos, greedy) runs through gRPC and through `/v1/completions`
   (SSE), alternating `--rounds` times after a warm-up of each, so that drift in this
   shared machine's load hits both alike.
3. Per API: the median over rounds of output-token throughput and TTFT p50/p99; then
   openai / grpc throughput (goal >= 0.95) and TTFT p50 openai - grpc (goal <= +2 ms).

`--kv-pages N` gives the decode worker a larger KV page pool than its slots need. Without
it, a closed loop at concurrency = slots is paced by admission: the orchestrator credits
the pages of a finished request back only at the decode worker's next load report (every
`--health-interval-s`, 2 s), so TTFT measures that wait and hides the front door's own
cost; with a pool a few times larger, the next request fits the page estimate at once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from shared.client.loadgen.cli import run_with_progress
from shared.client.loadgen.report import Slo, build_report
from shared.client.loadgen.runner import RunConfig
from shared.cluster.cluster import Cluster, ClusterSpec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--num-requests", type=int, default=320)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kv-pages",
        type=int,
        default=None,
        help="the decode worker's KV page pool (default: what its slots need)",
    )
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    p.add_argument("--no-progress", action="store_true")
    return p


def cluster_spec(args: argparse.Namespace) -> ClusterSpec:
    """The tiny cluster: `--slots` = the concurrency, both front doors on the orchestrator."""
    max_seq_len = int(args.prompt_len) + int(args.output_len) + 1
    engine = ["--model", "tiny", "--slots", str(args.concurrency)]
    engine += ["--prefill-buckets", args.prompt_len, "--max-seq-len", str(max_seq_len)]
    pool = [] if args.kv_pages is None else ["--kv-pages", str(args.kv_pages)]
    return ClusterSpec(
        worker_flags=engine,
        role_flags={"decode": pool},
        orchestrator_flags=("--model", "tiny", "--http-port", "0"),
        startup_timeout_s=args.startup_timeout_s,
    )


def run_both(targets: dict[str, str], args: argparse.Namespace) -> dict[str, list[dict]]:
    """A warm-up of each API, then `--rounds` rounds alternating them: each round's report."""
    runs: dict[str, list[dict]] = {api: [] for api in targets}
    for api, target in targets.items():
        warm = RunConfig(
            target,
            concurrency=args.concurrency,
            num_requests=args.warmup,
            seed=args.seed + 1,
            api=api,
        )
        run_with_progress(warm, args, f"{api} warm-up")
    for round_ in range(args.rounds):
        for api, target in targets.items():
            config = RunConfig(
                target,
                concurrency=args.concurrency,
                seed=args.seed,
                num_requests=args.num_requests,
                api=api,
            )
            loadavg = os.getloadavg()[0]
            result = run_with_progress(config, args, f"{api} round {round_}")
            report = build_report(result.records, result.duration_s, Slo(None, None))
            report["loadavg_1m_before"] = loadavg
            assert report["completed"] == args.num_requests, report["errors"]
            runs[api].append(report)
    return runs


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per API the median over rounds; then openai / grpc throughput and TTFT p50 gap."""

    def median(api: str, section: str | None, key: str) -> float:
        return statistics.median(r[section][key] if section else r[key] for r in runs[api])

    summary = {
        api: {
            "output_token_throughput": median(api, None, "output_token_throughput"),
            "ttft_p50_ms": median(api, "ttft_ms", "p50"),
            "ttft_p99_ms": median(api, "ttft_ms", "p99"),
            "tpot_p50_ms": median(api, "tpot_ms", "p50"),
        }
        for api in runs
    }
    summary["openai_over_grpc_throughput"] = (
        summary["openai"]["output_token_throughput"] / summary["grpc"]["output_token_throughput"]
    )
    summary["openai_minus_grpc_ttft_p50_ms"] = (
        summary["openai"]["ttft_p50_ms"] - summary["grpc"]["ttft_p50_ms"]
    )
    return summary


def print_summary(summary: dict) -> None:
    print(f"\n{'api':<8}{'tok/s':>10}{'TTFT p50 ms':>14}{'TTFT p99 ms':>14}{'TPOT p50 ms':>14}")
    for api in ("grpc", "openai"):
        s = summary[api]
        print(
            f"{api:<8}{s['output_token_throughput']:>10.1f}{s['ttft_p50_ms']:>14.2f}"
            f"{s['ttft_p99_ms']:>14.2f}{s['tpot_p50_ms']:>14.2f}"
        )
    print(
        f"\nthroughput openai / grpc: {summary['openai_over_grpc_throughput']:.3f} (goal >= 0.95)"
    )
    print(
        f"TTFT p50 openai - grpc: {summary['openai_minus_grpc_ttft_p50_ms']:+.2f} ms "
        "(goal <= +2 ms)"
    )


WORKLOAD_KEYS = (
    "concurrency",
    "num_requests",
    "prompt_len",
    "output_len",
    "rounds",
    "warmup",
    "seed",
    "kv_pages",
)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The knobs `run_with_progress` reads, as `pdserve bench` would have them.
    args.workload_file, args.vocab_max = None, 255
    args.prompt_len, args.output_len = str(args.prompt_len), str(args.output_len)
    with Cluster.start(cluster_spec(args)) as cluster:
        runs = run_both({"grpc": cluster.target, "openai": cluster.http_url}, args)
    summary = summarize(runs)
    print_summary(summary)
    workload = {k: getattr(args, k) for k in WORKLOAD_KEYS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"workload": workload, "summary": summary, "runs": runs}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

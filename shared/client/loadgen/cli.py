"""`pdserve bench`: send a seeded workload to an orchestrator; report latency and goodput.

    pdserve bench --target 127.0.0.1:50051 --rate 8 --num-requests 200 \
        --prompt-len 64 --output-len 16:64 --slo-ttft-ms 200 --slo-tpot-ms 50 \
        --out bench.json --plots bench_plots/

Exactly one of `--rate` (open loop, Poisson arrivals) or `--concurrency` (closed loop);
`--num-requests` and/or `--duration-s` bound the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from shared.client.loadgen.report import Slo, build_report, format_table, records_json
from shared.client.loadgen.runner import RunConfig, RunResult, run
from shared.client.loadgen.workload import LengthDist, WorkloadError, from_file, synthetic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--target",
        default="127.0.0.1:50051",
        help="orchestrator HOST:PORT (gRPC), or its HTTP API's HOST:PORT with --api openai",
    )
    p.add_argument(
        "--api",
        choices=("grpc", "openai"),
        default="grpc",
        help="grpc: the Generate API; openai: the OpenAI-compatible /v1/completions (SSE)",
    )
    p.add_argument("--token-file", type=Path, help="bearer token for an authenticated server")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    load.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    p.add_argument("--num-requests", type=int, help="stop sending after this many")
    p.add_argument("--duration-s", type=float, help="stop sending after this long")
    p.add_argument("--prompt-len", default="64", help="N (fixed) or A:B (uniform)")
    p.add_argument("--output-len", default="32", help="N (fixed) or A:B (uniform)")
    p.add_argument(
        "--workload-file",
        type=Path,
        help='JSON [{"prompt": str|[ids], "output_len": N}], cycled in order',
    )
    p.add_argument(
        "--vocab-max",
        type=int,
        default=255,
        help="random prompt token ids are drawn from [1, vocab-max]",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds prompts, lengths and arrivals")
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="generate exactly output-len tokens (default on)",
    )
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--slo-ttft-ms", type=float, help="goodput: TTFT limit")
    p.add_argument("--slo-tpot-ms", type=float, help="goodput: TPOT limit")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--plots", type=Path, metavar="DIR", help="write PNG plots here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run_with_progress(
    config: RunConfig, args: argparse.Namespace, label: str = "bench"
) -> RunResult:
    """Run the workload the flags describe, with a progress bar on stderr."""
    if args.workload_file is not None:
        workload = from_file(args.workload_file)
    else:
        workload = synthetic(
            LengthDist.parse(args.prompt_len),
            LengthDist.parse(args.output_len),
            args.vocab_max,
            args.seed,
        )
    with tqdm(
        total=config.num_requests,
        desc=label,
        unit="req",
        file=sys.stderr,
        disable=args.no_progress,
    ) as bar:

        def done(record) -> None:
            bar.update(1)
            if not record.ok:
                bar.set_postfix(last_error=record.error)

        return asyncio.run(run(config, workload, done))


def config_from_args(args: argparse.Namespace, target: str | None = None) -> RunConfig:
    token = args.token_file.read_text().strip() if args.token_file else None
    return RunConfig(
        target=target or args.target,
        rate=args.rate,
        concurrency=args.concurrency,
        num_requests=args.num_requests,
        duration_s=args.duration_s,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        request_timeout_s=args.request_timeout_s,
        token=token,
        api=args.api,
    )


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        config = config_from_args(args)
        result = run_with_progress(config, args)
    except (WorkloadError, OSError) as err:
        print(f"pdserve bench: error: {err}", file=sys.stderr)
        return 2
    report = build_report(
        result.records, result.duration_s, Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    )
    print(format_table(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "started_unix_s": result.started_unix_s,
            "report": report,
            "requests": records_json(result.records),
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    if args.plots is not None:
        from shared.client.loadgen.plots import write_plots  # matplotlib only when plots are asked

        for path in write_plots(result.records, args.plots, title=f"pdserve bench {args.target}"):
            print(f"wrote {path}", file=sys.stderr)
    return 0 if report["completed"] == report["num_requests"] else 1

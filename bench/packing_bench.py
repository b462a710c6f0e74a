"""Packed, chunked prefill: TTFT under concurrency, and a short prompt behind a long one.

    python bench/packing_bench.py --out FILE.json [--model small|tiny] [--part a|b|both]

(a) TTFT under concurrency, on `--model` (small by default): bursts of 32 concurrent
    requests with distinct random 128-token prompts (no shared prefix; prefix cache off in
    both runs to isolate packing), 8 output tokens each, 32 decode slots (decode is not
    the bottleneck). Run once with `--prefill-max-rows 1` (one prompt per call: the old
    behaviour) and once with packing (`--prefill-max-rows 8`), both `--prefill-chunk 128`.
    Reported: TTFT p50/p90/p99 of each, `ttft_p99_ratio_c32_vs_batch1` (packing on / off;
    goal <= 0.5).
(b) Head-of-line, always on `tiny` (`--max-seq-len 4160`, `--prefill-chunk 256`, prefix
    cache off): a 4000-token prompt is sent, ~50 ms later a 20-token one; both TTFTs are
    recorded, in several trials. One chunk's time: a lone 256-token prompt's client TTFT
    (the same path the short prompt takes; median over trials), and the prefill worker's
    `pdserve_prefill_seconds` for those single-chunk prompts. Run once with
    `--prefill-max-rows 1` and once with 4; `short_ttft_over_chunk_time` = the short
    prompt's median TTFT / the lone 256-token prompt's median TTFT (the issue: the short
    one gets its first token within about one chunk's time).

Each run starts a fresh cluster (orchestrator + 1 prefill + 1 decode worker, loopback),
both workers with `--warm-up all` so that nothing compiles while a run is measured, and
sends a few unmeasured requests first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefill_cluster import (
    VOCAB,
    git_state,
    latency_stats_ms,
    machine,
    prefill_delta,
    prefill_metrics,
    start_cluster,
    stream_once,
)

from shared.client.generator import AsyncGeneratorClient
from shared.cluster.cluster import Cluster

TIMEOUT_S = 300.0
GOAL_P99_RATIO = 0.5


def rng_prompt(rng: np.random.Generator, vocab: int, n: int) -> list[int]:
    return rng.integers(3, vocab, n).tolist()


def flags(model: str, *extra: str, compilation_cache_dir: str) -> list[str]:
    out = ["--model", model, "--warm-up", "all", *extra]
    if compilation_cache_dir:
        out += ["--compilation-cache-dir", compilation_cache_dir]
    return out


# ---------------------------------------------------------------- (a) concurrency


async def bursts(target: str, vocab: int, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    async with AsyncGeneratorClient(target) as client:
        for _ in range(args.warmup):  # unmeasured, distinct prompts
            await stream_once(client, rng_prompt(rng, vocab, args.prompt_len), 8, TIMEOUT_S)
        warm = await asyncio.gather(
            *(
                stream_once(client, rng_prompt(rng, vocab, args.prompt_len), 8, TIMEOUT_S)
                for _ in range(args.concurrency)
            )
        )
        rounds = []
        for _ in range(args.rounds):
            # Longer than the orchestrator's load-report interval (2 s): each burst starts
            # with a fresh view of the decode worker's free slots.
            await asyncio.sleep(args.pause_s)
            prompts = [rng_prompt(rng, vocab, args.prompt_len) for _ in range(args.concurrency)]
            got = await asyncio.gather(
                *(stream_once(client, p, args.max_tokens, TIMEOUT_S) for p in prompts)
            )
            rounds.append(got)
    return {"warm_errors": [s.error for s in warm if s.error], "rounds": rounds}


def worker_flags(
    args: argparse.Namespace, model: str, common: list[str], chunk: int, rows: int
) -> tuple[list[str], list[str]]:
    """(prefill flags, decode flags): packed prefill of `rows` rows of `chunk` tokens, no
    prefix cache."""
    packing = ["--prefill-chunk", str(chunk), "--prefill-max-rows", str(rows)]
    cache = args.compilation_cache_dir
    prefill = flags(
        model, *common, *packing, "--prefix-cache-mib", "0", compilation_cache_dir=cache
    )
    return prefill, flags(model, *common, compilation_cache_dir=cache)


def burst_run(args: argparse.Namespace, rows: int, common: list[str]) -> dict:
    """One cluster with `--prefill-max-rows rows`: the bursts' TTFTs and what it took."""
    prefill, decode = worker_flags(args, args.model, common, args.prompt_len, rows)
    load = machine()
    started = time.perf_counter()
    with start_cluster(prefill, decode, args.model, args.startup_timeout_s) as cluster:
        startup = time.perf_counter() - started
        before = prefill_metrics(cluster)
        got = asyncio.run(bursts(cluster.target, VOCAB[args.model], args))
        counters = prefill_delta(before, prefill_metrics(cluster))
        alive = cluster.alive()
    streams = [s for r in got["rounds"] for s in r]
    ok = [s for s in streams if s.error is None and s.ttft_s is not None]
    return {
        "prefill_max_rows": rows,
        "requests": len(streams),
        "errors": [s.error for s in streams if s.error] + got["warm_errors"],
        "ttft_ms": latency_stats_ms([s.ttft_s for s in ok]),
        "ttft_ms_per_round": [
            latency_stats_ms([s.ttft_s for s in r if s.ttft_s is not None]) for r in got["rounds"]
        ],
        "ttft_ms_by_round": [
            [None if s.ttft_s is None else round(s.ttft_s * 1e3, 1) for s in r]
            for r in got["rounds"]
        ],
        "burst_wall_s": [max(s.end for s in r) - min(s.sent for s in r) for r in got["rounds"]],
        "prefill_worker_counters": counters,
        "argv": cluster.arguments(),
        "startup_s": startup,
        "machine_before": load,
        "machine_after": machine(),
        "processes_alive_at_end": alive,
    }


def part_a(args: argparse.Namespace) -> dict:
    max_seq_len = -(-(args.prompt_len + args.max_tokens + 1) // 16) * 16
    common = ["--slots", str(args.slots), "--max-seq-len", str(max_seq_len)]
    common += ["--prefill-buckets", str(args.prompt_len)]
    runs = {}
    for rows in (1, args.packed_rows):
        runs[f"max_rows_{rows}"] = burst_run(args, rows, common)
        print(f"(a) max_rows={rows}: TTFT {runs[f'max_rows_{rows}']['ttft_ms']}", file=sys.stderr)
    off, on = runs["max_rows_1"], runs[f"max_rows_{args.packed_rows}"]
    ratio = {
        q: on["ttft_ms"][q] / off["ttft_ms"][q] if off["ttft_ms"][q] else None
        for q in ("p50", "p90", "p99")
    }
    return {
        "model": args.model,
        "workload": {
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "seed": args.seed,
            "distinct_prompts": True,
            "ignore_eos": True,
            "greedy": True,
            "warmup": f"{args.warmup} single requests + one unmeasured burst of {args.concurrency}",
        },
        "flags": {
            "slots": args.slots,
            "max_seq_len": max_seq_len,
            "prefill_chunk": args.prompt_len,
            "prefix_cache_mib": 0,
            "prefill_max_rows": [1, args.packed_rows],
        },
        "runs": runs,
        "ttft_ratio_packed_vs_batch1": ratio,
        "ttft_p99_ratio_c32_vs_batch1": ratio["p99"],
        "goal_ttft_p99_ratio_le_0.5": None
        if ratio["p99"] is None
        else ratio["p99"] <= GOAL_P99_RATIO,
    }


# ---------------------------------------------------------------- (b) head-of-line


async def head_of_line(cluster: Cluster, args: argparse.Namespace) -> dict:
    vocab = VOCAB["tiny"]
    rng = np.random.default_rng(args.seed + 1)
    out: dict = {"trials": [], "lone_chunk": [], "lone_short": []}
    async with AsyncGeneratorClient(cluster.target) as client:
        for n in (256, args.long_len, args.short_len):  # unmeasured
            await stream_once(client, rng_prompt(rng, vocab, n), 4, TIMEOUT_S)
        # One chunk's time: a lone single-chunk (256-token) prompt, client and worker side.
        before = prefill_metrics(cluster)
        for _ in range(args.trials):
            s = await stream_once(client, rng_prompt(rng, vocab, args.chunk), 4, TIMEOUT_S)
            out["lone_chunk"].append(s)
        after = prefill_metrics(cluster)
        d = prefill_delta(before, after)
        out["worker_chunk_prefill_s"] = d["prefill_seconds_sum"] / max(
            1, d["prefill_seconds_count"]
        )
        for _ in range(args.trials):
            s = await stream_once(client, rng_prompt(rng, vocab, args.short_len), 4, TIMEOUT_S)
            out["lone_short"].append(s)
        for _ in range(args.trials):
            long_prompt = rng_prompt(rng, vocab, args.long_len)
            short_prompt = rng_prompt(rng, vocab, args.short_len)
            long_task = asyncio.create_task(stream_once(client, long_prompt, 4, TIMEOUT_S))
            await asyncio.sleep(args.gap_s)
            short = await stream_once(client, short_prompt, 4, TIMEOUT_S)
            long = await long_task
            out["trials"].append((long, short))
            await asyncio.sleep(0.2)
    return out


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def median_ms(values: list[float]) -> float | None:
    return ms(statistics.median(values)) if values else None


def head_of_line_summary(got: dict, rows: int) -> dict:
    """One run's TTFTs: the short prompt sent while a long one prefills, each alone, and
    how they compare to one chunk's time."""
    errors = [s.error for s in got["lone_chunk"] + got["lone_short"] if s.error]
    errors += [s.error for pair in got["trials"] for s in pair if s.error]
    short = [s.ttft_s for _, s in got["trials"] if s.ttft_s is not None]
    long = [s.ttft_s for s, _ in got["trials"] if s.ttft_s is not None]
    chunk = [s.ttft_s for s in got["lone_chunk"] if s.ttft_s is not None]
    lone_short = [s.ttft_s for s in got["lone_short"] if s.ttft_s is not None]
    short_first = sum(
        1
        for lo, sh in got["trials"]
        if sh.first is not None and lo.first is not None and sh.first < lo.first
    )
    run = {
        "prefill_max_rows": rows,
        "trials": len(got["trials"]),
        "errors": errors,
        "short_ttft_ms_median": median_ms(short),
        "short_ttft_ms": [ms(v) for v in short],
        "long_ttft_ms_median": median_ms(long),
        "long_ttft_ms": [ms(v) for v in long],
        "short_sent_after_long_ms": [ms(sh.sent - lo.sent) for lo, sh in got["trials"]],
        "short_first_token_before_long": short_first,
        "chunk_time_ms_client_median": median_ms(chunk),
        "chunk_time_ms_client": [ms(v) for v in chunk],
        "chunk_time_ms_worker_prefill_seconds_mean": ms(got["worker_chunk_prefill_s"]),
        "lone_short_ttft_ms_median": median_ms(lone_short),
    }
    if short and chunk:
        run["short_ttft_over_chunk_time"] = statistics.median(short) / statistics.median(chunk)
        run["short_ttft_over_chunk_time_worker"] = (
            statistics.median(short) / got["worker_chunk_prefill_s"]
        )
        run["long_ttft_over_chunk_time"] = statistics.median(long) / statistics.median(chunk)
    return run


def part_b(args: argparse.Namespace) -> dict:
    common = ["--slots", "8", "--max-seq-len", str(args.hol_max_seq_len)]
    common += ["--prefill-buckets", str(args.chunk)]
    runs = {}
    for rows in (1, 4):
        prefill, decode = worker_flags(args, "tiny", common, args.chunk, rows)
        load = machine()
        with start_cluster(prefill, decode, "tiny", args.startup_timeout_s) as cluster:
            got = asyncio.run(head_of_line(cluster, args))
            alive = cluster.alive()
        run = head_of_line_summary(got, rows)
        run.update(argv=cluster.arguments(), machine_before=load, machine_after=machine())
        run["processes_alive_at_end"] = alive
        runs[f"max_rows_{rows}"] = run
        print(
            f"(b) max_rows={rows}: short {run['short_ttft_ms_median']:.1f} ms, long "
            f"{run['long_ttft_ms_median']:.1f} ms, chunk {run['chunk_time_ms_client_median']:.1f}"
            " ms",
            file=sys.stderr,
        )
    return {
        "model": "tiny",
        "workload": {
            "long_prompt_tokens": args.long_len,
            "short_prompt_tokens": args.short_len,
            "gap_s": args.gap_s,
            "trials": args.trials,
            "max_tokens": 4,
            "seed": args.seed,
            "chunk_reference": f"a lone {args.chunk}-token prompt (one chunk), {args.trials} "
            "times; its client TTFT (median) is the denominator of short_ttft_over_chunk_time",
        },
        "flags": {
            "max_seq_len": args.hol_max_seq_len,
            "prefill_chunk": args.chunk,
            "prefix_cache_mib": 0,
            "prefill_max_rows": [1, 4],
            "slots": 8,
        },
        "runs": runs,
        "short_ttft_over_chunk_time": {
            k: r.get("short_ttft_over_chunk_time") for k, r in runs.items()
        },
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="small", choices=sorted(VOCAB), help="part (a)")
    p.add_argument("--part", default="both", choices=["a", "b", "both"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="(a): measured bursts")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--packed-rows", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pause-s", type=float, default=2.5, help="(a): before each burst")
    p.add_argument("--hol-max-seq-len", type=int, default=4160)
    p.add_argument("--chunk", type=int, default=256, help="(b): --prefill-chunk")
    p.add_argument("--long-len", type=int, default=4000)
    p.add_argument("--short-len", type=int, default=20)
    p.add_argument("--gap-s", type=float, default=0.05)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--compilation-cache-dir", default="", help="passed to the workers")
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    result: dict = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "source": git_state(),
        "machine_at_start": machine(),
    }
    if args.part in ("a", "both"):
        result["a_concurrency"] = part_a(args)
        result["ttft_p99_ratio_c32_vs_batch1"] = result["a_concurrency"][
            "ttft_p99_ratio_c32_vs_batch1"
        ]
    if args.part in ("b", "both"):
        result["b_head_of_line"] = part_b(args)
        result["short_ttft_over_chunk_time"] = result["b_head_of_line"][
            "short_ttft_over_chunk_time"
        ]
    result["machine_at_end"] = machine()
    result["wall_s"] = time.time() - started
    if "a_concurrency" in result:
        a = result["a_concurrency"]
        print(f"\n(a) {a['model']}, {args.concurrency} concurrent x {args.rounds} rounds")
        print(f"{'max_rows':>9}{'TTFT p50':>10}{'p90':>8}{'p99':>8}  ms")
        for r in a["runs"].values():
            t = r["ttft_ms"]
            print(f"{r['prefill_max_rows']:>9}{t['p50']:>10.0f}{t['p90']:>8.0f}{t['p99']:>8.0f}")
        print(
            f"ttft_p99_ratio_c32_vs_batch1 {a['ttft_p99_ratio_c32_vs_batch1']:.2f} "
            f"(goal <= 0.5: {a['goal_ttft_p99_ratio_le_0.5']})"
        )
    if "b_head_of_line" in result:
        print(f"\n(b) tiny, {args.long_len}-token prompt then a {args.short_len}-token one")
        print(
            f"{'max_rows':>9}{'short':>8}{'long':>8}{'chunk':>8}{'chunk(w)':>9}"
            f"{'short/chunk':>12}  ms"
        )
        for r in result["b_head_of_line"]["runs"].values():
            print(
                f"{r['prefill_max_rows']:>9}{r['short_ttft_ms_median']:>8.1f}"
                f"{r['long_ttft_ms_median']:>8.1f}{r['chunk_time_ms_client_median']:>8.1f}"
                f"{r['chunk_time_ms_worker_prefill_seconds_mean']:>9.1f}"
                f"{r.get('short_ttft_over_chunk_time', float('nan')):>12.2f}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

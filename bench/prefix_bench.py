"""Prefix cache on vs off: a seeded multi-turn chat workload through a local cluster.

    python bench/prefix_bench.py --out FILE.json [--model small|tiny] [--conversations N]
        [--concurrency C] [--seed S] [--prefix-cache-mib X]

1. The workload (seeded, the same for both runs): a shared system prompt of ~500 random
   token ids; N conversations of 4-8 turns; turn t's prompt = the system prompt + the
   whole history (every earlier user message, each followed by the tokens the model
   actually answered to it, read from that turn's response stream) + a new user message
   of 20-60 tokens; 16-32 output tokens per turn, greedy, EOS ignored. C conversations run
   at once (all of them by default); the turns of one conversation are sequential.
2. It runs twice against a fresh cluster each time (orchestrator + 1 prefill + 1 decode
   worker on loopback): prefix cache off (`--prefix-cache-mib 0`), then on (the size
   given). A few unrelated warm-up requests go first; the prefill worker's counters
   (tokens computed, prefix-cache hit/miss tokens, evictions) are read before and after.
3. Per request: client-side TTFT (send -> first token), turn index, prompt length.
   Reported per run: TTFT p50/p90/p99 overall and over turns 2+, prefill tokens computed
   per request; across runs: `ttft_p50_ratio_turns2plus` (on / off),
   `prefill_tokens_saved_fraction` (1 - computed_on / computed_off) and
   `repeated_prompt_fraction` (defined in the JSON), with the goals.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shlex
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

PAGE_SIZE = 16
REQUEST_TIMEOUT_S = 300.0
GOAL_TTFT_RATIO = 0.3

REPEATED_DEFINITION = (
    "For each request r (in the cache-on run), repeated(r) = the longest common prefix, in "
    "tokens, of r's prompt and any prompt the client sent before r (earlier send time, any "
    "conversation), not block-aligned; repeated_prompt_fraction = sum repeated(r) / sum "
    "len(prompt r) over all measured requests. Two variants are reported beside it: "
    "`_block_aligned` rounds each repeated(r) down to a whole page of 16 tokens and to at "
    "most len - 1 (what a page cache can reuse at best), and `_available` counts only "
    "earlier prompts whose first token had already arrived when r was sent (prefilled, so "
    "cacheable), not block-aligned; `_available_block_aligned` both. The cache can beat "
    "`_available`: a prompt queued at the prefill worker looks the cache up when it is first "
    "scheduled, so it can hit a prompt that finished prefill after it was sent. It cannot "
    "reach `repeated_prompt_fraction` when prompts sharing a prefix are prefilled at the "
    "same time (the conversations' first turns all start at once), nor past the block "
    "alignment and the last token, which is always computed."
)


def make_workload(seed: int, conversations: int, vocab: int, system_len: int) -> dict:
    """The user side of every conversation: system prompt, messages, output lengths."""
    rng = np.random.default_rng(seed)
    low = 3  # above the special ids
    system = rng.integers(low, vocab, system_len).tolist()
    convs = []
    for _ in range(conversations):
        turns = int(rng.integers(4, 9))
        convs.append(
            [
                {
                    "message": rng.integers(low, vocab, int(rng.integers(20, 61))).tolist(),
                    "max_tokens": int(rng.integers(16, 33)),
                }
                for _ in range(turns)
            ]
        )
    return {"system": system, "conversations": convs}


async def run_workload(target: str, workload: dict, concurrency: int) -> list[dict]:
    records: list[dict] = []
    async with AsyncGeneratorClient(target) as client:
        gate = asyncio.Semaphore(concurrency)
        t0 = time.perf_counter()

        async def conversation(index: int, turns: list[dict]) -> None:
            async with gate:
                history = list(workload["system"])
                for turn, spec in enumerate(turns, start=1):
                    prompt = history + spec["message"]
                    s = await stream_once(client, prompt, spec["max_tokens"], REQUEST_TIMEOUT_S)
                    records.append(
                        {
                            "conversation": index,
                            "turn": turn,
                            "prompt": prompt,
                            "prompt_len": len(prompt),
                            "sent_s": s.sent - t0,
                            "first_s": None if s.first is None else s.first - t0,
                            "end_s": s.end - t0,
                            "ttft_s": s.ttft_s,
                            "answer": s.tokens,
                            "error": s.error,
                        }
                    )
                    if s.error:
                        return  # the rest of this conversation would not be the same
                    history = prompt + s.tokens

        await asyncio.gather(
            *(conversation(i, turns) for i, turns in enumerate(workload["conversations"]))
        )
    records.sort(key=lambda r: r["sent_s"])
    return records


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def repeated_tokens(records: list[dict]) -> dict:
    """Per the REPEATED_DEFINITION, over records sorted by send time."""
    total = plain = aligned = available = available_aligned = 0
    for i, r in enumerate(records):
        prompt, n = r["prompt"], r["prompt_len"]
        best = best_available = 0
        for earlier in records[:i]:
            lcp = common_prefix(prompt, earlier["prompt"])
            best = max(best, lcp)
            if earlier["first_s"] is not None and earlier["first_s"] <= r["sent_s"]:
                best_available = max(best_available, lcp)
        total += n
        plain += best
        available += best_available
        aligned += min(best, n - 1) // PAGE_SIZE * PAGE_SIZE
        available_aligned += min(best_available, n - 1) // PAGE_SIZE * PAGE_SIZE
    return {
        "prompt_tokens": total,
        "repeated_tokens": plain,
        "repeated_prompt_fraction": plain / total if total else None,
        "repeated_prompt_fraction_block_aligned": aligned / total if total else None,
        "repeated_prompt_fraction_available": available / total if total else None,
        "repeated_prompt_fraction_available_block_aligned": available_aligned / total
        if total
        else None,
    }


def summarize(records: list[dict], counters: dict[str, float]) -> dict:
    ok = [r for r in records if r["error"] is None and r["ttft_s"] is not None]
    later = [r for r in ok if r["turn"] >= 2]
    n = len(records)
    return {
        "requests": n,
        "errors": [
            f"conv {r['conversation']} turn {r['turn']}: {r['error']}"
            for r in records
            if r["error"]
        ],
        "prompt_tokens": sum(r["prompt_len"] for r in records),
        "ttft_ms": latency_stats_ms([r["ttft_s"] for r in ok]),
        "ttft_ms_turns2plus": latency_stats_ms([r["ttft_s"] for r in later]),
        "ttft_ms_turn1": latency_stats_ms([r["ttft_s"] for r in ok if r["turn"] == 1]),
        "prefill_tokens_computed": counters["tokens_computed"],
        "prefill_tokens_computed_per_request": counters["tokens_computed"] / n if n else None,
        "prefill_worker_counters": counters,
        "duration_s": max((r["end_s"] for r in records), default=0.0),
        # Whether both runs saw the same prompts (greedy answers feed the next turn).
        "prompts_sha256": hashlib.sha256(
            json.dumps(
                sorted((r["conversation"], r["turn"], r["prompt"]) for r in records)
            ).encode()
        ).hexdigest(),
    }


def measure(name: str, args: argparse.Namespace, workload: dict, cache_mib: float) -> tuple:
    # --warm-up all: nothing compiles while a run is measured.
    common = [
        "--model",
        args.model,
        "--max-seq-len",
        str(args.max_seq_len),
        "--page-size",
        str(PAGE_SIZE),
        "--warm-up",
        "all",
    ]
    if args.compilation_cache_dir:
        common += ["--compilation-cache-dir", args.compilation_cache_dir]
    prefill = [*common, "--prefix-cache-mib", str(cache_mib)]
    decode = [*common, "--slots", str(args.slots)]
    if args.prefill_chunk:
        prefill += ["--prefill-chunk", str(args.prefill_chunk)]
    load_before = machine()
    started = time.perf_counter()
    with start_cluster(prefill, decode, args.model, args.startup_timeout_s) as cluster:
        startup_s = time.perf_counter() - started
        records, counters = asyncio.run(measured(cluster, workload, args))
        alive = cluster.alive()
    print(f"{name}: {len(records)} requests, startup {startup_s:.0f} s", file=sys.stderr)
    summary = summarize(records, counters)
    summary.update(
        {
            "prefix_cache_mib": cache_mib,
            "argv": cluster.arguments(),
            "startup_s": startup_s,
            "machine_before": load_before,
            "machine_after": machine(),
            "processes_alive_at_end": alive,
        }
    )
    return summary, records


async def measured(
    cluster: Cluster, workload: dict, args: argparse.Namespace
) -> tuple[list[dict], dict[str, float]]:
    """Warm-up (unrelated prompts, not counted), then the workload between two reads of
    the prefill worker's counters."""
    async with AsyncGeneratorClient(cluster.target) as client:
        rng = np.random.default_rng(args.seed + 10_000)
        for i in range(args.warmup):
            prompt = rng.integers(3, VOCAB[args.model], 100 + 150 * i).tolist()
            s = await stream_once(client, prompt, 8, REQUEST_TIMEOUT_S)
            if s.error:
                raise RuntimeError(f"warm-up request failed: {s.error}")
    before = prefill_metrics(cluster)
    records = await run_workload(cluster.target, workload, args.concurrency)
    return records, prefill_delta(before, prefill_metrics(cluster))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="small", choices=sorted(VOCAB))
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--concurrency", type=int, help="conversations at once (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system-len", type=int, default=500)
    p.add_argument("--prefix-cache-mib", type=float, default=768.0, help="the cache-on run")
    p.add_argument("--prefill-chunk", type=int, help="default: the worker's (largest bucket)")
    p.add_argument("--max-seq-len", type=int, default=2048)
    # Twice the conversations at once: the orchestrator's estimate of a decode worker's
    # free slots can lag its load report (every 2 s) right after a request ends.
    p.add_argument("--slots", type=int, default=16, help="decode slots")
    p.add_argument("--warmup", type=int, default=3, help="unrelated requests before each run")
    p.add_argument("--compilation-cache-dir", default="", help="passed to the workers")
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    return p


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def build_result(
    args: argparse.Namespace, workload: dict, longest: int, off: dict, on: dict, records_on: list
) -> dict:
    """The report: both runs, their ratios, the repeated-token bound and the goals."""
    repeated = repeated_tokens(records_on)
    ttft_ratio = ratio(on["ttft_ms_turns2plus"]["p50"], off["ttft_ms_turns2plus"]["p50"])
    saved = 1 - on["prefill_tokens_computed"] / off["prefill_tokens_computed"]
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": args.model,
        "source": git_state(),
        "workload": {
            "seed": args.seed,
            "conversations": args.conversations,
            "concurrency": args.concurrency,
            "system_prompt_tokens": args.system_len,
            "turns_per_conversation": [len(c) for c in workload["conversations"]],
            "user_message_tokens": "20-60 (uniform)",
            "max_tokens_per_turn": "16-32 (uniform)",
            "greedy": True,
            "ignore_eos": True,
            "longest_conversation_positions": longest,
            "warmup_requests_per_run": args.warmup,
        },
        "flags": {
            "max_seq_len": args.max_seq_len,
            "page_size": PAGE_SIZE,
            "decode_slots": args.slots,
            "warm_up": "all (both workers)",
            "decode_kv_pages": "0 (default: every slot full at max_seq_len)",
            "prefill_chunk": args.prefill_chunk or "default (largest --prefill-buckets: 128)",
            "prefill_max_rows": "default (4)",
            "prefix_cache_mib_on": args.prefix_cache_mib,
        },
        "cache_off": off,
        "cache_on": on,
        "same_prompts_both_runs": off["prompts_sha256"] == on["prompts_sha256"],
        "ttft_p50_ratio_turns2plus": ttft_ratio,
        "ttft_p99_ratio_turns2plus": ratio(
            on["ttft_ms_turns2plus"]["p99"], off["ttft_ms_turns2plus"]["p99"]
        ),
        "prefill_tokens_saved_fraction": saved,
        **{k: v for k, v in repeated.items() if k.startswith("repeated_prompt_fraction")},
        "repeated_prompt_fraction_definition": REPEATED_DEFINITION,
        "goals": {
            "ttft_p50_ratio_turns2plus <= 0.3 (small)": None
            if args.model != "small" or ttft_ratio is None
            else ttft_ratio <= GOAL_TTFT_RATIO,
            "prefill_tokens_saved_fraction >= repeated_prompt_fraction": saved
            >= repeated["repeated_prompt_fraction"],
        },
        "requests_cache_on": [
            {k: r[k] for k in ("conversation", "turn", "prompt_len", "sent_s", "ttft_s")}
            for r in records_on
        ],
    }
    return result


def print_table(result: dict) -> None:
    off, on = result["cache_off"], result["cache_on"]
    print(
        f"\n{'run':<10}{'req':>5}{'TTFT p50':>10}{'p99':>9}{'t2+ p50':>9}{'t2+ p99':>9}"
        f"{'computed/req':>14}{'hit tok':>9}"
    )
    for name, r in (("cache off", off), ("cache on", on)):
        print(
            f"{name:<10}{r['requests']:>5}{r['ttft_ms']['p50']:>10.0f}{r['ttft_ms']['p99']:>9.0f}"
            f"{r['ttft_ms_turns2plus']['p50']:>9.0f}{r['ttft_ms_turns2plus']['p99']:>9.0f}"
            f"{r['prefill_tokens_computed_per_request']:>14.1f}"
            f"{r['prefill_worker_counters']['cache_hit_tokens']:>9.0f}"
        )
    for key in (
        "ttft_p50_ratio_turns2plus",
        "prefill_tokens_saved_fraction",
        "repeated_prompt_fraction",
        "repeated_prompt_fraction_block_aligned",
        "repeated_prompt_fraction_available",
        "repeated_prompt_fraction_available_block_aligned",
    ):
        print(f"{key:<50}{result[key]:.3f}")
    print("goals:", json.dumps(result["goals"]))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.concurrency = args.concurrency or args.conversations
    workload = make_workload(args.seed, args.conversations, VOCAB[args.model], args.system_len)
    longest = max(
        args.system_len + sum(len(t["message"]) + t["max_tokens"] for t in c)
        for c in workload["conversations"]
    )
    if longest >= args.max_seq_len:
        print(
            f"the longest conversation needs {longest} positions: raise --max-seq-len",
            file=sys.stderr,
        )
        return 2
    started = time.time()
    off, _ = measure("cache off", args, workload, 0.0)
    on, records_on = measure("cache on", args, workload, args.prefix_cache_mib)
    result = build_result(args, workload, longest, off, on, records_on)
    result["wall_s"] = time.time() - started
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""KV capacity: concurrent requests one KV memory budget serves, paged vs contiguous slots.

    python bench/capacity_bench.py --out FILE.json [--budget-tokens 65536] [--page-size 16]

The contiguous-slot design gives every slot `max_seq_len` positions, and max_seq_len must
hold the longest request the deployment admits (prompt 1024 + output 512 here): a fixed
budget / max_seq_len slots, however short the requests are.

The paged design is simulated with the decode worker's own page allocator
(shared/kv/pages.py) and its policy (decode_server/scheduler.py): a saturated queue of
requests from bench/length_mix.py; each admitted request is promised the pages of its
prompt and first token; every step each live request grows by one token (a page at a
time, on demand); when the pool runs dry the youngest is preempted and goes back to the
head of the queue with its tokens so far as its prompt (the orchestrator's resume). The
figure is the mean number of requests decoding per step, in steady state, and the ratio
to the contiguous design's slot count at the same budget. No device work: capacity is
memory accounting, and the allocator is the code that does it.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from length_mix import LONGEST, SHAPES, Request, request_mix

from shared.kv.pages import PageAllocator, PagesExhaustedError, pages_for


def simulate_paged(
    requests: list[Request], budget_tokens: int, page_size: int, max_seq_len: int
) -> dict:
    pool = budget_tokens // page_size
    allocator = PageAllocator(pool + 1, page_size, pages_for(max_seq_len, page_size))
    queue = collections.deque((i, r.prompt_len, r.output_len) for i, r in enumerate(requests))
    live: dict[int, list[int]] = {}  # slot -> [request, tokens in cache, tokens left]
    order: dict[int, int] = {}  # slot -> admission counter (youngest = largest)
    free_slots = list(range(len(requests)))[::-1]
    admitted = preemptions = steps = 0
    concurrency: list[int] = []
    while queue or live:
        # Admission: the head of the queue while its prompt's pages are there.
        while queue:
            request, prompt, left = queue[0]
            try:
                allocator.reserve(f"r{request}", prompt + 1)
            except PagesExhaustedError:
                break
            queue.popleft()
            slot = free_slots.pop()
            allocator.assign(slot, prompt + 1, f"r{request}")
            live[slot] = [request, prompt, left]
            order[slot] = admitted
            admitted += 1
        # Growth, oldest first; the youngest goes when the pool is dry.
        for slot in sorted(live, key=order.__getitem__):
            while slot in live:
                try:
                    allocator.grow(slot, live[slot][1])
                    break
                except PagesExhaustedError:
                    victim = max(live, key=order.__getitem__)
                    request, length, left = live.pop(victim)
                    allocator.release(victim)
                    free_slots.append(victim)
                    queue.appendleft((request, length, left))
                    preemptions += 1
        steps += 1
        concurrency.append(len(live))
        for slot in list(live):
            live[slot][1] += 1
            live[slot][2] -= 1
            if live[slot][2] <= 0:
                live.pop(slot)
                allocator.release(slot)
                free_slots.append(slot)
        allocator.check()
        if len(queue) < len(requests) // 4:
            break  # the queue no longer saturates the pool: steady state is over
    steady = concurrency[len(concurrency) // 5 :]  # skip the ramp-up
    return {
        "pool_pages": pool,
        "steps": steps,
        "mean_concurrent": sum(steady) / len(steady),
        "min_concurrent": min(steady),
        "preemptions": preemptions,
        "preemptions_per_1k_tokens": 1000 * preemptions / sum(concurrency),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-tokens", type=int, default=65536)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rows = []
    for shape in SHAPES:
        requests = request_mix(args.requests, shape, args.seed)
        max_seq_len = LONGEST
        contiguous = args.budget_tokens // max_seq_len
        paged = simulate_paged(requests, args.budget_tokens, args.page_size, max_seq_len)
        rows.append(
            {
                "shape": shape,
                "mean_prompt": sum(r.prompt_len for r in requests) / len(requests),
                "mean_output": sum(r.output_len for r in requests) / len(requests),
                "max_seq_len": max_seq_len,
                "contiguous_slots": contiguous,
                **paged,
                "capacity_ratio_vs_contiguous": paged["mean_concurrent"] / contiguous,
            }
        )
        print(rows[-1], file=sys.stderr)
    print(f"\nKV budget: {args.budget_tokens} tokens, pages of {args.page_size}")
    print(f"{'mix':<13}{'contiguous':>11}{'paged mean':>12}{'ratio':>8}{'preempt/1k tok':>16}")
    for r in rows:
        ratio, preempted = r["capacity_ratio_vs_contiguous"], r["preemptions_per_1k_tokens"]
        print(
            f"{r['shape']:<13}{r['contiguous_slots']:>11}{r['mean_concurrent']:>12.1f}"
            f"{ratio:>8.2f}{preempted:>16.2f}"
        )
    result = {
        "budget_tokens": args.budget_tokens,
        "page_size": args.page_size,
        "requests": args.requests,
        "seed": args.seed,
        "rows": rows,
        # The headline: the heavy-tailed mix (see bench/length_mix.py); the uniform row is
        # the pessimistic bound.
        "capacity_ratio_vs_contiguous": rows[SHAPES.index("log-uniform")][
            "capacity_ratio_vs_contiguous"
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

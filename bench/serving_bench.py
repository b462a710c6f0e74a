"""Serving TPOT through the real cluster against the engine's own step, in one run.

    python bench/serving_bench.py --out FILE.json [--config small] [--concurrency 1,8,32]

A `pdserve orchestrator`, a prefill and a decode worker (32 slots, paged KV) on loopback;
for each concurrency C, C clients stream at once through the public gRPC API (prompts of
128 tokens, 128 output tokens, EOS ignored), in rounds. A request's TPOT is
(last token time - first token time) / (tokens - 1); the row reports the median over
requests. After the cluster stops, the same engine configuration steps C live requests
(at the context the served requests had halfway) in this process: its median step is the
engine's time per token at that batch. The ratio is what serving adds to it (the
orchestrator, gRPC, the decode worker's loop): goal <= 1.2 at every concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from engine_bench import synthetic_prefix  # noqa: E402

from decode_server.scheduler import DecodeBatch  # noqa: E402
from shared.client.generator import AsyncGeneratorClient  # noqa: E402
from shared.cluster.cluster import Cluster, ClusterSpec  # noqa: E402
from shared.config import EngineConfig, model_preset  # noqa: E402
from shared.engine.engine import Engine  # noqa: E402

SLOTS = 32
PROMPT_LEN = 128
OUTPUT_LEN = 128
MAX_SEQ_LEN = 512
PAGE_SIZE = 16


def engine_flags(config: str) -> tuple[str, ...]:
    return (
        "--model",
        config,
        "--slots",
        str(SLOTS),
        "--prefill-buckets",
        str(PROMPT_LEN),
        "--max-seq-len",
        str(MAX_SEQ_LEN),
        "--page-size",
        str(PAGE_SIZE),
    )


async def one_request(client: AsyncGeneratorClient, seed: int) -> float | None:
    """TPOT of one streamed request, seconds."""
    prompt = [int(t) for t in np.random.default_rng(seed).integers(3, 30000, PROMPT_LEN)]
    times: list[float] = []
    async for chunk in client.generate(prompt, max_tokens=OUTPUT_LEN, ignore_eos=True):
        now = time.perf_counter()
        times += [now] * len(chunk.token_ids)
    if len(times) < 2:
        return None
    return (times[-1] - times[0]) / (len(times) - 1)


async def serve_round(address: str, concurrency: int, rounds: int) -> list[float]:
    tpots: list[float] = []
    async with AsyncGeneratorClient(address) as client:
        await one_request(client, 10**9)  # the first request of a connection pays its setup
        for r in range(rounds):
            got = await asyncio.gather(
                *(one_request(client, r * 1000 + i) for i in range(concurrency))
            )
            tpots += [t for t in got if t is not None]
    return tpots


def engine_step_seconds(config: str, batch: int, steps: int) -> float:
    """Median step with `batch` live requests at the served requests' halfway context."""
    engine = Engine(
        model_preset(config),
        EngineConfig(SLOTS, (PROMPT_LEN,), MAX_SEQ_LEN, page_size=PAGE_SIZE),
    )
    params = engine.init_params(seed=0)
    prefix = synthetic_prefix(engine, PROMPT_LEN + OUTPUT_LEN // 2, seed=0)
    decode = DecodeBatch(engine)
    decode.insert([prefix] * batch, list(range(batch)))
    for _ in range(3):
        decode.step(params)
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        decode.step(params)  # reads the tokens back, as the decode worker does
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="small")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=32, help="at least, per concurrency")
    parser.add_argument("--steps", type=int, default=30)
    return parser


def served_tpots(config: str, levels: list[int], requests: int) -> dict[int, list[float]]:
    """Each concurrency's request TPOTs through a cluster of `config` workers."""
    spec = ClusterSpec(
        worker_flags=engine_flags(config),
        orchestrator_flags=("--model", config),
        startup_timeout_s=900.0,
    )
    served: dict[int, list[float]] = {}
    with Cluster.start(spec) as cluster:
        for c in levels:
            rounds = max(1, -(-requests // c)) if c > 1 else min(8, requests)
            served[c] = asyncio.run(serve_round(cluster.target, c, rounds))
            print(f"concurrency {c}: {len(served[c])} requests", file=sys.stderr)
    return served


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    served = served_tpots(args.config, levels, args.requests)
    rows = []
    for c in levels:
        step = engine_step_seconds(args.config, c, args.steps)
        tpot = statistics.median(served[c])
        rows.append(
            {
                "concurrency": c,
                "requests": len(served[c]),
                "tpot_p50_ms": tpot * 1e3,
                "engine_step_ms": step * 1e3,
                "ratio": tpot / step,
            }
        )
        print(rows[-1], file=sys.stderr)

    print(f"\n{'concurrency':>12}{'TPOT p50 ms':>13}{'engine step ms':>16}{'ratio':>8}")
    for r in rows:
        print(
            f"{r['concurrency']:>12}{r['tpot_p50_ms']:>13.1f}{r['engine_step_ms']:>16.1f}"
            f"{r['ratio']:>8.2f}"
        )
    result = {
        "config": args.config,
        "slots": SLOTS,
        "prompt_len": PROMPT_LEN,
        "output_len": OUTPUT_LEN,
        "max_seq_len": MAX_SEQ_LEN,
        "page_size": PAGE_SIZE,
        "device": str(jax.devices()[0]),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

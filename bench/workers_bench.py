"""Decode throughput through the workers versus the raw engine loop, in one run.

    python bench/workers_bench.py --out FILE.json [--config small] [--batches 8,32]

For each batch size B: a `pdserve prefill` and a `pdserve decode --slots B` process on
loopback serve B concurrent requests (KV pushed from the prefill server); the tokens/s is
measured over the window in which all B requests are decoding. The same engine, in this
process, then steps B live slots directly. The ratio is the serving overhead.
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from decode_server.scheduler import DecodeBatch
from shared.cluster.cluster import Cluster, ClusterSpec
from shared.config import EngineConfig, model_preset
from shared.engine.engine import Engine
from shared.sampling_params import SamplingParams
from shared.transport.grpc_transport import GrpcDecodeClient, GrpcPrefillClient
from shared.transport.types import (
    GenerationLimits,
    PrefillRequest,
    ReserveRequest,
    TransportConfig,
)

PROMPT_LEN = 64
MAX_SEQ_LEN = 512


def engine_tokens_per_s(config_name: str, batch: int, steps: int) -> float:
    engine = Engine(model_preset(config_name), EngineConfig(batch, (PROMPT_LEN,), MAX_SEQ_LEN))
    params = engine.init_params(seed=0)
    prefix = engine.prefill(params, list(range(1, PROMPT_LEN + 1)))
    decode = DecodeBatch(engine)
    decode.insert([prefix] * batch, list(range(batch)))
    for _ in range(3):
        decode.step(params)
    start = time.perf_counter()
    for _ in range(steps):
        decode.step(params)  # reads every step's tokens back, as the server does
    return batch * steps / (time.perf_counter() - start)


async def server_tokens_per_s(prefill_addr: str, decode_addr: str, batch: int, steps: int) -> float:
    config = TransportConfig(rpc_timeout_s=120.0, transfer_timeout_s=120.0)
    decode, prefill = GrpcDecodeClient(decode_addr, config), GrpcPrefillClient(prefill_addr, config)
    arrivals: list[list[float]] = [[] for _ in range(batch)]

    async def one(i: int) -> None:
        limits = GenerationLimits(steps + 1, stop_on_eos=False)
        lease = await decode.reserve(ReserveRequest(f"b{i}", PROMPT_LEN, limits, 120.0))
        stream = decode.stream_tokens(lease.lease_id)
        prompt = tuple(int(t) for t in np.random.default_rng(i).integers(3, 30000, PROMPT_LEN))
        request = PrefillRequest(f"b{i}", prompt, SamplingParams(), decode_addr, lease.lease_id)
        await prefill.prefill(request, timeout=120.0)
        async for tokens in stream:
            now = time.perf_counter()
            arrivals[i].extend([now] * len(tokens.token_ids))

    await asyncio.gather(*(one(i) for i in range(batch)))
    await decode.close()
    await prefill.close()
    # Steady state: from the moment the last request started decoding to the moment the
    # first one finished, every slot was live.
    start = max(a[0] for a in arrivals)
    end = min(a[-1] for a in arrivals)
    tokens = sum(sum(1 for t in a if start < t <= end) for a in arrivals)
    return tokens / (end - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="small")
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        flags = (
            "--model",
            args.config,
            "--prefill-buckets",
            str(PROMPT_LEN),
            "--max-seq-len",
            str(MAX_SEQ_LEN),
            "--slots",
            str(batch),
        )
        spec = ClusterSpec(worker_flags=flags, orchestrator=False, startup_timeout_s=600.0)
        with Cluster.start(spec) as cluster:
            prefill, decode = cluster.workers["prefill-0"], cluster.workers["decode-0"]
            server = [
                asyncio.run(server_tokens_per_s(prefill.address, decode.address, batch, args.steps))
                for _ in range(args.repeats)
            ]
        engine = [engine_tokens_per_s(args.config, batch, args.steps) for _ in range(args.repeats)]
        row = {
            "config": args.config,
            "batch": batch,
            "server_tokens_per_s": statistics.median(server),
            "engine_tokens_per_s": statistics.median(engine),
        }
        row["ratio"] = row["server_tokens_per_s"] / row["engine_tokens_per_s"]
        rows.append(row)
        print(row, file=sys.stderr)

    print(f"\n{'config':<8}{'batch':>6}{'server tok/s':>14}{'engine tok/s':>14}{'ratio':>8}")
    for r in rows:
        print(
            f"{r['config']:<8}{r['batch']:>6}{r['server_tokens_per_s']:>14.1f}"
            f"{r['engine_tokens_per_s']:>14.1f}{r['ratio']:>8.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

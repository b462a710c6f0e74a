"""The chunked paged prefill against a dense prefill of the same prompt, in one run.

    python bench/prefill_paths_bench.py --out FILE.json [--model smollm2] [--lengths 128,512]

For each prompt length L, one engine with a prefill bucket of L (so `Engine.prefill` runs
the prompt as one chunk, as a prefill worker with `--prefill-chunk L` does):
* `chunked_tok_s`: `Engine.prefill` (shared/engine/prefill.py): the chunk program over a
  paged pool (K/V scattered into pages, attention read back through the page table), the
  first token sampled, and the KV gathered out of the pool: what a prefill worker runs.
* `dense_tok_s`: the same model without a cache (`Transformer`, shared/engine/model/
  llama.py), causal attention over the prompt itself, logits at the last position only:
  the least a prefill must compute, with nothing kept.
`chunked_over_dense` = chunked / dense tokens/s. Medians of several calls after a warm-up;
both in the same process, one after the other per length. The issue's goal: at least 0.8
at 128 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
from engine_bench import engine_and_params, timed

from shared.config import EngineConfig
from shared.engine.engine import Params


def measure(model: str, length: int, repeats: int) -> dict:
    config = EngineConfig(1, (length,), max(512, 2 * length), page_size=16)
    engine, params = engine_and_params(model, config)
    rng = np.random.default_rng(length)
    prompt = rng.integers(0, engine.model_config.vocab_size, length).astype(np.int32)

    def chunked() -> None:
        jax.block_until_ready(engine.prefill(params, prompt).cache)

    @jax.jit
    def dense_forward(params: Params, tokens: jax.Array) -> jax.Array:
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
        last = jnp.full((1,), tokens.shape[1] - 1, jnp.int32)
        logits, _ = engine.model(params)(tokens, positions, logits_at=last)
        return jnp.argmax(logits, axis=-1)

    tokens = prompt[None, :]

    def dense() -> None:
        with jax.set_mesh(engine.mesh):
            dense_forward(params, tokens).block_until_ready()

    chunked_s = timed(chunked, repeats)
    dense_s = timed(dense, repeats)
    chunked_again_s = timed(chunked, repeats)  # both sides of the dense run: drift shows
    return {
        "model": model,
        "length": length,
        "chunked_ms": chunked_s * 1e3,
        "chunked_again_ms": chunked_again_s * 1e3,
        "dense_ms": dense_s * 1e3,
        "chunked_tok_s": length / chunked_s,
        "dense_tok_s": length / dense_s,
        "chunked_over_dense": dense_s / chunked_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lengths", default="128,512")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = [measure(args.model, int(n), args.repeats) for n in args.lengths.split(",")]
    print(f"{'length':>7} {'chunked ms':>11} {'again ms':>9} {'dense ms':>9} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['length']:>7} {r['chunked_ms']:>11.1f} {r['chunked_again_ms']:>9.1f} "
            f"{r['dense_ms']:>9.1f} {r['chunked_over_dense']:>6.2f}"
        )
    report = {
        "bench": "prefill_paths",
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_before": load,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

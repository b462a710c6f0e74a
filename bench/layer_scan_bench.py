"""Would scanning over layers cut SmolLM2's compile time for free? The cost on this CPU.

    python bench/layer_scan_bench.py --out bench/results/layer_scan_bench.json

30 MLP-shaped layers of SmolLM2's sizes (d_model 576, FFN 1536, float32), three ways:
* `separate`: one array per layer, unrolled (pdserve's layout today);
* `stacked_static`: one [30, ...] array per weight, unrolled with static slices (a stacked
  layout that decode keeps unrolled);
* `scan`: the stacked arrays under `jax.lax.scan` (one layer compiled).
For 1 row (a decode step) and 128 rows (a prefill bucket): compile seconds and the median
run. Scanning shares the parameter arrays only if they are stored stacked, so both decode
and prefill would pay that layout's run cost (or keep a second, stacked copy of the
weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

LAYERS, D_MODEL, FFN = 30, 576, 1536


def main(argv: list[str] | None = None) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    ups = [
        jnp.asarray(rng.standard_normal((D_MODEL, FFN), np.float32) * 0.02) for _ in range(LAYERS)
    ]
    downs = [
        jnp.asarray(rng.standard_normal((FFN, D_MODEL), np.float32) * 0.02) for _ in range(LAYERS)
    ]
    up_stack, down_stack = jnp.stack(ups), jnp.stack(downs)

    def layer(x: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
        return x + jnp.tanh(x @ up) @ down

    def separate(x: jax.Array, ups: list, downs: list) -> jax.Array:
        for up, down in zip(ups, downs, strict=True):
            x = layer(x, up, down)
        return x

    def stacked_static(x: jax.Array, ups: jax.Array, downs: jax.Array) -> jax.Array:
        for i in range(LAYERS):
            x = layer(x, ups[i], downs[i])
        return x

    def scan(x: jax.Array, ups: jax.Array, downs: jax.Array) -> jax.Array:
        return jax.lax.scan(lambda x, w: (layer(x, *w), None), x, (ups, downs))[0]

    variants = {
        "separate": (separate, (ups, downs)),
        "stacked_static": (stacked_static, (up_stack, down_stack)),
        "scan": (scan, (up_stack, down_stack)),
    }
    result: dict = {
        "layers": LAYERS,
        "d_model": D_MODEL,
        "ffn": FFN,
        "load_average_at_start": os.getloadavg(),
        "rows": {},
    }
    jax.jit(lambda a: a + 1)(up_stack).block_until_ready()  # backend start-up, not timed
    for rows in (1, 128):
        x = jnp.ones((rows, D_MODEL), jnp.float32)
        for name, (fn, weights) in variants.items():
            jitted = jax.jit(fn)
            start = time.perf_counter()
            jitted.lower(x, *weights).compile()
            compile_s = time.perf_counter() - start
            jitted(x, *weights).block_until_ready()
            runs = []
            for _ in range(9):
                start = time.perf_counter()
                jitted(x, *weights).block_until_ready()
                runs.append(time.perf_counter() - start)
            entry = {"compile_s": compile_s, "run_ms": statistics.median(runs) * 1e3}
            result["rows"].setdefault(str(rows), {})[name] = entry
            print(
                f"{rows:>3} rows  {name:<15} compile {compile_s:5.2f} s  run "
                f"{entry['run_ms']:7.2f} ms",
                flush=True,
            )
    result["load_average_at_end"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

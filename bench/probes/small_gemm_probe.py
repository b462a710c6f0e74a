"""How fast this CPU multiplies at a decode step's shapes: SmolLM2's MLP at 1, 8 and 32 rows.

    python bench/probes/small_gemm_probe.py --out bench/results/small_gemm_probe.json

30 layers of `x @ up` then `@ down` (576 -> 1536 -> 576, float32, each layer's weights their
own arrays, 212 MiB in all, as in the model), jitted by XLA:CPU (whose dots go to its GEMM
library) and the same in numpy (OpenBLAS), beside one 2048^3 product (this machine's
GEMM peak). It showed that the decode step's dense part, most of a step at 8-32 rows, is
bound by the GEMM libraries at small M: 25-45 GFLOPS at 8 rows and 55-80 at 32 in both
XLA and OpenBLAS, against ~160 at 2048^3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from engine_bench import timed

LAYERS, D_MODEL, D_FF = 30, 576, 1536


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ups = [rng.random((D_MODEL, D_FF), np.float32) * 0.01 for _ in range(LAYERS)]
    downs = [rng.random((D_FF, D_MODEL), np.float32) * 0.01 for _ in range(LAYERS)]
    jax_ups, jax_downs = [jnp.asarray(w) for w in ups], [jnp.asarray(w) for w in downs]

    @jax.jit
    def mlp(x: jax.Array, ups: list[jax.Array], downs: list[jax.Array]) -> jax.Array:
        for up, down in zip(ups, downs, strict=True):
            x = x + (x @ up) @ down
        return x

    def numpy_mlp(x: np.ndarray) -> np.ndarray:
        for up, down in zip(ups, downs, strict=True):
            x = x + (x @ up) @ down
        return x

    big = jnp.asarray(rng.random((2048, 2048), np.float32))
    square = jax.jit(lambda a: a @ a)
    peak_s = timed(lambda: square(big).block_until_ready(), 10)
    report: dict = {
        "load_avg_before": os.getloadavg()[0],
        "peak_gflops_2048": 2 * 2048**3 / peak_s / 1e9,
        "rows": [],
    }
    print(f"2048^3: {report['peak_gflops_2048']:.1f} GFLOPS")
    for m in (1, 8, 32):
        x = rng.random((m, D_MODEL), np.float32)
        jx = jnp.asarray(x)
        flops = LAYERS * 2 * 2 * m * D_MODEL * D_FF
        xla_s = timed(lambda jx=jx: mlp(jx, jax_ups, jax_downs).block_until_ready(), 15)
        numpy_s = timed(lambda x=x: numpy_mlp(x), 15)
        row = {
            "rows": m,
            "xla_ms": xla_s * 1e3,
            "xla_gflops": flops / xla_s / 1e9,
            "openblas_ms": numpy_s * 1e3,
            "openblas_gflops": flops / numpy_s / 1e9,
        }
        report["rows"].append(row)
        print(
            f"rows={m:>3}: XLA {row['xla_ms']:6.1f} ms {row['xla_gflops']:6.1f} GFLOPS | "
            f"OpenBLAS {row['openblas_ms']:6.1f} ms {row['openblas_gflops']:6.1f} GFLOPS"
        )
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

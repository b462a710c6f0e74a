"""Loading and int8 benchmark: load time and peak RSS per weight source, int8 decode steps.

    python bench/load_bench.py [--out bench/results/load_bench.json] [--steps 30]

1. Writes the `small` preset as a Hugging Face directory (random float32 weights, written
   with safetensors from numpy, no torch) in a temp dir, then converts it with
   `pdserve convert` to a float32 and a pre-quantized int8 orbax checkpoint.
2. Loads each source with `load_model` in a fresh subprocess, so the child's peak RSS is
   the honest peak of that one load: the high-water mark is reset after the imports, and
   the RSS at that point (JAX and friends, "base") is reported beside it.
3. Times `generate` at batch 8 for float32 and int8 params of `small`.
This machine is shared and noisy: compare ratios within a run, not absolute numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
from safetensors.numpy import save_file

REPO = pathlib.Path(__file__).resolve().parents[1]
PRESET = "small"

_CHILD = """
import json, pathlib, resource, sys, time
import jax
from shared.weights.checkpoint import load_model, param_bytes
from shared.config import EngineConfig

def status_mib(key):
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

# Reset the RSS high-water mark after the imports (Linux: clear_refs 5), so the peak is
# the load's own; without that, fall back to ru_maxrss (which includes the imports).
try:
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    reset = True
except OSError:
    reset = False
base = status_mib("VmRSS")
start = time.perf_counter()
loaded = load_model(sys.argv[1], engine_config=EngineConfig(), quantize=sys.argv[2] or None)
jax.block_until_ready(loaded.params)
seconds = time.perf_counter() - start
peak = status_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mib": peak, "base_rss_mib": base,
                  "param_mib": param_bytes(loaded.params) / 2**20}))
"""


def write_hf_dir(out: pathlib.Path) -> None:
    """`small` as LlamaForCausalLM safetensors: one shard per group of layers + an index."""
    from shared.config import model_preset
    from shared.weights.hf import tensor_names

    config = model_preset(PRESET)
    rng = np.random.default_rng(0)
    shapes = _hf_shapes(config)
    weight_map: dict[str, str] = {}
    groups = [[n for n in shapes if not n.startswith("model.layers.")]]
    groups += [
        [n for n in shapes if n.startswith(f"model.layers.{i}.")] for i in range(config.num_layers)
    ]
    for index, names in enumerate(groups):
        file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (rng.standard_normal(shapes[n], np.float32) * 0.02) for n in names}
        save_file(tensors, str(out / file))
        weight_map.update(dict.fromkeys(names, file))
    assert set(weight_map) == set(tensor_names(config))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(_hf_config(config)))


def _hf_shapes(config: object) -> dict[str, tuple[int, ...]]:
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {
        "model.embed_tokens.weight": (c.vocab_size, c.d_model),
        "model.norm.weight": (c.d_model,),
        "lm_head.weight": (c.vocab_size, c.d_model),
    }
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (c.d_model,),
            p + "post_attention_layernorm.weight": (c.d_model,),
            p + "self_attn.q_proj.weight": (q, c.d_model),
            p + "self_attn.k_proj.weight": (kv, c.d_model),
            p + "self_attn.v_proj.weight": (kv, c.d_model),
            p + "self_attn.o_proj.weight": (c.d_model, q),
            p + "mlp.gate_proj.weight": (c.ffn_dim, c.d_model),
            p + "mlp.up_proj.weight": (c.ffn_dim, c.d_model),
            p + "mlp.down_proj.weight": (c.d_model, c.ffn_dim),
        }
    return shapes


def _hf_config(c: object) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": False,
        "bos_token_id": c.bos_id,
        "eos_token_id": c.eos_id,
    }


def _run(args: Sequence[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, check=False, env=env
    )
    if proc.returncode:
        raise RuntimeError(f"{args[:2]} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def measure_load(spec: pathlib.Path, quantize: str, repeats: int) -> dict[str, float]:
    """Median seconds and max peak RSS over `repeats` fresh processes."""
    runs = [
        json.loads(_run(["-c", _CHILD, str(spec), quantize]).splitlines()[-1])
        for _ in range(repeats)
    ]
    best = {k: max(r[k] for r in runs) for k in ("peak_rss_mib", "base_rss_mib", "param_mib")}
    return {"seconds": statistics.median(r["seconds"] for r in runs), **best}


_DECODE_CHILD = """
import json, statistics, sys, time
import jax
from shared.weights.checkpoint import load_model
from shared.config import EngineConfig
from decode_server.scheduler import DecodeBatch
from shared.engine.engine import Engine

engine_config = EngineConfig(max_slots=8, prefill_buckets=(16,), max_seq_len=256)
loaded = load_model(sys.argv[3], engine_config=engine_config, quantize=sys.argv[1] or None)
engine = Engine(loaded.model_config, engine_config)
prefix = engine.prefill(loaded.params, list(range(1, 13)))
batch = DecodeBatch(engine)
batch.insert([prefix] * 8, list(range(8)))
samples = []
for i in range(int(sys.argv[2]) + 3):  # 3 warm-up steps, compile included
    start = time.perf_counter()
    batch.step(loaded.params)  # reads the tokens back
    if i >= 3:
        samples.append(time.perf_counter() - start)
print(json.dumps(statistics.median(samples) * 1e3))
"""

# As bench/kv_transfer_bench.py does: keep glibc from mapping and unmapping every large
# buffer (each fresh mapping page-faults again). XLA:CPU materializes the dequantized f32
# weights each int8 step, so without this the int8 figure is mostly page faults.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TOP_PAD_": str(2**29)}


def decode_step_ms(quantize: str, steps: int, malloc_tuning: bool) -> float:
    """Median ms of one `generate` at batch 8 (all slots live), in a fresh process."""
    env = {**os.environ, **(MALLOC_ENV if malloc_tuning else {})}
    return float(
        _run(["-c", _DECODE_CHILD, quantize, str(steps), PRESET], env=env).splitlines()[-1]
    )


@dataclasses.dataclass(frozen=True)
class LoadCase:
    source: str  # "orbax" | "hf"
    dtype: str  # what is served: "float32" | "int8"
    path_key: str  # which directory
    quantize: str  # --quantize at load ("" = none)
    note: str


CASES = (
    LoadCase("orbax", "float32", "orbax_f32", "", "float32 checkpoint"),
    LoadCase("hf", "float32", "hf", "", "safetensors, converted on load"),
    LoadCase("orbax", "int8", "orbax_int8", "", "pre-quantized checkpoint"),
    LoadCase("orbax", "int8", "orbax_f32", "int8", "float32 checkpoint, quantized on load"),
    LoadCase("hf", "int8", "hf", "int8", "safetensors, quantized on load"),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "bench/results/load_bench.json")
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps per dtype")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per load")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="decode without it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pdserve-load-bench-") as tmp:
        dirs = {k: pathlib.Path(tmp) / k for k in ("hf", "orbax_f32", "orbax_int8")}
        dirs["hf"].mkdir()
        write_hf_dir(dirs["hf"])
        cli = ["-m", "pdserve_cli", "convert", "--hf-dir", str(dirs["hf"]), "--out"]
        _run([*cli, str(dirs["orbax_f32"])])
        _run([*cli, str(dirs["orbax_int8"]), "--quantize", "int8"])
        loads = []
        for case in CASES:
            result = measure_load(dirs[case.path_key], case.quantize, args.repeats)
            loads.append({"source": case.source, "dtype": case.dtype, "note": case.note, **result})
    tuning = not args.no_malloc_tuning
    f32_ms = decode_step_ms("", args.steps, tuning)
    int8_ms = decode_step_ms("int8", args.steps, tuning)
    report = {
        "model": PRESET,
        "load": loads,
        "int8_decode": {
            "batch": 8,
            "malloc_tuning": tuning,
            "float32_step_ms": f32_ms,
            "int8_step_ms": int8_ms,
            "ratio": int8_ms / f32_ms,
        },
    }
    print(
        f"{'source':<6} {'served':<8} {'seconds':>8} {'peak MiB':>9} {'base MiB':>9} "
        f"{'params MiB':>10}  note"
    )
    for r in loads:
        print(
            f"{r['source']:<6} {r['dtype']:<8} {r['seconds']:>8.2f} {r['peak_rss_mib']:>9.0f} "
            f"{r['base_rss_mib']:>9.0f} {r['param_mib']:>10.0f}  {r['note']}"
        )
    print(
        f"decode step, batch 8: float32 {f32_ms:.2f} ms, int8 {int8_ms:.2f} ms "
        f"(int8/float32 = {int8_ms / f32_ms:.2f})"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

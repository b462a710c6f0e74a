"""SmolLM2-135M (the packaged GGUF): worker startup (load + compile) and int8 agreement.

    python bench/smollm2_bench.py --out bench/results/smollm2_bench.json [--skip-startup]

1. Startup: `pdserve worker --role prefill` and `--role decode` with `pdserve serve`'s
   default engine flags, one after the other (each alone on the machine), timed from
   spawn to its ready line (shared/cluster); the worker's own progress lines split load
   from compile.
2. int8 agreement: greedy tokens of each int8 model (weight-only) against float32 (the
   dequantized file), over 20 chat prompts of NEW_TOKENS tokens each (past the end of
   turn too): the fraction of tokens before the first divergence, averaged (the goal is
   >= 0.90), and the prompts that agree entirely. Variants:
   * `int8`: AQT per output channel, quantized on load from the dequantized float32
     weights (`--quantize int8`), and the same with the embedding table and the tied LM
     head kept in float (`--quantize int8 --float-lm-head`);
   * `int8_blocks`: the GGUF's own 32-weight blocks as int8 with their scales and
     offsets (`--quantize int8-blocks`);
   * `int8_blocks_from_floats`: 32-weight min/max blocks rounded from the dequantized
     float32 weights, what `--quantize int8-blocks` gives a float source (an F16/BF16
     GGUF, an HF checkpoint).

`--skip-startup` keeps the startup figures already in `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.cluster.cluster import worker_argv  # noqa: E402
from shared.cluster.processes import kill, launch, wait_ready  # noqa: E402

SERVE_ENGINE_FLAGS = ("--slots", "8", "--prefill-buckets", "16,32,64,128", "--max-seq-len", "256")
NEW_TOKENS = 32
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about autumn.",
    "What is 12 times 7?",
    "Who wrote Romeo and Juliet?",
    "Explain photosynthesis in one sentence.",
    "Give me a synonym for happy.",
    "What is the boiling point of water in Celsius?",
    "List the planets of the solar system.",
    "Translate 'good morning' into Spanish.",
    "What does a CPU do?",
    "Tell me a fun fact about octopuses.",
    "How many days are in a leap year?",
    "What is the largest ocean on Earth?",
    "Suggest a name for a pet cat.",
    "Why is the sky blue?",
    "What is Python used for?",
    "Describe a rainbow.",
    "What is the square root of 81?",
    "Recommend a book for a long flight.",
]


def startup(role: str) -> dict:
    """Seconds from spawn to the ready line, and the worker's own load / compile split."""
    from shared.serving.flags import for_role

    flags = ["--model", "smollm2", *for_role(role, SERVE_ENGINE_FLAGS)]  # prefill: no --slots
    start = time.perf_counter()
    child = launch(role, worker_argv(role, *flags), env={"JAX_PLATFORMS": "cpu"})
    try:
        wait_ready(child, timeout=1800.0)
        total = time.perf_counter() - start
    finally:
        kill(child)
    loaded = re.search(r"loaded in ([\d.]+)s", child.text())
    loaded_s = float(loaded[1]) if loaded else None
    return {
        "role": role,
        "total_s": total,
        "load_s": loaded_s,
        "compile_s": total - (loaded_s or 0.0),
    }


def int8_agreement() -> dict:
    import numpy as np

    from decode_server.scheduler import DecodeBatch
    from shared.chat import ChatMessage, render_chat
    from shared.config import EngineConfig, Quantization
    from shared.engine.engine import Engine
    from shared.weights.checkpoint import load_model
    from shared.weights.model_info import load_model_info

    engine_config = EngineConfig(max_slots=len(QUESTIONS), prefill_buckets=(64,), max_seq_len=128)
    info = load_model_info("smollm2")
    prompts = [
        info.tokenizer.encode(render_chat(info.chat, [ChatMessage("user", q)]), add_bos=False)
        for q in QUESTIONS
    ]
    tokens = {}
    variants = {
        "float32": None,
        "int8": Quantization(),
        "int8_float_embedding_and_head": Quantization(embedding=False, lm_head=False),
        "int8_blocks": Quantization(block_size=32),
        "int8_blocks_from_floats": Quantization(block_size=32),
    }
    float_params = None
    for name, quantize in variants.items():
        if name.endswith("_from_floats"):
            config = dataclasses.replace(float_params[0], quantization=quantize)
            params = _quantized_from_floats(config, float_params[1], engine_config)
        else:
            loaded = load_model("smollm2", engine_config=engine_config, quantize=quantize)
            config, params = loaded.model_config, loaded.params
        if quantize is None:
            float_params = (config, params)
        engine = Engine(config, engine_config)
        prefixes = [engine.prefill(params, p) for p in prompts]
        batch = DecodeBatch(engine)
        batch.insert(prefixes, list(range(len(prompts))))
        steps = [np.array([p.first_token for p in prefixes])]
        for _ in range(NEW_TOKENS - 1):  # greedy past EOS too: every prompt gets 32 tokens
            step = batch.step(params)[0]
            steps.append(np.array([step[slot] for slot in range(len(prompts))]))
        tokens[name] = np.stack(steps, axis=1)  # [prompts, NEW_TOKENS]
    reference = tokens.pop("float32")
    return {name: _agreement(reference, other) for name, other in tokens.items()}


def _quantized_from_floats(config, float_params, engine_config):
    """Float params -> `config`'s int8 params, leaf by leaf through the loaders' own
    `place` (what a float checkpoint quantized on load gets)."""
    import jax.numpy as jnp

    from shared.weights.tree import abstract_params, flatten, float_paths, place, unflatten

    abstract = abstract_params(config, jnp.dtype(engine_config.dtype))
    targets, floats = flatten(abstract), flatten(float_params)
    flat = {}
    for path in float_paths(targets):
        flat.update(place(path, floats[path], targets))
    return unflatten(abstract, flat)


def _agreement(reference, other) -> dict:
    import numpy as np

    same = reference == other
    before_divergence = [int(np.argmin(row)) if not row.all() else NEW_TOKENS for row in same]
    return {
        "prompts": len(same),
        "new_tokens": NEW_TOKENS,
        "mean_fraction_before_first_divergence": statistics.mean(
            n / NEW_TOKENS for n in before_divergence
        ),
        "tokens_before_first_divergence": before_divergence,
        "fully_agreeing_prompts": sum(n == NEW_TOKENS for n in before_divergence),
        "position_agreement": float(same.mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-startup", action="store_true")
    args = parser.parse_args(argv)
    result: dict = {"load_average_at_start": os.getloadavg()}
    if args.skip_startup and args.out.is_file():
        previous = json.loads(args.out.read_text())
        result["startup"] = previous.get("startup")
        result["startup_load_average_at_start"] = previous.get("load_average_at_start")
    if not args.skip_startup:
        result["startup"] = [startup("prefill"), startup("decode")]
        for r in result["startup"]:
            print(
                f"{r['role']:<8} startup {r['total_s']:6.1f} s  (load {r['load_s']:.1f} s, "
                f"compile + process start {r['compile_s']:.1f} s)"
            )
    result["int8_agreement"] = agreements = int8_agreement()
    for name, agreement in agreements.items():
        a = agreement
        print(
            f"{name} vs float32 over {a['prompts']} prompts x {NEW_TOKENS} tokens: "
            f"{a['mean_fraction_before_first_divergence']:.3f} of tokens before the first "
            f"divergence (goal >= 0.90); {a['fully_agreeing_prompts']} prompts agree "
            f"entirely; per-position agreement {a['position_agreement']:.3f}"
        )
    result["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

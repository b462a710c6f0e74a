"""Which int8 layout could keep SmolLM2's greedy tokens: a probe, not a serving path.

    python bench/probes/int8_variants_probe.py --out bench/results/int8_variants_probe.json

Each variant rounds the dequantized float32 weights (every dense kernel, and the embedding
that is also the tied LM head) the way that layout would store them, then runs the float
engine on the rounded weights: the greedy agreement with float32 that the layout would
give, before any kernel for it exists. Same 20 chat prompts x 32 tokens and metric as
bench/smollm2_bench.py; `int8_per_channel` reproduces that bench's served int8 tokens
(AQT, one scale per output channel), which checks the rounding here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# bench/smollm2_bench.py (the prompts and the agreement metric) lives one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import smollm2_bench

GROUP = 32  # the GGUF block size of Q4_1 and Q8_0


def _groups(w: np.ndarray, axis: int) -> tuple[np.ndarray, tuple[int, ...]]:
    moved = np.moveaxis(w, axis, -1)
    return moved.reshape(*moved.shape[:-1], -1, GROUP), moved.shape


def _back(g: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    return np.moveaxis(g.reshape(shape), -1, axis).astype(np.float32)


def per_channel(w: np.ndarray, axis: int) -> np.ndarray:
    scale = np.abs(w).max(axis=axis, keepdims=True) / 127.5
    return (np.clip(np.round(w / np.where(scale == 0, 1, scale)), -127, 127) * scale).astype(
        np.float32
    )


def symmetric_groups(w: np.ndarray, axis: int) -> np.ndarray:
    g, shape = _groups(w, axis)
    scale = np.abs(g).max(axis=-1, keepdims=True) / 127.5
    return _back(
        np.clip(np.round(g / np.where(scale == 0, 1, scale)), -127, 127) * scale, shape, axis
    )


def asymmetric_groups(w: np.ndarray, axis: int) -> np.ndarray:
    g, shape = _groups(w, axis)
    low, high = g.min(axis=-1, keepdims=True), g.max(axis=-1, keepdims=True)
    step = (high - low) / 255
    return _back(np.round((g - low) / np.where(step == 0, 1, step)) * step + low, shape, axis)


def float16(w: np.ndarray, axis: int) -> np.ndarray:
    return w.astype(np.float16).astype(np.float32)


VARIANTS = {
    "int8_per_channel": per_channel,
    "int8_symmetric_groups_of_32": symmetric_groups,
    "uint8_asymmetric_groups_of_32": asymmetric_groups,
    "float16": float16,
}


def _prompts() -> list[list[int]]:
    from shared.chat import ChatMessage, render_chat
    from shared.weights.model_info import load_model_info

    info = load_model_info("smollm2")
    return [
        info.tokenizer.encode(render_chat(info.chat, [ChatMessage("user", q)]), add_bos=False)
        for q in smollm2_bench.QUESTIONS
    ]


def _greedy(engine: object, params: object, prompts: list[list[int]]) -> np.ndarray:
    """[prompts, NEW_TOKENS] greedy tokens of the float engine on `params`."""
    from decode_server.scheduler import DecodeBatch

    prefixes = [engine.prefill(params, p) for p in prompts]
    batch = DecodeBatch(engine)
    batch.insert(prefixes, list(range(len(prompts))))
    steps = [np.array([p.first_token for p in prefixes])]
    for _ in range(smollm2_bench.NEW_TOKENS - 1):
        step = batch.step(params)[0]
        steps.append(np.array([step[slot] for slot in range(len(prompts))]))
    return np.stack(steps, axis=1)


def _rounded_params(params: object, weights: dict, rounding: object) -> object:
    """A copy of `params` whose kernels and embedding went through `rounding`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def rounded(path: tuple, leaf: object) -> object:
        key = getattr(path[-1], "key", path[-1])
        if key == "kernel":  # [in, out]: contracting axis 0
            return jnp.asarray(rounding(np.asarray(leaf, np.float32), 0))
        if key == "embedding":  # [V, D]: read along D, as the tied LM head contracts
            return jnp.asarray(rounding(np.asarray(leaf, np.float32), 1))
        return leaf

    copy = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(copy, jax.tree_util.tree_map_with_path(rounded, weights))
    return copy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from flax import nnx

    from shared.config import EngineConfig
    from shared.engine.engine import Engine
    from shared.weights.checkpoint import load_model

    prompts = _prompts()
    config = EngineConfig(max_slots=len(prompts), prefill_buckets=(64,), max_seq_len=128)
    loaded = load_model("smollm2", engine_config=config)
    engine = Engine(loaded.model_config, config)
    weights = nnx.to_pure_dict(loaded.params)
    reference = _greedy(engine, loaded.params, prompts)
    command = "python bench/probes/int8_variants_probe.py " + " ".join(argv or sys.argv[1:])
    result: dict = {"command": command}
    for name, rounding in VARIANTS.items():
        params = _rounded_params(loaded.params, weights, rounding)
        result[name] = smollm2_bench._agreement(reference, _greedy(engine, params, prompts))
        share = result[name]["mean_fraction_before_first_divergence"]
        print(f"{name:<32} {share:.3f} of tokens before the first divergence", flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

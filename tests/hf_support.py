"""Helpers shared by the HF import / checkpoint / quantization tests: the committed
fixtures (tests/fixtures/hf, made by make_hf_fixtures.py) and the serving path."""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import numpy as np

from decode_server.scheduler import DecodeBatch
from shared.engine.engine import Engine, Params

HF_FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf"
FIXTURE_NAMES = ("llama_gqa", "qwen2_bias")


@dataclasses.dataclass(frozen=True)
class Reference:
    """What transformers computed (float32) for one fixture model."""

    prompts: list[list[int]]
    continuations: list[list[int]]  # greedy, NEW_TOKENS each
    margins: list[float]  # smallest top-2 logit gap along each greedy continuation
    logits: list[np.ndarray]  # [len(prompt + continuation) - 1, V] per prompt

    def sequence(self, i: int) -> list[int]:
        """Prompt plus all but the last generated token: the positions `logits[i]` covers."""
        return self.prompts[i] + self.continuations[i][:-1]


@functools.cache
def reference(name: str) -> Reference:
    meta = json.loads((HF_FIXTURES / name / "reference.json").read_text())
    arrays = np.load(HF_FIXTURES / name / "reference.npz")
    logits = [arrays[f"logits_{i}"] for i in range(len(meta["prompts"]))]
    return Reference(meta["prompts"], meta["continuations"], meta["margins"], logits)


def greedy(
    engine: Engine, params: Params, prompts: list[list[int]], steps: int
) -> tuple[list[list[int]], list[np.ndarray]]:
    """All prompts through `prefill`, inserted into slots together, then `steps - 1`
    `generate` calls: the serving path, continuous batching included.

    Returns the tokens per prompt and, per prompt, the logits each `generate` sampled from
    ([steps - 1, V]: the positions right after the prompt).
    """
    prefixes = [engine.prefill(params, p) for p in prompts]
    batch = DecodeBatch(engine)
    slots = list(range(len(prompts)))
    batch.insert(prefixes, slots)
    out = [[p.first_token] for p in prefixes]
    step_logits = []
    for _ in range(steps - 1):
        step_logits.append(batch.logits(params, slots))
        tokens, _ = batch.step(params)
        for slot, row in zip(slots, out, strict=True):
            row.append(tokens[slot])
    per_prompt = [np.stack([s[i] for s in step_logits]) for i in range(len(prompts))]
    return out, per_prompt

"""Seeded request-length mixes for capacity benchmarks.

Two shapes over the same ranges (prompts 64-1024 tokens, outputs 16-512):
* `uniform`: every length equally likely (a pessimistic mix: the mean prompt is 544);
* `log-uniform`: every order of magnitude equally likely, the heavy-tailed shape of
  chat traffic (many short prompts and answers, a few long ones).
"""

from __future__ import annotations

import dataclasses

import numpy as np

PROMPT_RANGE = (64, 1024)
OUTPUT_RANGE = (16, 512)
SHAPES = ("uniform", "log-uniform")
# Positions the longest request of the ranges can take: what a contiguous slot must hold
# for any request the deployment admits.
LONGEST = PROMPT_RANGE[1] + OUTPUT_RANGE[1]


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    prompt_len: int
    output_len: int


def _draw(rng: np.random.Generator, low: int, high: int, shape: str, n: int) -> np.ndarray:
    if shape == "uniform":
        return rng.integers(low, high + 1, n)
    if shape == "log-uniform":
        return np.exp(rng.uniform(np.log(low), np.log(high + 1), n)).astype(np.int64)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def request_mix(n: int, shape: str, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    prompts = _draw(rng, *PROMPT_RANGE, shape, n)
    outputs = _draw(rng, *OUTPUT_RANGE, shape, n)
    return [Request(int(p), int(o)) for p, o in zip(prompts, outputs, strict=True)]

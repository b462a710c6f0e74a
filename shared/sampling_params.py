"""A request's sampling parameters: plain data, no JAX (the orchestrator and the client
build and check them; shared/engine/sampling.py turns them into the step's arrays).

temperature 0 means greedy; top_k 0 means no top-k cut; top_p 1 means no nucleus cut. The
seed and the token's absolute position alone decide a sampled token's randomness.
"""

from __future__ import annotations

import dataclasses
import math

MAX_SEED = 2**64 - 1


class SamplingError(ValueError):
    """A sampling parameter is out of range; the message names the value and the limit."""


@dataclasses.dataclass(slots=True, frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 means no top-k cut; top_p 1 means no nucleus cut."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError(f"temperature={self.temperature} must be a finite number >= 0")
        if self.top_k < 0:
            raise SamplingError(f"top_k={self.top_k} must be >= 0 (0 disables top-k)")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p={self.top_p} must be in (0, 1]")
        if not 0 <= self.seed <= MAX_SEED:
            raise SamplingError(f"seed={self.seed} must be in [0, 2**64)")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def seed_words(self) -> tuple[int, int]:
        """The 64-bit seed as (low, high) uint32 words; jax runs without x64."""
        return self.seed & 0xFFFFFFFF, self.seed >> 32

"""What every part of the engine shares: the params type, a step's logprobs, the engine's
errors, bucket sizes and per-row sampling arrays."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shared.sampling_params import SamplingParams

Params = nnx.State
# A step's logprobs (sampling.logprobs): log p(token) [R], top ids [R, N], top logprobs
# [R, N]; zeros when the step was not asked for them.
StepLogprobs = tuple[jax.Array, jax.Array, jax.Array]


class EngineError(ValueError):
    """Bad input to the engine; the message names the value and the limit."""


class PromptTooLongError(EngineError):
    pass


class TokenOutOfVocabularyError(EngineError):
    pass


class SlotError(EngineError):
    pass


def power_of_two_buckets(limit: int) -> tuple[int, ...]:
    """1, 2, 4, ... below `limit`, then `limit`: the sizes a padded shape compiles for."""
    buckets, b = [], 1
    while b < limit:
        buckets.append(b)
        b *= 2
    return (*buckets, limit)


def compute_dtype(name: str) -> jnp.dtype:
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def sampling_rows(rows: Sequence[SamplingParams]) -> tuple[np.ndarray, ...]:
    """Per-row sampling arrays: temperature [R], top_k [R], top_p [R], seeds [R, 2]."""
    return (
        np.array([r.temperature for r in rows], np.float32),
        np.array([r.top_k for r in rows], np.int32),
        np.array([r.top_p for r in rows], np.float32),
        np.array([r.seed_words() for r in rows], np.uint32).reshape(len(rows), 2),
    )


def check_tokens(tokens: np.ndarray, vocab: int) -> None:
    """Every id in [0, vocab), or TokenOutOfVocabularyError naming the first that is not."""
    bad = tokens[(tokens < 0) | (tokens >= vocab)]
    if bad.size:
        raise TokenOutOfVocabularyError(
            f"token id {int(bad[0])} is outside the vocabulary [0, {vocab})"
        )

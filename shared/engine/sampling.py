"""Per-request sampling: greedy, temperature, top-k, top-p, with a per-request seed; and
the sampled tokens' logprobs, for the requests that ask (shared/logprobs.py).

The randomness of a sampled token depends only on (seed, absolute position of that token),
never on the slot, the batch neighbours or the worker: a request resumed elsewhere after a
failure continues the very same sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from shared.logprobs import MAX_TOP_LOGPROBS, TokenLogprob


def token_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """seeds [B, 2] uint32 (low, high), positions [B] -> [B] typed PRNG keys."""

    def one(seed: jax.Array, position: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(seed[0]), seed[1])
        return jax.random.fold_in(key, position)

    return jax.vmap(one)(seeds, positions)


def sample(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seeds: jax.Array,
    positions: jax.Array,
) -> jax.Array:
    """logits [B, V] float32; per-row parameters [B] (seeds [B, 2]) -> tokens [B] int32.

    `positions` [B] is the absolute position the sampled token will occupy.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic() -> jax.Array:
        vocab = logits.shape[-1]
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        ranked = -jnp.sort(-scaled, axis=-1)  # [B, V] descending
        rank = jnp.arange(vocab)[None, :]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
        in_top_k = rank < k
        probs = jax.nn.softmax(jnp.where(in_top_k, ranked, -jnp.inf), axis=-1)
        # Nucleus: keep a token while the mass ranked above it is still below top_p.
        mass_above = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(in_top_k & (mass_above < top_p[:, None]), axis=-1)
        threshold = jnp.take_along_axis(ranked, jnp.maximum(kept, 1)[:, None] - 1, axis=-1)
        candidates = jnp.where(scaled >= threshold, scaled, -jnp.inf)
        keys = token_keys(seeds, positions)
        drawn = jax.vmap(jax.random.categorical)(keys, candidates).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    # Sorting the vocabulary is the costly part: skip it when every live row is greedy.
    return jax.lax.cond(jnp.any(temperature > 0), stochastic, lambda: greedy)


def logprobs(
    logits: jax.Array, tokens: jax.Array, wanted: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [B, V], the tokens drawn from them [B], `wanted` [] bool -> (log p(token)
    [B], top ids [B, N] int32, top logprobs [B, N]), N = min(MAX_TOP_LOGPROBS, V).

    From the logits the step already has: one log-softmax and one `lax.top_k`, only when
    `wanted` (a step where no row asked returns zeros and pays for neither)."""
    n = min(MAX_TOP_LOGPROBS, logits.shape[-1])

    def compute() -> tuple[jax.Array, jax.Array, jax.Array]:
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        chosen = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
        top_values, top_ids = jax.lax.top_k(log_probs, n)
        return chosen, top_ids.astype(jnp.int32), top_values

    def skip() -> tuple[jax.Array, jax.Array, jax.Array]:
        rows = logits.shape[0]
        return (
            jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, n), jnp.int32),
            jnp.zeros((rows, n), jnp.float32),
        )

    return jax.lax.cond(wanted, compute, skip)


def token_logprob(
    chosen: float, top_ids: np.ndarray, top_values: np.ndarray, count: int
) -> TokenLogprob:
    """One row of `logprobs`' host copy, with the request's own `count` of alternatives."""
    top = tuple(zip(top_ids[:count].tolist(), top_values[:count].tolist(), strict=True))
    return TokenLogprob(float(chosen), top)

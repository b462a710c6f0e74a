"""What served output is compared to: the model's uncached full-sequence forward.

No cache, no pages, no chunks: every position attends causally to the tokens before it,
computed from scratch. Greedy continuation re-runs the whole sequence for each token. It
shares only the params and the model code with serving (the same `Transformer`, called
without a cache), so a bug in the paged path, the page tables, inserts or chunking shows
up as a token that differs from this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from shared.engine.base import Params, PromptTooLongError, check_tokens

if TYPE_CHECKING:
    from shared.engine.engine import Engine


class ReferenceForward:
    """One engine's uncached forward, padded to max_seq_len (causal attention makes the
    padding invisible), so it compiles once whatever the length."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._jit = jax.jit(self._impl)

    def logits(self, params: Params, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits [len(tokens), V] at every position."""
        config = self.engine.config
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        check_tokens(tokens, self.engine.model_config.vocab_size)
        if len(tokens) > config.max_seq_len:
            raise PromptTooLongError(
                f"{len(tokens)} tokens exceed max_seq_len ({config.max_seq_len})"
            )
        padded = np.zeros((1, config.max_seq_len), np.int32)
        padded[0, : len(tokens)] = tokens
        with jax.set_mesh(self.engine.mesh):
            return np.asarray(self._jit(params, padded))[0, : len(tokens)]

    def greedy(self, params: Params, prompt: Sequence[int], n: int) -> list[int]:
        """The next `n` greedy tokens after `prompt`, one full forward each."""
        sequence = [int(t) for t in prompt]
        for _ in range(n):
            sequence.append(int(np.argmax(self.logits(params, sequence)[-1])))
        return sequence[len(prompt) :]

    def _impl(self, params: Params, tokens: jax.Array) -> jax.Array:
        self.engine.compile_counts["reference"] += 1
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]  # [1, T]
        logits, _ = self.engine.model(params)(tokens, positions)
        return logits

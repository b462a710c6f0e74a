"""A decode step and a prefill chunk call in one program: the mixed batch.

A worker that runs both phases on one device (the colocated role) would otherwise stall
every decoding request for each prefill call, or run the two on two threads that fight
for the same cores. Here one forward (`Transformer.segments`) takes the decode rows (one
token each, over the decode pool) and the chunk rows (one chunk of one prompt each, over
the prefill pool) together: every dense layer reads the weights once for both, attention
stays within each pool. The inputs and outputs of each part are exactly those of its own
program (`DecodePrograms.step_inputs`/`step_outputs`, `ChunkPrograms.chunk_inputs`/
`chunk_outputs`), so a row's tokens are the same whichever program ran it.

Both pools are donated. Compiled per (decode batch bucket, chunk rows bucket); the chunk
length is the prefill loop's.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import numpy as np

from shared.engine.base import Params, StepLogprobs

if TYPE_CHECKING:
    from shared.engine.chunked_prefill import PackedChunks
    from shared.engine.decode import DecodeState
    from shared.engine.engine import Engine
    from shared.kv.prefix import CacheDict


@dataclasses.dataclass(frozen=True, slots=True)
class MixedOutput:
    state: DecodeState
    tokens: jax.Array  # [decode bucket]: each decode row's next token
    logprobs: StepLogprobs  # the decode rows'
    pool: CacheDict  # the prefill pool, updated
    first: jax.Array  # [chunk bucket]: the token after each chunk row
    chunk_logits: jax.Array  # [chunk bucket, V]
    chunk_logprobs: StepLogprobs


class MixedPrograms:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        rep = engine.replicated
        self.step_jit = jax.jit(
            self._impl,
            donate_argnums=(1, 5),
            out_shardings=(
                engine.decode.state_sharding,
                rep,
                rep,
                engine.chunk_programs.pool_sharding,
                rep,
                rep,
                rep,
            ),
        )
        # (decode batch bucket, chunk rows bucket) pairs compiled ahead: a caller runs a
        # mixed call only for these (else the two programs one after the other), so that
        # serving never waits for a compile. Added to by the compiling thread.
        self.ready: set[tuple[int, int]] = set()

    def is_ready(self, rows: int, chunks: PackedChunks) -> bool:
        """Whether a mixed call of `rows` decode rows beside `chunks` is compiled."""
        bucket = self.engine.batch_bucket(rows)
        return (bucket, chunks.arrays[0].shape[0]) in self.ready

    def step(
        self,
        params: Params,
        state: DecodeState,
        rows: np.ndarray,
        new_pages: np.ndarray | None,
        logprobs: bool,
        pool: CacheDict,
        chunks: PackedChunks,
    ) -> MixedOutput:
        """`Engine.generate` of `rows` and `ChunkedPrefill.run` of `chunks` in one call."""
        padded, pages = self.engine.decode.padded_rows(rows, new_pages)
        with jax.set_mesh(self.engine.mesh):
            out = self.step_jit(
                params, state, padded, pages, np.bool_(logprobs), pool, *chunks.arrays
            )
        return MixedOutput(*out)

    def compile(self, params: Params, bucket: int, chunks: PackedChunks, pool: CacheDict) -> None:
        """Lower and compile the call for decode batch `bucket` and these chunk shapes, on
        an abstract decode state (nothing allocated or donated)."""
        state = self.engine.decode.abstract_state()
        with jax.set_mesh(self.engine.mesh):
            rows = np.zeros((bucket,), np.int32)
            self.step_jit.lower(
                params, state, rows, rows, np.bool_(False), pool, *chunks.arrays
            ).compile()
        self.ready.add((bucket, chunks.arrays[0].shape[0]))

    def _impl(
        self,
        params: Params,
        state: DecodeState,
        rows: jax.Array,
        new_pages: jax.Array,
        decode_wanted: jax.Array,
        pool: CacheDict,
        tokens: jax.Array,  # [R, T]
        starts: jax.Array,
        counts: jax.Array,
        tables: jax.Array,
        temperature: jax.Array,
        top_k: jax.Array,
        top_p: jax.Array,
        seeds: jax.Array,
        chunk_wanted: jax.Array,
    ) -> tuple:
        r, t = tokens.shape
        self.engine.compile_counts[f"mixed[{len(rows)}+{r}x{t}]"] += 1
        decode, chunk = self.engine.decode, self.engine.chunk_programs
        step = decode.step_inputs(state, rows, new_pages)
        paged, last = chunk.chunk_inputs(tokens, starts, counts, tables)
        (step_logits, cache), (chunk_logits, new_pool) = self.engine.model(params).segments(
            [
                (step.tokens, step.paged.q_positions, state.cache, step.paged, step.logits_at),
                (tokens, paged.q_positions, pool, paged, last),
            ]
        )
        new_state, next_tokens, step_logprobs = decode.step_outputs(
            state, rows, step, cache, step_logits, decode_wanted
        )
        first, chunk_logprobs = chunk.chunk_outputs(
            chunk_logits, paged, temperature, top_k, top_p, seeds, chunk_wanted
        )
        return new_state, next_tokens, step_logprobs, new_pool, first, chunk_logits, chunk_logprobs

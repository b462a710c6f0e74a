"""Chunked, packed prefill over a paged KV pool: the one prefill path. Prefill workers
run it (prefill_server/loop.py), and so does `Engine.prefill` (shared/engine/prefill.py).

A prompt is computed in chunks of `chunk` tokens. Each call runs up to `max_rows` rows,
one chunk of one prompt per row (several prompts packed in one call), through the
engine's one paged forward (`Engine.forward`, the decode step's model call with T tokens
per row): every row writes its chunk's K/V into its own pages and attends to its own
pages only (the page table and per-row lengths keep prompts apart: no prompt sees
another's tokens), so a chunk attends to the KV of the chunks before it, and to pages
reused from the prefix cache (shared/kv/prefix_cache.py) exactly as if it had computed
them. Shapes depend on (rows bucket, chunk, pool pages) only: any prompt length up to
max_seq_len - 1 runs without a compile of its own.

When a prompt's last chunk has run, its first token is sampled from the logits at its
last position (seeded by that position, as a decode step samples), and `gather` reads its
KV out of the pool as a layout-neutral `Prefix` (the model's KV heads, one copy each),
which the worker pushes to a decode worker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from shared.engine.base import Params, StepLogprobs, power_of_two_buckets, sampling_rows
from shared.engine.mesh import CACHE_AXES, named
from shared.engine.model.attention import PagedInputs
from shared.engine.sampling import logprobs, sample
from shared.kv.pages import SCRATCH_PAGE
from shared.kv.prefix import CacheDict
from shared.sampling_params import SamplingParams

if TYPE_CHECKING:
    from shared.engine.engine import Engine


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkRow:
    """One prompt's next chunk: `tokens` at positions start .. start + len(tokens) - 1."""

    tokens: np.ndarray
    start: int
    pages: Sequence[int]  # the prompt's pages in position order (all of them)
    sampling: SamplingParams


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkOutput:
    """Per row: the token sampled after the chunk's last position (the prompt's first
    token when the chunk was its last), the logits it came from, its logprobs."""

    tokens: np.ndarray  # [rows]
    logits: jax.Array  # [bucket, V] float32 (rows beyond len(rows) are padding)
    logprobs: StepLogprobs


@dataclasses.dataclass(frozen=True, slots=True)
class PackedChunks:
    """A chunk call's inputs on the host: (tokens, starts, counts, tables, temperature,
    top_k, top_p, seeds, wanted), padded to a rows bucket; `rows` of them are real."""

    arrays: tuple[np.ndarray, ...]
    rows: int

    def output(self, first: jax.Array, logits: jax.Array, logprobs: StepLogprobs) -> ChunkOutput:
        """The call's outputs, cut to the real rows where it matters (the tokens)."""
        return ChunkOutput(np.asarray(first)[: self.rows], logits, logprobs)


class ChunkPrograms:
    """One engine's jitted chunk calls, owned by the engine (`Engine.chunk_programs`) and
    shared by every `ChunkedPrefill` on it, whatever its pool size (a shape the programs
    compile for): tests build many prefill loops on one session engine, and
    `Engine.prefill` runs its prompts through the very same chunk program. Holds no pool:
    the pool is the caller's, passed in."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.page_size = engine, engine.config.page_size
        sharding = named(engine.mesh, CACHE_AXES, engine.rules)
        self.pool_sharding = jax.tree.map(lambda _: sharding, engine.decode_pool_shapes)
        rep = engine.replicated
        self.chunk = jax.jit(
            self._chunk_impl,
            donate_argnums=(1,),
            out_shardings=(self.pool_sharding, rep, rep, rep),
        )
        self.gather = jax.jit(self._gather_impl, out_shardings=rep)
        self.init = jax.jit(self._init_impl, static_argnums=(0,), out_shardings=self.pool_sharding)
        self.copy_page = jax.jit(
            self._copy_page_impl, donate_argnums=(0,), out_shardings=self.pool_sharding
        )

    def _chunk_impl(
        self,
        params: Params,
        pool: CacheDict,
        tokens: jax.Array,  # [R, T]
        starts: jax.Array,  # [R]: position of each row's first token
        counts: jax.Array,  # [R]: valid tokens in the row (0: a padding row)
        tables: jax.Array,  # [R, W]
        temperature: jax.Array,
        top_k: jax.Array,
        top_p: jax.Array,
        seeds: jax.Array,
        wanted: jax.Array,
    ) -> tuple[CacheDict, jax.Array, jax.Array, StepLogprobs]:
        r, t = tokens.shape
        self.engine.compile_counts[f"chunk[{r}x{t}]"] += 1
        paged, last = self.chunk_inputs(tokens, starts, counts, tables)
        logits, new_pool = self.engine.forward(params, pool, tokens, paged, logits_at=last)
        first, step_logprobs = self.chunk_outputs(
            logits, paged, temperature, top_k, top_p, seeds, wanted
        )
        return new_pool, first, logits, step_logprobs

    def chunk_inputs(
        self, tokens: jax.Array, starts: jax.Array, counts: jax.Array, tables: jax.Array
    ) -> tuple[PagedInputs, jax.Array]:
        """Inside a trace: where each row's chunk is written and read, and the position of
        its last valid token (whose logits sample the next token)."""
        t = tokens.shape[1]
        offsets = jnp.arange(t, dtype=jnp.int32)[None, :]
        positions = starts[:, None] + offsets  # [R, T]
        valid = offsets < counts[:, None]
        # Padding tokens (and padding rows) write to the scratch page, which no row reads.
        column = jnp.where(valid, positions // self.page_size, 0)
        write_pages = jnp.where(valid, jnp.take_along_axis(tables, column, axis=1), SCRATCH_PAGE)
        paged = PagedInputs(
            page_table=tables,
            q_positions=positions,
            # A padding row reads the scratch page's first position rather than nothing:
            # a decode kernel (one-token chunks on TPU) wants every row to see something.
            kv_lengths=jnp.maximum(starts + counts, 1),
            write_pages=write_pages,
            write_offsets=positions % self.page_size,
        )
        return paged, jnp.maximum(counts - 1, 0)

    @staticmethod
    def chunk_outputs(
        logits: jax.Array,
        paged: PagedInputs,
        temperature: jax.Array,
        top_k: jax.Array,
        top_p: jax.Array,
        seeds: jax.Array,
        wanted: jax.Array,
    ) -> tuple[jax.Array, StepLogprobs]:
        """Inside a trace: the token sampled after each row's chunk, and its logprobs."""
        # As a decode step: the sampled token lands at position kv_length (a padding row's
        # 1 instead of 0 changes nothing anyone reads).
        first = sample(logits, temperature, top_k, top_p, seeds, paged.kv_lengths)
        return first, logprobs(logits, first, wanted)

    def _gather_impl(self, pool: CacheDict, pages: jax.Array) -> CacheDict:
        self.engine.compile_counts[f"gather[{pages.shape[0]}]"] += 1
        r = self.engine.parallelism.kv_replication

        def read(leaf: jax.Array) -> jax.Array:  # [C, P, S, H] -> [KV, N * S, H]
            rows = leaf[::r, pages]
            return rows.reshape(rows.shape[0], -1, rows.shape[3])

        return jax.tree.map(read, pool)

    def _copy_page_impl(self, pool: CacheDict, source: jax.Array, target: jax.Array) -> CacheDict:
        self.engine.compile_counts["copy_page"] += 1
        # Every layer's page `source` into page `target`, on each device's own heads.
        return jax.tree.map(lambda leaf: leaf.at[:, target].set(leaf[:, source]), pool)

    def _init_impl(self, num_pages: int) -> CacheDict:
        return jax.tree.map(
            lambda s: jnp.zeros((s.shape[0], num_pages, *s.shape[2:]), s.dtype),
            self.engine.decode_pool_shapes,
        )


class ChunkedPrefill:
    def __init__(self, engine: Engine, num_pages: int, chunk: int, max_rows: int) -> None:
        if chunk <= 0 or max_rows <= 0:
            raise ValueError(f"chunk={chunk} and max_rows={max_rows} must be > 0")
        self.engine, self.chunk, self.max_rows = engine, chunk, max_rows
        config = engine.config
        self.page_size, self.num_pages = config.page_size, num_pages
        self.width = config.max_pages_per_slot  # a page-table row: max_seq_len positions
        self.row_buckets = power_of_two_buckets(max_rows)
        self.page_buckets = power_of_two_buckets(self.width)
        self.programs = engine.chunk_programs
        with jax.set_mesh(engine.mesh):
            self.pool: CacheDict = self.programs.init(num_pages)

    def rows_bucket(self, rows: int) -> int:
        return next(b for b in self.row_buckets if b >= rows)

    # Running chunks ------------------------------------------------------------------------

    def run(self, params: Params, rows: Sequence[ChunkRow], want_logprobs: bool) -> ChunkOutput:
        """One call: each row's chunk written into its pages, and the next token sampled
        after each row's last position. The pool is updated in place (donated)."""
        if not rows:
            raise ValueError(f"0 rows: a call takes 1 to {self.max_rows}")
        return self.run_packed(params, self.pack(rows, want_logprobs))

    def run_packed(self, params: Params, packed: PackedChunks) -> ChunkOutput:
        """`run` of rows already packed (`pack`)."""
        with jax.set_mesh(self.engine.mesh):
            self.pool, first, logits, step_logprobs = self.programs.chunk(
                params, self.pool, *packed.arrays
            )
        return packed.output(first, logits, step_logprobs)

    def pack(
        self, rows: Sequence[ChunkRow], want_logprobs: bool, bucket: int | None = None
    ) -> PackedChunks:
        """The arrays of a call of these rows, padded to a rows bucket (by default the
        smallest that holds them): what `run`, or a mixed call beside a decode step
        (shared/engine/mixed.py), passes to the chunk program."""
        if not 0 <= len(rows) <= self.max_rows:
            raise ValueError(f"{len(rows)} rows: a call takes at most {self.max_rows}")
        bucket = bucket or self.rows_bucket(max(len(rows), 1))
        tokens = np.zeros((bucket, self.chunk), np.int32)
        starts = np.zeros((bucket,), np.int32)
        counts = np.zeros((bucket,), np.int32)
        tables = np.full((bucket, self.width), SCRATCH_PAGE, np.int32)
        for i, row in enumerate(rows):
            n = len(row.tokens)
            if not 0 < n <= self.chunk:
                raise ValueError(f"a chunk holds 1 to {self.chunk} tokens, got {n}")
            end_page = -(-(row.start + n) // self.page_size)
            if len(row.pages) < end_page or len(row.pages) > self.width:
                raise ValueError(
                    f"positions up to {row.start + n} need {end_page} pages, got "
                    f"{len(row.pages)} (at most {self.width})"
                )
            tokens[i, :n] = row.tokens
            starts[i], counts[i] = row.start, n
            tables[i, : len(row.pages)] = row.pages
        filler = [SamplingParams()] * (bucket - len(rows))
        sampling = sampling_rows([r.sampling for r in rows] + filler)
        arrays = (tokens, starts, counts, tables, *sampling, np.bool_(want_logprobs))
        return PackedChunks(arrays, len(rows))

    def copy_page(self, source: int, target: int) -> None:
        """Page `source`'s KV into page `target` (a prefix-cache hit of part of a block:
        the prompt fills `target` on from there). In place (donated), in call order."""
        with jax.set_mesh(self.engine.mesh):
            self.pool = self.programs.copy_page(self.pool, np.int32(source), np.int32(target))

    # Reading a prompt's KV out ---------------------------------------------------------------

    def gather(self, pages: Sequence[int], true_length: int) -> CacheDict:
        """The KV of positions [0, true_length) held in `pages` (position order): leaves
        [num_kv_heads, L, head_dim], L >= true_length (a power-of-two count of pages), ready
        (the copy has finished: the pool may be donated to the next call right after)."""
        needed = -(-true_length // self.page_size)
        if len(pages) < needed:
            raise ValueError(f"{true_length} positions need {needed} pages, got {len(pages)}")
        bucket = next(b for b in self.page_buckets if b >= needed)
        padded = np.full((bucket,), SCRATCH_PAGE, np.int32)
        padded[:needed] = pages[:needed]
        with jax.set_mesh(self.engine.mesh):
            cache = self.programs.gather(self.pool, padded)
        return jax.block_until_ready(cache)

    # Compiling ahead -------------------------------------------------------------------------

    def compile(self, params: Params) -> None:
        """Compile every rows bucket, the page copy and every gather length (warm-up)."""
        for bucket in self.row_buckets:
            self._compile_chunk(params, bucket)
        self.copy_page(SCRATCH_PAGE, SCRATCH_PAGE)
        for bucket in self.page_buckets:
            self.gather([SCRATCH_PAGE] * bucket, bucket * self.page_size)

    def _compile_chunk(self, params: Params, bucket: int) -> None:
        packed = self.pack([], False, bucket)
        with jax.set_mesh(self.engine.mesh):
            self.programs.chunk.lower(params, self.pool, *packed.arrays).compile()

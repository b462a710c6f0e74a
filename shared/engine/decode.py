"""The decode state and its jitted programs: init, insert, generate (one step), release.

The decode KV lives in pages: each layer's pool is [C, pages, page_size, H] and the state
holds each slot's page table; which page is whose is decided on the host
(shared/kv/pages.py), and these programs only see the resulting arrays. A step runs the
live rows only, padded to a batch bucket (`Engine.batch_bucket`): one compile per bucket,
and a step costs what its live rows and their live pages cost, not what the slots could
hold. The state passed to `generate`, `bulk_insert` and `release` is donated: the caller
uses the returned state and drops the old one.

The step is the engine's one paged forward (`Engine.forward`), the same model call a
prefill chunk makes (shared/engine/chunked_prefill.py), one token per row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from shared.engine.base import (
    Params,
    PromptTooLongError,
    SlotError,
    StepLogprobs,
    sampling_rows,
)
from shared.engine.mesh import CACHE_AXES, named
from shared.engine.model.attention import PagedInputs
from shared.engine.sampling import logprobs, sample
from shared.kv.pages import SCRATCH_PAGE
from shared.kv.prefix import CacheDict, Prefix
from shared.sampling_params import SamplingParams

if TYPE_CHECKING:
    from shared.engine.engine import Engine


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the decode step reads and writes; one row per slot. [B] = max_slots."""

    cache: CacheDict  # leaves [C, P, page_size, H]: the page pools (C cache heads, sharded)
    page_table: jax.Array  # [B, W] int32: each slot's pages in position order, then scratch
    lengths: jax.Array  # [B] int32: tokens in the cache = position of `tokens`
    tokens: jax.Array  # [B] int32: the last sampled token, fed to the next step
    active: jax.Array  # [B] bool
    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] float32
    seeds: jax.Array  # [B, 2] uint32


class StepInputs(NamedTuple):
    """Inside a trace: one decode step's rows as the model reads them."""

    live: jax.Array  # [R] bool: a live slot's row (not padding, not idle)
    table: jax.Array  # [R, W]: each row's page table, its new page included
    tokens: jax.Array  # [R, 1]: each row's last token
    paged: PagedInputs
    logits_at: jax.Array  # [R]: zeros (the one position of each row)

    @property
    def model_inputs(self) -> tuple[jax.Array, PagedInputs, jax.Array]:
        """(tokens, paged, logits_at), as `Engine.forward` takes them after the cache."""
        return self.tokens, self.paged, self.logits_at


# DecodeState's per-slot fields (everything but the cache), which an insert sets.
ROW_FIELDS = tuple(f.name for f in dataclasses.fields(DecodeState) if f.name != "cache")


class DecodePrograms:
    """One engine's jitted decode programs and the host-side padding around them."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.config = engine, engine.config
        rep = engine.replicated
        pool_sharding = named(engine.mesh, CACHE_AXES, engine.rules)
        self.state_sharding = DecodeState(
            cache=jax.tree.map(lambda _: pool_sharding, engine.decode_pool_shapes),
            **{f: rep for f in ROW_FIELDS},
        )
        # Prefixes come in with the model's KV heads; split over the devices when they
        # divide, else every device gets them all (it keeps the copies it serves).
        self._prefix_rows = NamedSharding(engine.mesh, jax.P(None, engine.rules["kv_heads"]))
        self.generate_jit = jax.jit(
            self._generate_impl,
            donate_argnums=(1,),
            out_shardings=(self.state_sharding, rep, rep),
        )
        self._logits_jit = jax.jit(self._logits_impl)
        # An insert is one small program per cache leaf (all leaves share it: same shapes)
        # plus one for the slot rows, not one program over every leaf: XLA compiles 2 x
        # num_layers scatters in one program in seconds (SmolLM2: ~4.5 s for each of the
        # 20 (batch, length) pairs warm-up compiles), the single-leaf one in a fraction.
        self._write_pages_jit = jax.jit(
            self._write_pages_impl, donate_argnums=(0,), out_shardings=pool_sharding
        )
        self._insert_rows_jit = jax.jit(
            self._insert_rows_impl,
            donate_argnums=(0,),
            out_shardings={f: rep for f in ROW_FIELDS},
        )
        self._release_jit = jax.jit(
            self._release_impl, donate_argnums=(0,), out_shardings=self.state_sharding
        )
        self._init_jit = jax.jit(self._init_impl, out_shardings=self.state_sharding)

    # Init and release -----------------------------------------------------------------------

    def init_state(self) -> DecodeState:
        with jax.set_mesh(self.engine.mesh):
            return self._init_jit()

    def _init_impl(self) -> DecodeState:
        b, w = self.config.max_slots, self.config.max_pages_per_slot
        return DecodeState(
            cache=jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), self.engine.decode_pool_shapes
            ),
            page_table=jnp.full((b, w), SCRATCH_PAGE, jnp.int32),
            lengths=jnp.zeros((b,), jnp.int32),
            tokens=jnp.zeros((b,), jnp.int32),
            active=jnp.zeros((b,), bool),
            temperature=jnp.zeros((b,), jnp.float32),
            top_k=jnp.zeros((b,), jnp.int32),
            top_p=jnp.ones((b,), jnp.float32),
            seeds=jnp.zeros((b, 2), jnp.uint32),
        )

    def release(self, state: DecodeState, slot: int) -> DecodeState:
        self.check_slots(np.asarray([slot], np.int32), 1)
        with jax.set_mesh(self.engine.mesh):
            return self._release_jit(state, np.int32(slot))

    def _release_impl(self, state: DecodeState, slot: jax.Array) -> DecodeState:
        self.engine.compile_counts["release"] += 1
        # Zero its temperature too, so an all-greedy batch skips the sampling sort.
        return dataclasses.replace(
            state,
            active=state.active.at[slot].set(False),
            temperature=state.temperature.at[slot].set(0.0),
        )

    # Insert ---------------------------------------------------------------------------------

    def bulk_insert(
        self,
        prefixes: Sequence[Prefix],
        state: DecodeState,
        slots: Sequence[int] | np.ndarray,
        pages: Sequence[Sequence[int]],
    ) -> DecodeState:
        """`Engine.bulk_insert`: the batch padded to a power of two (padding rows target
        slot `max_slots` and page `total_pages`, which the scatters drop), every cache to
        the largest insert length among them."""
        slots = np.asarray(slots, np.int32).reshape(-1)
        self.check_slots(slots, len(prefixes))
        if len(pages) != len(prefixes):
            raise SlotError(f"{len(prefixes)} prefixes but {len(pages)} page lists")
        if not prefixes:
            return state
        length = max(self._insert_length(p) for p in prefixes)
        count = 1 << (len(prefixes) - 1).bit_length()
        padded_slots = np.full((count,), self.config.max_slots, np.int32)
        padded_slots[: len(slots)] = slots
        tables, write_pages = self._page_rows(prefixes, pages, length, count)
        stacked = self._stacked_caches(prefixes, length, count)  # leaves [N, KV, L, H]
        pad = count - len(prefixes)
        rows = [p.sampling for p in prefixes] + [SamplingParams()] * pad
        lengths = np.array([p.true_length for p in prefixes] + [0] * pad, np.int32)
        firsts = np.array([p.first_token for p in prefixes] + [0] * pad, np.int32)
        with jax.set_mesh(self.engine.mesh):
            cache = jax.tree.map(
                lambda pool, new: self._write_pages_jit(pool, new, write_pages),
                state.cache,
                stacked,
            )
            fields = self._insert_rows_jit(
                {f: getattr(state, f) for f in ROW_FIELDS},
                padded_slots,
                tables,
                lengths,
                firsts,
                *sampling_rows(rows),
            )
        return DecodeState(cache=cache, **fields)

    def _page_rows(
        self,
        prefixes: Sequence[Prefix],
        pages: Sequence[Sequence[int]],
        length: int,
        count: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each row's page table [count, W] and the pages its first `length` positions
        are written to [count, length / page_size] (== total_pages: dropped)."""
        page_size, width = self.config.page_size, self.config.max_pages_per_slot
        written = length // page_size
        write_pages = np.full((count, written), self.config.total_pages, np.int32)
        tables = np.full((count, width), SCRATCH_PAGE, np.int32)
        for i, (prefix, owned) in enumerate(zip(prefixes, pages, strict=True)):
            needed = -(-(prefix.true_length + 1) // page_size)
            if len(owned) < needed or len(owned) > width:
                raise SlotError(
                    f"a prefix of {prefix.true_length} tokens needs {needed} pages (its first "
                    f"step included), got {len(owned)}; a slot holds at most {width}"
                )
            tables[i, : len(owned)] = owned
            n = min(len(owned), written)
            write_pages[i, :n] = owned[:n]
        return tables, write_pages

    def _stacked_caches(self, prefixes: Sequence[Prefix], length: int, count: int) -> CacheDict:
        """Every prefix's leaves padded to `length` and stacked (padding rows are zeros),
        placed on the mesh split by KV heads where they divide. Host (wire) prefixes are
        stacked on the host: one transfer to the devices, each getting only its heads."""
        kv, h = self.engine.model_config.num_kv_heads, self.engine.model_config.head_dim
        dtype = self.engine.dtype

        def stack(*leaves: Any) -> jax.Array:
            if all(isinstance(leaf, np.ndarray) for leaf in leaves):
                out = np.zeros((count, kv, length, h), np.dtype(dtype))
                for i, leaf in enumerate(leaves):
                    n = min(length, leaf.shape[1])
                    out[i, :, :n] = leaf[:, :n]
                return jax.device_put(out, self._prefix_rows)
            rows = [jnp.asarray(leaf, dtype)[:, :length] for leaf in leaves]
            rows = [jnp.pad(r, ((0, 0), (0, length - r.shape[1]), (0, 0))) for r in rows]
            rows += [jnp.zeros_like(rows[0])] * (count - len(rows))
            return jax.device_put(jnp.stack(rows), self._prefix_rows)

        return jax.tree.map(stack, *(p.cache for p in prefixes))

    def check_slots(self, slots: np.ndarray, count: int) -> None:
        if len(slots) != count:
            raise SlotError(f"{count} prefixes but {len(slots)} slots")
        bad = slots[(slots < 0) | (slots >= self.config.max_slots)]
        if bad.size:
            raise SlotError(f"slot {int(bad[0])} is out of range [0, {self.config.max_slots})")
        if len(set(slots.tolist())) != len(slots):
            raise SlotError(f"slots {slots.tolist()} name the same slot twice")

    def _insert_length(self, prefix: Prefix) -> int:
        """Cache columns an insert writes: the prefill bucket holding the prefix (or
        max_seq_len), in whole pages."""
        if prefix.true_length >= self.config.max_seq_len:
            raise PromptTooLongError(
                f"prefix of {prefix.true_length} tokens does not fit max_seq_len "
                f"({self.config.max_seq_len}) with room for one more token"
            )
        page = self.config.page_size
        for bucket in (*self.config.prefill_buckets, self.config.max_seq_len):
            if prefix.true_length <= bucket:
                return -(-bucket // page) * page
        raise AssertionError("unreachable: max_seq_len bounds every prefix")

    def _write_pages_impl(
        self,
        pool: jax.Array,  # [C, P, page_size, H]: one layer's K or V pages
        new: jax.Array,  # [N, KV, L, H], L a multiple of page_size
        pages: jax.Array,  # [N, L / page_size]; == total_pages where nothing is written
    ) -> jax.Array:
        n, length = new.shape[0], new.shape[2]
        self.engine.compile_counts[f"insert[{n}x{length}]"] += 1
        r, page = self.engine.parallelism.kv_replication, self.config.page_size
        # [N, KV, L, H] -> cache heads in pages [C, N, L / page, page, H].
        heads = jnp.repeat(new, r, axis=1).astype(pool.dtype)
        c, h = heads.shape[1], heads.shape[3]
        paged = heads.reshape(n, c, length // page, page, h).transpose(1, 0, 2, 3, 4)
        return pool.at[:, pages].set(paged, mode="drop")

    def _insert_rows_impl(
        self,
        fields: dict[str, jax.Array],  # the state's per-slot rows (ROW_FIELDS)
        slots: jax.Array,  # [N]; == max_slots for padding rows
        tables: jax.Array,  # [N, W]: the rows' page tables
        lengths: jax.Array,
        firsts: jax.Array,
        temperature: jax.Array,
        top_k: jax.Array,
        top_p: jax.Array,
        seeds: jax.Array,
    ) -> dict[str, jax.Array]:
        new = dict(
            page_table=tables,
            lengths=lengths,
            tokens=firsts,
            active=jnp.ones_like(slots, bool),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seeds=seeds,
        )
        return {f: fields[f].at[slots].set(new[f], mode="drop") for f in ROW_FIELDS}

    # Generate -------------------------------------------------------------------------------

    def padded_rows(
        self, rows: Sequence[int] | np.ndarray, new_pages: Sequence[int] | np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`rows` and their new pages padded to the batch bucket that serves them."""
        rows = np.asarray(rows, np.int32).reshape(-1)
        bucket = self.engine.batch_bucket(len(rows))
        padded = np.full((bucket,), self.config.max_slots, np.int32)
        padded[: len(rows)] = rows
        pages = np.full((bucket,), -1, np.int32)
        if new_pages is not None:
            pages[: len(rows)] = new_pages
        return padded, pages

    def generate(
        self,
        params: Params,
        state: DecodeState,
        rows: Sequence[int] | np.ndarray,
        new_pages: Sequence[int] | np.ndarray | None,
        logprobs: bool,
    ) -> tuple[DecodeState, jax.Array, StepLogprobs]:
        padded, pages = self.padded_rows(rows, new_pages)
        with jax.set_mesh(self.engine.mesh):
            return self.generate_jit(params, state, padded, pages, np.bool_(logprobs))

    def _generate_impl(
        self,
        params: Params,
        state: DecodeState,
        rows: jax.Array,
        new_pages: jax.Array,
        wanted: jax.Array,
    ) -> tuple[DecodeState, jax.Array, StepLogprobs]:
        self.engine.compile_counts[f"generate[{len(rows)}]"] += 1
        step = self.step_inputs(state, rows, new_pages)
        logits, cache = self.engine.forward(params, state.cache, *step.model_inputs)
        return self.step_outputs(state, rows, step, cache, logits, wanted)

    def step_inputs(self, state: DecodeState, rows: jax.Array, new_pages: jax.Array) -> StepInputs:
        """Inside a trace: what the model reads for one step of `rows` (each row's last
        token, where its K/V goes). Padding and idle rows write to the scratch page only."""
        page = self.config.page_size
        valid = rows < self.config.max_slots
        r = jnp.minimum(rows, self.config.max_slots - 1)
        live = valid & state.active[r]
        lengths = jnp.where(live, state.lengths[r], 0)
        col = lengths // page
        table = state.page_table[r]  # [R, W]
        starts_page = (new_pages >= 0)[:, None] & (jnp.arange(table.shape[1])[None] == col[:, None])
        table = jnp.where(starts_page, new_pages[:, None], table)
        table = jnp.where(live[:, None], table, SCRATCH_PAGE)
        paged = PagedInputs(
            page_table=table,
            q_positions=lengths[:, None],
            kv_lengths=lengths + 1,
            write_pages=jnp.take_along_axis(table, col[:, None], axis=1),
            write_offsets=(lengths % page)[:, None],
        )
        tokens = jnp.where(live, state.tokens[r], 0)
        return StepInputs(live, table, tokens[:, None], paged, jnp.zeros_like(lengths))

    def step_outputs(
        self,
        state: DecodeState,
        rows: jax.Array,
        step: StepInputs,
        cache: CacheDict,
        logits: jax.Array,
        wanted: jax.Array,
    ) -> tuple[DecodeState, jax.Array, StepLogprobs]:
        """Inside a trace: sample each live row's next token from `logits` and record the
        step in the state -> (new state, next tokens [R], their logprobs)."""
        live = step.live
        r = jnp.minimum(rows, self.config.max_slots - 1)
        lengths, tokens = state.lengths[r], state.tokens[r]
        # The new token lands right after the one fed in.
        next_tokens = sample(
            logits,
            state.temperature[r],
            state.top_k[r],
            state.top_p[r],
            state.seeds[r],
            lengths + 1,
        )
        next_tokens = jnp.where(live, next_tokens, tokens)

        def put(old: jax.Array, new: jax.Array) -> jax.Array:
            return old.at[rows].set(new, mode="drop")  # padding rows (max_slots) dropped

        new_state = dataclasses.replace(
            state,
            cache=cache,
            page_table=put(state.page_table, step.table),
            lengths=put(state.lengths, lengths + live.astype(jnp.int32)),
            tokens=put(state.tokens, next_tokens),
        )
        return new_state, next_tokens, logprobs(logits, next_tokens, wanted)

    def logits(
        self,
        params: Params,
        state: DecodeState,
        rows: Sequence[int] | np.ndarray,
        new_pages: Sequence[int] | np.ndarray | None,
    ) -> np.ndarray:
        rows = np.asarray(rows, np.int32).reshape(-1)
        pages = np.full_like(rows, -1) if new_pages is None else np.asarray(new_pages, np.int32)
        with jax.set_mesh(self.engine.mesh):
            return np.asarray(self._logits_jit(params, state, rows, pages))

    def _logits_impl(
        self, params: Params, state: DecodeState, rows: jax.Array, new_pages: jax.Array
    ) -> jax.Array:
        step = self.step_inputs(state, rows, new_pages)
        return self.engine.forward(params, state.cache, *step.model_inputs)[0]

    # Compiling ahead ------------------------------------------------------------------------

    def compile_generate(self, params: Params, bucket: int) -> None:
        """Lower and compile the step for batch `bucket` on an abstract state (nothing is
        allocated or donated)."""
        with jax.set_mesh(self.engine.mesh):
            rows = np.zeros((bucket,), np.int32)
            self.generate_jit.lower(
                params, self.abstract_state(), rows, rows, np.bool_(False)
            ).compile()

    def abstract_state(self) -> DecodeState:
        """The decode state's shapes, dtypes and shardings (for compiling ahead)."""
        return jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            jax.eval_shape(self._init_impl),
            self.state_sharding,
        )

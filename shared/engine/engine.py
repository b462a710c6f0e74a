"""Engine: the model in its two modes behind a small, jitted API.

Who calls what:
* A prefill worker calls `prefill` once per request (engine thread only). Prompts are padded
  to the smallest bucket that holds them, so `prefill` compiles once per bucket.
* A decode worker's engine thread owns a `DecodeBatch` (decode_server/scheduler.py), which
  calls `init_decode_state` once, then between two steps `bulk_insert` for every prefix
  that arrived, `generate` once per step over the live rows only, and `release` for every
  slot that finished. The decode state passed to `generate`, `bulk_insert`, `insert` and
  `release` is donated: the caller must use the returned state and drop the old one.
* The colocated worker does both, handing `Prefix` objects over in memory.

The decode KV lives in pages: each layer's pool is [C, pages, page_size, H] and the decode
state holds each slot's page table; which page is whose is decided on the host
(shared/kv/pages.py), and the jitted functions only see the resulting arrays.
`generate` runs the live rows only, padded to a batch bucket (powers of two up to the slot
count): one compile per bucket, and a step costs what its live rows and their live pages
cost, not what the slots could hold.

Params (an `nnx.State` of `nnx.Param`s) are passed in explicitly, never captured, so that
one compiled function serves any weights of the same shapes.

Tensor parallelism: an engine runs on a `jax.sharding.Mesh` (shared/engine/mesh.py; one
device unless given more). Params live sharded as `param_shardings` says, the decode state
as `state_sharding` says (the KV pools by heads, everything else replicated), and every
jitted function keeps them so (outputs pinned to the same shardings, donation intact). A
`Prefix` is layout-neutral: its leaves are the model's logical KV heads, whatever the
tensor-parallel size of the engine that made it or will insert it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from shared.config import EngineConfig, ModelConfig
from shared.engine.mesh import CACHE_AXES, Parallelism, make_mesh, named, replicated
from shared.engine.model.attention import PagedInputs
from shared.engine.model.llama import Transformer, abstract_model
from shared.engine.params import init_params, param_shardings, with_shardings
from shared.engine.sampling import logprobs, sample, token_logprob
from shared.kv.pages import SCRATCH_PAGE
from shared.kv.prefix import CacheDict, Prefix
from shared.logprobs import check_top_logprobs
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


# DecodeState's per-slot fields (everything but the cache), which an insert sets.
_ROW_FIELDS = tuple(f.name for f in dataclasses.fields(DecodeState) if f.name != "cache")


def power_of_two_buckets(limit: int) -> tuple[int, ...]:
    """1, 2, 4, ... below `limit`, then `limit`: the sizes a padded shape compiles for."""
    buckets, b = [], 1
    while b < limit:
        buckets.append(b)
        b *= 2
    return (*buckets, limit)


def _dtype(name: str) -> jnp.dtype:
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


class Engine:
    """One model config, two model modes, jitted prefill / insert / generate / release."""

    def __init__(
        self, model_config: ModelConfig, engine_config: EngineConfig, mesh: Mesh | None = None
    ) -> None:
        self.model_config = model_config
        self.config = engine_config
        self.dtype = _dtype(engine_config.dtype)
        self.mesh = mesh if mesh is not None else make_mesh(1)
        self.parallelism = Parallelism.of(model_config, self.mesh.size)
        self.rules = self.parallelism.rules()
        # How often each jitted function was traced (= compiled); tests assert on it.
        self.compile_counts: Counter[str] = Counter()

        # Built once, outside any trace: the prefill cache of one position, whose shapes
        # `_prefill_model` stretches to each bucket.
        self._prefill_graph, self._abstract_params, self._prefill_cache_1 = self._abstract(
            "prefill", 1, 1
        )
        self.param_shardings = param_shardings(self._abstract_params, self.mesh, self.rules)
        self._decode_graph, _, self._abstract_decode_cache = self._abstract(
            "autoregressive", engine_config.total_pages, engine_config.page_size
        )
        self._replicated = replicated(self.mesh)
        cache_sharding = named(self.mesh, CACHE_AXES, self.rules)
        self.state_sharding = DecodeState(
            cache=jax.tree.map(
                lambda _: cache_sharding, nnx.to_pure_dict(self._abstract_decode_cache)
            ),
            **{
                f.name: self._replicated
                for f in dataclasses.fields(DecodeState)
                if f.name != "cache"
            },
        )
        # Prefixes come in with the model's KV heads; split over the devices when they
        # divide, else every device gets them all (it keeps the copies it serves).
        kv_axis = self.rules["kv_heads"]
        self._prefix_rows_sharding = NamedSharding(self.mesh, jax.P(None, kv_axis, None, None))
        self._prefill_jit = jax.jit(self._prefill_impl)
        self._generate_jit = jax.jit(
            self._generate_impl,
            donate_argnums=(1,),
            out_shardings=(self.state_sharding, self._replicated, self._replicated),
        )
        self._decode_logits_jit = jax.jit(self._decode_logits_impl)
        # An insert is one small program per cache leaf (all leaves share it: same shapes)
        # plus one for the slot rows, not one program over every leaf: XLA compiles 2 x
        # num_layers scatters in one program in seconds (SmolLM2: ~4.5 s for each of the
        # 20 (batch, length) pairs warm-up compiles), the single-leaf one in a fraction.
        self._write_pages_jit = jax.jit(
            self._write_pages_impl, donate_argnums=(0,), out_shardings=cache_sharding
        )
        rows_sharding = {f: self._replicated for f in _ROW_FIELDS}
        self._insert_rows_jit = jax.jit(
            self._insert_rows_impl, donate_argnums=(0,), out_shardings=rows_sharding
        )
        self._release_jit = jax.jit(
            self._release_impl, donate_argnums=(0,), out_shardings=self.state_sharding
        )
        self._init_state_jit = jax.jit(self._init_state_impl, out_shardings=self.state_sharding)
        self._reference_jit = jax.jit(self._reference_impl)
        # Buckets not compiled yet, which prefill and generate step over (to the next larger
        # one) until `compile_prefill` / `compile_generate` has compiled them: a worker
        # serves once its largest buckets are compiled and compiles the rest meanwhile
        # (shared/serving/runtime.py). Read by the engine thread, emptied by the compiling
        # one (set membership and discard are atomic).
        self._held: set[tuple[str, int]] = set()

    def _abstract(self, mode: str, batch: int, cache_len: int) -> tuple[Any, Params, nnx.State]:
        # Prefill never reads the paged-attention settings: the loader's defaults, so that
        # the loader's abstract model (shared/weights/tree.py) is this one, built once.
        prefill = mode == "prefill"
        return abstract_model(
            self.model_config,
            mode,
            batch=batch,
            cache_len=cache_len,
            dtype=self.dtype,
            parallelism=self.parallelism,
            attention="xla" if prefill else self.attention,
            pages_per_block=1 if prefill else self.config.pages_per_block,
        )

    @property
    def attention(self) -> str:
        """The decode attention kernel: Pallas on TPU unless configured otherwise."""
        if self.config.attention != "auto":
            return self.config.attention
        return "pallas" if self.mesh.devices.flat[0].platform == "tpu" else "xla"

    @property
    def max_pages_per_slot(self) -> int:
        return self.config.max_pages_per_slot

    @functools.cached_property
    def batch_buckets(self) -> tuple[int, ...]:
        """The row counts `generate` is compiled for: powers of two, then max_slots."""
        return power_of_two_buckets(self.config.max_slots)

    def batch_bucket(self, rows: int) -> int:
        """The smallest compiled-or-compilable batch bucket that holds `rows`."""
        return next(
            b for b in self.batch_buckets if b >= rows and ("generate", b) not in self._held
        )

    # Compiling ahead (warm-up) -------------------------------------------------------------

    def hold_buckets(self, prefill: Sequence[int] = (), batch: Sequence[int] = ()) -> None:
        """Step over these prefill / batch buckets (to the next larger one) until they are
        compiled by `compile_prefill` / `compile_generate`. The largest of each cannot be
        held: every prompt and every batch must always have a bucket."""
        if self.config.max_prompt_len in prefill or self.batch_buckets[-1] in batch:
            raise EngineError("the largest prefill and batch buckets cannot be held")
        self._held.update(("prefill", b) for b in prefill)
        self._held.update(("generate", b) for b in batch)

    @property
    def held_buckets(self) -> dict[str, tuple[int, ...]]:
        """The buckets held until compiled, by function."""
        return {
            kind: tuple(sorted(b for k, b in self._held if k == kind))
            for kind in ("prefill", "generate")
        }

    def compile_prefill(self, params: Params, bucket: int) -> None:
        """Compile `prefill` for `bucket` without running it, then release the bucket.
        Safe from another thread while the engine thread serves."""
        sampling = self._sampling_rows([SamplingParams()])
        with jax.set_mesh(self.mesh):
            self._prefill_jit.lower(
                params,
                np.zeros((1, bucket), np.int32),
                np.int32(bucket),
                *sampling,
                np.bool_(False),
            ).compile()
        self._held.discard(("prefill", bucket))

    def compile_generate(self, params: Params, bucket: int) -> None:
        """Compile `generate` for batch `bucket` without running it (nothing is allocated
        or donated: the state is abstract), then release the bucket. Safe from another
        thread while the engine thread serves."""
        with jax.set_mesh(self.mesh):
            state = jax.tree.map(
                lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                jax.eval_shape(self._init_state_impl),
                self.state_sharding,
            )
            rows = np.zeros((bucket,), np.int32)
            self._generate_jit.lower(params, state, rows, rows, np.bool_(False)).compile()
        self._held.discard(("generate", bucket))

    @property
    def tp(self) -> int:
        """Tensor-parallel size: the devices this engine drives."""
        return self.mesh.size

    # Parameters -------------------------------------------------------------------------

    @property
    def abstract_params(self) -> Params:
        """ShapeDtypeStruct targets for checkpoint restores, each with its sharding."""
        return with_shardings(self._abstract_params, self.param_shardings)

    @functools.cached_property
    def kv_bytes_per_token(self) -> int:
        """Pool bytes one cached position takes (all layers, K and V, every cache head)."""
        return self.decode_cache_bytes // (self.config.total_pages * self.config.page_size)

    def init_params(self, seed: int = 0) -> Params:
        """Seeded random weights (the embedded presets), created already sharded."""
        return init_params(self.model_config, self.dtype, seed, self.param_shardings)

    def place_params(self, params: Params) -> Params:
        """Params from anywhere (host arrays, one device) -> this engine's shardings."""
        return jax.device_put(params, self.param_shardings)

    def abstract_prefix_cache(self, length: int) -> CacheDict:
        """Shapes and dtypes of a prefix cache of `length` positions (a pure dict of
        ShapeDtypeStructs, [num_kv_heads, length, head_dim]): what a KV receiver expects."""
        kv, h = self.model_config.num_kv_heads, self.model_config.head_dim
        leaf = jax.ShapeDtypeStruct((kv, length, h), self.dtype)
        return jax.tree.map(lambda _: leaf, nnx.to_pure_dict(self._prefill_cache_1))

    # Prefill ----------------------------------------------------------------------------

    def prefill(
        self,
        params: Params,
        tokens: Sequence[int] | np.ndarray,
        true_length: int | None = None,
        sampling: SamplingParams | None = None,
        *,
        allow_long: bool = False,
        logprobs: int | None = None,
    ) -> Prefix:
        """Run the prompt, sample its first token at position `true_length`.

        `tokens` may be unpadded or already padded; only `tokens[:true_length]` are read.
        `allow_long` (resumed requests only) admits prompts past the largest bucket, up to
        max_seq_len - 1, padded to max_seq_len: one more compile, on first use.
        `logprobs` (None: not computed): the first token's logprob and this many most
        likely alternatives, in `Prefix.first_logprob`.
        """
        check_top_logprobs(logprobs)
        sampling = sampling or SamplingParams()
        prompt = np.asarray(tokens, dtype=np.int64).reshape(-1)
        true_length = len(prompt) if true_length is None else int(true_length)
        if not 0 < true_length <= len(prompt):
            raise EngineError(
                f"true_length={true_length} must be in [1, {len(prompt)}] (the tokens given)"
            )
        prompt = prompt[:true_length]
        self.validate_tokens(prompt)
        bucket = self._prefill_bucket(true_length, allow_long)
        padded = np.zeros((1, bucket), np.int32)
        padded[0, :true_length] = prompt
        wanted = np.bool_(logprobs is not None)  # traced: both values share one compile
        with jax.set_mesh(self.mesh):
            cache, first, step_logprobs = self._prefill_jit(
                params, padded, np.int32(true_length), *self._sampling_rows([sampling]), wanted
            )
        first_logprob = None
        if logprobs is not None:
            chosen, ids, values = jax.device_get(step_logprobs)
            first_logprob = token_logprob(chosen[0], ids[0], values[0], logprobs)
        return Prefix(
            cache=cache,
            true_length=true_length,
            first_token=int(first[0]),
            sampling=sampling,
            first_logprob=first_logprob,
        )

    def _prefill_bucket(self, length: int, allow_long: bool) -> int:
        if length <= self.config.max_prompt_len:
            return next(
                b
                for b in self.config.prefill_buckets
                if b >= length and ("prefill", b) not in self._held
            )
        if allow_long and length < self.config.max_seq_len:
            return self.config.max_seq_len
        if allow_long:
            raise PromptTooLongError(
                f"resumed prompt of {length} tokens leaves no room in max_seq_len "
                f"({self.config.max_seq_len})"
            )
        raise PromptTooLongError(
            f"prompt of {length} tokens is longer than the largest prefill bucket "
            f"({self.config.max_prompt_len}); raise --prefill-buckets or shorten the prompt"
        )

    def validate_tokens(self, tokens: np.ndarray) -> None:
        vocab = self.model_config.vocab_size
        bad = tokens[(tokens < 0) | (tokens >= vocab)]
        if bad.size:
            raise TokenOutOfVocabularyError(
                f"token id {int(bad[0])} is outside the vocabulary [0, {vocab})"
            )

    def _prefill_impl(
        self,
        params: Params,
        tokens: jax.Array,  # [1, T]
        true_length: jax.Array,  # []
        temperature: jax.Array,
        top_k: jax.Array,
        top_p: jax.Array,
        seeds: jax.Array,
        wanted: jax.Array,  # [] bool: compute the first token's logprobs
    ) -> tuple[CacheDict, jax.Array, StepLogprobs]:
        self.compile_counts[f"prefill[{tokens.shape[1]}]"] += 1
        model, positions = self._prefill_model(params, tokens.shape[1])
        logits = model(tokens, positions, logits_at=(true_length - 1)[None])  # [1, V]
        position = true_length[None]  # the first token goes right after the prompt
        first = sample(logits, temperature, top_k, top_p, seeds, position)
        r = self.parallelism.kv_replication
        # [C, 1, T, H] cache heads -> [KV, T, H]: one copy of each of the model's KV heads.
        logical = jax.tree.map(lambda c: c[::r, 0], nnx.to_pure_dict(nnx.state(model, nnx.Cache)))
        return logical, first, logprobs(logits, first, wanted)

    # Decode state -------------------------------------------------------------------------

    def init_decode_state(self) -> DecodeState:
        with jax.set_mesh(self.mesh):
            return self._init_state_jit()

    def _init_state_impl(self) -> DecodeState:
        b, w = self.config.max_slots, self.max_pages_per_slot
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._abstract_decode_cache)
        return DecodeState(
            cache=nnx.to_pure_dict(cache),
            page_table=jnp.full((b, w), SCRATCH_PAGE, jnp.int32),
            lengths=jnp.zeros((b,), jnp.int32),
            tokens=jnp.zeros((b,), jnp.int32),
            active=jnp.zeros((b,), bool),
            temperature=jnp.zeros((b,), jnp.float32),
            top_k=jnp.zeros((b,), jnp.int32),
            top_p=jnp.ones((b,), jnp.float32),
            seeds=jnp.zeros((b, 2), jnp.uint32),
        )

    def insert(
        self, prefix: Prefix, state: DecodeState, slot: int, pages: Sequence[int]
    ) -> DecodeState:
        """Write one prefix into `slot`'s pages; the slot becomes live. Donates `state`."""
        return self.bulk_insert([prefix], state, np.asarray([slot], np.int32), [pages])

    def bulk_insert(
        self,
        prefixes: Sequence[Prefix],
        state: DecodeState,
        slots: Sequence[int] | np.ndarray,
        pages: Sequence[Sequence[int]],
    ) -> DecodeState:
        """Write every prefix into the pages its slot was given, in one call. Donates
        `state`.

        `pages[i]` lists slot i's pages in position order (shared/kv/pages.py): enough
        for the prefix and the position of its first decode step. The batch is padded to a
        power of two (padding rows target slot `max_slots` and page `total_pages`, which the
        scatters drop) and every cache to the largest insert length among them, so this
        compiles once per (power of two, length), never per slot set.
        """
        slots = np.asarray(slots, np.int32).reshape(-1)
        self._check_slots(slots, len(prefixes))
        if len(pages) != len(prefixes):
            raise SlotError(f"{len(prefixes)} prefixes but {len(pages)} page lists")
        if not prefixes:
            return state
        length = max(self._insert_length(p) for p in prefixes)
        count = 1 << (len(prefixes) - 1).bit_length()
        page_size, width = self.config.page_size, self.max_pages_per_slot
        written = length // page_size
        padded_slots = np.full((count,), self.config.max_slots, np.int32)
        padded_slots[: len(slots)] = slots
        write_pages = np.full((count, written), self.config.total_pages, np.int32)  # dropped
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
        stacked = self._stacked_caches(prefixes, length, count)  # leaves [N, KV, L, H]
        filler = SamplingParams()
        pad = count - len(prefixes)
        rows = [p.sampling for p in prefixes] + [filler] * pad
        lengths = np.array([p.true_length for p in prefixes] + [0] * pad, np.int32)
        firsts = np.array([p.first_token for p in prefixes] + [0] * pad, np.int32)
        with jax.set_mesh(self.mesh):
            cache = jax.tree.map(
                lambda pool, new: self._write_pages_jit(pool, new, write_pages),
                state.cache,
                stacked,
            )
            fields = self._insert_rows_jit(
                {f: getattr(state, f) for f in _ROW_FIELDS},
                padded_slots,
                tables,
                lengths,
                firsts,
                *self._sampling_rows(rows),
            )
        return DecodeState(cache=cache, **fields)

    def _stacked_caches(self, prefixes: Sequence[Prefix], length: int, count: int) -> CacheDict:
        """Every prefix's leaves padded to `length` and stacked (padding rows are zeros),
        placed on the mesh split by KV heads where they divide. Host (wire) prefixes are
        stacked on the host: one transfer to the devices, each getting only its heads."""
        kv, h = self.model_config.num_kv_heads, self.model_config.head_dim
        dtype = np.dtype(self.dtype)

        def stack(*leaves: Any) -> jax.Array:
            if all(isinstance(leaf, np.ndarray) for leaf in leaves):
                out = np.zeros((count, kv, length, h), dtype)
                for i, leaf in enumerate(leaves):
                    n = min(length, leaf.shape[1])
                    out[i, :, :n] = leaf[:, :n]
                return jax.device_put(out, self._prefix_rows_sharding)
            rows = [jnp.asarray(leaf, self.dtype)[:, :length] for leaf in leaves]
            rows = [jnp.pad(r, ((0, 0), (0, length - r.shape[1]), (0, 0))) for r in rows]
            rows += [jnp.zeros_like(rows[0])] * (count - len(rows))
            return jax.device_put(jnp.stack(rows), self._prefix_rows_sharding)

        return jax.tree.map(stack, *(p.cache for p in prefixes))

    def _check_slots(self, slots: np.ndarray, count: int) -> None:
        if len(slots) != count:
            raise SlotError(f"{count} prefixes but {len(slots)} slots")
        bad = slots[(slots < 0) | (slots >= self.config.max_slots)]
        if bad.size:
            raise SlotError(f"slot {int(bad[0])} is out of range [0, {self.config.max_slots})")
        if len(set(slots.tolist())) != len(slots):
            raise SlotError(f"slots {slots.tolist()} name the same slot twice")

    def _insert_length(self, prefix: Prefix) -> int:
        """Cache columns an insert writes: the bucket holding the prefix (or max_seq_len),
        in whole pages."""
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
        self.compile_counts[f"insert[{n}x{length}]"] += 1
        r, page = self.parallelism.kv_replication, self.config.page_size
        # [N, KV, L, H] -> cache heads in pages [C, N, L / page, page, H].
        heads = jnp.repeat(new, r, axis=1).astype(pool.dtype)
        c, h = heads.shape[1], heads.shape[3]
        paged = heads.reshape(n, c, length // page, page, h).transpose(1, 0, 2, 3, 4)
        return pool.at[:, pages].set(paged, mode="drop")

    def _insert_rows_impl(
        self,
        fields: dict[str, jax.Array],  # the state's per-slot rows (_ROW_FIELDS)
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
        return {f: fields[f].at[slots].set(new[f], mode="drop") for f in _ROW_FIELDS}

    def release(self, state: DecodeState, slot: int) -> DecodeState:
        """Mark `slot` empty; steps stop reading it. Its pages go back to the pool on the
        host (shared/kv/pages.py); the next owner overwrites them. Donates `state`."""
        self._check_slots(np.asarray([slot], np.int32), 1)
        with jax.set_mesh(self.mesh):
            return self._release_jit(state, np.int32(slot))

    def _release_impl(self, state: DecodeState, slot: jax.Array) -> DecodeState:
        self.compile_counts["release"] += 1
        # Zero its temperature too, so an all-greedy batch skips the sampling sort.
        return dataclasses.replace(
            state,
            active=state.active.at[slot].set(False),
            temperature=state.temperature.at[slot].set(0.0),
        )

    # Generate -----------------------------------------------------------------------------

    def generate(
        self,
        params: Params,
        state: DecodeState,
        rows: Sequence[int] | np.ndarray,
        new_pages: Sequence[int] | np.ndarray | None = None,
        logprobs: bool = False,
    ) -> tuple[DecodeState, jax.Array, StepLogprobs]:
        """One decode step for the live slots `rows` -> (new state, next tokens [bucket],
        their logprobs: `StepLogprobs`, zeros unless `logprobs`).

        `new_pages[i]` (or -1) is the page row i's token is written to when it starts a new
        page (its length a multiple of page_size); the host allocated it. The rows are padded
        to the smallest batch bucket; token i belongs to `rows[i]`, the rest is padding.
        Donates `state`. A live slot must have lengths < max_seq_len. `logprobs` is traced,
        not static: asking for them never compiles another step.
        """
        rows = np.asarray(rows, np.int32).reshape(-1)
        bucket = self.batch_bucket(len(rows))
        padded = np.full((bucket,), self.config.max_slots, np.int32)
        padded[: len(rows)] = rows
        pages = np.full((bucket,), -1, np.int32)
        if new_pages is not None:
            pages[: len(rows)] = new_pages
        with jax.set_mesh(self.mesh):
            return self._generate_jit(params, state, padded, pages, np.bool_(logprobs))

    def _generate_impl(
        self,
        params: Params,
        state: DecodeState,
        rows: jax.Array,
        new_pages: jax.Array,
        wanted: jax.Array,
    ) -> tuple[DecodeState, jax.Array, StepLogprobs]:
        self.compile_counts[f"generate[{len(rows)}]"] += 1
        live, table, cache, logits = self._step(params, state, rows, new_pages)
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
            page_table=put(state.page_table, table),
            lengths=put(state.lengths, lengths + live.astype(jnp.int32)),
            tokens=put(state.tokens, next_tokens),
        )
        return new_state, next_tokens, logprobs(logits, next_tokens, wanted)

    def _step(
        self, params: Params, state: DecodeState, rows: jax.Array, new_pages: jax.Array
    ) -> tuple[jax.Array, jax.Array, CacheDict, jax.Array]:
        """The model on each row's last token -> (live [R], page tables [R, W], updated
        cache, logits [R, V]). Padding and idle rows write to the scratch page only."""
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
        cache = jax.tree.map(lambda x: x, self._abstract_decode_cache)
        nnx.replace_by_pure_dict(cache, state.cache)
        model = nnx.merge(self._decode_graph, params, cache)
        tokens = jnp.where(live, state.tokens[r], 0)
        logits = model(tokens[:, None], lengths[:, None], paged=paged)[:, 0]  # [R, V]
        return live, table, nnx.to_pure_dict(nnx.state(model, nnx.Cache)), logits

    # References for tests and debugging (not on the serving path) ------------------------

    def decode_logits(
        self,
        params: Params,
        state: DecodeState,
        rows: Sequence[int] | np.ndarray,
        new_pages: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """The logits `generate` would sample from for `rows` [len(rows), V], with the same
        `new_pages`; `state` is not donated, nothing is recorded."""
        rows = np.asarray(rows, np.int32).reshape(-1)
        pages = np.full_like(rows, -1) if new_pages is None else np.asarray(new_pages, np.int32)
        with jax.set_mesh(self.mesh):
            logits = self._decode_logits_jit(params, state, rows, pages)
        return np.asarray(logits)

    def _decode_logits_impl(
        self, params: Params, state: DecodeState, rows: jax.Array, new_pages: jax.Array
    ) -> jax.Array:
        return self._step(params, state, rows, new_pages)[3]

    def reference_logits(self, params: Params, tokens: Sequence[int]) -> np.ndarray:
        """Uncached full-sequence forward: logits [len(tokens), V] at every position.

        Padded to max_seq_len (causal attention makes the padding invisible), so it compiles
        once whatever the length.
        """
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        self.validate_tokens(tokens)
        if len(tokens) > self.config.max_seq_len:
            raise PromptTooLongError(
                f"{len(tokens)} tokens exceed max_seq_len ({self.config.max_seq_len})"
            )
        padded = np.zeros((1, self.config.max_seq_len), np.int32)
        padded[0, : len(tokens)] = tokens
        with jax.set_mesh(self.mesh):
            return np.asarray(self._reference_jit(params, padded))[0, : len(tokens)]

    def _reference_impl(self, params: Params, tokens: jax.Array) -> jax.Array:
        self.compile_counts["reference"] += 1
        model, positions = self._prefill_model(params, tokens.shape[1])
        return model(tokens, positions)

    def _prefill_model(self, params: Params, length: int) -> tuple[Transformer, jax.Array]:
        """Inside a trace: the prefill-mode model with an empty cache of `length` positions."""
        cache = jax.tree.map(
            lambda s: jnp.zeros((s.shape[0], 1, length, s.shape[3]), s.dtype),
            self._prefill_cache_1,
        )
        positions = jnp.arange(length, dtype=jnp.int32)[None, :]  # [1, T]
        return nnx.merge(self._prefill_graph, params, cache), positions

    # Helpers ------------------------------------------------------------------------------

    @staticmethod
    def _sampling_rows(rows: Sequence[SamplingParams]) -> tuple[np.ndarray, ...]:
        return (
            np.array([r.temperature for r in rows], np.float32),
            np.array([r.top_k for r in rows], np.int32),
            np.array([r.top_p for r in rows], np.float32),
            np.array([r.seed_words() for r in rows], np.uint32).reshape(len(rows), 2),
        )

    @functools.cached_property
    def decode_cache_bytes(self) -> int:
        """Bytes of the whole decode KV pool (every page, every cache head: replicated KV
        heads count each copy)."""
        return sum(
            int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize
            for s in jax.tree.leaves(self._abstract_decode_cache)
        )

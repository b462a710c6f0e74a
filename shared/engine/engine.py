"""Engine: one model config on one device mesh, behind a small jitted API.

Who calls what:
* A prefill worker runs prompts in chunks over a paged pool (`ChunkedPrefill`,
  shared/engine/chunked_prefill.py, driven by prefill_server/loop.py). `prefill` runs one
  prompt through that same chunk program (shared/engine/prefill.py): tests and
  `generate-local` use it.
* A decode worker's engine thread owns a `DecodeBatch` (decode_server/scheduler.py), which
  calls `init_decode_state` once, then between two steps `bulk_insert` for every prefix
  that arrived, `generate` once per step over the live rows only, and `release` for every
  slot that finished (shared/engine/decode.py). The decode state passed to `generate`,
  `bulk_insert`, `insert` and `release` is donated: the caller must use the returned state
  and drop the old one.
* The colocated worker does both on one thread, handing `Prefix` objects over in memory:
  a decode step and the prefill chunks beside it run as one mixed call
  (shared/engine/mixed.py, from `DecodeBatch.step`).
* Tests compare all of it to `reference_logits` (shared/engine/reference.py).

Both a decode step and a prefill chunk are `forward`: the model in its paged form, T
tokens per row (1 for a step). Params (an `nnx.State` of `nnx.Param`s) are passed in
explicitly, never captured, so that one compiled function serves any weights of the same
shapes.

Tensor parallelism: an engine runs on a `jax.sharding.Mesh` (shared/engine/mesh.py; one
device unless given more). Params live sharded as `param_shardings` says, the KV pools by
heads, everything else replicated, and every jitted function keeps them so (outputs
pinned to the same shardings, donation intact). A `Prefix` is layout-neutral: its leaves
are the model's logical KV heads, whatever the tensor-parallel size of the engine that
made it or will insert it.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from shared.config import EngineConfig, ModelConfig
from shared.engine.base import (
    EngineError,
    Params,
    PromptTooLongError,
    SlotError,
    StepLogprobs,
    TokenOutOfVocabularyError,
    check_tokens,
    compute_dtype,
    power_of_two_buckets,
)
from shared.engine.chunked_prefill import ChunkPrograms
from shared.engine.decode import DecodePrograms, DecodeState
from shared.engine.mesh import Parallelism, make_mesh, replicated
from shared.engine.mixed import MixedPrograms
from shared.engine.model.attention import PagedInputs
from shared.engine.model.llama import Transformer, abstract_model, kv_pool_shapes
from shared.engine.params import init_params, param_shardings, with_shardings
from shared.engine.prefill import PromptPrefill
from shared.engine.reference import ReferenceForward
from shared.kv.prefix import CacheDict, Prefix
from shared.sampling_params import SamplingParams

__all__ = [
    "DecodeState",
    "Engine",
    "EngineError",
    "Params",
    "PromptTooLongError",
    "SlotError",
    "StepLogprobs",
    "TokenOutOfVocabularyError",
    "power_of_two_buckets",
]


class Engine:
    """One model config: the paged forward, its decode and chunk programs, the reference."""

    def __init__(
        self, model_config: ModelConfig, engine_config: EngineConfig, mesh: Mesh | None = None
    ) -> None:
        self.model_config = model_config
        self.config = engine_config
        self.dtype = compute_dtype(engine_config.dtype)
        self.mesh = mesh if mesh is not None else make_mesh(1)
        self.parallelism = Parallelism.of(model_config, self.mesh.size)
        self.rules = self.parallelism.rules()
        self.replicated = replicated(self.mesh)
        # How often each jitted function was traced (= compiled); tests assert on it.
        self.compile_counts: Counter[str] = Counter()
        self._graph, self._abstract_params = abstract_model(
            model_config,
            dtype=self.dtype,
            parallelism=self.parallelism,
            attention=self.attention,
            pages_per_block=engine_config.read_pages_per_block(self.platform),
        )
        self.param_shardings = param_shardings(self._abstract_params, self.mesh, self.rules)
        # The decode pool; a prefill pool has the same leaves with its own page count.
        self.decode_pool_shapes = kv_pool_shapes(
            model_config,
            self.parallelism,
            engine_config.total_pages,
            engine_config.page_size,
            self.dtype,
        )
        self.decode = DecodePrograms(self)
        self.state_sharding = self.decode.state_sharding
        self.chunk_programs = ChunkPrograms(self)
        self.mixed = MixedPrograms(self)  # a decode step and a chunk call in one
        self.reference = ReferenceForward(self)
        self._prompt_prefill = PromptPrefill(self)
        # Batch buckets not compiled yet, which `generate` steps over (to the next larger
        # one) until `compile_generate` has compiled them: a worker serves once its largest
        # bucket is compiled and compiles the rest meanwhile (shared/serving/runtime.py).
        # Read by the engine thread, emptied by the compiling one (set membership and
        # discard are atomic).
        self._held: set[int] = set()

    @property
    def platform(self) -> str:
        """The devices' platform: cpu, tpu, gpu."""
        return self.mesh.devices.flat[0].platform

    @property
    def attention(self) -> str:
        """The decode attention kernel: Pallas on TPU unless configured otherwise."""
        if self.config.attention != "auto":
            return self.config.attention
        return "pallas" if self.platform == "tpu" else "xla"

    @property
    def tp(self) -> int:
        """Tensor-parallel size: the devices this engine drives."""
        return self.mesh.size

    @property
    def max_pages_per_slot(self) -> int:
        return self.config.max_pages_per_slot

    # The model ------------------------------------------------------------------------------

    def model(self, params: Params) -> Transformer:
        """Inside a trace: the model with these params."""
        return nnx.merge(self._graph, params)

    def forward(
        self,
        params: Params,
        cache: CacheDict,
        tokens: jax.Array,  # [R, T]
        paged: PagedInputs,
        logits_at: jax.Array,  # [R]: the position of each row whose logits are wanted
    ) -> tuple[jax.Array, CacheDict]:
        """Inside a trace: the paged forward of a decode step (T = 1) and of a prefill
        chunk alike -> (logits [R, V], the updated pools). Each row's tokens sit at
        `paged.q_positions`."""
        logits, new_cache = self.model(params)(
            tokens, paged.q_positions, cache, paged, logits_at=logits_at
        )
        return logits, new_cache

    # Batch buckets and compiling ahead (warm-up) ---------------------------------------------

    @functools.cached_property
    def batch_buckets(self) -> tuple[int, ...]:
        """The row counts `generate` is compiled for: powers of two, then max_slots."""
        return power_of_two_buckets(self.config.max_slots)

    def batch_bucket(self, rows: int) -> int:
        """The smallest compiled-or-compilable batch bucket that holds `rows`."""
        return next(b for b in self.batch_buckets if b >= rows and b not in self._held)

    def hold_buckets(self, batch: Sequence[int]) -> None:
        """Step over these batch buckets (to the next larger one) until `compile_generate`
        has compiled them. The largest cannot be held: every batch needs a bucket."""
        if self.batch_buckets[-1] in batch:
            raise EngineError("the largest batch bucket cannot be held")
        self._held.update(batch)

    @property
    def held_buckets(self) -> tuple[int, ...]:
        """The batch buckets held until compiled."""
        return tuple(sorted(self._held))

    def compile_generate(self, params: Params, bucket: int) -> None:
        """Compile `generate` for batch `bucket` without running it (nothing is allocated
        or donated: the state is abstract), then release the bucket. Safe from another
        thread while the engine thread serves."""
        self.decode.compile_generate(params, bucket)
        self._held.discard(bucket)

    # Parameters -----------------------------------------------------------------------------

    @property
    def abstract_params(self) -> Params:
        """ShapeDtypeStruct targets for checkpoint restores, each with its sharding."""
        return with_shardings(self._abstract_params, self.param_shardings)

    def init_params(self, seed: int = 0) -> Params:
        """Seeded random weights (the embedded presets), created already sharded."""
        return init_params(self.model_config, self.dtype, seed, self.param_shardings)

    def place_params(self, params: Params) -> Params:
        """Params from anywhere (host arrays, one device) -> this engine's shardings."""
        return jax.device_put(params, self.param_shardings)

    # Sizes ----------------------------------------------------------------------------------

    @functools.cached_property
    def decode_cache_bytes(self) -> int:
        """Bytes of the whole decode KV pool (every page, every cache head: replicated KV
        heads count each copy)."""
        return sum(
            int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize
            for s in jax.tree.leaves(self.decode_pool_shapes)
        )

    @functools.cached_property
    def kv_bytes_per_token(self) -> int:
        """Pool bytes one cached position takes (all layers, K and V, every cache head)."""
        return self.decode_cache_bytes // (self.config.total_pages * self.config.page_size)

    def abstract_prefix_cache(self, length: int) -> CacheDict:
        """Shapes and dtypes of a prefix cache of `length` positions (a pure dict of
        ShapeDtypeStructs, [num_kv_heads, length, head_dim]): what a KV receiver expects."""
        kv, h = self.model_config.num_kv_heads, self.model_config.head_dim
        leaf = jax.ShapeDtypeStruct((kv, length, h), self.dtype)
        return jax.tree.map(lambda _: leaf, self.decode_pool_shapes)

    def validate_tokens(self, tokens: np.ndarray) -> None:
        check_tokens(tokens, self.model_config.vocab_size)

    # Prefill --------------------------------------------------------------------------------

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
        """Run the prompt through the chunked prefill program, sample its first token at
        position `true_length` (engine thread only).

        Only `tokens[:true_length]` are read. A prompt may be as long as the largest
        prefill bucket; `allow_long` (resumed requests) admits up to max_seq_len - 1.
        `logprobs` (None: not computed): the first token's logprob and this many most
        likely alternatives, in `Prefix.first_logprob`.
        """
        return self._prompt_prefill.run(params, tokens, true_length, sampling, allow_long, logprobs)

    # Decode ---------------------------------------------------------------------------------

    def init_decode_state(self) -> DecodeState:
        return self.decode.init_state()

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
        `state`. `pages[i]` lists slot i's pages in position order (shared/kv/pages.py):
        enough for the prefix and the position of its first decode step. Compiles once
        per (power of two of prefixes, insert length), never per slot set."""
        return self.decode.bulk_insert(prefixes, state, slots, pages)

    def release(self, state: DecodeState, slot: int) -> DecodeState:
        """Mark `slot` empty; steps stop reading it. Its pages go back to the pool on the
        host (shared/kv/pages.py); the next owner overwrites them. Donates `state`."""
        return self.decode.release(state, slot)

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
        return self.decode.generate(params, state, rows, new_pages, logprobs)

    # References for tests and debugging (not on the serving path) ----------------------------

    def decode_logits(
        self,
        params: Params,
        state: DecodeState,
        rows: Sequence[int] | np.ndarray,
        new_pages: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """The logits `generate` would sample from for `rows` [len(rows), V], with the same
        `new_pages`; `state` is not donated, nothing is recorded."""
        return self.decode.logits(params, state, rows, new_pages)

    def reference_logits(self, params: Params, tokens: Sequence[int]) -> np.ndarray:
        """The uncached full-sequence forward: logits [len(tokens), V] at every position
        (shared/engine/reference.py)."""
        return self.reference.logits(params, tokens)

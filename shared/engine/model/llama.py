"""Llama-family decoder in flax NNX. The model holds params only; its KV comes in and goes
out explicitly (as flax's gemma example passes its cache), so one graph serves every use:

* with a KV cache (`Transformer(..., cache=, paged=)`): the cache is a pool of pages per
  layer ([C, P, page_size, H]); each row of tokens [B, T] writes its new K/V into the
  pages `paged` names and attends over the pages its page table lists
  (shared/engine/model/attention.py). T = 1 is a decode step, T > 1 a prefill chunk.
  Returns the logits and the updated pools.
* without one: the uncached full-sequence forward, causal attention over the tokens
  themselves (shared/engine/reference.py: what tests compare served output to).

Caches are head-major, C first: the cache heads (the model's KV heads, or the
tensor-parallel size when KV heads are replicated: shared/engine/mesh.py), the sharded
axis. Writes are scatters over the other axes, which XLA partitions without communication
and performs in place on the donated buffer (tests/test_sharding.py checks the compiled
step for a cache-sized copy).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shared.config import ModelConfig
from shared.engine.mesh import CACHE_AXES, Parallelism, constrain
from shared.engine.model.attention import (
    PagedInputs,
    paged_attention_pallas,
    paged_attention_xla,
    write_pages,
)
from shared.engine.model.layers import MLP, Dense, Embed, RMSNorm
from shared.engine.model.rope import apply_rope, inverse_frequencies
from shared.kv.prefix import CacheDict

_MASKED = -1e30  # finite, so a fully masked row (an empty slot) gives no NaN

# One layer's (K, V) page pools, each [C, P, page_size, H].
LayerKV = tuple[jax.Array, jax.Array]
# One batch of a forward: tokens [B, T], positions [B, T], its cache or None, where its rows
# read and write that cache, and the position of each row whose logits are wanted (or None).
SegmentInputs = tuple[jax.Array, jax.Array, CacheDict | None, PagedInputs | None, jax.Array | None]


class Segment(NamedTuple):
    """One batch inside a layer: its tokens [B, T] (for their shape), positions [B, T],
    this layer's (K, V) pools or None, and where its rows read and write them."""

    tokens: jax.Array
    positions: jax.Array
    kv: LayerKV | None
    paged: PagedInputs | None


class Attention(nnx.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: jnp.dtype,
        parallelism: Parallelism,
        attention: str = "xla",
        pages_per_block: int = 1,
        rngs: nnx.Rngs,
    ) -> None:
        c = config
        self.attention, self.pages_per_block = attention, pages_per_block  # static
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.parallelism = parallelism  # frozen: static structure, not state
        # A tuple, not an array: static model structure, not state that nnx.split would carry.
        self.inv_freq = tuple(inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling))
        gain, bias, int8 = c.init_kernel_gain, c.qkv_bias, c.quantization is not None
        block = c.quantization.block_size if c.quantization else None
        kw = dict(dtype=dtype, gain=gain, int8=int8, block_size=block, rngs=rngs)
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        # Column-parallel q/k/v (by heads), row-parallel o: one all-reduce per attention.
        self.q_proj = Dense(c.d_model, q_out, use_bias=bias, axes=("embed", "q_heads"), **kw)
        self.k_proj = Dense(c.d_model, kv_out, use_bias=bias, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Dense(c.d_model, kv_out, use_bias=bias, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Dense(q_out, c.d_model, axes=("q_heads", "embed"), **kw)

    def __call__(
        self, x: jax.Array, segments: Sequence[Segment]
    ) -> tuple[jax.Array, list[LayerKV | None]]:
        """x [N, D], every segment's tokens flattened in order -> (out [N, D], each
        segment's updated pools or None).

        The projections run once over all N tokens (one read of the weights for a decode
        step and a prefill chunk alike); attention runs per segment: with `kv`, its new K/V
        go where its `paged` says and each row reads its own pages; without, attention is
        causal over the row's own tokens (positions 0..T-1)."""
        n, h = self.num_heads, self.head_dim
        q_all, k_all, v_all = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        outs, kvs = [], []
        spans = _spans([segment.tokens.size for segment in segments])
        for segment, (lo, hi) in zip(segments, spans, strict=True):
            b, t = segment.tokens.shape
            q = q_all[lo:hi].reshape(b, t, n, h)
            k = k_all[lo:hi].reshape(b, t, self.num_kv_heads, h)
            v = v_all[lo:hi].reshape(b, t, self.num_kv_heads, h)
            out, kv = self._attend(q, k, v, segment)
            outs.append(out.reshape(b * t, n * h))
            kvs.append(kv)
        return self.o_proj(_concat(outs)), kvs

    def _attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, segment: Segment
    ) -> tuple[jax.Array, LayerKV | None]:
        """q [B, T, N, H], k, v [B, T, KV, H] of one segment -> ([B, T, N, H], its pools)."""
        b, t, n, h = q.shape
        c, rules = self.parallelism.cache_heads, self.parallelism.rules()
        q = apply_rope(q, segment.positions, self.inv_freq)
        k = apply_rope(k, segment.positions, self.inv_freq)
        # Cache heads [C, B, T, H]: KV head j becomes heads j*r .. j*r + r - 1 when each is
        # replicated r times, so cache head e serves query heads e*n/C .. (e+1)*n/C - 1.
        r = self.parallelism.kv_replication
        k = constrain(jnp.repeat(k, r, axis=2).transpose(2, 0, 1, 3), CACHE_AXES, rules)
        v = constrain(jnp.repeat(v, r, axis=2).transpose(2, 0, 1, 3), CACHE_AXES, rules)
        q = q.reshape(b, t, c, n // c, h).transpose(2, 0, 1, 3, 4)  # [C, B, T, G, H]
        q = constrain(q, (*CACHE_AXES[:3], None, "head_dim"), rules)
        kv = segment.kv
        if kv is None:
            out = _causal_attention(q, k, v)
        else:
            assert segment.paged is not None, "a KV cache is read through its page tables"
            out, kv = self._paged_attention(q, k, v, kv, segment.paged)
        return out.transpose(1, 2, 0, 3, 4), kv  # heads back in q order

    def _paged_attention(
        self, q: jax.Array, k: jax.Array, v: jax.Array, kv: LayerKV, paged: PagedInputs
    ) -> tuple[jax.Array, LayerKV]:
        """q [C, B, T, G, H]; k, v [C, B, T, H] written at (write_pages, write_offsets),
        then every row reads its live pages only."""
        rules = self.parallelism.rules()
        pool_k = write_pages(kv[0], k, paged.write_pages, paged.write_offsets)
        pool_v = write_pages(kv[1], v, paged.write_pages, paged.write_offsets)
        pool_k = constrain(pool_k, CACHE_AXES, rules)
        pool_v = constrain(pool_v, CACHE_AXES, rules)
        # Scaled in float32, as the uncached path scales its scores.
        scaled = q.astype(jnp.float32) / jnp.sqrt(jnp.float32(q.shape[-1]))
        # The Pallas kernel is a decode kernel: one query per row, at kv_length - 1.
        if self.attention == "pallas" and q.shape[2] == 1:
            head_axis = rules["cache_heads"] if self.parallelism.tp > 1 else None
            out = paged_attention_pallas(
                scaled,
                pool_k,
                pool_v,
                paged.page_table,
                paged.kv_lengths,
                pages_per_block=self.pages_per_block,
                head_axis=head_axis,
            )
        else:
            out = paged_attention_xla(
                scaled,
                pool_k,
                pool_v,
                paged.page_table,
                paged.q_positions,
                paged.kv_lengths,
                pages_per_block=self.pages_per_block,
            )
        return out.astype(q.dtype), (pool_k, pool_v)


def _causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q [C, B, T, G, H]; k, v [C, B, T, H] -> [C, B, T, G, H], position t seeing 0..t."""
    t, h = q.shape[2], q.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))  # [T, S]
    scores = jnp.einsum("cbtgh,cbsh->cbgts", q, k).astype(jnp.float32) / jnp.sqrt(h)
    probs = jax.nn.softmax(jnp.where(causal, scores, _MASKED), axis=-1).astype(v.dtype)
    return jnp.einsum("cbgts,cbsh->cbtgh", probs, v)


class Block(nnx.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: jnp.dtype,
        parallelism: Parallelism,
        attention: str = "xla",
        pages_per_block: int = 1,
        rngs: nnx.Rngs,
    ) -> None:
        self.input_norm = RMSNorm(config.d_model, eps=config.rms_eps, dtype=dtype)
        self.attn = Attention(
            config,
            dtype=dtype,
            parallelism=parallelism,
            attention=attention,
            pages_per_block=pages_per_block,
            rngs=rngs,
        )
        self.post_attn_norm = RMSNorm(config.d_model, eps=config.rms_eps, dtype=dtype)
        self.mlp = MLP(
            config.d_model,
            config.ffn_dim,
            dtype=dtype,
            gain=config.init_kernel_gain,
            int8=config.quantization is not None,
            block_size=config.quantization.block_size if config.quantization else None,
            rngs=rngs,
        )

    def __call__(
        self, x: jax.Array, segments: Sequence[Segment]
    ) -> tuple[jax.Array, list[LayerKV | None]]:
        """x [N, D]: every segment's tokens, flattened -> (x [N, D], each one's pools)."""
        out, kvs = self.attn(self.input_norm(x), segments)
        x = x + out
        return x + self.mlp(self.post_attn_norm(x)), kvs


class Transformer(nnx.Module):
    """Decoder-only LM, params only. `parallelism` decides its cache heads (default: one
    device); `attention` the paged-attention implementation of decode steps ("xla" or
    "pallas") and `pages_per_block` its block."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        parallelism: Parallelism | None = None,
        attention: str = "xla",
        pages_per_block: int = 1,
        rngs: nnx.Rngs,
    ) -> None:
        parallelism = parallelism or Parallelism.of(config, 1)
        block_kw = dict(
            dtype=dtype,
            parallelism=parallelism,
            attention=attention,
            pages_per_block=pages_per_block,
            rngs=rngs,
        )
        self.config = config
        quant = config.quantization
        self.embed = Embed(
            config.vocab_size,
            config.d_model,
            std=config.init_embed_std,
            dtype=dtype,
            int8=quant is not None and quant.embedding,
            block_size=quant.block_size if quant else None,
            rngs=rngs,
        )
        self.layers = nnx.List([Block(config, **block_kw) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.d_model, eps=config.rms_eps, dtype=dtype)
        self.lm_head = (
            None
            if config.tie_embeddings
            else Dense(
                config.d_model,
                config.vocab_size,
                dtype=dtype,
                int8=quant is not None and quant.lm_head,
                block_size=quant.block_size if quant else None,
                axes=("embed", "vocab"),
                rngs=rngs,
            )
        )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: CacheDict | None = None,
        paged: PagedInputs | None = None,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, CacheDict | None]:
        """tokens, positions [B, T] -> (float32 logits [B, T, V], the updated cache).

        `cache` (`kv_pool_shapes`' layout) and `paged`: the page pools and where each row
        writes and reads them; None: the uncached forward, which returns no cache. With
        `logits_at` [B] only those positions go through the LM head -> [B, V]; a chunk of
        512 prompt tokens does not pay for 512 vocabulary projections.
        """
        ((logits, new_cache),) = self.segments([(tokens, positions, cache, paged, logits_at)])
        return logits, new_cache

    def segments(self, inputs: Sequence[SegmentInputs]) -> list[tuple[jax.Array, CacheDict | None]]:
        """Several batches in one forward -> each one's (logits, updated cache), as
        `__call__` gives them.

        Each input is (tokens, positions, cache, paged, logits_at) as `__call__` takes
        them; the caches are distinct pools (a decode pool and a prefill pool, say). Every
        dense layer runs once over all their tokens, so a decode step and a prefill chunk
        sharing a call read the weights once; attention stays within each batch."""
        x = _concat([self.embed(tokens).reshape(-1, self.config.d_model) for tokens, *_ in inputs])
        new_caches: list[CacheDict] = [{"layers": {}} for _ in inputs]
        for i, layer in enumerate(self.layers):
            segments = [
                Segment(tokens, positions, None if cache is None else _layer_kv(cache, i), paged)
                for tokens, positions, cache, paged, _ in inputs
            ]
            x, kvs = layer(x, segments)
            for new_cache, kv in zip(new_caches, kvs, strict=True):
                if kv is not None:
                    new_cache["layers"][i] = {"attn": {"cache_k": kv[0], "cache_v": kv[1]}}
        x = self.final_norm(x)
        picked = []
        spans = _spans([tokens.size for tokens, *_ in inputs])
        for (tokens, _, _, _, logits_at), (lo, hi) in zip(inputs, spans, strict=True):
            rows = x[lo:hi].reshape(*tokens.shape, -1)
            if logits_at is not None:
                rows = jnp.take_along_axis(rows, logits_at[:, None, None], axis=1)[:, 0]
            picked.append(rows)
        # One LM-head matmul for every segment's wanted positions.
        flat = _concat([rows.reshape(-1, rows.shape[-1]) for rows in picked])
        logits = (self.embed.attend(flat) if self.lm_head is None else self.lm_head(flat)).astype(
            jnp.float32
        )
        spans = _spans([rows.size // rows.shape[-1] for rows in picked])
        return [
            (logits[lo:hi].reshape(*rows.shape[:-1], -1), None if cache is None else new_cache)
            for rows, (lo, hi), (_, _, cache, _, _), new_cache in zip(
                picked, spans, inputs, new_caches, strict=True
            )
        ]


def _spans(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Each batch's [lo, hi) in the flattened token axis, from the batches' token counts."""
    ends = np.cumsum([0, *sizes]).tolist()
    return list(itertools.pairwise(ends))


def _concat(parts: list[jax.Array]) -> jax.Array:
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _layer_kv(cache: CacheDict, layer: int) -> LayerKV:
    leaves = cache["layers"][layer]["attn"]
    return leaves["cache_k"], leaves["cache_v"]


def kv_pool_shapes(
    config: ModelConfig, parallelism: Parallelism, pages: int, page_size: int, dtype: jnp.dtype
) -> CacheDict:
    """The cache a `Transformer` reads and returns, as ShapeDtypeStructs: per layer
    {"attn": {"cache_k", "cache_v"}}, each [cache heads, pages, page_size, head_dim]."""
    c = parallelism.cache_heads
    leaf = jax.ShapeDtypeStruct((c, pages, page_size, config.head_dim), jnp.dtype(dtype))
    return {
        "layers": {
            i: {"attn": {"cache_k": leaf, "cache_v": leaf}} for i in range(config.num_layers)
        }
    }


def abstract_model(
    config: ModelConfig,
    *,
    dtype: jnp.dtype,
    parallelism: Parallelism,
    attention: str = "xla",
    pages_per_block: int = 1,
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph, abstract params) of a Transformer, as `nnx.split` gives them.

    Cached: building the abstract model traces every parameter's initializer (SmolLM2:
    several seconds on a busy 2-core machine), and a worker needs the same one for its
    loader and its engine. Each call gets its own state container."""
    graph, params = _abstract_split(
        config, jnp.dtype(dtype), parallelism, attention, pages_per_block
    )  # jnp.dtype: jnp.float32 and dtype("float32") are one key
    return graph, jax.tree.map(lambda leaf: leaf, params)


@functools.lru_cache(maxsize=8)
def _abstract_split(*key: Any) -> tuple[nnx.GraphDef, nnx.State]:
    config, dtype, parallelism, attention, pages_per_block = key
    kw = dict(
        dtype=dtype, parallelism=parallelism, attention=attention, pages_per_block=pages_per_block
    )
    model = nnx.eval_shape(lambda: Transformer(config, **kw, rngs=nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)

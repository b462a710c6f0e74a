"""Llama-family decoder in flax NNX, built in one of two model modes.

* `prefill`: a batch of padded prompts [B, T]; causal attention over the prompt; the
  K/V of every position is written to the layer's `nnx.Cache` ([C, B, T, H]).
* `autoregressive`: one token per decode slot [B, 1]; each slot attends over its own
  cached prefix (positions < its length) and its K/V is written at that length.

The cache is head-major, [C, B, S, H] with C the cache heads (the model's KV heads, or the
tensor-parallel size when KV heads are replicated: shared/engine/mesh.py), so that the
heads axis is the sharded one and each device's shard is contiguous. Slots and positions
follow, and the per-slot write is a scatter over (slot, position) that leaves the heads
axis alone: XLA partitions it without communication and updates the donated buffer in
place (tests/test_sharding.py checks the compiled step for a cache-sized copy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from shared.config import ModelConfig, ModelMode
from shared.engine.mesh import CACHE_AXES, Parallelism, constrain
from shared.engine.model.layers import MLP, Dense, Embed, RMSNorm
from shared.engine.model.rope import apply_rope, inverse_frequencies

_MASKED = -1e30  # finite, so a fully masked row (an empty slot) gives no NaN


class Attention(nnx.Module):
    def __init__(
        self,
        config: ModelConfig,
        mode: ModelMode,
        *,
        batch: int,
        cache_len: int,
        dtype: jnp.dtype,
        parallelism: Parallelism,
        rngs: nnx.Rngs,
    ) -> None:
        c = config
        self.mode = mode
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.parallelism = parallelism  # frozen: static structure, not state
        # A tuple, not an array: static model structure, not state that nnx.split would carry.
        self.inv_freq = tuple(inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling))
        gain, bias, int8 = c.init_kernel_gain, c.qkv_bias, c.quantization is not None
        kw = dict(dtype=dtype, gain=gain, int8=int8, rngs=rngs)
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        # Column-parallel q/k/v (by heads), row-parallel o: one all-reduce per attention.
        self.q_proj = Dense(c.d_model, q_out, use_bias=bias, axes=("embed", "q_heads"), **kw)
        self.k_proj = Dense(c.d_model, kv_out, use_bias=bias, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Dense(c.d_model, kv_out, use_bias=bias, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Dense(q_out, c.d_model, axes=("q_heads", "embed"), **kw)
        cache_shape = (parallelism.cache_heads, batch, cache_len, c.head_dim)
        self.cache_k = nnx.Cache(jnp.zeros(cache_shape, dtype))
        self.cache_v = nnx.Cache(jnp.zeros(cache_shape, dtype))

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B, T, D]; positions [B, T] (prefill: 0..T-1; autoregressive: each slot's length)."""
        b, t, _ = x.shape
        n, h = self.num_heads, self.head_dim
        c, rules = self.parallelism.cache_heads, self.parallelism.rules()
        q = apply_rope(self.q_proj(x).reshape(b, t, n, h), positions, self.inv_freq)
        k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, h), positions,
                       self.inv_freq)  # fmt: skip
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, h)
        # Cache heads [C, B, T, H]: KV head j becomes heads j*r .. j*r + r - 1 when each is
        # replicated r times, so cache head e serves query heads e*n/C .. (e+1)*n/C - 1.
        r = self.parallelism.kv_replication
        k = constrain(jnp.repeat(k, r, axis=2).transpose(2, 0, 1, 3), CACHE_AXES, rules)
        v = constrain(jnp.repeat(v, r, axis=2).transpose(2, 0, 1, 3), CACHE_AXES, rules)
        q = q.reshape(b, t, c, n // c, h).transpose(2, 0, 1, 3, 4)  # [C, B, T, G, H]
        q = constrain(q, (*CACHE_AXES[:3], None, "head_dim"), rules)
        if self.mode == "prefill":
            out = self._prefill_attention(q, k, v)
        else:
            out = self._decode_attention(q, k, v, positions[:, 0])
        out = out.transpose(1, 2, 0, 3, 4).reshape(b, t, n * h)  # heads back in q order
        return self.o_proj(out)

    def _prefill_attention(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """q [C, B, T, G, H]; k, v [C, B, T, H] -> [C, B, T, G, H]."""
        t, h = q.shape[2], q.shape[-1]
        self.cache_k[...] = k
        self.cache_v[...] = v
        causal = jnp.tril(jnp.ones((t, t), bool))  # [T, S]
        scores = jnp.einsum("cbtgh,cbsh->cbgts", q, k).astype(jnp.float32) / jnp.sqrt(h)
        probs = jax.nn.softmax(jnp.where(causal, scores, _MASKED), axis=-1).astype(v.dtype)
        return jnp.einsum("cbgts,cbsh->cbtgh", probs, v)

    def _decode_attention(
        self, q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array
    ) -> jax.Array:
        """q [C, B, 1, G, H]; k, v [C, B, 1, H]; each slot writes at its length."""
        b, h = q.shape[1], q.shape[-1]
        rules = self.parallelism.rules()
        slots = jnp.arange(b)
        # mode="drop": a slot already at the end of the cache writes nothing (the caller stops
        # such slots; this only keeps an idle slot from corrupting memory).
        cache_k = self.cache_k[...].at[:, slots, lengths].set(k[:, :, 0], mode="drop")
        cache_v = self.cache_v[...].at[:, slots, lengths].set(v[:, :, 0], mode="drop")
        cache_k = constrain(cache_k, CACHE_AXES, rules)
        cache_v = constrain(cache_v, CACHE_AXES, rules)
        self.cache_k[...] = cache_k
        self.cache_v[...] = cache_v
        s = cache_k.shape[2]
        scores = jnp.einsum("cbgh,cbsh->cbgs", q[:, :, 0], cache_k).astype(jnp.float32)
        scores = scores / jnp.sqrt(h)
        visible = (jnp.arange(s)[None, :] <= lengths[:, None])[None, :, None, :]  # [1,B,1,S]
        probs = jax.nn.softmax(jnp.where(visible, scores, _MASKED), axis=-1).astype(v.dtype)
        return jnp.einsum("cbgs,cbsh->cbgh", probs, cache_v)[:, :, None]  # [C, B, 1, G, H]


class Block(nnx.Module):
    def __init__(
        self,
        config: ModelConfig,
        mode: ModelMode,
        *,
        batch: int,
        cache_len: int,
        dtype: jnp.dtype,
        parallelism: Parallelism,
        rngs: nnx.Rngs,
    ) -> None:
        self.input_norm = RMSNorm(config.d_model, eps=config.rms_eps, dtype=dtype)
        self.attn = Attention(
            config, mode, batch=batch, cache_len=cache_len, dtype=dtype,
            parallelism=parallelism, rngs=rngs,
        )  # fmt: skip
        self.post_attn_norm = RMSNorm(config.d_model, eps=config.rms_eps, dtype=dtype)
        self.mlp = MLP(
            config.d_model,
            config.ffn_dim,
            dtype=dtype,
            gain=config.init_kernel_gain,
            int8=config.quantization is not None,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        x = x + self.attn(self.input_norm(x), positions)
        return x + self.mlp(self.post_attn_norm(x))


class Transformer(nnx.Module):
    """Decoder-only LM. `batch` and `cache_len` size the KV cache for this mode;
    `parallelism` decides its cache heads (default: one device)."""

    def __init__(
        self,
        config: ModelConfig,
        mode: ModelMode,
        *,
        batch: int,
        cache_len: int,
        dtype: jnp.dtype = jnp.float32,
        parallelism: Parallelism | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        parallelism = parallelism or Parallelism.of(config, 1)
        block_kw = dict(
            batch=batch, cache_len=cache_len, dtype=dtype, parallelism=parallelism, rngs=rngs
        )
        self.config = config
        self.mode = mode
        quant = config.quantization
        self.embed = Embed(
            config.vocab_size,
            config.d_model,
            std=config.init_embed_std,
            dtype=dtype,
            int8=quant is not None and quant.embedding,
            rngs=rngs,
        )
        self.layers = nnx.List([Block(config, mode, **block_kw) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.d_model, eps=config.rms_eps, dtype=dtype)
        self.lm_head = (
            None
            if config.tie_embeddings
            else Dense(
                config.d_model,
                config.vocab_size,
                dtype=dtype,
                int8=quant is not None and quant.lm_head,
                axes=("embed", "vocab"),
                rngs=rngs,
            )
        )

    def __call__(
        self, tokens: jax.Array, positions: jax.Array, logits_at: jax.Array | None = None
    ) -> jax.Array:
        """tokens, positions [B, T] -> float32 logits [B, T, V].

        With `logits_at` [B] only those positions go through the LM head -> [B, V]; prefill
        uses it so a 512-token prompt does not pay for 512 vocabulary projections.
        """
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, positions)
        x = self.final_norm(x)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]  # [B, D]
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits.astype(jnp.float32)

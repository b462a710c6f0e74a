"""Llama-family decoder in flax NNX, built in one of two model modes.

* `prefill`: a batch of padded prompts [B, T]; causal attention over the prompt; the
  K/V of every position is written to the layer's `nnx.Cache` ([B*KV, T, H]).
* `autoregressive`: one token per decode slot [B, 1]; each slot attends over its own
  cached prefix (positions < its length) and its K/V is written at that length.

The cache is flat, [B*KV, S, H], not [B, S, KV, H]: with the KV-head axis folded into the
leading axis the per-slot write is a plain row scatter, and XLA-CPU updates the donated
buffer in place instead of copying the whole cache every layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from shared.config import ModelConfig, ModelMode
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
        rngs: nnx.Rngs,
    ) -> None:
        c = config
        self.mode = mode
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        # A tuple, not an array: static model structure, not state that nnx.split would carry.
        self.inv_freq = tuple(inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling))
        gain, bias, int8 = c.init_kernel_gain, c.qkv_bias, c.quantization is not None
        self.q_proj = Dense(c.d_model, c.num_heads * c.head_dim, use_bias=bias, dtype=dtype,
                            gain=gain, int8=int8, rngs=rngs)  # fmt: skip
        self.k_proj = Dense(c.d_model, c.num_kv_heads * c.head_dim, use_bias=bias, dtype=dtype,
                            gain=gain, int8=int8, rngs=rngs)  # fmt: skip
        self.v_proj = Dense(c.d_model, c.num_kv_heads * c.head_dim, use_bias=bias, dtype=dtype,
                            gain=gain, int8=int8, rngs=rngs)  # fmt: skip
        self.o_proj = Dense(c.num_heads * c.head_dim, c.d_model, dtype=dtype, gain=gain,
                            int8=int8, rngs=rngs)  # fmt: skip
        cache_shape = (batch * c.num_kv_heads, cache_len, c.head_dim)
        self.cache_k = nnx.Cache(jnp.zeros(cache_shape, dtype))
        self.cache_v = nnx.Cache(jnp.zeros(cache_shape, dtype))

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B, T, D]; positions [B, T] (prefill: 0..T-1; autoregressive: each slot's length)."""
        b, t, _ = x.shape
        n, kv, h = self.num_heads, self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).reshape(b, t, n, h), positions, self.inv_freq)
        k = apply_rope(self.k_proj(x).reshape(b, t, kv, h), positions, self.inv_freq)
        v = self.v_proj(x).reshape(b, t, kv, h)
        q = q.reshape(b, t, kv, n // kv, h)  # [B, T, KV, G, H]: head i reads KV head i // G
        if self.mode == "prefill":
            out = self._prefill_attention(q, k, v)
        else:
            out = self._decode_attention(q, k, v, positions[:, 0])
        return self.o_proj(out.reshape(b, t, n * h))

    def _prefill_attention(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        b, t, kv, _, h = q.shape
        self.cache_k[...] = k.transpose(0, 2, 1, 3).reshape(b * kv, t, h)
        self.cache_v[...] = v.transpose(0, 2, 1, 3).reshape(b * kv, t, h)
        causal = jnp.tril(jnp.ones((t, t), bool))  # [T, S]
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k).astype(jnp.float32) / jnp.sqrt(h)
        probs = jax.nn.softmax(jnp.where(causal, scores, _MASKED), axis=-1).astype(v.dtype)
        return jnp.einsum("bkgts,bskh->btkgh", probs, v)

    def _decode_attention(
        self, q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array
    ) -> jax.Array:
        b, _, kv, _, h = q.shape
        rows = jnp.arange(b * kv)
        cols = jnp.repeat(lengths, kv)  # [B*KV]: each slot writes at its own length
        # mode="drop": a slot already at the end of the cache writes nothing (the caller stops
        # such slots; this only keeps an idle slot from corrupting memory).
        cache_k = self.cache_k[...].at[rows, cols].set(k.reshape(b * kv, h), mode="drop")
        cache_v = self.cache_v[...].at[rows, cols].set(v.reshape(b * kv, h), mode="drop")
        self.cache_k[...] = cache_k
        self.cache_v[...] = cache_v
        s = cache_k.shape[1]
        keys = cache_k.reshape(b, kv, s, h)
        values = cache_v.reshape(b, kv, s, h)
        scores = jnp.einsum("bkgh,bksh->bkgs", q[:, 0], keys).astype(jnp.float32) / jnp.sqrt(h)
        visible = (jnp.arange(s)[None, :] <= lengths[:, None])[:, None, None, :]  # [B,1,1,S]
        probs = jax.nn.softmax(jnp.where(visible, scores, _MASKED), axis=-1).astype(values.dtype)
        return jnp.einsum("bkgs,bksh->bkgh", probs, values)[:, None]  # [B, 1, KV, G, H]


class Block(nnx.Module):
    def __init__(
        self,
        config: ModelConfig,
        mode: ModelMode,
        *,
        batch: int,
        cache_len: int,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ) -> None:
        self.input_norm = RMSNorm(config.d_model, eps=config.rms_eps, dtype=dtype)
        self.attn = Attention(
            config, mode, batch=batch, cache_len=cache_len, dtype=dtype, rngs=rngs
        )
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
    """Decoder-only LM. `batch` and `cache_len` size the KV cache for this mode."""

    def __init__(
        self,
        config: ModelConfig,
        mode: ModelMode,
        *,
        batch: int,
        cache_len: int,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
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
        self.layers = nnx.List(
            [
                Block(config, mode, batch=batch, cache_len=cache_len, dtype=dtype, rngs=rngs)
                for _ in range(config.num_layers)
            ]
        )
        self.final_norm = RMSNorm(config.d_model, eps=config.rms_eps, dtype=dtype)
        self.lm_head = (
            None
            if config.tie_embeddings
            else Dense(
                config.d_model,
                config.vocab_size,
                dtype=dtype,
                int8=quant is not None and quant.lm_head,
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

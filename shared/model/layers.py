"""Building blocks of the decoder: dense projection, RMSNorm, embedding, SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _kernel_init(gain: float) -> nnx.Initializer:
    # Variance gain**2 / fan_in: gain 1 is LeCun-normal; the tiny preset uses > 1 so that its
    # random logits are far apart and greedy choices never hinge on float rounding.
    return nnx.initializers.variance_scaling(gain**2, "fan_in", "normal")


class Dense(nnx.Module):
    """`y = x @ kernel (+ bias)` with kernel [in, out].

    Written by hand (not nnx.Linear) so that the matmul is ours to swap: int8 weights go
    through AQT here (see shared/quantization.py), and nnx.Linear's dot_general hook passes
    keywords AQT does not take.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        gain: float = 1.0,
        rngs: nnx.Rngs,
    ) -> None:
        self.dtype = dtype
        self.kernel = nnx.Param(
            _kernel_init(gain)(rngs.params(), (in_features, out_features), jnp.float32).astype(
                dtype
            )
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...d,df->...f", x.astype(self.dtype), self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype = jnp.float32) -> None:
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalize in float32 whatever the compute dtype, as the reference models do.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Embed(nnx.Module):
    def __init__(
        self, vocab_size: int, dim: int, *, std: float, dtype: jnp.dtype, rngs: nnx.Rngs
    ) -> None:
        self.dtype = dtype
        self.embedding = nnx.Param(
            (std * jax.random.normal(rngs.params(), (vocab_size, dim), jnp.float32)).astype(dtype)
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied LM head: logits = x @ embedding.T."""
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding[...])


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(
        self, d_model: int, ffn_dim: int, *, dtype: jnp.dtype, gain: float, rngs: nnx.Rngs
    ) -> None:
        self.gate_proj = Dense(d_model, ffn_dim, dtype=dtype, gain=gain, rngs=rngs)
        self.up_proj = Dense(d_model, ffn_dim, dtype=dtype, gain=gain, rngs=rngs)
        self.down_proj = Dense(ffn_dim, d_model, dtype=dtype, gain=gain, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))

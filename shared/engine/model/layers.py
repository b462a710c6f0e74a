"""Building blocks of the decoder: dense projection, RMSNorm, embedding, SwiGLU MLP.

Every param carries its logical axis names (`out_sharding` metadata, see
shared/engine/mesh.py); the engine maps them to the device mesh. Params are created
unsharded (`eager_sharding=False`): the engine places them, or creates them under a jit
whose outputs are already sharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from shared.engine import quantization

Axes = tuple[str | None, ...]


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    """An `nnx.Param` with logical axis names, one per dimension of `value`."""
    assert len(axes) == value.ndim, (axes, value.shape)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _kernel_init(gain: float) -> nnx.Initializer:
    # Variance gain**2 / fan_in: gain 1 is LeCun-normal; the tiny preset uses > 1 so that its
    # random logits are far apart and greedy choices never hinge on float rounding.
    return nnx.initializers.variance_scaling(gain**2, "fan_in", "normal")


class Dense(nnx.Module):
    """`y = x @ kernel (+ bias)` with kernel [in, out].

    Written by hand (not nnx.Linear) so that the matmul is ours to swap: int8 weights go
    through AQT here (see shared/engine/quantization.py), and nnx.Linear's dot_general hook passes
    keywords AQT does not take.

    With `int8=True` the params are `kernel` int8 [in, out] and `kernel_scale` float32
    [1, out] (weight-only, per output channel); with a `block_size` too, `kernel_scale` and
    `kernel_offset` are float32 [in / block_size, out] (blocks along the input). The random
    init is the float init quantized, so a quantized preset's seeded weights are the float
    preset's, quantized. `axes` names the (in, out) logical axes; per-channel scales and the
    bias shard like the out axis, block scales and offsets like the kernel.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        gain: float = 1.0,
        int8: bool = False,
        block_size: int | None = None,
        axes: tuple[str | None, str | None] = (None, None),
        rngs: nnx.Rngs,
    ) -> None:
        self.dtype = dtype
        kernel = _kernel_init(gain)(rngs.params(), (in_features, out_features), jnp.float32)
        if int8 and block_size is not None:
            values, scale, offset = quantization.quantize_blocks_jit(
                kernel.astype(dtype), 0, block_size
            )
            self.kernel = param(values, axes)
            self.kernel_scale = param(scale, axes)
            self.kernel_offset = param(offset, axes)
        elif int8:
            values, scale = quantization.quantize(kernel.astype(dtype), contracting_axis=0)
            self.kernel = param(values, axes)
            self.kernel_scale = param(scale, (None, axes[1]))
            self.kernel_offset = None
        else:
            self.kernel = param(kernel.astype(dtype), axes)
            self.kernel_scale = self.kernel_offset = None
        self.bias = param(jnp.zeros((out_features,), dtype), (axes[1],)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kernel_offset is not None:
            y = quantization.block_int8_dot_general(
                x,
                self.kernel[...],
                self.kernel_scale[...],
                self.kernel_offset[...],
                0,
                self.dtype,
            )
        elif self.kernel_scale is not None:
            y = quantization.int8_dot_general(
                x, self.kernel[...], self.kernel_scale[...], 0, self.dtype
            )
        else:
            y = jnp.einsum("...d,df->...f", x.astype(self.dtype), self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype = jnp.float32) -> None:
        self.eps = eps
        self.dtype = dtype
        self.scale = param(jnp.ones((dim,), dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalize in float32 whatever the compute dtype, as the reference models do.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding [V, D]; `attend` is the tied LM head.

    With `int8=True` the table is int8 with `embedding_scale` float32 [V, 1], one scale per
    row: a lookup dequantizes its rows, and for the tied head the per-row scale is exactly
    a per-output-channel scale, so `attend` goes through AQT like any int8 Dense. With a
    `block_size` too, `embedding_scale` and `embedding_offset` are [V, D / block_size]:
    blocks along each row, as a GGUF stores the table.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        std: float,
        dtype: jnp.dtype,
        int8: bool = False,
        block_size: int | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.dtype = dtype
        table = (std * jax.random.normal(rngs.params(), (vocab_size, dim), jnp.float32)).astype(
            dtype
        )
        if int8 and block_size is not None:
            values, scale, offset = quantization.quantize_blocks_jit(table, 1, block_size)
            self.embedding = param(values, ("vocab", "embed"))
            self.embedding_scale = param(scale, ("vocab", None))
            self.embedding_offset = param(offset, ("vocab", None))
        elif int8:
            values, scale = quantization.quantize(table, contracting_axis=1)
            self.embedding = param(values, ("vocab", "embed"))
            self.embedding_scale = param(scale, ("vocab", None))
            self.embedding_offset = None
        else:
            self.embedding = param(table, ("vocab", "embed"))
            self.embedding_scale = self.embedding_offset = None

    def __call__(self, tokens: jax.Array) -> jax.Array:
        rows = jnp.take(self.embedding[...], tokens, axis=0)
        if self.embedding_scale is None:
            return rows
        scale = jnp.take(self.embedding_scale[...], tokens, axis=0)
        if self.embedding_offset is not None:
            offset = jnp.take(self.embedding_offset[...], tokens, axis=0)
            return quantization.dequantize_blocks(rows, scale, offset, rows.ndim - 1, self.dtype)
        return quantization.dequantize(rows, scale, self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied LM head: logits = x @ embedding.T."""
        if self.embedding_offset is not None:
            return quantization.block_int8_dot_general(
                x,
                self.embedding[...],
                self.embedding_scale[...],
                self.embedding_offset[...],
                1,
                self.dtype,
            )
        if self.embedding_scale is not None:
            return quantization.int8_dot_general(
                x, self.embedding[...], self.embedding_scale[...], 1, self.dtype
            )
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding[...])


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(
        self,
        d_model: int,
        ffn_dim: int,
        *,
        dtype: jnp.dtype,
        gain: float,
        int8: bool = False,
        block_size: int | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        kw = dict(dtype=dtype, gain=gain, int8=int8, block_size=block_size, rngs=rngs)
        # Column-parallel gate/up, row-parallel down: one all-reduce per MLP.
        self.gate_proj = Dense(d_model, ffn_dim, axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(d_model, ffn_dim, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(ffn_dim, d_model, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))

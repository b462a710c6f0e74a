"""Weight-only int8 through AQT: quantize a float weight, and multiply by an int8 weight.

Two layouts. Per channel (below): one scale per output channel, AQT's own quantizer and
int8 matmul. Blocks (`quantize_blocks`, `block_int8_dot_general`): every `block` weights
along the contracting axis have a scale and an offset, `w = q * scale + offset`, which
is how llama.cpp's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 (and the 32-weight sub-blocks of Q4_K/Q5_K)
store a weight: a GGUF's blocks are served as they are (shared/weights/gguf_blocks.py),
and float weights get min/max blocks here.

Both directions go through one AQT config (`aqt.jax.v2.config`), weight-only: the rhs
(weights) uses AQT's IntSymmetric 8-bit numerics with absmax calibration along the
contracting axis (one scale per output channel); the lhs (activations) is not quantized.

* `quantize` is AQT's own rhs quantizer: what AQT's freezer stores in CONVERT mode. The
  converter (`pdserve convert --quantize int8`) and convert-on-load both call it, so the
  two paths give the same int8 values and scales bit for bit.
* `int8_dot_general` is AQT's `dg_core` with the frozen weight handed over as a full
  `QTensor` (`rhs_qt`), which is what `AqtDotGeneral` does in SERVE mode. AQT then skips
  calibration and quantization of the rhs (XLA drops the unused dummy operand) and
  multiplies activations by the int8 values, applying the scales to the output
  (`DequantMode.OUTPUT`). The float kernel never exists as a parameter.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from aqt.jax.v2 import aqt_tensor
from aqt.jax.v2 import config as aqt_config

SCALE_SUFFIX = "_scale"  # the scale of param `x` is param `x_scale`
OFFSET_SUFFIX = "_offset"  # blocks only: the offset of param `x` is param `x_offset`


def weight_only_int8_config() -> aqt_config.DotGeneral:
    """AQT dot_general config: int8 rhs (per-channel absmax), float lhs, no backward pass.

    A fresh object per call: AQT configs hold a calibrator that is set up on first use.
    """
    cfg = aqt_config.config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)
    aqt_config.set_bits(
        cfg,
        fwd_lhs_bit=None,
        fwd_rhs_bit=8,
        dlhs_lhs_bit=None,
        dlhs_rhs_bit=None,
        drhs_lhs_bit=None,
        drhs_rhs_bit=None,
    )
    return cfg


def quantize(weight: jax.Array, contracting_axis: int) -> tuple[jax.Array, jax.Array]:
    """float weight -> (int8 values, float32 scales) with AQT's rhs quantizer.

    The scale has the weight's rank, with size 1 on `contracting_axis` (one scale per output
    channel): [in, out] -> [1, out]; an embedding [V, D] read along D -> [V, 1].
    Dequantized value = int8 * scale.
    """
    quantizer = weight_only_int8_config().fwd.dg_quantizer.rhs
    quantizer.init_calibration()
    qt, _ = quantizer.quant(weight.astype(jnp.float32), calibration_axes=[contracting_axis])
    (scale,) = qt.scale
    return qt.qvalue.astype(jnp.int8), scale.astype(jnp.float32)


quantize_jit: Callable[[jax.Array, int], tuple[jax.Array, jax.Array]] = jax.jit(
    quantize, static_argnums=1
)


def int8_dot_general(
    x: jax.Array, values: jax.Array, scale: jax.Array, rhs_contracting: int, dtype: jnp.dtype
) -> jax.Array:
    """Contract the last axis of `x` with axis `rhs_contracting` of a 2-D int8 weight.

    x [..., K]; values int8 [K, N] (rhs_contracting=0) or [N, K] (=1) -> [..., N] in `dtype`.
    """
    qt = aqt_tensor.QTensor(
        qvalue=values, scale=[scale], scale_t=None, bias=[], dequant_dtype=dtype
    )
    dims = (((x.ndim - 1,), (rhs_contracting,)), ((), ()))
    # The dummy rhs only feeds AQT's calibration of a tensor it already has (rhs_qt is
    # full), so its result is discarded and XLA removes it from the compiled step.
    dummy = jnp.zeros(values.shape, dtype)
    out, _ = weight_only_int8_config().dg_core(
        lhs=x.astype(dtype), rhs=dummy, lhs_qt=None, rhs_qt=qt, dimension_numbers=dims
    )
    return out.astype(dtype)


def dequantize(values: jax.Array, scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """int8 values * scale, as AQT's QTensor.dequant does (used for embedding lookups)."""
    return values.astype(dtype) * scale.astype(dtype)


# Blocks ---------------------------------------------------------------------------------


def _split(x: jax.Array, axis: int, block: int) -> jax.Array:
    """[.., K, ..] -> [.., K / block, block, ..]."""
    return x.reshape(*x.shape[:axis], x.shape[axis] // block, block, *x.shape[axis + 1 :])


GRID_STEPS_PER_GAP = (1, 2, 3, 4)


def _fit_grid(
    w: jax.Array, low: jax.Array, step: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Blocks [..., B] on the grid `low + level * step`: (levels, least-squares step and
    base over those levels, whether the levels fit 0..255, largest residual)."""
    usable = jnp.isfinite(step) & (step > 0)
    levels = jnp.round((w - low) / jnp.where(usable, step, 1.0))
    mean_level = jnp.mean(levels, axis=-1, keepdims=True)
    centred = levels - mean_level
    mean_w = jnp.mean(w, axis=-1, keepdims=True)
    spread = jnp.sum(centred * centred, axis=-1, keepdims=True)
    scale = jnp.sum(centred * (w - mean_w), axis=-1, keepdims=True) / jnp.where(
        spread > 0, spread, 1.0
    )
    base = mean_w - scale * mean_level
    residual = jnp.max(jnp.abs(levels * scale + base - w), axis=-1, keepdims=True)
    fits = usable & (jnp.max(levels, axis=-1, keepdims=True) <= 255)
    return levels, scale, base, fits, residual


def quantize_blocks(
    weight: jax.Array, contracting_axis: int, block: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float weight -> (int8 values, float32 scales, float32 offsets), one of each per block.

    A block whose weights already lie on an evenly spaced grid of at most 256 levels (each
    block of a dequantized GGUF Q4/Q5/Q8 tensor does) keeps that grid: its step is the
    smallest gap between its distinct weights or a half, third or quarter of it, refined
    with the offset by least squares over the levels, so the block is stored to within a
    few float32 roundings (`rounding` below). Any other block gets 256 levels over its own
    [min, max]: an error of at most (max - min) / 510 per weight. A constant block is exact
    (scale 0, offset = value).
    """
    within = contracting_axis + 1  # the axis of the weights within a block
    w = jnp.moveaxis(_split(weight.astype(jnp.float32), contracting_axis, block), within, -1)
    low = jnp.min(w, axis=-1, keepdims=True)
    high = jnp.max(w, axis=-1, keepdims=True)
    # Min/max: levels 0..255 from the block minimum.
    span_scale = (high - low) / 255.0
    span_levels = jnp.round((w - low) / jnp.where(span_scale == 0, 1.0, span_scale))
    span_levels = jnp.clip(span_levels, 0, 255)
    # Grid: equal levels are equal floats, so the smallest nonzero gap is a whole number of
    # grid steps; try it, then its half, third and quarter (with 32 weights of Q8_0's 255
    # levels it is at most three steps in every block of SmolLM2's table).
    gaps = jnp.diff(jnp.sort(w, axis=-1), axis=-1)
    smallest_gap = jnp.min(jnp.where(gaps > 0, gaps, jnp.inf), axis=-1, keepdims=True)
    rounding = 16 * jnp.finfo(jnp.float32).eps * jnp.max(jnp.abs(w), axis=-1, keepdims=True)
    on_grid = jnp.zeros_like(low, dtype=bool)
    levels, scale, base = span_levels, span_scale, low  # kept where no grid fits
    for steps in GRID_STEPS_PER_GAP:
        grid_levels, grid_scale, grid_base, in_range, residual = _fit_grid(
            w, low, smallest_gap / steps
        )
        fits = in_range & (residual <= rounding) & ~on_grid
        levels = jnp.where(fits, grid_levels, levels)
        scale = jnp.where(fits, grid_scale, scale)
        base = jnp.where(fits, grid_base, base)
        on_grid = on_grid | fits
    # int8 holds -128..127: levels past 127 are stored shifted, the offset absorbs it.
    shift = jnp.where(jnp.max(levels, axis=-1, keepdims=True) > 127, 128.0, 0.0)
    values = jnp.moveaxis(levels - shift, -1, within)
    return (
        values.astype(jnp.int8).reshape(weight.shape),
        jnp.squeeze(scale, -1),
        jnp.squeeze(base + shift * scale, -1),
    )


quantize_blocks_jit: Callable[[jax.Array, int, int], tuple[jax.Array, jax.Array, jax.Array]] = (
    jax.jit(quantize_blocks, static_argnums=(1, 2))
)


def dequantize_blocks(
    values: jax.Array,
    scale: jax.Array,
    offset: jax.Array,
    contracting_axis: int,
    dtype: jnp.dtype,
) -> jax.Array:
    """int8 values [.., K, ..] with per-block scale and offset [.., K / block, ..] -> float.

    An AQT QTensor with the block scale and the (negated) offset as its bias: AQT's
    dequantization `q * scale - bias`, in float32 as llama.cpp's `d * q + m`, so a GGUF
    block dequantizes to the same float32 the `gguf` package gives.
    """
    block = values.shape[contracting_axis] // scale.shape[contracting_axis]
    qt = aqt_tensor.QTensor(
        qvalue=_split(values, contracting_axis, block),
        scale=[jnp.expand_dims(scale.astype(jnp.float32), contracting_axis + 1)],
        scale_t=None,
        bias=[-jnp.expand_dims(offset.astype(jnp.float32), contracting_axis + 1)],
        dequant_dtype=jnp.float32,
    )
    return qt.dequant().reshape(values.shape).astype(dtype)


def block_int8_dot_general(
    x: jax.Array,
    values: jax.Array,
    scale: jax.Array,
    offset: jax.Array,
    rhs_contracting: int,
    dtype: jnp.dtype,
) -> jax.Array:
    """Contract the last axis of `x` with axis `rhs_contracting` of a 2-D block-int8 weight.

    The weight is dequantized inside the step and fed to one dot (AQT's fake-quant serving
    form), because per-block scales cannot move to the output as per-channel ones do:
    memory holds int8 only, and the float weight is a temporary of the step (XLA on TPU
    can fuse it into the matmul's operand; XLA on CPU writes it out, see the README).
    """
    weight = dequantize_blocks(values, scale, offset, rhs_contracting, dtype)
    spec = "...k,kn->...n" if rhs_contracting == 0 else "...k,nk->...n"
    return jnp.einsum(spec, x.astype(dtype), weight)

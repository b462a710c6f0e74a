"""Weight-only int8 through AQT: quantize a float weight, and multiply by an int8 weight.

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

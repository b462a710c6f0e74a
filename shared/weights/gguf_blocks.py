"""A GGUF tensor's own blocks as block-int8 (`w = q * scale + offset` per 32 weights).

llama.cpp's legacy formats store every 32 weights of a row as small integers with a
float16 scale (and, for the `_1` formats, a minimum): Q8_0 `d * q`, Q4_0 `d * (q - 8)`,
Q4_1 `d * q + m`, Q5_0 `d * (q - 16)`, Q5_1 `d * q + m`. Q4_K and Q5_K keep 32-weight
sub-blocks with 6-bit scales and minimums under float16 super-block factors:
`(d * sc) * q - dmin * m`. All of these are exactly an int8 block with a float32 scale and
offset, so `--quantize int8-blocks` serves them as stored: the int8 model's weights are
the float model's (the dequantized file), bit for bit, and int8 costs no accuracy.

The integers are read with the `gguf` package's own unpacking: each block is dequantized
once more with its factors set to 1 and 0, which yields `q` (or `sc * q`) exactly. Other
formats (F32, F16, BF16, and Q2_K, Q3_K, Q6_K, whose scales cover 16 weights) have no
32-weight form of their own; their dequantized floats go through
`quantization.quantize_blocks` like any float weight.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BLOCK = 32
_ONE_F16 = np.array([1.0], np.float16).view(np.uint8)  # two bytes
_ZERO_F16 = np.array([0.0], np.float16).view(np.uint8)

# Format -> (bytes per block, whether a float16 minimum follows the float16 scale; the
# K-quants' second float16 is their super-block minimum factor, dmin).
_LEGACY = {
    "Q8_0": (34, False),
    "Q4_0": (18, False),
    "Q4_1": (20, True),
    "Q5_0": (22, False),
    "Q5_1": (24, True),
}
_K_QUANTS = {"Q4_K": 144, "Q5_K": 176}  # 256 weights: 8 sub-blocks of 32
EXACT_TYPES = (*_LEGACY, *_K_QUANTS)


def exact_blocks(tensor: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(int8 q [rows, cols], float32 scale and offset [rows, cols / 32]) of a 2-D GGUF
    tensor whose format has exact 32-weight blocks; None for any other format."""
    from gguf.quants import dequantize

    kind = tensor.tensor_type.name
    if kind not in EXACT_TYPES or len(tensor.shape) != 2:
        return None
    rows, cols = (int(n) for n in reversed(tensor.shape))
    size, has_minimum = _LEGACY[kind] if kind in _LEGACY else (_K_QUANTS[kind], True)
    blocks = np.asarray(tensor.data, np.uint8).reshape(-1, size).copy()
    factor = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    minimum = np.zeros_like(factor)
    if has_minimum:
        minimum = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
        blocks[:, 2:4] = _ZERO_F16
    blocks[:, 0:2] = _ONE_F16
    unit = dequantize(blocks.reshape(rows, -1), tensor.tensor_type).reshape(-1, BLOCK)
    if kind in _LEGACY:
        q = unit  # q (shifted by the format's own offset: Q4_0 -8..7, Q5_0 -16..15)
        scale, offset = factor, minimum
    else:
        from gguf.quants import Q4_K

        sc, mins = Q4_K.get_scale_min(blocks[:, 4:16])  # [super-blocks, 8] each
        sc, mins = sc.reshape(-1).astype(np.float32), mins.reshape(-1).astype(np.float32)
        super_d, super_min = np.repeat(factor, 8), np.repeat(minimum, 8)
        # The unit dequantization is sc * q; a sub-block with sc 0 is its offset alone.
        q = np.where(sc[:, None] > 0, unit / np.where(sc > 0, sc, 1)[:, None], 0)
        scale = super_d * sc  # float32, as gguf computes `d * sc`
        offset = -(super_min * mins)
    if not np.array_equal(q, np.round(q)) or q.min(initial=0) < -128 or q.max(initial=0) > 127:
        raise ValueError(f"{tensor.name}: {kind} blocks did not unpack to integers")
    return (
        q.astype(np.int8).reshape(rows, cols),
        scale.astype(np.float32).reshape(rows, cols // BLOCK),
        offset.astype(np.float32).reshape(rows, cols // BLOCK),
    )

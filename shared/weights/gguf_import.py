"""GGUF files (llama.cpp's format) of Llama-architecture models -> ModelConfig + flat params.

Read with the `gguf` package: the file is memory-mapped, and each tensor is dequantized
in numpy (llama.cpp's block formats) one at a time, then cast (or int8-quantized) to its
target, so loading never holds the float model twice. With 32-weight block-int8 targets
(`--quantize int8-blocks`), tensors whose format has exact 32-weight blocks keep them
(shared/weights/gguf_blocks.py) instead of being dequantized and rounded again.

Mapping notes:
* GGUF stores a weight with `ne = [in, out]`, i.e. a row-major numpy array [out, in]
  (HF's layout); our kernels are [in, out]: transposed here.
* llama.cpp's converter permutes the rows of `attn_q` and `attn_k` (per head, from HF's
  rotate_half layout to the interleaved pairs its rope kernel uses). Our RoPE uses HF's
  layout, so the permutation is undone here (`unpermute_rope_rows`).
* The model config comes from the `llama.*` metadata keys; BOS/EOS from
  `tokenizer.ggml.*`. A model without `output.weight` ties its LM head to the embedding.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from shared.config import ModelConfig
from shared.weights import gguf_blocks
from shared.weights.gguf_reader import tensor_index
from shared.weights.hf_config import CheckpointError
from shared.weights.tree import AbstractFlat, Flat, block_size_of, float_paths, place, place_blocks

# Block formats the `gguf` package dequantizes and that we accept; anything else (the
# IQ*, TQ* and FP4 formats, integer tensors) is refused by name.
SUPPORTED_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)


def tensor_names(config: ModelConfig) -> dict[str, tuple[str, int | None]]:
    """GGUF tensor name -> (our dotted path, heads to un-permute the rows by, or None)."""
    names: dict[str, tuple[str, int | None]] = {
        "token_embd.weight": ("embed.embedding", None),
        "output_norm.weight": ("final_norm.scale", None),
    }
    if not config.tie_embeddings:
        names["output.weight"] = ("lm_head.kernel", None)
    for i in range(config.num_layers):
        g, ours = f"blk.{i}.", f"layers.{i}."
        names[g + "attn_norm.weight"] = (ours + "input_norm.scale", None)
        names[g + "ffn_norm.weight"] = (ours + "post_attn_norm.scale", None)
        names[g + "attn_q.weight"] = (ours + "attn.q_proj.kernel", config.num_heads)
        names[g + "attn_k.weight"] = (ours + "attn.k_proj.kernel", config.num_kv_heads)
        names[g + "attn_v.weight"] = (ours + "attn.v_proj.kernel", None)
        names[g + "attn_output.weight"] = (ours + "attn.o_proj.kernel", None)
        for ffn in ("gate", "up", "down"):
            names[f"{g}ffn_{ffn}.weight"] = (f"{ours}mlp.{ffn}_proj.kernel", None)
    return names


def permute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k weights [heads * head_dim, in]: within each
    head, row order (first half, second half) becomes interleaved pairs (0, h/2, 1, ...)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute_rope_rows`: GGUF q/k rows back to HF's rotate_half layout."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def read_params(
    reader: Any, path: pathlib.Path, config: ModelConfig, targets: AbstractFlat
) -> Flat:
    """Dequantize, check, un-permute, transpose, cast (or quantize) every tensor."""
    names = tensor_names(config)
    index = tensor_index(reader)
    missing = [n for n in names if n not in index]
    if missing:
        raise CheckpointError(
            f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)"
        )
    extra = sorted(set(index) - set(names))
    if extra:
        raise CheckpointError(
            f"{path}: unexpected tensor {extra[0]!r} for a {config.num_layers}-layer llama "
            f"({len(extra)} unexpected in all)"
        )
    covered = {ours for ours, _ in names.values()}
    uncovered = [p for p in float_paths(targets) if p not in covered]
    if uncovered:
        raise AssertionError(f"tensor_names() does not cover params {uncovered}")
    flat: Flat = {}
    for name, (ours, heads) in names.items():
        if block_size_of(ours, targets) == gguf_blocks.BLOCK:
            blocks = gguf_blocks.exact_blocks(index[name])
            if blocks is not None:  # the values, scales and offsets, each [out, ...]
                flat.update(
                    place_blocks(
                        ours, *_our_layout(name, ours, heads, blocks, targets, path), targets
                    )
                )
                continue
        value = dequantized(index[name], path)  # [out, in] (HF layout); norms: [D]
        (value,) = _our_layout(name, ours, heads, (value,), targets, path)
        flat.update(place(ours, value, targets))
        del value
    return flat


def _our_layout(
    name: str,
    ours: str,
    heads: int | None,
    arrays: tuple[np.ndarray, ...],
    targets: AbstractFlat,
    path: pathlib.Path,
) -> tuple[np.ndarray, ...]:
    """Arrays of one GGUF tensor laid out by its rows ([out, ...]: the weight, or its block
    values, scales and offsets) -> ours: the weight's shape checked against the metadata,
    q/k rows un-permuted, kernels transposed to [in, out]."""
    kernel = arrays[0].ndim == 2 and ours != "embed.embedding"
    want = targets[ours].shape
    expected = tuple(reversed(want)) if kernel else want
    if tuple(arrays[0].shape) != tuple(expected):
        raise CheckpointError(
            f"{path}: tensor {name!r} has shape {list(arrays[0].shape)}, the metadata implies "
            f"{list(expected)}"
        )
    if heads is not None:
        arrays = tuple(unpermute_rope_rows(a, heads) for a in arrays)
    if kernel:
        arrays = tuple(np.ascontiguousarray(a.T) for a in arrays)
    return arrays


def dequantized(tensor: Any, path: pathlib.Path) -> np.ndarray:
    """One GGUF tensor as float32 numpy, in row-major [.., out, in] order."""
    from gguf.quants import dequantize

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} has type {kind}, which pdserve does not load; "
            f"supported: {', '.join(SUPPORTED_TYPES)}"
        )
    shape = tuple(int(n) for n in reversed(tensor.shape))  # ne is fastest-first
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)

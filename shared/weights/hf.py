"""Hugging Face directories (Llama / Mistral / Qwen2) -> ModelConfig + flat params.

Reads `config.json` and `*.safetensors` (sharded with `model.safetensors.index.json`, or
not) with the `safetensors` package; no torch. Every shape is checked against the model
config from the file headers before any tensor is read, so a bad directory fails fast, and
every error names the file (and tensor) at fault.

Mapping notes:
* HF Linear weights are [out, in]; our kernels are [in, out]: transposed here.
* Our RoPE uses HF's rotate_half layout, so q/k weights are taken as they are (no
  permutation, unlike Meta's original checkpoints).
* A list of eos ids (Qwen2, Llama 3 instruct) keeps the first: ModelConfig has one eos id.
* A sliding window (Mistral) is honoured by capping max_position_embeddings at the window:
  within it, windowed and full attention agree exactly.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from shared.config import ModelConfig
from shared.weights.hf_config import CheckpointError
from shared.weights.tree import AbstractFlat, Flat, float_paths, place

INDEX_FILE = "model.safetensors.index.json"
_IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # a buffer some old checkpoints saved


def tensor_names(config: ModelConfig) -> dict[str, tuple[str, bool]]:
    """HF tensor name -> (our dotted path, transpose?)."""
    names = {
        "model.embed_tokens.weight": ("embed.embedding", False),
        "model.norm.weight": ("final_norm.scale", False),
    }
    if not config.tie_embeddings:
        names["lm_head.weight"] = ("lm_head.kernel", True)
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        names[hf + "input_layernorm.weight"] = (ours + "input_norm.scale", False)
        names[hf + "post_attention_layernorm.weight"] = (ours + "post_attn_norm.scale", False)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{hf}self_attn.{proj}.weight"] = (f"{ours}attn.{proj}.kernel", True)
        if config.qkv_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                names[f"{hf}self_attn.{proj}.bias"] = (f"{ours}attn.{proj}.bias", False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{hf}mlp.{proj}.weight"] = (f"{ours}mlp.{proj}.kernel", True)
    return names


def shard_map(hf_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> the safetensors file holding it (from the index, or each file's header)."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err!r})") from None
        return {name: hf_dir / file for name, file in weight_map.items()}
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{hf_dir}: no *.safetensors files (and no {INDEX_FILE})")
    where: dict[str, pathlib.Path] = {}
    for file in files:
        with _open(file) as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    return where


def _open(file: pathlib.Path) -> Any:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (named by {INDEX_FILE})")
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable safetensors file ({err})") from None


def read_params(hf_dir: pathlib.Path, config: ModelConfig, targets: AbstractFlat) -> Flat:
    """Read, check, transpose, cast and (for int8 targets) quantize every tensor.

    One tensor is held in float at a time, so converting on load never holds the float
    model and the int8 model together.
    """
    names = tensor_names(config)
    where = shard_map(hf_dir)
    _check_names(hf_dir, names, where, targets)
    flat: Flat = {}
    for file, wanted in _group_by_file(names, where).items():
        with _open(file) as handle:
            for name in wanted:
                path, transpose = names[name]
                value = _read(handle, file, name, transpose, targets[path].shape)
                flat.update(place(path, value, targets))
                del value
    return flat


def _check_names(
    hf_dir: pathlib.Path,
    names: dict[str, tuple[str, bool]],
    where: dict[str, pathlib.Path],
    targets: AbstractFlat,
) -> None:
    missing = [n for n in names if n not in where]
    if missing:
        raise CheckpointError(
            f"{hf_dir}: tensor {missing[0]!r} is missing from the safetensors files "
            f"({len(missing)} missing in all)"
        )
    extra = [n for n in where if n not in names and not n.endswith(_IGNORED_TENSORS)]
    # A tied model may still ship lm_head.weight (a copy of the embedding): ignore it.
    extra = [n for n in extra if n != "lm_head.weight"]
    if extra:
        raise CheckpointError(
            f"{where[extra[0]]}: unexpected tensor {extra[0]!r} for this config "
            f"({len(extra)} unexpected in all); is it a different architecture or quantized?"
        )
    covered = {path for path, _ in names.values()}
    uncovered = [p for p in float_paths(targets) if p not in covered]
    if uncovered:
        raise AssertionError(f"tensor_names() does not cover params {uncovered}")


def _group_by_file(
    names: dict[str, tuple[str, bool]], where: dict[str, pathlib.Path]
) -> dict[pathlib.Path, list[str]]:
    groups: dict[pathlib.Path, list[str]] = {}
    for name in names:
        groups.setdefault(where[name], []).append(name)
    return groups


def _read(
    handle: Any, file: pathlib.Path, name: str, transpose: bool, want: tuple[int, ...]
) -> np.ndarray:
    try:
        shape = tuple(handle.get_slice(name).get_shape())
    except SafetensorError as err:
        raise CheckpointError(f"{file}: tensor {name!r} unreadable ({err})") from None
    expected = tuple(reversed(want)) if transpose else tuple(want)
    if shape != expected:
        raise CheckpointError(
            f"{file}: tensor {name!r} has shape {list(shape)}, config.json implies {list(expected)}"
        )
    try:
        value = handle.get_tensor(name)
    except SafetensorError as err:
        raise CheckpointError(f"{file}: tensor {name!r} unreadable ({err})") from None
    return np.ascontiguousarray(value.T) if transpose else value


def iter_files(hf_dir: pathlib.Path) -> Iterator[pathlib.Path]:
    """The files of an HF directory that `convert` copies next to the orbax params."""
    for name in ("tokenizer.json",):
        if (hf_dir / name).is_file():
            yield hf_dir / name

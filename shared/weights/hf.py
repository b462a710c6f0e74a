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

from shared.config import ConfigError, ModelConfig, RopeScaling
from shared.weights.tree import AbstractFlat, Flat, float_paths, place

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
INDEX_FILE = "model.safetensors.index.json"
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # a buffer some old checkpoints saved


class CheckpointError(ValueError):
    """A checkpoint or HF directory is missing, malformed or unsupported; the message names
    the file and, where there is one, the tensor."""


# Config ------------------------------------------------------------------------------------


def read_config(hf_dir: pathlib.Path) -> ModelConfig:
    """config.json -> ModelConfig (float; quantization is the caller's choice)."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; an HF model directory needs config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: architecture {arch!r} is not supported; pdserve imports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    missing = [k for k in _REQUIRED_KEYS if cfg.get(k) is None]
    if missing:
        raise CheckpointError(f"{path}: required keys missing for {arch}: {missing}")
    _check_supported_features(cfg, path, arch)
    try:
        return _model_config(cfg, hf_dir.name, arch)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _check_supported_features(cfg: dict[str, Any], path: pathlib.Path, arch: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{path}: hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
    # Llama's attention_bias also puts a bias on o_proj, which our Attention does not have.
    if arch != "Qwen2ForCausalLM" and cfg.get("attention_bias"):
        raise CheckpointError(f"{path}: attention_bias=true (bias on o_proj) is not supported")
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{path}: mlp_bias=true is not supported")


def _rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from `rope_theta` + `rope_scaling` (transformers < 5 and most Hub
    checkpoints) or `rope_parameters` (transformers >= 5)."""
    params = cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"rope type {kind!r} is not supported; only 'default' and 'llama3' are")
    return (
        theta,
        RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        ),
    )


def _model_config(cfg: dict[str, Any], name: str, arch: str) -> ModelConfig:
    heads = int(cfg["num_attention_heads"])
    theta, scaling = _rope(cfg)
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None  # ModelConfig holds one eos id: keep the first
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    window = cfg.get("sliding_window")
    uses_window = arch == "MistralForCausalLM" or cfg.get("use_sliding_window", False)
    if uses_window and window:
        max_pos = min(max_pos, int(window))
    return ModelConfig(
        name=name,
        vocab_size=int(cfg["vocab_size"]),
        d_model=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        ffn_dim=int(cfg["intermediate_size"]),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM",
        max_position_embeddings=max_pos,
        bos_id=cfg.get("bos_token_id"),
        eos_id=eos,
    )


# Tensors -----------------------------------------------------------------------------------


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

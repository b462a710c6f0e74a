"""A Hugging Face directory's `config.json` -> `ModelConfig`, with no tensor read and no
JAX (the orchestrator reads a model's config this way; shared/weights/hf.py reads its
tensors).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from shared.config import ConfigError, ModelConfig, RopeScaling

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


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

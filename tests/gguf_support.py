"""Write small GGUF files the way llama.cpp's converter lays them out, for the import tests:
HF-layout weights in, q/k rows permuted, any block format the `gguf` package quantizes."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping

import gguf
import numpy as np

from shared.config import ModelConfig
from shared.weights.gguf_import import permute_rope_rows, tensor_names


def gpt2_byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies use it)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


IM_START, IM_END = 256, 257
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_tokenizer(add_bos: bool = False, model: str = "gpt2") -> dict:
    """A byte-level BPE of exactly the tiny preset's 320 ids: the 256 byte symbols, two
    control tokens, merges spelling "the" and " the", and unreachable fillers."""
    tokens = [*gpt2_byte_alphabet(), "<|im_start|>", "<|im_end|>", "th", "the", "Ġthe"]
    tokens += [f"<unused{i}>" for i in range(320 - len(tokens))]
    types = [1] * 256 + [3, 3] + [1] * (len(tokens) - 258)
    merges = ["t h", "th e", "Ġ the"]  # by rank: " the" is Ġ + t h -> th + e -> Ġ + the
    V = gguf.GGUFValueType
    return {
        "tokenizer.ggml.model": (model, V.STRING),
        "tokenizer.ggml.pre": ("smollm", V.STRING),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": (merges, V.ARRAY, V.STRING),
        "tokenizer.ggml.add_bos_token": (add_bos, V.BOOL),
        "tokenizer.chat_template": (CHATML, V.STRING),
    }


def params_as_gguf_tensors(config: ModelConfig, flat: Mapping[str, np.ndarray]) -> dict:
    """Our flat params -> {GGUF name: HF-layout float32 array, q/k permuted like llama.cpp}."""
    tensors = {}
    for name, (ours, heads) in tensor_names(config).items():
        value = np.asarray(flat[ours], np.float32)
        if value.ndim == 2 and ours != "embed.embedding":
            value = value.T  # ours [in, out] -> GGUF/HF [out, in]
        if heads is not None:
            value = permute_rope_rows(value, heads)
        tensors[name] = np.ascontiguousarray(value)
    return tensors


def write_gguf(
    path: pathlib.Path,
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    arch: str = "llama",
    type_of: Callable[[str], gguf.GGMLQuantizationType] = lambda name: (
        gguf.GGMLQuantizationType.F32
    ),
    tokenizer: Mapping[str, object] | None = None,
    raw: Mapping[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
) -> pathlib.Path:
    """A GGUF file with `llama.*` metadata for `config`; `type_of(name)` picks each 2-D
    tensor's block format (norms stay F32, as llama.cpp keeps them)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(config.name)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.bos_id is not None:
        writer.add_bos_token_id(config.bos_id)
    if config.eos_id is not None:
        writer.add_eos_token_id(config.eos_id)
    for key, value in (tokenizer or {}).items():
        writer.add_key_value(key, *value)
    for name, value in tensors.items():
        f32 = gguf.GGMLQuantizationType.F32
        kind = type_of(name) if type_of is not None and value.ndim == 2 else f32
        if kind in (gguf.GGMLQuantizationType.F32,):
            writer.add_tensor(name, value)
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, value.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)
    for name, (data, kind) in (raw or {}).items():
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

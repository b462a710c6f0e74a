"""A GGUF file opened (memory-mapped) and its metadata -> `ModelConfig`, with no tensor read
and no JAX (the orchestrator and the tokenizer read a GGUF this way; shared/weights/
gguf_import.py reads its tensors).
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

from shared.config import ConfigError, ModelConfig
from shared.weights.hf_config import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama",)
_REQUIRED_KEYS = (
    "block_count",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
)


def is_gguf(path: pathlib.Path) -> bool:
    """`--model` names a GGUF file: by its suffix, or by its magic bytes."""
    if path.suffix == ".gguf":
        return True
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(4) == b"GGUF"


def open_gguf(path: pathlib.Path) -> Any:
    """A `gguf.GGUFReader` on `path` (memory-mapped); CheckpointError if it is not GGUF."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    stat = path.stat()
    return _reader(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _reader(path: str, size: int, mtime_ns: int) -> Any:
    """Cached per file version: parsing the metadata (tens of thousands of vocabulary
    strings) takes seconds, and a process that loads weights and tokenizer reads it twice."""
    import gguf  # imported here: only GGUF models need it

    del size, mtime_ns  # only part of the cache key
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as err:
        raise CheckpointError(f"{path}: not a readable GGUF file ({err})") from None


def metadata(reader: Any, key: str, default: Any = None) -> Any:
    """One metadata value as a Python value (str, int, float, bool or list), or `default`."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


# Config ------------------------------------------------------------------------------------


def read_config(reader: Any, path: pathlib.Path) -> ModelConfig:
    """`general.architecture` + `llama.*` keys -> ModelConfig (float)."""
    arch = metadata(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: architecture {arch!r} is not supported; pdserve imports GGUF files of "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (use a Hugging Face directory for others)"
        )
    missing = [k for k in _REQUIRED_KEYS if metadata(reader, f"{arch}.{k}") is None]
    if missing:
        raise CheckpointError(f"{path}: metadata keys missing: {[f'{arch}.{k}' for k in missing]}")
    scaling = metadata(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_index(reader):
        raise CheckpointError(f"{path}: rope scaling ({scaling!r}, rope_freqs) is not supported")

    def key(name: str, default: Any = None) -> Any:
        return metadata(reader, f"{arch}.{name}", default)

    heads = int(key("attention.head_count"))
    d_model = int(key("embedding_length"))
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise CheckpointError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    try:
        return ModelConfig(
            name=str(metadata(reader, "general.name") or path.stem),
            vocab_size=int(vocab),
            d_model=d_model,
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv") or heads),
            head_dim=int(key("attention.key_length") or d_model // heads),
            ffn_dim=int(key("feed_forward_length")),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rms_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in tensor_index(reader),
            max_position_embeddings=int(key("context_length", 2048)),
            bos_id=metadata(reader, "tokenizer.ggml.bos_token_id"),
            eos_id=metadata(reader, "tokenizer.ggml.eos_token_id"),
        )
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


# Tensors -----------------------------------------------------------------------------------


def tensor_index(reader: Any) -> dict[str, Any]:
    """Every tensor of the file by name (its header only: nothing is read)."""
    return {t.name: t for t in reader.tensors}

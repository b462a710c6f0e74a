"""What a process that serves no weights (the orchestrator) needs to know of a model: its
config (vocabulary, EOS) and its tokenizer. Reads no tensors."""

from __future__ import annotations

import pathlib

from shared.config import MODEL_PRESETS, ModelConfig, model_preset
from shared.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from shared.weights.checkpoint import METADATA_FILE, TOKENIZER_FILE, CheckpointError, read_metadata
from shared.weights.hf import read_config


def load_model_info(spec: str) -> tuple[ModelConfig, Tokenizer]:
    """`--model` as the workers take it -> (config, tokenizer)."""
    if spec in MODEL_PRESETS:
        config = model_preset(spec)
        return config, ByteTokenizer(config.vocab_size, config.bos_id, config.eos_id)
    path = pathlib.Path(spec).expanduser().resolve()
    if (path / METADATA_FILE).is_file():
        config, _ = read_metadata(path)
    elif (path / "config.json").is_file():
        config = read_config(path)
    else:
        raise CheckpointError(
            f"{path}: not a preset, a pdserve checkpoint ({METADATA_FILE}) or a Hugging Face "
            "directory (config.json)"
        )
    tokenizer_file = path / TOKENIZER_FILE
    if tokenizer_file.is_file():
        return config, HFTokenizer(tokenizer_file, config.bos_id, config.eos_id)
    return config, ByteTokenizer(config.vocab_size, config.bos_id, config.eos_id)

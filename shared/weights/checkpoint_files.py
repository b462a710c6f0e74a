"""A pdserve checkpoint's file names and its metadata file (`pdserve.json`: format
version, model config, quantization), read with no JAX; shared/weights/checkpoint.py
writes and restores the params.
"""

from __future__ import annotations

import json
import pathlib

from shared.config import ModelConfig
from shared.weights.hf_config import CheckpointError

FORMAT_VERSION = 1
METADATA_FILE = "pdserve.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.json"


def read_metadata(ckpt: pathlib.Path) -> tuple[ModelConfig, dict]:
    path = ckpt / METADATA_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version={meta.get('format_version')!r}; this pdserve reads "
            f"version {FORMAT_VERSION}"
        )
    try:
        return ModelConfig.from_dict(meta["model_config"]), meta
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: bad model_config ({err})") from None

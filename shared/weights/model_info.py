"""What a process needs to turn requests into prompts, without the weights: the model's
config (vocabulary, EOS), its tokenizer and its chat template. The orchestrator never
loads weights; `generate-local` and `convert` use it beside `load_model`.

Where each comes from:
* preset: the byte-level tokenizer, no chat template;
* GGUF file (or a packaged model): the file's metadata (shared/weights/gguf_tokenizer.py);
* pdserve checkpoint or HF directory: `tokenizer.json`, and `tokenizer_config.json`
  (`chat_template`, `bos_token`, `eos_token`, `add_bos_token`) or `chat_template.jinja`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from shared.config import MODEL_PRESETS, ModelConfig, model_preset
from shared.tokenizer import ByteTokenizer, ChatFormat, HFTokenizer, Tokenizer
from shared.weights.checkpoint_files import METADATA_FILE, TOKENIZER_FILE, read_metadata
from shared.weights.gguf_reader import is_gguf, open_gguf
from shared.weights.gguf_reader import read_config as read_gguf_config
from shared.weights.gguf_tokenizer import END_OF_TURN_TOKENS, gguf_chat_format, gguf_tokenizer
from shared.weights.hf_config import CheckpointError, read_config
from shared.weights.packaged import resolve_packaged

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclasses.dataclass(frozen=True, slots=True)
class ModelInfo:
    config: ModelConfig
    tokenizer: Tokenizer
    chat: ChatFormat | None  # None: the model has no chat template (chat is refused)


def load_model_info(spec: str) -> ModelInfo:
    """`--model` as the workers take it -> config, tokenizer, chat template."""
    if spec in MODEL_PRESETS:
        config = model_preset(spec)
        tokenizer = ByteTokenizer(config.vocab_size, config.bos_id, config.eos_id)
        return ModelInfo(config, tokenizer, None)
    path = resolve_packaged(spec) or pathlib.Path(spec).expanduser().resolve()
    if is_gguf(path):
        reader = open_gguf(path)
        config = read_gguf_config(reader, path)
        return ModelInfo(config, gguf_tokenizer(reader, path), gguf_chat_format(reader))
    if (path / METADATA_FILE).is_file():
        config, _ = read_metadata(path)
    elif (path / "config.json").is_file():
        config = read_config(path)
    else:
        raise CheckpointError(
            f"{path}: not a preset, a .gguf file, a pdserve checkpoint ({METADATA_FILE}) or a "
            "Hugging Face directory (config.json)"
        )
    tokenizer_file = path / TOKENIZER_FILE
    settings = _tokenizer_config(path)
    bos = config.bos_id if settings.get("add_bos_token", True) else None
    tokenizer: Tokenizer = (
        HFTokenizer(tokenizer_file, bos, config.eos_id)
        if tokenizer_file.is_file()
        else ByteTokenizer(config.vocab_size, bos, config.eos_id)
    )
    return ModelInfo(config, tokenizer, _chat_format(path, settings, tokenizer, config))


def _tokenizer_config(path: pathlib.Path) -> dict[str, Any]:
    file = path / TOKENIZER_CONFIG_FILE
    if not file.is_file():
        return {}
    try:
        settings = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return settings


def _token_text(value: Any) -> str:
    """`bos_token` as HF writes it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value or ""


def _chat_format(
    path: pathlib.Path, settings: dict[str, Any], tokenizer: Tokenizer, config: ModelConfig
) -> ChatFormat | None:
    template = settings.get("chat_template")
    if (path / CHAT_TEMPLATE_FILE).is_file():
        template = (path / CHAT_TEMPLATE_FILE).read_text()
    if not isinstance(template, str) or not template:
        return None  # absent, or a list of named templates (tool use): not supported
    eot = {config.eos_id}
    if isinstance(tokenizer, HFTokenizer):
        eot.update(tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS if t in template)
    return ChatFormat(
        template=template,
        bos_token=_token_text(settings.get("bos_token")),
        eos_token=_token_text(settings.get("eos_token")),
        end_of_turn_ids=tuple(sorted(i for i in eot if i is not None)),
    )


def save_text_files(info: ModelInfo, out: pathlib.Path) -> None:
    """Write the tokenizer and chat template into checkpoint `out` (`pdserve convert`), in
    the files `load_model_info` reads back."""
    if not isinstance(info.tokenizer, HFTokenizer):
        return
    (out / TOKENIZER_FILE).write_text(info.tokenizer.to_str())
    settings: dict[str, Any] = {"add_bos_token": info.tokenizer.bos_id is not None}
    if info.chat is not None:
        settings.update(
            chat_template=info.chat.template,
            bos_token=info.chat.bos_token,
            eos_token=info.chat.eos_token,
        )
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(settings, indent=1) + "\n")

"""Tokenizers (byte-level default; HF tokenizer.json) and incremental detokenization."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol


class Tokenizer(Protocol):
    """What the serving path needs from a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; a trailing incomplete UTF-8 sequence decodes to U+FFFD."""
        ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then BOS and EOS; ids above them decode to nothing.

    The embedded presets use it, so the default model needs no tokenizer file.
    """

    def __init__(self, vocab_size: int, bos_id: int | None = 256, eos_id: int | None = 257):
        if vocab_size < 256:
            raise ValueError(f"a byte tokenizer needs vocab_size >= 256, got {vocab_size}")
        self.vocab_size, self.bos_id, self.eos_id = vocab_size, bos_id, eos_id

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, through the `tokenizers` library. BOS is prepended
    by `encode` (unless add_bos=False) when `bos_id` is set."""

    def __init__(self, path: str | Path, bos_id: int | None = None, eos_id: int | None = None):
        from tokenizers import Tokenizer as _HF  # imported here: only HF models need it

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        self._init(_HF.from_file(str(path)), bos_id, eos_id)

    @classmethod
    def from_str(cls, json_text: str, bos_id: int | None, eos_id: int | None) -> HFTokenizer:
        """From `tokenizer.json` text (a GGUF file's tokenizer is built in memory)."""
        from tokenizers import Tokenizer as _HF

        tokenizer = cls.__new__(cls)
        tokenizer._init(_HF.from_str(json_text), bos_id, eos_id)
        return tokenizer

    def _init(self, tok: Any, bos_id: int | None, eos_id: int | None) -> None:
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos_id, eos_id

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_str(self) -> str:
        """`tokenizer.json` text (what `pdserve convert` writes beside the params)."""
        return self._tok.to_str()

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


@dataclasses.dataclass(frozen=True, slots=True)
class ChatFormat:
    """A model's chat template (Jinja, as in Hugging Face's `tokenizer_config.json`) and the
    special tokens it may name; shared/chat.py renders it."""

    template: str
    bos_token: str = ""
    eos_token: str = ""
    # Tokens that end an assistant turn (`<|im_end|>`): a chat generation stops on them
    # as on EOS, and they are not returned.
    end_of_turn_ids: tuple[int, ...] = ()


class IncrementalDetokenizer:
    """Turns a growing token sequence into text deltas, never splitting a character.

    Decodes a short window of recent tokens (byte-level BPEs need context: a token's text
    can depend on its neighbours) and holds text back while it ends in U+FFFD, i.e. while
    the last token ended inside a UTF-8 character.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_ids or [])
        # [_prefix, _read) is context already emitted; text after _read is pending.
        self._prefix = max(0, len(self._ids) - 6)
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (possibly empty)."""
        self._ids.append(token_id)
        context = self._tok.decode(self._ids[self._prefix : self._read])
        full = self._tok.decode(self._ids[self._prefix :])
        if full.endswith("\ufffd") or len(full) <= len(context):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(context) :]

    def flush(self) -> str:
        """Whatever is still pending at the end of the stream (may hold U+FFFD)."""
        context = self._tok.decode(self._ids[self._prefix : self._read])
        full = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full[len(context) :]

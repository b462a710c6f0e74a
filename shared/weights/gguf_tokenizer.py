"""A GGUF file's tokenizer metadata -> a `tokenizers` BPE tokenizer + chat template.

llama.cpp's converter stores a byte-level BPE ("gpt2" tokenizer model) as parallel arrays:
`tokenizer.ggml.tokens` (id -> token text, already in the GPT-2 byte-to-unicode alphabet),
`tokenizer.ggml.merges` ("a b" strings, by rank), `tokenizer.ggml.token_type` (1 normal,
3 control, 4 user-defined, ...) and `tokenizer.ggml.pre`, the name of the pre-tokenizer
(the regex that splits text before BPE). We rebuild the Hugging Face tokenizer from them:
BPE model, ByteLevel pre-tokenizer (the GPT-2 regex) and decoder, and the control and
user-defined tokens as added tokens, so `<|im_start|>` in a rendered chat prompt is one id.
"""

from __future__ import annotations

import pathlib
from typing import Any

from shared.tokenizer import ChatFormat, HFTokenizer
from shared.weights.gguf_reader import metadata
from shared.weights.hf_config import CheckpointError

# llama.cpp token types (llama_token_type / gguf.TokenType).
_CONTROL, _USER_DEFINED = 3, 4
# `tokenizer.ggml.pre` values whose regex is GPT-2's, split into single digits first
# (llama.cpp: "\p{N}" then the GPT-2 pattern); plain GPT-2 needs no digit split.
_GPT2_PRE = ("default", "gpt2", "gpt-2")
_DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact")
# Tokens that end an assistant turn in common chat templates; one that the template
# writes and the vocabulary holds as a control token ends a chat generation like EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def tokenizer_json(reader: Any, path: pathlib.Path) -> str:
    """The tokenizer as `tokenizer.json` text (what `pdserve convert` writes)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = metadata(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"{path}: tokenizer model {kind!r} is not supported; pdserve reads byte-level BPE "
            "('gpt2') tokenizers from GGUF; for others, serve the Hugging Face directory"
        )
    pre = metadata(reader, "tokenizer.ggml.pre", "default")
    if pre not in _GPT2_PRE + _DIGITS_THEN_GPT2_PRE:
        raise CheckpointError(
            f"{path}: pre-tokenizer {pre!r} is not supported; pdserve knows "
            f"{', '.join(_GPT2_PRE + _DIGITS_THEN_GPT2_PRE)}"
        )
    tokens: list[str] = metadata(reader, "tokenizer.ggml.tokens")
    merges: list[str] = metadata(reader, "tokenizer.ggml.merges") or []
    types: list[int] = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges])
    tokenizer = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2_PRE:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    added = [
        AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
        for i in range(len(tokens))
        if types[i] in (_CONTROL, _USER_DEFINED)
    ]
    tokenizer.add_tokens(added)
    return tokenizer.to_str()


def gguf_tokenizer(reader: Any, path: pathlib.Path) -> HFTokenizer:
    """The file's tokenizer; BOS is prepended only when `add_bos_token` says so."""
    add_bos = bool(metadata(reader, "tokenizer.ggml.add_bos_token", True))
    bos = metadata(reader, "tokenizer.ggml.bos_token_id")
    eos = metadata(reader, "tokenizer.ggml.eos_token_id")
    return HFTokenizer.from_str(tokenizer_json(reader, path), bos if add_bos else None, eos)


def gguf_chat_format(reader: Any) -> ChatFormat | None:
    """`tokenizer.chat_template` with the special tokens it may name; None without one."""
    template = metadata(reader, "tokenizer.chat_template")
    if not template:
        return None
    tokens: list[str] = metadata(reader, "tokenizer.ggml.tokens")
    types: list[int] = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)

    def text_of(key: str) -> str | None:
        i = metadata(reader, key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    eot = {
        metadata(reader, "tokenizer.ggml.eot_token_id"),
        metadata(reader, "tokenizer.ggml.eos_token_id"),
    }
    control = {tokens[i]: i for i in range(len(tokens)) if types[i] == _CONTROL}
    eot.update(control[t] for t in END_OF_TURN_TOKENS if t in control and t in template)
    return ChatFormat(
        template=template,
        bos_token=text_of("tokenizer.ggml.bos_token_id") or "",
        eos_token=text_of("tokenizer.ggml.eos_token_id") or "",
        end_of_turn_ids=tuple(sorted(i for i in eot if i is not None)),
    )

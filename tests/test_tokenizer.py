"""Tokenizers and incremental detokenization (never split a UTF-8 character)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer

TEXT = "héllo, 世界 🌍!"


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer(320)
    ids = tok.encode(TEXT)
    assert ids[0] == 256 and all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids) == TEXT
    assert tok.encode("a", add_bos=False) == [97]


def test_incremental_detokenizer_never_splits_a_character():
    tok = ByteTokenizer(320)
    detok = IncrementalDetokenizer(tok, tok.encode("prompt:"))
    deltas = [detok.push(i) for i in tok.encode(TEXT, add_bos=False)]
    assert "".join(deltas) + detok.flush() == TEXT
    assert all("\ufffd" not in d for d in deltas)
    # "🌍" is four bytes: the first three produce nothing, the fourth the whole character.
    globe = TEXT.encode().index("🌍".encode())
    assert deltas[globe : globe + 4] == ["", "", "", "🌍"]


def test_specials_decode_to_nothing_and_truncated_tail_is_flushed():
    tok = ByteTokenizer(320)
    detok = IncrementalDetokenizer(tok)
    assert detok.push(257) == ""  # EOS
    assert detok.push(0xE4) == ""  # first byte of a 3-byte character, never finished
    assert detok.flush() == "\ufffd"


@pytest.fixture
def word_level_tokenizer(tmp_path: Path) -> Path:
    """A real tokenizer.json (word-level, built with the `tokenizers` library)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "!": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    json.loads(path.read_text())  # it is a real tokenizer.json
    return path


def test_hf_tokenizer_file(word_level_tokenizer: Path):
    tok = HFTokenizer(word_level_tokenizer, bos_id=None)
    ids = tok.encode("hello world !")
    assert ids == [1, 2, 3]
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text.replace(" ", "") == "helloworld!"


def test_hf_tokenizer_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer file .*nope\.json does not exist"):
        HFTokenizer(tmp_path / "nope.json")

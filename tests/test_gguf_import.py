"""GGUF import on small files written here the way llama.cpp lays them out (tests/gguf_support.py):
the q/k row permutation, every accepted block format, refusals, the tokenizer and chat
template from metadata, and `pdserve convert --gguf`. The real SmolLM2 file is tested
in tests/test_smollm2.py."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from shared.config import EngineConfig, ModelConfig
from shared.engine import quantization
from shared.engine.engine import Engine
from shared.weights import convert_cli
from shared.weights.checkpoint import CheckpointError, load_model
from shared.weights.gguf_import import permute_rope_rows, tensor_names, unpermute_rope_rows
from shared.weights.model_info import load_model_info
from shared.weights.tree import contracting_axis, flatten
from tests.gguf_support import (
    IM_END,
    IM_START,
    params_as_gguf_tensors,
    tiny_tokenizer,
    write_gguf,
)

Q = gguf.GGMLQuantizationType
ENGINE = EngineConfig(max_slots=1, prefill_buckets=(8,), max_seq_len=16)


@pytest.fixture(scope="module")
def tiny() -> tuple[ModelConfig, dict]:
    loaded = load_model("tiny", engine_config=ENGINE, seed=0)
    config = dataclasses.replace(loaded.model_config, bos_id=IM_START, eos_id=IM_END)
    return config, {k: np.asarray(v) for k, v in flatten(loaded.params).items()}


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory, tiny) -> pathlib.Path:
    config, flat = tiny
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    return write_gguf(
        path, config, params_as_gguf_tensors(config, flat), tokenizer=tiny_tokenizer()
    )


def test_rope_permutation_matches_llama_cpp_on_a_hand_example():
    # Two heads of head_dim 4, one input column: llama.cpp interleaves each head's halves,
    # rows (0 1 | 2 3) -> (0 2 1 3).
    rows = np.arange(8, dtype=np.float32)[:, None]
    assert permute_rope_rows(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert unpermute_rope_rows(permute_rope_rows(rows, 2), 2)[:, 0].tolist() == list(range(8))
    # And on a real-sized shape: 3 KV heads of head_dim 8 over 5 inputs.
    w = np.random.default_rng(0).standard_normal((24, 5)).astype(np.float32)
    assert not np.array_equal(permute_rope_rows(w, 3), w)
    np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(w, 3), 3), w)


def test_f32_gguf_loads_the_exact_params_and_config(f32_file, tiny):
    config, flat = tiny
    loaded = load_model(str(f32_file), engine_config=ENGINE)
    got = {k: np.asarray(v) for k, v in flatten(loaded.params).items()}
    assert got.keys() == flat.keys()
    for path, value in flat.items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)
    c = loaded.model_config
    shape = (
        "vocab_size",
        "d_model",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "ffn_dim",
        "rope_theta",
        "tie_embeddings",
        "bos_id",
        "eos_id",
    )
    assert {f: getattr(c, f) for f in shape} == {f: getattr(config, f) for f in shape}
    assert c.rms_eps == pytest.approx(config.rms_eps)


# Largest error of each block format, as a fraction of the tensor's largest magnitude: one
# quantization step of a block whose largest magnitude is the tensor's (symmetric formats
# scale by amax / 2**(bits-1), offset ones by (max - min) / (2**bits - 1) <= 2 amax / ...).
BOUNDS = {
    Q.F16: 2**-10,
    Q.BF16: 2**-7,
    Q.Q8_0: 1 / 127,
    Q.Q5_0: 1 / 16,
    Q.Q5_1: 2 / 31,
    Q.Q4_0: 1 / 8,
    Q.Q4_1: 2 / 15,
}


def test_every_block_format_dequantizes_within_its_step(tmp_path, tiny):
    config, flat = tiny
    tensors = params_as_gguf_tensors(config, flat)
    kinds = list(BOUNDS)
    matrices = [n for n, v in tensors.items() if v.ndim == 2]
    type_of = {name: kinds[i % len(kinds)] for i, name in enumerate(matrices)}
    path = write_gguf(tmp_path / "mixed.gguf", config, tensors, type_of=type_of.__getitem__)
    loaded = flatten(load_model(str(path), engine_config=ENGINE).params)
    reread = params_as_gguf_tensors(config, {k: np.asarray(v) for k, v in loaded.items()})
    seen = set()
    for name, kind in type_of.items():
        error = np.abs(reread[name] - tensors[name]).max() / np.abs(tensors[name]).max()
        assert 0 < error <= BOUNDS[kind], (name, kind.name, error)
        seen.add(kind)
    assert seen == set(BOUNDS)
    # int8 on load from the dequantized floats (AQT), as for any float source.
    int8 = flatten(load_model(str(path), engine_config=ENGINE, quantize="int8").params)
    assert int8["layers.0.attn.q_proj.kernel"].dtype == jnp.int8


# Where each K-quant super-block (256 weights) keeps its float16 scales (d, and dmin for
# the formats with an offset), in ggml's block layouts (gguf/quants.py splits them the same
# way). Random bytes there could be inf or NaN, so those are overwritten with small finite
# scales; every other byte (sub-block scales, low and high quant bits) stays random.
K_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_k_blocks(
    rng: np.random.Generator, rows: int, cols: int, kind: gguf.GGMLQuantizationType
) -> np.ndarray:
    """Raw `kind` blocks for a [rows, cols] tensor: random quants under finite scales."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in K_SCALE_OFFSETS[kind]:
        scale = rng.uniform(2**-12, 2**-8, (rows, cols // block)).astype(np.float16)
        raw[..., offset : offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def test_k_quants_load_exactly_what_gguf_dequantizes(tmp_path, tiny):
    """Q2_K..Q6_K (which gguf cannot quantize, so the blocks are written raw): every matrix
    loads as gguf's own dequantization, bit for bit, un-permuted and transposed into place
    (read back through the writer's layout, so a shape or order slip fails too)."""
    config, flat = tiny
    tensors = params_as_gguf_tensors(config, flat)
    rng = np.random.default_rng(0)
    kinds = list(K_SCALE_OFFSETS)
    matrices = [n for n, v in tensors.items() if v.ndim == 2]
    raw = {}
    for i, name in enumerate(matrices):  # tiny's inputs (256, 768) are whole super-blocks
        rows, cols = tensors.pop(name).shape
        kind = kinds[i % len(kinds)]
        raw[name] = (random_k_blocks(rng, rows, cols, kind), kind)
    path = write_gguf(tmp_path / "k.gguf", config, tensors, raw=raw)
    loaded = flatten(load_model(str(path), engine_config=ENGINE).params)
    reread = params_as_gguf_tensors(config, {k: np.asarray(v) for k, v in loaded.items()})
    seen = set()
    for name, (blocks, kind) in raw.items():
        expected = gguf.quants.dequantize(blocks, kind)
        assert np.isfinite(expected).all() and np.abs(expected).max() > 0, (name, kind.name)
        np.testing.assert_array_equal(reread[name], expected, err_msg=f"{name} {kind.name}")
        seen.add(kind)
    assert seen == set(K_SCALE_OFFSETS)


# int8 blocks ---------------------------------------------------------------------------
# The integer range each format's blocks hold (q of `q * scale + offset`).
EXACT_RANGES = {
    Q.Q8_0: (-127, 127),
    Q.Q4_0: (-8, 7),
    Q.Q4_1: (0, 15),
    Q.Q5_0: (-16, 15),
    Q.Q5_1: (0, 31),
    Q.Q4_K: (0, 15),
    Q.Q5_K: (0, 31),
}
REROUNDED = (Q.F16, Q.Q6_K)  # no exact 32-weight form: min/max blocks of the floats


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory, tiny) -> tuple[pathlib.Path, dict]:
    """Every matrix in one of the formats above (K-quants written raw, see below)."""
    config, flat = tiny
    tensors = params_as_gguf_tensors(config, flat)
    kinds = [*EXACT_RANGES, *REROUNDED]
    rng = np.random.default_rng(1)
    type_of, raw = {}, {}
    for i, name in enumerate(n for n, v in list(tensors.items()) if v.ndim == 2):
        kind = type_of[name] = kinds[i % len(kinds)]
        if kind in K_SCALE_OFFSETS:
            rows, cols = tensors.pop(name).shape
            raw[name] = (random_k_blocks(rng, rows, cols, kind), kind)
    path = tmp_path_factory.mktemp("blocks") / "mixed.gguf"
    write_gguf(path, config, tensors, type_of=type_of.get, raw=raw, tokenizer=tiny_tokenizer())
    return path, type_of


def test_int8_blocks_serve_each_formats_own_blocks_bit_for_bit(mixed_file, tiny):
    """`--quantize int8-blocks`: a tensor whose format has exact 32-weight blocks is int8
    whose dequantization is the float load's tensor, bit for bit (un-permuted and transposed
    like it), with the format's integers; other formats are min/max blocks of the floats."""
    config, _ = tiny
    path, type_of = mixed_file
    floats = flatten(load_model(str(path), engine_config=ENGINE).params)
    blocks = flatten(load_model(str(path), engine_config=ENGINE, quantize="int8-blocks").params)
    names = tensor_names(config)
    seen = set()
    for name, kind in type_of.items():
        ours = names[name][0]
        axis = contracting_axis(ours)
        values, scale, offset = (blocks[ours + s] for s in ("", "_scale", "_offset"))
        assert values.dtype == jnp.int8, ours
        back = np.asarray(quantization.dequantize_blocks(values, scale, offset, axis, jnp.float32))
        want = np.asarray(floats[ours])
        if kind in EXACT_RANGES:
            np.testing.assert_array_equal(back, want, err_msg=f"{name} {kind.name}")
            low, high = EXACT_RANGES[kind]
            assert low <= int(values.min()) and int(values.max()) <= high, (name, kind.name)
            assert int(values.max()) - int(values.min()) >= (high - low) // 2, (name, kind.name)
        else:  # each weight within half a step of its own block's range
            want_blocks = np.moveaxis(want, axis, -1).reshape(-1, 32)
            error = np.abs(np.moveaxis(back, axis, -1).reshape(-1, 32) - want_blocks)
            step = np.ptp(want_blocks, axis=1, keepdims=True) / 255
            assert error.max() > 0 and (error <= step / 2 * (1 + 1e-4) + 1e-9).all(), name
        seen.add(kind)
    assert seen == {*EXACT_RANGES, *REROUNDED}


def test_int8_blocks_of_the_dequantized_floats_find_the_same_grids(mixed_file, tiny, tmp_path):
    """The GGUF converted to a float checkpoint, then served `--quantize int8-blocks`: the
    quantizer sees only floats, and still stores each exact format's blocks on their grid
    (to float32 rounding), where min/max blocks would be off by up to a 510th of a range."""
    config, _ = tiny
    path, type_of = mixed_file
    assert convert_cli.main(["--gguf", str(path), "--out", str(tmp_path / "f32")]) == 0
    floats = flatten(load_model(str(path), engine_config=ENGINE).params)
    loaded = load_model(str(tmp_path / "f32"), engine_config=ENGINE, quantize="int8-blocks")
    blocks = flatten(loaded.params)
    names = tensor_names(config)
    for name, kind in type_of.items():
        if kind not in EXACT_RANGES:
            continue
        ours = names[name][0]
        values, scale, offset = (blocks[ours + s] for s in ("", "_scale", "_offset"))
        back = quantization.dequantize_blocks(
            values, scale, offset, contracting_axis(ours), jnp.float32
        )
        want = np.asarray(floats[ours])
        tolerance = 16 * np.finfo(np.float32).eps * np.abs(want).max()
        assert np.abs(np.asarray(back) - want).max() <= tolerance, (name, kind.name)


def test_convert_gguf_int8_blocks_stores_the_blocks_it_serves(mixed_file, tmp_path):
    path, _ = mixed_file
    out = tmp_path / "blocks"
    assert (
        convert_cli.main(["--gguf", str(path), "--out", str(out), "--quantize", "int8-blocks"]) == 0
    )
    direct = load_model(str(path), engine_config=ENGINE, quantize="int8-blocks")
    restored = load_model(str(out), engine_config=ENGINE)  # pre-quantized: no flag needed
    assert restored.model_config == direct.model_config
    assert restored.model_config.quantization.block_size == 32
    assert restored.weights_id == direct.weights_id


def test_int8_blocks_of_a_gguf_give_the_float_models_logits(mixed_file):
    path, _ = mixed_file
    floats = load_model(str(path), engine_config=ENGINE)
    blocks = load_model(str(path), engine_config=ENGINE, quantize="int8-blocks")
    tokens = [IM_START, 40, 41, 259, 7, 300, 12]
    a = Engine(floats.model_config, ENGINE).reference_logits(floats.params, tokens)
    b = Engine(blocks.model_config, ENGINE).reference_logits(blocks.params, tokens)
    # Only the re-rounded F16 and Q6_K matrices differ; all else is the same weights.
    assert np.abs(a - b).max() <= 0.05 * a.std()
    assert (a.argmax(-1) == b.argmax(-1)).all()


def test_an_unsupported_block_format_is_refused_by_name(tmp_path, tiny):
    config, flat = tiny
    tensors = params_as_gguf_tensors(config, flat)
    v = tensors.pop("blk.0.attn_v.weight")  # [64, 256]: one IQ2_XXS block of 256 per row
    block_bytes = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS][1]
    raw = {"blk.0.attn_v.weight": (np.zeros((v.shape[0], block_bytes), np.uint8), Q.IQ2_XXS)}
    path = write_gguf(tmp_path / "iq.gguf", config, tensors, raw=raw)
    with pytest.raises(CheckpointError, match=r"'blk.0.attn_v.weight' has type IQ2_XXS"):
        load_model(str(path), engine_config=ENGINE)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("arch", "architecture 'qwen3' is not supported"),
        ("missing", "tensor 'blk.1.ffn_down.weight' is missing"),
        ("shape", r"tensor 'blk.0.ffn_up.weight' has shape \[700, 256\]"),
        ("extra", "unexpected tensor 'blk.9.attn_q.weight'"),
    ],
)
def test_bad_files_are_refused_naming_what_is_wrong(tmp_path, tiny, change, message):
    config, flat = tiny
    tensors = params_as_gguf_tensors(config, flat)
    arch = "qwen3" if change == "arch" else "llama"
    if change == "missing":
        del tensors["blk.1.ffn_down.weight"]
    if change == "shape":
        tensors["blk.0.ffn_up.weight"] = tensors["blk.0.ffn_up.weight"][:700]
    if change == "extra":
        tensors["blk.9.attn_q.weight"] = tensors["blk.0.attn_q.weight"]
    path = write_gguf(tmp_path / "bad.gguf", config, tensors, arch=arch)
    with pytest.raises(CheckpointError, match=message):
        load_model(str(path), engine_config=ENGINE)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not gguf at all")
    with pytest.raises(CheckpointError, match=r"junk\.gguf: not a readable GGUF file"):
        load_model(str(path), engine_config=ENGINE)


def test_tokenizer_and_chat_template_from_metadata(f32_file):
    info = load_model_info(str(f32_file))
    the, space_the = 259, 260  # "the" and "Ġthe" in tiny_tokenizer()
    assert info.tokenizer.encode("the<|im_end|> the") == [the, IM_END, space_the]  # no BOS
    assert info.tokenizer.encode(" th") == [32, 258]  # "Ġ" is byte 32's symbol
    assert info.tokenizer.decode([the, space_the, ord("B")]) == "the theB"
    assert info.chat is not None and info.chat.end_of_turn_ids == (IM_END,)
    assert (info.chat.bos_token, info.chat.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_add_bos_token_and_tokenizer_model_are_honoured(tmp_path, tiny):
    config, flat = tiny
    tensors = params_as_gguf_tensors(config, flat)
    with_bos = write_gguf(tmp_path / "bos.gguf", config, tensors, tokenizer=tiny_tokenizer(True))
    assert load_model_info(str(with_bos)).tokenizer.encode("the") == [IM_START, 259]
    spm = write_gguf(
        tmp_path / "spm.gguf", config, tensors, tokenizer=tiny_tokenizer(model="llama")
    )
    with pytest.raises(CheckpointError, match="tokenizer model 'llama' is not supported"):
        load_model_info(str(spm))


def test_convert_gguf_writes_a_checkpoint_with_params_tokenizer_and_template(
    f32_file, tmp_path, capsys
):
    out = tmp_path / "ckpt"
    assert convert_cli.main(["--gguf", str(f32_file), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    direct = load_model(str(f32_file), engine_config=ENGINE)
    restored = load_model(str(out), engine_config=ENGINE)
    assert restored.weights_id == direct.weights_id
    assert restored.model_config == direct.model_config
    info, original = load_model_info(str(out)), load_model_info(str(f32_file))
    text = "the<|im_start|> the"
    assert info.tokenizer.encode(text) == original.tokenizer.encode(text)
    assert info.chat == original.chat
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is False

"""`pdserve convert` and orbax checkpoints: round trips, presets, and every bad input
failing with the file (and tensor) named, from `load_model`, before anything serves."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer

from shared.config import EngineConfig
from shared.engine.engine import Params
from shared.weights.checkpoint import CheckpointError, ModelSource, load_model
from shared.weights.convert_cli import main as convert_main
from shared.weights.tree import flatten
from tests.hf_support import HF_FIXTURES

LLAMA = HF_FIXTURES / "llama_gqa"
QWEN = HF_FIXTURES / "qwen2_bias"


def assert_same_params(a: Params, b: Params) -> None:
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        x, y = np.asarray(fa[path]), np.asarray(fb[path])
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert x.tobytes() == y.tobytes(), path


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("ckpt") / "qwen2"
    assert convert_main(["--hf-dir", str(QWEN), "--out", str(out)]) == 0
    return out


def test_convert_writes_params_config_and_tokenizer(qwen_ckpt: pathlib.Path):
    assert (qwen_ckpt / "params").is_dir()
    # The tokenizer as the loaded model serializes it (GGUF sources have no file to copy):
    # the same tokenizer as the source's, in canonical form.
    written = Tokenizer.from_file(str(qwen_ckpt / "tokenizer.json")).to_str()
    assert written == Tokenizer.from_file(str(QWEN / "tokenizer.json")).to_str()
    meta = json.loads((qwen_ckpt / "pdserve.json").read_text())
    assert meta["format_version"] == 1 and meta["param_dtype"] == "float32"
    assert meta["model_config"]["qkv_bias"] is True


def test_orbax_checkpoint_serves_the_hf_params_exactly(
    qwen_ckpt: pathlib.Path, engine_config: EngineConfig
):
    from_hf = load_model(str(QWEN), engine_config=engine_config)
    from_ckpt = load_model(str(qwen_ckpt), engine_config=engine_config)
    assert from_ckpt.source is ModelSource.ORBAX
    assert from_ckpt.model_config == from_hf.model_config
    assert from_ckpt.weights_id == from_hf.weights_id
    assert from_ckpt.tokenizer_path == qwen_ckpt / "tokenizer.json"
    assert_same_params(from_ckpt.params, from_hf.params)


def test_restore_in_bfloat16_casts_and_renames_the_weights(
    qwen_ckpt: pathlib.Path, engine_config: EngineConfig
):
    f32 = load_model(str(qwen_ckpt), engine_config=engine_config)
    bf16_config = EngineConfig(
        max_slots=engine_config.max_slots,
        prefill_buckets=engine_config.prefill_buckets,
        max_seq_len=engine_config.max_seq_len,
        dtype="bfloat16",
    )
    bf16 = load_model(str(qwen_ckpt), engine_config=bf16_config)
    assert {str(a.dtype) for a in jax.tree.leaves(bf16.params)} == {"bfloat16"}
    # Other numbers, so another identity: a bf16 worker's KV must not pass for an f32 one's.
    assert bf16.weights_id != f32.weights_id


def test_preset_is_the_engine_seeded_init(engine_config: EngineConfig, params: Params):
    loaded = load_model("tiny", engine_config=engine_config)
    assert loaded.source is ModelSource.PRESET and loaded.tokenizer_path is None
    assert_same_params(loaded.params, params)
    assert loaded.weights_id == load_model("tiny", engine_config=engine_config).weights_id


def test_convert_refuses_to_overwrite(qwen_ckpt: pathlib.Path, capsys):
    assert convert_main(["--hf-dir", str(QWEN), "--out", str(qwen_ckpt)]) == 1
    assert str(qwen_ckpt) in capsys.readouterr().err


# Bad input ------------------------------------------------------------------------------


def _copy(src: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(src, tmp_path / src.name))


def _edit_config(hf_dir: pathlib.Path, **changes: object) -> pathlib.Path:
    cfg = json.loads((hf_dir / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    return hf_dir / "config.json"


def _load(path: pathlib.Path, engine_config: EngineConfig) -> None:
    load_model(str(path), engine_config=engine_config)


def test_missing_config_json_names_the_file(tmp_path, engine_config: EngineConfig):
    hf = _copy(LLAMA, tmp_path)
    (hf / "config.json").unlink()
    with pytest.raises(CheckpointError, match="neither a pdserve checkpoint"):
        _load(hf, engine_config)


def test_missing_shard_names_the_file(tmp_path, engine_config: EngineConfig):
    hf = _copy(QWEN, tmp_path)
    (hf / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00004\.safetensors: missing"):
        _load(hf, engine_config)


def test_no_safetensors_at_all(tmp_path, engine_config: EngineConfig):
    hf = _copy(LLAMA, tmp_path)
    (hf / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"llama_gqa: no \*\.safetensors files"):
        _load(hf, engine_config)


def test_unsupported_architecture_names_it(tmp_path, engine_config: EngineConfig):
    config = _edit_config(_copy(LLAMA, tmp_path), architectures=["GPT2LMHeadModel"])
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel' is not supported") as err:
        _load(config.parent, engine_config)
    assert str(config) in str(err.value)


def test_unsupported_rope_type_names_it(tmp_path, engine_config: EngineConfig):
    config = _edit_config(
        _copy(LLAMA, tmp_path), rope_parameters={"rope_type": "yarn", "factor": 4.0}
    )
    with pytest.raises(CheckpointError, match=r"config\.json: rope type 'yarn'"):
        _load(config.parent, engine_config)


def test_config_without_required_keys_names_them(tmp_path, engine_config: EngineConfig):
    config = _edit_config(_copy(LLAMA, tmp_path), hidden_size=None, num_hidden_layers=None)
    with pytest.raises(CheckpointError, match=r"\['hidden_size', 'num_hidden_layers'\]") as err:
        _load(config.parent, engine_config)
    assert str(config) in str(err.value)


def test_wrong_tensor_shape_names_file_and_tensor(tmp_path, engine_config: EngineConfig):
    # The config says a wider MLP than the tensors hold.
    config = _edit_config(_copy(LLAMA, tmp_path), intermediate_size=96)
    with pytest.raises(CheckpointError) as err:
        _load(config.parent, engine_config)
    message = str(err.value)
    assert "model.safetensors: tensor 'model.layers.0.mlp." in message
    assert "has shape [128, 64], config.json implies [96, 64]" in message


def test_missing_tensor_names_it(tmp_path, engine_config: EngineConfig):
    # An untied config needs lm_head.weight, which the tied Qwen2 files do not have.
    config = _edit_config(_copy(QWEN, tmp_path), tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match=r"tensor 'lm_head\.weight' is missing"):
        _load(config.parent, engine_config)


def test_unexpected_tensor_names_file_and_tensor(tmp_path, engine_config: EngineConfig):
    # One layer fewer in the config than in the files.
    config = _edit_config(_copy(LLAMA, tmp_path), num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model"):
        _load(config.parent, engine_config)


def test_truncated_safetensors_names_the_file(tmp_path, engine_config: EngineConfig):
    hf = _copy(LLAMA, tmp_path)
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors"):
        _load(hf, engine_config)


def test_checkpoint_with_wrong_shapes_names_the_param(
    qwen_ckpt: pathlib.Path, tmp_path, engine_config: EngineConfig
):
    bad = _copy(qwen_ckpt, tmp_path)
    meta = json.loads((bad / "pdserve.json").read_text())
    meta["model_config"]["ffn_dim"] = 96
    (bad / "pdserve.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"params: param 'layers\.0\.mlp\.\w+\.kernel' has"):
        _load(bad, engine_config)


def test_checkpoint_of_another_format_version(
    qwen_ckpt: pathlib.Path, tmp_path, engine_config: EngineConfig
):
    bad = _copy(qwen_ckpt, tmp_path)
    meta = json.loads((bad / "pdserve.json").read_text())
    meta["format_version"] = 99
    (bad / "pdserve.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"pdserve\.json: format_version=99"):
        _load(bad, engine_config)


def test_unknown_model_spec(engine_config: EngineConfig):
    with pytest.raises(CheckpointError, match="not a preset"):
        load_model("no-such-model", engine_config=engine_config)

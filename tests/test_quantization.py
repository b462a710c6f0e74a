"""AQT weight-only int8: the numerics, both load paths, and how close int8 stays to float.

Bounds asserted here (and why):
* A single int8 matmul: |int8 - float| <= sum_k |x_k| * scale_n / 2, the worst case of
  round-to-nearest with step `scale_n` (AQT's absmax / 127.5) on every weight.
* Whole-model logits on the HF fixtures: max |int8 - float| <= 0.3 * std(float logits).
  Errors of ~0.4% per weight compound through two layers of these deliberately large-scale
  random weights; measured 0.19 (llama_gqa) and 0.15 (qwen2_bias) of the std, so 0.3 leaves
  headroom while still failing on any real mistake (a wrong scale axis gives errors of the
  order of the logits themselves).
* Greedy agreement: the next-token argmax, given the same (float) prefix, agrees with float
  at >= 90% of all positions over the fixture prompts (measured 95% and 98%).
* Blocks (`int8-blocks`, min/max per 32 weights): every weight within half a step of its
  block, step = (max - min) / 255; the same logit and agreement bounds as per channel
  (measured 0.21 and 0.14 of the std, agreement 97% and 100%: on these random weights
  32-weight min/max blocks are no closer than per-channel absmax over 64 inputs; the
  real model's GGUF blocks are served exactly, see tests/test_smollm2.py).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shared.config import ConfigError, EngineConfig, ModelConfig, Quantization
from shared.engine import quantization
from shared.engine.engine import Engine, Params
from shared.engine.mesh import Parallelism
from shared.weights.checkpoint import LoadedModel, load_model, param_bytes
from shared.weights.convert_cli import main as convert_main
from shared.weights.tree import flatten, place
from tests.hf_support import FIXTURE_NAMES, HF_FIXTURES, greedy, reference

# Each test compiles an engine of its own (or runs many steps): more than the default.
pytestmark = pytest.mark.timeout(60)


def test_quantize_is_per_output_channel_and_round_to_nearest():
    w = jax.random.normal(jax.random.key(0), (64, 32)) * jnp.linspace(0.1, 3.0, 32)
    values, scale = quantization.quantize(w, contracting_axis=0)
    assert values.dtype == jnp.int8 and scale.dtype == jnp.float32
    assert scale.shape == (1, 32)
    np.testing.assert_allclose(scale[0], np.abs(w).max(axis=0) / 127.5, rtol=1e-6)
    error = np.abs(np.asarray(values, np.float32) * scale - w)
    assert (error <= scale / 2 + 1e-6).all()


@pytest.mark.parametrize("axis", [0, 1], ids=["kernel_in_out", "embedding_v_d"])
def test_int8_dot_general_applies_the_scales_per_output_channel(axis: int):
    k, n = 48, 40
    shape = (k, n) if axis == 0 else (n, k)
    w = jax.random.normal(jax.random.key(1), shape) * 0.3
    x = jax.random.normal(jax.random.key(2), (2, 3, k))
    values, scale = quantization.quantize(w, contracting_axis=axis)
    out = quantization.int8_dot_general(x, values, scale, axis, jnp.float32)
    dequant = np.asarray(values, np.float32) * np.asarray(scale)
    expected = np.einsum("btk,kn->btn", x, dequant if axis == 0 else dequant.T)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    # And against the float weights: within the round-to-nearest worst case.
    exact = np.einsum("btk,kn->btn", x, w if axis == 0 else w.T)
    bound = np.abs(x).sum(-1, keepdims=True) * np.asarray(scale).reshape(1, 1, n) / 2
    assert (np.abs(out - exact) <= bound + 1e-5).all()


def test_quantize_blocks_rounds_each_weight_within_half_its_blocks_step():
    w = jax.random.normal(jax.random.key(3), (96, 40)) * jnp.linspace(0.1, 3.0, 40)
    w = w.at[32:64, 5].set(0.25)  # one constant block: stored exactly
    values, scale, offset = quantization.quantize_blocks(w, 0, 32)
    assert values.dtype == jnp.int8 and scale.dtype == offset.dtype == jnp.float32
    assert values.shape == w.shape and scale.shape == offset.shape == (3, 40)
    blocks = np.asarray(w).reshape(3, 32, 40)
    step = (blocks.max(1) - blocks.min(1)) / 255
    np.testing.assert_allclose(scale, step, rtol=1e-6)
    back = quantization.dequantize_blocks(values, scale, offset, 0, jnp.float32)
    error = np.abs(np.asarray(back) - np.asarray(w)).reshape(3, 32, 40)
    assert (error <= step[:, None, :] / 2 * (1 + 1e-4) + 1e-7).all()
    assert error[1, :, 5].max() == 0 and scale[1, 5] == 0
    assert int(values.min()) == -128 and int(values.max()) == 127  # all 256 levels used


def _levels_with_gaps(rng: np.random.Generator, gaps: tuple[int, int]) -> np.ndarray:
    """[4, 32, 16] integer levels from -127 whose neighbours differ by one of `gaps`, so the
    smallest gap is gaps[0] steps while the grid step is 1 (the gaps are coprime)."""
    steps = rng.choice(gaps, (4, 31, 16))
    steps[:, 0] = gaps[0]  # the smallest gap occurs in every block
    levels = np.concatenate([np.zeros((4, 1, 16)), np.cumsum(steps, axis=1)], axis=1) - 127
    return rng.permuted(levels, axis=1).astype(np.float32)


def test_quantize_blocks_keeps_weights_that_already_lie_on_a_grid():
    """Dequantized llama.cpp blocks: Q4_1 (`d * q + m`, q 0..15, float16 d and m) and Q8_0
    (`d * q`) with sparse levels whose smallest gap is 2 or 3 steps. Each block keeps its
    grid (step d, to float32 rounding), not 256 min/max levels over its range."""
    rng = np.random.default_rng(7)
    d = rng.uniform(1e-3, 1e-2, (4, 1, 16)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.1, 0.0, (4, 1, 16)).astype(np.float16).astype(np.float32)
    q4 = rng.integers(0, 16, (4, 32, 16)).astype(np.float32)
    q4[:, :2] = [[0], [15]]  # a full range, so the step is d itself
    q4[:, 2] = 1.0
    cases = [(q4, m), (_levels_with_gaps(rng, (2, 3)), 0.0), (_levels_with_gaps(rng, (3, 4)), 0.0)]
    for q, offset in cases:
        w = jnp.asarray((d * q + offset).reshape(128, 16))
        values, scale, offset_ = quantization.quantize_blocks(w, 0, 32)
        back = np.asarray(quantization.dequantize_blocks(values, scale, offset_, 0, jnp.float32))
        tolerance = 16 * np.finfo(np.float32).eps * np.abs(np.asarray(w)).max()
        assert np.abs(back - np.asarray(w)).max() <= tolerance
        np.testing.assert_allclose(np.asarray(scale).reshape(4, 1, 16), d, rtol=1e-4)
    # A block on a grid of 300 levels has no int8 form of it: min/max, as for any float.
    wide_levels = np.append(np.arange(31, dtype=np.float32), 299.0)  # steps of 1, 300 levels
    wide = jnp.asarray(wide_levels[:, None] * np.ones((1, 2), np.float32))
    _, wide_scale, _ = quantization.quantize_blocks(wide, 0, 32)
    np.testing.assert_allclose(wide_scale, 299 / 255, rtol=1e-6)


@pytest.mark.parametrize("axis", [0, 1], ids=["kernel_in_out", "embedding_v_d"])
def test_block_int8_dot_general_is_the_dot_of_the_dequantized_blocks(axis: int):
    k, n = 64, 24
    shape = (k, n) if axis == 0 else (n, k)
    w = jax.random.normal(jax.random.key(4), shape) * 0.3
    x = jax.random.normal(jax.random.key(5), (2, 3, k))
    values, scale, offset = quantization.quantize_blocks(w, axis, 32)
    assert scale.shape == ((2, n) if axis == 0 else (n, 2))
    out = quantization.block_int8_dot_general(x, values, scale, offset, axis, jnp.float32)
    # Dequantized by hand: block b of the contracting axis uses scale and offset row b.
    s = np.repeat(np.asarray(scale), 32, axis=axis)
    o = np.repeat(np.asarray(offset), 32, axis=axis)
    dequant = np.asarray(values, np.float32) * s + o
    expected = np.einsum("btk,kn->btn", x, dequant if axis == 0 else dequant.T)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


# The serving paths on the HF fixtures, per channel and in blocks ----------------------

MODES = {"int8": Quantization(), "int8-blocks": Quantization(block_size=32)}


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module", params=list(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def on_load(name: str, mode: str, engine_config: EngineConfig) -> LoadedModel:
    """Convert on load: float safetensors, quantized tensor by tensor as they are read."""
    return load_model(str(HF_FIXTURES / name), engine_config=engine_config, quantize=mode)


@pytest.fixture(scope="module")
def prequantized(
    name: str, mode: str, engine_config: EngineConfig, tmp_path_factory: pytest.TempPathFactory
) -> LoadedModel:
    out = tmp_path_factory.mktemp("int8") / name
    args = ["--hf-dir", str(HF_FIXTURES / name), "--out", str(out), "--quantize", mode]
    assert convert_main(args) == 0
    return load_model(str(out), engine_config=engine_config)


@pytest.fixture(scope="module")
def int8_engine(on_load: LoadedModel, engine_config: EngineConfig) -> Engine:
    return Engine(on_load.model_config, engine_config)


def test_prequantized_checkpoint_restores_int8_and_scales_byte_for_byte(
    mode: str, on_load: LoadedModel, prequantized: LoadedModel
):
    assert prequantized.model_config == on_load.model_config
    assert prequantized.model_config.quantization == MODES[mode]
    a, b = flatten(on_load.params), flatten(prequantized.params)
    assert a.keys() == b.keys()
    kernels = [p for p in a if p.endswith(("kernel", "embedding"))]
    assert kernels and all(a[p].dtype == jnp.int8 for p in kernels)
    assert all(a[p + "_scale"].dtype == jnp.float32 for p in kernels)
    assert all((p + "_offset" in a) == (mode == "int8-blocks") for p in kernels)
    for path in a:
        assert np.asarray(a[path]).tobytes() == np.asarray(b[path]).tobytes(), path
    assert prequantized.weights_id == on_load.weights_id


def test_int8_params_are_about_a_quarter_of_float32(
    name: str, mode: str, prequantized: LoadedModel, engine_config: EngineConfig
):
    float32 = load_model(str(HF_FIXTURES / name), engine_config=engine_config)
    ratio = param_bytes(prequantized.params) / param_bytes(float32.params)
    # 1/4 plus the float32 scales, norms and biases (larger in relative terms at d=64);
    # blocks add a float32 scale and offset per 32 weights: 1/4 + 1/16.
    low, high = (0.25, 0.30) if mode == "int8" else (0.3125, 0.36)
    assert low < ratio < high, ratio


def test_int8_logits_stay_close_to_float(name: str, on_load: LoadedModel, int8_engine: Engine):
    ref = reference(name)
    agree = total = 0
    for i in range(len(ref.prompts)):
        ours = int8_engine.reference_logits(on_load.params, ref.sequence(i))
        assert np.abs(ours - ref.logits[i]).max() <= 0.3 * ref.logits[i].std()
        agree += int((ours.argmax(-1) == ref.logits[i].argmax(-1)).sum())
        total += len(ours)
    assert agree / total >= 0.9, f"greedy agreement {agree}/{total}"


def test_both_int8_paths_generate_the_same_tokens(
    on_load: LoadedModel, prequantized: LoadedModel, int8_engine: Engine
):
    prompts = reference(on_load.model_config.name).prompts[:1]  # one bucket: one compile
    tokens_a, logits_a = greedy(int8_engine, on_load.params, prompts, steps=6)
    tokens_b, logits_b = greedy(int8_engine, prequantized.params, prompts, steps=6)
    assert tokens_a == tokens_b
    for x, y in zip(logits_a, logits_b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_float_checkpoint_quantized_on_load_equals_prequantized(
    name: str,
    mode: str,
    prequantized: LoadedModel,
    engine_config: EngineConfig,
    tmp_path: pathlib.Path,
):
    """The third way in: a float orbax checkpoint + `--quantize int8` at start."""
    out = tmp_path / "float"
    assert convert_main(["--hf-dir", str(HF_FIXTURES / name), "--out", str(out)]) == 0
    loaded = load_model(str(out), engine_config=engine_config, quantize=mode)
    assert loaded.weights_id == prequantized.weights_id


def test_lm_head_can_stay_float(engine_config: EngineConfig):
    quant = Quantization(embedding=False, lm_head=False)
    loaded = load_model(str(HF_FIXTURES / "llama_gqa"), engine_config=engine_config, quantize=quant)
    flat = flatten(loaded.params)
    assert flat["lm_head.kernel"].dtype == jnp.float32 and "lm_head.kernel_scale" not in flat
    assert flat["embed.embedding"].dtype == jnp.float32
    assert flat["layers.0.mlp.up_proj.kernel"].dtype == jnp.int8


@pytest.mark.parametrize("quantize", list(MODES))
def test_int8_preset_is_the_float_preset_quantized(
    quantize: str, engine_config: EngineConfig, params: Params
):
    loaded = load_model("tiny", engine_config=engine_config, quantize=quantize)
    targets = flatten(jax.eval_shape(lambda: loaded.params))
    expected: dict = {}
    for path, value in flatten(params).items():
        expected.update(place(path, value, targets))
    got = flatten(loaded.params)
    assert got.keys() == expected.keys()
    for path in got:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=path)


def test_quantization_changes_the_fingerprint_but_not_the_float_one():
    tiny = ModelConfig.tiny()
    assert "quantization" not in tiny.to_dict()  # float fingerprints as before int8 existed
    int8 = dataclasses.replace(tiny, quantization=Quantization())
    assert int8.fingerprint() != tiny.fingerprint()
    assert ModelConfig.from_dict(int8.to_dict()) == int8

    blocks = dataclasses.replace(tiny, quantization=Quantization(block_size=32))
    assert "block_size" not in int8.to_dict()["quantization"]  # per channel as before blocks
    assert blocks.fingerprint() not in (int8.fingerprint(), tiny.fingerprint())
    assert ModelConfig.from_dict(blocks.to_dict()) == blocks


def test_blocks_that_do_not_fit_the_model_or_the_mesh_are_refused():
    tiny = ModelConfig.tiny()
    with pytest.raises(ConfigError, match=r"int8 blocks of 32 do not divide ffn_dim \(100\)"):
        dataclasses.replace(tiny, ffn_dim=100, quantization=Quantization(block_size=32))
    # tiny's row-parallel inputs (256 and 768 wide) at tensor-parallel 8: 32 and 96 per
    # device, whole blocks of 32 but not of 64.
    Parallelism.of(dataclasses.replace(tiny, quantization=Quantization(block_size=32)), 8)
    wide = dataclasses.replace(tiny, quantization=Quantization(block_size=64))
    with pytest.raises(ConfigError, match=r"splits num_heads \* head_dim \(256\) into 32"):
        Parallelism.of(wide, 8)

"""HF import is exact: our logits and greedy tokens equal what `transformers` computed.

The reference (tests/fixtures/hf/*/reference.*) is float32 eager attention recomputed from
scratch each step; we compare it with a full forward and with the serving path (prefill,
bulk_insert, generate), so the KV cache and RoPE at decode positions are covered too.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from shared.config import EngineConfig, RopeScaling
from shared.engine.engine import Engine
from shared.weights.checkpoint import LoadedModel, ModelSource, load_model
from tests.hf_support import FIXTURE_NAMES, HF_FIXTURES, greedy, reference

# Each test compiles an engine of its own (or runs many steps): more than the default.
pytestmark = pytest.mark.timeout(60)

# float32 logits of O(1-40): differences come only from summation order (XLA vs torch).
ATOL, RTOL = 1e-4, 1e-5


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def hf_model(request: pytest.FixtureRequest, engine_config: EngineConfig) -> LoadedModel:
    return load_model(str(HF_FIXTURES / request.param), engine_config=engine_config)


@pytest.fixture(scope="module")
def hf_engine(hf_model: LoadedModel, engine_config: EngineConfig) -> Engine:
    return Engine(hf_model.model_config, engine_config)


def test_llama_config_maps_gqa_rope_scaling_and_untied_head(engine_config: EngineConfig):
    loaded = load_model(str(HF_FIXTURES / "llama_gqa"), engine_config=engine_config)
    c = loaded.model_config
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.d_model) == (4, 2, 16, 64)
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 32)
    assert (c.tie_embeddings, c.qkv_bias, c.rms_eps) == (False, False, 1e-6)
    assert (c.bos_id, c.eos_id, c.quantization) == (1, 2, None)
    assert loaded.source is ModelSource.HF
    assert loaded.tokenizer_path == HF_FIXTURES / "llama_gqa" / "tokenizer.json"


def test_qwen2_config_maps_bias_tied_embeddings_and_first_eos(engine_config: EngineConfig):
    c = load_model(str(HF_FIXTURES / "qwen2_bias"), engine_config=engine_config).model_config
    assert (c.tie_embeddings, c.qkv_bias, c.rope_theta, c.rope_scaling) == (
        True,
        True,
        1e6,
        None,
    )
    assert c.eos_id == 2  # config.json says [2, 3]: ModelConfig keeps the first


def test_full_forward_matches_transformers(hf_model: LoadedModel, hf_engine: Engine):
    ref = reference(hf_model.model_config.name)
    for i in range(len(ref.prompts)):
        ours = hf_engine.reference_logits(hf_model.params, ref.sequence(i))
        np.testing.assert_allclose(ours, ref.logits[i], atol=ATOL, rtol=RTOL)


def test_prefill_and_generate_match_transformers_token_for_token(
    hf_model: LoadedModel, hf_engine: Engine
):
    ref = reference(hf_model.model_config.name)
    # Equality is only meaningful if no greedy choice was within float noise of a tie.
    assert min(ref.margins) > 100 * ATOL
    steps = len(ref.continuations[0])
    tokens, step_logits = greedy(hf_engine, hf_model.params, ref.prompts, steps)
    assert tokens == ref.continuations
    for i, prompt in enumerate(ref.prompts):
        expected = ref.logits[i][len(prompt) : len(prompt) + steps - 1]
        np.testing.assert_allclose(step_logits[i], expected, atol=ATOL, rtol=RTOL)


def test_pre_v5_config_keys_give_the_same_model(tmp_path, engine_config: EngineConfig):
    """Most Hub checkpoints say rope_theta + rope_scaling (transformers < 5), not
    rope_parameters; both must map to the same config."""
    src = HF_FIXTURES / "llama_gqa"
    dst = shutil.copytree(src, tmp_path / "llama_gqa")
    cfg = json.loads((src / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    (dst / "config.json").write_text(json.dumps(cfg))
    old = load_model(str(src), engine_config=engine_config)
    new = load_model(str(dst), engine_config=engine_config)
    assert new.model_config == old.model_config
    assert new.weights_id == old.weights_id


def test_mistral_sliding_window_caps_the_context(tmp_path, engine_config: EngineConfig):
    dst = shutil.copytree(HF_FIXTURES / "llama_gqa", tmp_path / "mistral")
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], sliding_window=96)
    (dst / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(str(dst), engine_config=engine_config)
    # Within the window, windowed and full attention agree: serve only that far.
    assert loaded.model_config.max_position_embeddings == 96

"""Session-wide fixtures: one tiny engine, compiled once and shared by every test."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

from shared.config import EngineConfig, ModelConfig
from shared.engine.engine import Engine, Params


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return ModelConfig.tiny()


@pytest.fixture(scope="session")
def engine_config() -> EngineConfig:
    return EngineConfig(max_slots=4, prefill_buckets=(8, 16, 32), max_seq_len=64)


@pytest.fixture(scope="session")
def engine(tiny_config: ModelConfig, engine_config: EngineConfig) -> Engine:
    return Engine(tiny_config, engine_config)


@pytest.fixture(scope="session")
def params(engine: Engine) -> Params:
    return engine.init_params(seed=0)


@pytest.fixture(scope="session")
def tiny_fingerprint(engine_config: EngineConfig) -> str:
    """The model fingerprint worker processes serving `tiny` report (KV wire check)."""
    from shared.serving.runtime import model_fingerprint
    from shared.weights.checkpoint import load_model

    return model_fingerprint(load_model("tiny", engine_config=engine_config, seed=0))

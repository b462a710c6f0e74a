"""Small hand-made prefixes and specs shared by the KV and transport tests (no compile)."""

from __future__ import annotations

import numpy as np

from shared.kv.prefix import Prefix
from shared.kv_transfer.codec import KvSpec
from shared.sampling_params import SamplingParams

FINGERPRINT = "tiny-test:weights-seed-0"
KV_HEADS, BUCKET, HEAD_DIM, LAYERS = 2, 16, 8, 2
TRUE_LENGTH = 11
CHUNK = 256  # small, so a 2.8 KB payload travels in 11 chunks


def synthetic_cache(length: int = BUCKET, dtype: str = "float32", seed: int = 0) -> dict:
    """The engine's layout: {"layers": {i: {"attn": {"cache_k", "cache_v"}}}}."""
    rng = np.random.default_rng(seed)

    def leaf() -> np.ndarray:
        return rng.standard_normal((KV_HEADS, length, HEAD_DIM)).astype(dtype)

    return {"layers": {i: {"attn": {"cache_k": leaf(), "cache_v": leaf()}} for i in range(LAYERS)}}


def synthetic_prefix(true_length: int = TRUE_LENGTH, dtype: str = "float32") -> Prefix:
    return Prefix(
        cache=synthetic_cache(dtype=dtype),
        true_length=true_length,
        first_token=42,
        sampling=SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=2**64 - 3),
    )


def synthetic_spec(max_payload_bytes: int = 1 << 20, dtype: str = "float32") -> KvSpec:
    return KvSpec.from_cache(synthetic_cache(dtype=dtype), FINGERPRINT, max_payload_bytes)


def payload_bytes(true_length: int = TRUE_LENGTH, itemsize: int = 4) -> int:
    return LAYERS * 2 * KV_HEADS * true_length * HEAD_DIM * itemsize

"""Rotary position embeddings, with the Llama 3 frequency scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from shared.config import RopeScaling


def inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> np.ndarray:
    """[head_dim // 2] float64 inverse frequencies, scaled the way Llama 3 does.

    Computed once on the host in float64 so every mode and worker gets identical values.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3: keep high frequencies, divide low ones by `factor`, blend in between.
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    return np.where(
        wavelen > low_freq_wavelen,
        inv_freq / scaling.factor,
        np.where(wavelen < high_freq_wavelen, inv_freq, blended),
    )


def apply_rope(
    x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray | tuple[float, ...]
) -> jnp.ndarray:
    """Rotate `x` [B, T, N, H] by `positions` [B, T] (HF "rotate_half" layout)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(
        inv_freq, jnp.float32
    )  # [B,T,H/2]
    cos = jnp.cos(freqs)[:, :, None, :]  # [B, T, 1, H/2]
    sin = jnp.sin(freqs)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)

"""The paged decode attention kernels against a dense reference and each other: the XLA
loop over page blocks, and JAX's Pallas TPU paged-attention kernel run on CPU in interpret
mode (on one device and under shard_map over a head-sharded mesh)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from shared.engine.mesh import TENSOR, make_mesh
from shared.engine.model.attention import paged_attention_pallas, paged_attention_xla

C, G, H = 2, 2, 128  # cache heads, query heads per cache head, head_dim
PAGE, PAGES_PER_BLOCK, WIDTH = 16, 2, 8  # a row holds up to 8 pages = 128 positions
POOL = 40
# Lengths at and around page and block edges (block = 32 positions), and the longest.
LENGTHS = np.array([1, 15, 16, 17, 32, 33, 100, 128], np.int32)


def bf16_exact(x: np.ndarray) -> jax.Array:
    """float32 values that bfloat16 represents exactly: the kernel's MXU dots take bf16
    operands on TPU (and in interpret mode), so only such inputs can agree to 1e-5."""
    return jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    b = len(LENGTHS)
    q = bf16_exact(rng.normal(size=(C, b, 1, G, H)) / np.sqrt(H))
    k_pool = bf16_exact(rng.normal(size=(C, POOL, PAGE, H)))
    v_pool = bf16_exact(rng.normal(size=(C, POOL, PAGE, H)))
    # Each row's pages are a random, non-contiguous choice (page 0 is scratch).
    table = np.zeros((b, WIDTH), np.int32)
    order = rng.permutation(np.arange(1, POOL))
    taken = 0
    for row, length in enumerate(LENGTHS):
        n = -(-int(length) // PAGE)
        table[row, :n] = order[taken : taken + n]
        taken += n
    return q, k_pool, v_pool, jnp.asarray(table), jnp.asarray(LENGTHS)


def dense_reference(q, k_pool, v_pool, table, lengths) -> np.ndarray:
    q, k_pool, v_pool = (np.asarray(a, np.float64) for a in (q, k_pool, v_pool))
    out = np.zeros(q.shape)
    for row, length in enumerate(np.asarray(lengths)):
        pages = np.asarray(table)[row]
        k = k_pool[:, pages].reshape(C, -1, H)[:, :length]  # [C, L, H]
        v = v_pool[:, pages].reshape(C, -1, H)[:, :length]
        s = np.einsum("cgh,clh->cgl", q[:, row, 0], k)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, row, 0] = np.einsum("cgl,clh->cgh", p, v)
    return out


def xla(q, k_pool, v_pool, table, lengths) -> np.ndarray:
    positions = (lengths - 1)[:, None]  # the query is the last valid position
    run = jax.jit(paged_attention_xla, static_argnames="pages_per_block")
    out = run(q, k_pool, v_pool, table, positions, lengths, pages_per_block=PAGES_PER_BLOCK)
    return np.asarray(out)


def test_xla_paged_attention_equals_dense_attention():
    args = inputs()
    np.testing.assert_allclose(xla(*args), dense_reference(*args), rtol=1e-5, atol=1e-5)


def test_xla_reads_nothing_past_each_rows_length():
    """Garbage in every position past a row's length (and in unused table entries) changes
    nothing."""
    q, k_pool, v_pool, table, lengths = inputs()
    clean = xla(q, k_pool, v_pool, table, lengths)
    k_dirty, v_dirty = np.array(k_pool), np.array(v_pool)
    for row, length in enumerate(LENGTHS):
        pages = np.asarray(table)[row]
        for pos in range(int(length), WIDTH * PAGE):
            page, offset = pages[pos // PAGE], pos % PAGE  # page 0 (scratch) past the end
            k_dirty[:, page, offset] = 1e4
            v_dirty[:, page, offset] = -1e4
    dirty = xla(q, jnp.asarray(k_dirty), jnp.asarray(v_dirty), table, lengths)
    np.testing.assert_array_equal(dirty, clean)


@pytest.mark.timeout(120)
def test_pallas_kernel_in_interpret_mode_equals_the_xla_path():
    args = inputs(1)
    want = xla(*args)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        got = paged_attention_pallas(
            *args[:3], args[3], args[4], pages_per_block=PAGES_PER_BLOCK, head_axis=None
        )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(120)
def test_pallas_kernel_sharded_by_cache_heads_equals_the_xla_path():
    """Under shard_map on a 2-device mesh, each device runs the kernel on its cache head."""
    q, k_pool, v_pool, table, lengths = inputs(2)
    want = xla(q, k_pool, v_pool, table, lengths)
    mesh = make_mesh(2)
    heads = jax.sharding.NamedSharding(mesh, jax.P(TENSOR))
    q, k_pool, v_pool = (jax.device_put(a, heads) for a in (q, k_pool, v_pool))
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()), jax.set_mesh(mesh):
        got = paged_attention_pallas(
            q, k_pool, v_pool, table, lengths, pages_per_block=PAGES_PER_BLOCK, head_axis=TENSOR
        )
    assert len(got.sharding.device_set) == 2
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

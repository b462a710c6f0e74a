"""Attention over a paged KV cache: writing new K/V into pages, and reading live pages only.

The pool of one layer is `[C, P, S, H]`: C cache heads (the sharded axis), P pages of S
positions, head_dim H. Row b's positions live in the pages its page-table row lists, in
order: position p is at page `table[b, p // S]`, offset `p % S`. Page 0 is scratch
(shared/kv/pages.py): padding rows write there and unused table entries point there.

Two implementations of the read, with one contract:
* `paged_attention_xla`: any backend. A loop over blocks of pages, up to the longest
  live row in the batch (a dynamic trip count: one compile serves every length), with an
  online softmax; each block is gathered from the pool, so a step reads the pages that
  hold live positions and nothing of the pool beyond the longest row. Serves decode (one
  query per row) and chunks of prefill (several, causally masked) alike.
* `paged_attention_pallas`: decode on TPU, JAX's Pallas paged-attention kernel (it reads
  each row's pages straight from HBM, up to that row's own length), under `shard_map` so
  each chip runs it on its own cache heads. Tests run it on CPU in interpret mode against
  the XLA path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite: a row with nothing visible gives no NaN


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedInputs:
    """Where each row of a decode (or chunk) step reads and writes the paged cache."""

    page_table: jax.Array  # [B, W] int32: the row's pages in position order, then scratch
    q_positions: jax.Array  # [B, T] int32: absolute position of each query token
    kv_lengths: jax.Array  # [B] int32: positions [0, kv_length) are valid after the write
    write_pages: jax.Array  # [B, T] int32: page each new token's K/V goes to
    write_offsets: jax.Array  # [B, T] int32: its offset in that page


def write_pages(pool: jax.Array, new: jax.Array, pages: jax.Array, offsets: jax.Array) -> jax.Array:
    """pool [C, P, S, H]; new [C, B, T, H] at (pages [B, T], offsets [B, T]) -> pool.

    A scatter over (page, offset) that leaves the heads axis alone: each device writes
    its own heads, in place in the donated pool."""
    return pool.at[:, pages, offsets].set(new.astype(pool.dtype), mode="drop")


def paged_attention_xla(
    q: jax.Array,  # [C, B, T, G, H], already scaled by 1/sqrt(H)
    k_pool: jax.Array,  # [C, P, S, H]
    v_pool: jax.Array,  # [C, P, S, H]
    page_table: jax.Array,  # [B, W] int32, W a multiple of pages_per_block
    q_positions: jax.Array,  # [B, T] int32: each query's absolute position
    kv_lengths: jax.Array,  # [B] int32: positions [0, kv_length) hold valid K/V
    *,
    pages_per_block: int,
) -> jax.Array:
    """Causal attention of each row's queries over its valid positions -> [C, B, T, G, H]
    (float32 accumulation, the output in q's dtype)."""
    c, b, t, g, h = q.shape
    page_size = k_pool.shape[2]
    block_len = pages_per_block * page_size
    table = page_table.reshape(b, -1, pages_per_block)  # [B, blocks, ppb]
    n_blocks = (jnp.max(kv_lengths) + block_len - 1) // block_len
    q32 = q.astype(jnp.float32)

    def body(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        m, l, acc = carry  # [C, B, T, G], [C, B, T, G], [C, B, T, G, H]
        pages = jax.lax.dynamic_index_in_dim(table, i, axis=1, keepdims=False)  # [B, ppb]
        k = k_pool[:, pages].reshape(c, b, block_len, h)  # gathers live pages only
        v = v_pool[:, pages].reshape(c, b, block_len, h)
        s = jnp.einsum("cbtgh,cbkh->cbtgk", q32, k.astype(jnp.float32))
        kv_pos = i * block_len + jnp.arange(block_len)  # [K]
        visible = (kv_pos[None, None, :] < kv_lengths[:, None, None]) & (
            kv_pos[None, None, :] <= q_positions[:, :, None]
        )  # [B, T, K]
        s = jnp.where(visible[None, :, :, None, :], s, _MASKED)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])
        scale = jnp.exp(m - m_new)
        l = l * scale + p.sum(axis=-1)
        acc = acc * scale[..., None] + jnp.einsum("cbtgk,cbkh->cbtgh", p, v.astype(jnp.float32))
        return m_new, l, acc

    init = (
        jnp.full((c, b, t, g), _MASKED, jnp.float32),
        jnp.zeros((c, b, t, g), jnp.float32),
        jnp.zeros((c, b, t, g, h), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    return (acc / jnp.maximum(l, 1e-30)[..., None]).astype(q.dtype)


def paged_attention_pallas(
    q: jax.Array,  # [C, B, 1, G, H], already scaled
    k_pool: jax.Array,
    v_pool: jax.Array,
    page_table: jax.Array,  # [B, W]
    kv_lengths: jax.Array,  # [B]
    *,
    pages_per_block: int,
    head_axis: str | None,
) -> jax.Array:
    """Decode attention with JAX's Pallas TPU paged-attention kernel -> [C, B, 1, G, H].

    `head_axis`: the mesh axis the cache heads are sharded over (None: one device); the
    kernel runs per device on its own heads."""
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    kernel = functools.partial(
        paged_attention, pages_per_compute_block=pages_per_block, mask_value=_MASKED
    )

    def local(
        q: jax.Array, k: jax.Array, v: jax.Array, table: jax.Array, lengths: jax.Array
    ) -> jax.Array:
        c, b, _, g, h = q.shape
        flat_q = q[:, :, 0].transpose(1, 0, 2, 3).reshape(b, c * g, h)  # head = c * G + g
        out = kernel(flat_q, k, v, lengths, table)  # [B, C * G, H]
        return out.reshape(b, c, g, h).transpose(1, 0, 2, 3)[:, :, None]

    if head_axis is None:
        return local(q, k_pool, v_pool, page_table, kv_lengths)
    heads = jax.P(head_axis)
    return jax.shard_map(
        local,
        in_specs=(heads, heads, heads, jax.P(), jax.P()),
        out_specs=heads,
        check_vma=False,
    )(q, k_pool, v_pool, page_table, kv_lengths)

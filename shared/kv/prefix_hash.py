"""Chained hashes of a prompt's page-aligned token blocks: the keys of prefix caching.

Block i covers tokens [i * block, (i + 1) * block). Its hash digests the previous block's
hash, so equal hashes name equal *prefixes*, not just equal blocks; the first block's
parent is a namespace digest of everything else that changes KV (the model fingerprint,
the dtype, the block size), so no key is shared across models or layouts. Only whole
blocks are hashed: a partial last block is never cached or matched.

Pure Python (hashlib), no JAX: the orchestrator's prefix index imports it too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

BlockHash = bytes
# (parent hash, the block's tokens as little-endian int32 bytes) -> hash. Tests swap in a
# weak one to force collisions; callers must never trust a hash without checking tokens.
HashFn = Callable[[bytes, bytes], BlockHash]


def blake2b_hash(parent: bytes, block: bytes) -> BlockHash:
    return hashlib.blake2b(parent + block, digest_size=16).digest()


def namespace(*parts: object) -> bytes:
    """The root parent hash for a model and cache layout: `parts` are joined as text."""
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=16, person=b"pdserve-prefix").digest()


def block_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    return np.asarray(tokens, dtype="<i4").tobytes()


def block_hashes(
    tokens: Sequence[int] | np.ndarray,
    block: int,
    root: bytes,
    hash_fn: HashFn = blake2b_hash,
    limit: int | None = None,
) -> list[BlockHash]:
    """The chained hash of every whole block of `tokens` (at most `limit` blocks)."""
    if block <= 0:
        raise ValueError(f"block={block} must be > 0")
    ids = np.asarray(tokens, dtype="<i4").reshape(-1)
    count = len(ids) // block if limit is None else min(limit, len(ids) // block)
    hashes: list[BlockHash] = []
    parent = root
    for i in range(count):
        parent = hash_fn(parent, ids[i * block : (i + 1) * block].tobytes())
        hashes.append(parent)
    return hashes

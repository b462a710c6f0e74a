"""`Prefix`: what a prefill hands to decode, as plain data (no JAX: the wire codec, the
orchestrator's transport types and the decode worker's inbox all carry it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from shared.logprobs import TokenLogprob
from shared.sampling_params import SamplingParams

CacheDict = dict[str, Any]  # nested pure dict of per-layer K and V leaves


def map_leaves(fn: Any, tree: Any) -> Any:
    """`fn` applied to every array of a nested dict (a `CacheDict`), structure kept."""
    if isinstance(tree, dict):
        return {key: map_leaves(fn, value) for key, value in tree.items()}
    return fn(tree)


@dataclasses.dataclass(slots=True)
class Prefix:
    """What prefill hands to decode: the prompt's KV and how to continue it.

    `cache` leaves are [num_kv_heads, L, head_dim] with L >= true_length (a power-of-two
    count of pages, or exactly true_length after `trimmed()`/a wire transfer): the model's
    own KV heads, never the replicated cache heads, so a prefix moves between engines of
    any tensor-parallel size. Positions >= true_length hold padding and are never read.
    """

    cache: CacheDict
    true_length: int
    first_token: int
    sampling: SamplingParams
    # The first token's logprob, when prefill was asked for it (never sent with the KV: the
    # prefill worker returns it to the orchestrator with the first token).
    first_logprob: TokenLogprob | None = None

    def trimmed(self) -> Prefix:
        """This prefix with only the true length of every leaf, as host numpy arrays."""
        cache = map_leaves(lambda a: np.asarray(a)[:, : self.true_length], self.cache)
        return dataclasses.replace(self, cache=cache)

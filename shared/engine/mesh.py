"""Tensor parallelism: the device mesh, the logical axis rules, and what they imply.

A worker drives every chip of its host through one `jax.sharding.Mesh` with a single axis,
`tensor`. Params and caches carry *logical* axis names (flax `out_sharding` metadata on
each `nnx.Param`, and the cache layouts below); `LOGICAL_AXIS_RULES` maps them to mesh
axes, in one table, so changing the parallelism is a change here only (MaxText's
`logical_axis_rules`).

    attention  q_proj [embed, q_heads]    k/v_proj [embed, kv_heads]   o_proj [q_heads, embed]
    MLP        gate/up [embed, mlp]       down [mlp, embed]
    embedding  [vocab, embed]  (the tied LM head reads it: logits come out vocab-sharded)
    LM head    [embed, vocab]             norms [norm] (replicated)
    int8       values shard like the float kernel; per-channel scales like its out axis,
               block scales and offsets like the kernel (blocks never straddle devices)
    KV pools   [cache_heads, pages, page_size, head_dim] (decode and prefill alike)

KV heads. With `tp <= num_kv_heads` the KV heads split over the devices (tp must divide
them). With `tp > num_kv_heads` (GQA models on many chips) each KV head is *replicated*
`tp / num_kv_heads` times so that every device holds the one KV head its query heads read:
the cache has `tp` heads, one per device, and k/v_proj stay replicated (each device
computes all KV heads of a token and keeps its own: a few KiB of extra compute per token,
and k/v weights of D x num_kv_heads x head_dim per device instead of 1/tp of that). This
is what vLLM's TPU backend does, and like it we need `tp % num_kv_heads == 0` there. Query
heads must split evenly: `num_heads % tp == 0`. Anything else is refused at startup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from shared.config import ConfigError, ModelConfig

TENSOR = "tensor"  # the one mesh axis: tensor parallelism over the host's chips
MESH_AXES = (TENSOR,)

# Logical axis name -> mesh axis (None: replicated). The one table.
LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "vocab": TENSOR,
    "embed": None,
    "q_heads": TENSOR,
    "kv_heads": TENSOR,  # replicated instead when tp > num_kv_heads (see module docstring)
    "mlp": TENSOR,
    "norm": None,
    "cache_heads": TENSOR,
    "cache_slots": None,
    "cache_seq": None,
    "head_dim": None,
}

CACHE_AXES = ("cache_heads", "cache_slots", "cache_seq", "head_dim")


@dataclasses.dataclass(frozen=True, slots=True)
class Parallelism:
    """How a model is laid out over `tp` devices; validated at construction."""

    tp: int
    num_heads: int
    num_kv_heads: int

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ConfigError(f"--tensor-parallel={self.tp} must be >= 1")
        kv, tp = self.num_kv_heads, self.tp
        heads_ok = self.num_heads % tp == 0
        kv_ok = kv % tp == 0 or tp % kv == 0
        if not (heads_ok and kv_ok):
            raise ConfigError(
                f"--tensor-parallel={tp} does not fit this model ({self.num_heads} query heads, "
                f"{kv} KV heads): it must divide the query heads and either divide the KV "
                "heads or be a multiple of them; valid sizes: "
                f"{', '.join(map(str, valid_tensor_parallel(self.num_heads, kv)))}"
            )

    @classmethod
    def of(cls, config: ModelConfig, tp: int) -> Parallelism:
        layout = cls(tp, config.num_heads, config.num_kv_heads)
        block = config.quantization.block_size if config.quantization else None
        if block is not None:
            # Row-parallel kernels (o_proj, down_proj) split their input over the devices;
            # a block must not straddle two of them.
            for name, size in (
                ("num_heads * head_dim", config.num_heads * config.head_dim),
                ("ffn_dim", config.ffn_dim),
            ):
                if (size // tp) % block:
                    raise ConfigError(
                        f"--tensor-parallel={tp} splits {name} ({size}) into {size // tp} per "
                        f"device, not whole int8 blocks of {block}; use per-channel int8 or "
                        "another tensor-parallel size"
                    )
        return layout

    @property
    def cache_heads(self) -> int:
        """KV heads in the cache: the model's, or `tp` when they are replicated."""
        return max(self.num_kv_heads, self.tp)

    @property
    def kv_replication(self) -> int:
        """Copies of each KV head in the cache (1: none)."""
        return self.cache_heads // self.num_kv_heads

    def rules(self) -> dict[str, str | None]:
        """`LOGICAL_AXIS_RULES` for this layout: k/v projections replicate when their heads
        do not split."""
        rules = dict(LOGICAL_AXIS_RULES)
        if self.num_kv_heads % self.tp:
            rules["kv_heads"] = None
        return rules


def valid_tensor_parallel(num_heads: int, num_kv_heads: int, limit: int = 64) -> list[int]:
    """The tensor-parallel sizes up to `limit` a model with these heads supports."""
    return [
        tp
        for tp in range(1, limit + 1)
        if num_heads % tp == 0 and (num_kv_heads % tp == 0 or tp % num_kv_heads == 0)
    ]


def make_mesh(tp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D `tensor` mesh over the first `tp` local devices (Auto axes: GSPMD places
    what the shardings of inputs and outputs do not pin)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not 1 <= tp <= len(devices):
        raise ConfigError(
            f"--tensor-parallel={tp} needs {tp} devices; this host has {len(devices)} "
            f"({devices[0].platform if devices else 'none'})"
        )
    return Mesh(np.asarray(devices[:tp]), MESH_AXES, axis_types=(AxisType.Auto,))


def spec(names: Sequence[str | None], rules: dict[str, str | None]) -> PartitionSpec:
    """Logical axis names -> a PartitionSpec over the mesh axes."""
    return PartitionSpec(*(None if n is None else rules[n] for n in names))


def named(mesh: Mesh, names: Sequence[str | None], rules: dict[str, str | None]) -> NamedSharding:
    return NamedSharding(mesh, spec(names, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def constrain(x: jax.Array, names: Sequence[str | None], rules: dict[str, str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names against the mesh being traced under
    (`jax.set_mesh`); a no-op outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or TENSOR not in mesh.axis_names:
        return x
    return jax.lax.with_sharding_constraint(x, spec(names, rules))

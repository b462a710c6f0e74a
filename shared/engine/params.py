"""Params and their shardings: what the engine and the loaders in shared/weights share.

Every param carries logical axis names (flax `out_sharding` metadata); `param_shardings`
turns them into `NamedSharding`s on a mesh through the rules of shared/engine/mesh.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from shared.config import ModelConfig
from shared.engine.mesh import spec
from shared.engine.model.llama import Transformer

Params = nnx.State


def param_shardings(abstract: Params, mesh: Mesh, rules: dict[str, str | None]) -> Params:
    """The NamedSharding of every param, from its logical axis names and the rules."""

    def one(variable: nnx.Variable) -> nnx.Variable:
        names = variable.get_metadata().get("out_sharding") or (None,) * variable.ndim
        return variable.replace(NamedSharding(mesh, spec(names, rules)))

    return jax.tree.map(one, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_shardings(abstract: Params, shardings: Params) -> Params:
    """ShapeDtypeStructs that carry their target sharding (orbax restores into them)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def init_params(
    model_config: ModelConfig, dtype: jnp.dtype, seed: int, shardings: Params | None = None
) -> Params:
    """A preset's seeded random params. Created inside one jit whose outputs are already
    sharded, so no device ever holds the whole model; the values do not depend on the
    sharding (JAX's partitionable threefry), so every tensor-parallel size serves the very
    same weights."""

    def create() -> Params:
        model = Transformer(model_config, dtype=dtype, rngs=nnx.Rngs(seed))
        return nnx.state(model, nnx.Param)

    return jax.jit(create, out_shardings=shardings)()

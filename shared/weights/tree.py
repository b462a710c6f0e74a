"""The param tree as a flat dict of dotted paths, and the steps every loader shares.

Every way of loading weights (HF safetensors, orbax, seeded presets) ends the same way: a
flat `{"layers.0.attn.q_proj.kernel": array}` dict checked against the abstract params of
the model config (`ShapeDtypeStruct` targets, built without allocating anything), then
poured into that abstract `nnx.State`. One flat naming scheme means one place that knows
what an int8 param and its scale look like.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from shared.config import ModelConfig
from shared.engine.mesh import Parallelism
from shared.engine.model.llama import abstract_model
from shared.engine.params import param_shardings, with_shardings
from shared.engine.quantization import (
    OFFSET_SUFFIX,
    SCALE_SUFFIX,
    quantize_blocks_jit,
    quantize_jit,
)

Flat = dict[str, jax.Array]
AbstractFlat = dict[str, jax.ShapeDtypeStruct]


def _path_str(path: tuple) -> str:
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value":
            continue  # nnx.Variable's own node, not part of the param's name
        parts.append(str(getattr(key, "key", getattr(key, "name", key))))
    return ".".join(parts)


def abstract_params(
    model_config: ModelConfig, dtype: jnp.dtype, mesh: Mesh | None = None
) -> nnx.State:
    """ShapeDtypeStruct params of `model_config` (int8 + scales when it is quantized); with
    a mesh, each carries its sharding, and every loader places tensors straight there."""
    _, abstract = abstract_model(
        model_config, dtype=dtype, parallelism=Parallelism.of(model_config, 1)
    )
    if mesh is None:
        return abstract
    rules = Parallelism.of(model_config, mesh.size).rules()
    return with_shardings(abstract, param_shardings(abstract, mesh, rules))


def flatten(state: nnx.State) -> dict[str, object]:
    """nnx.State -> {dotted path: leaf}; works on arrays and ShapeDtypeStructs alike."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {_path_str(path): leaf for path, leaf in leaves}


def unflatten(abstract: nnx.State, flat: Mapping[str, jax.Array]) -> nnx.State:
    """Pour `flat` into the structure of `abstract`; the caller has checked the keys."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    return jax.tree_util.tree_unflatten(treedef, [flat[_path_str(p)] for p, _ in paths])


def is_quantized(target: jax.ShapeDtypeStruct) -> bool:
    return jnp.dtype(target.dtype) == jnp.int8


def contracting_axis(path: str) -> int:
    """Dense kernels are [in, out] (contract axis 0); the embedding [V, D] contracts D."""
    return 1 if path.endswith("embedding") else 0


def block_size_of(path: str, targets: AbstractFlat) -> int | None:
    """The int8 block size of the param at `path`, None if it is not block-quantized."""
    offset = targets.get(path + OFFSET_SUFFIX)
    if offset is None:
        return None
    axis = contracting_axis(path)
    return targets[path].shape[axis] // offset.shape[axis]


def place(path: str, value: np.ndarray | jax.Array, targets: AbstractFlat) -> Flat:
    """A float tensor for `path` -> the leaves it becomes in `targets`.

    A float target gets the value cast to its dtype; an int8 target gets AQT's int8 values
    plus `path + "_scale"`, and a block-int8 target `quantize_blocks`' values plus
    `path + "_scale"` and `path + "_offset"` (convert on load: the float tensor is dropped
    by the caller).
    A target with a sharding gets the tensor straight onto its shards: each device receives
    only its part (the host holds this one tensor, never the model).
    """
    target = targets[path]
    if not is_quantized(target):
        return {path: _put(value, target.dtype, target)}
    sharded_float = _put(value, jnp.float32, target)  # quantized where it lives
    block = block_size_of(path, targets)
    if block is not None:
        blocks = quantize_blocks_jit(sharded_float, contracting_axis(path), block)
        return place_blocks(path, *blocks, targets)
    values, scale = quantize_jit(sharded_float, contracting_axis(path))
    return {
        path: _put(values, values.dtype, target),
        path + SCALE_SUFFIX: _put(scale, scale.dtype, targets[path + SCALE_SUFFIX]),
    }


def place_blocks(
    path: str,
    values: np.ndarray | jax.Array,
    scale: np.ndarray | jax.Array,
    offset: np.ndarray | jax.Array,
    targets: AbstractFlat,
) -> Flat:
    """Block-int8 values with their scales and offsets -> the three leaves of `path`."""
    leaves = {path: values, path + SCALE_SUFFIX: scale, path + OFFSET_SUFFIX: offset}
    for name, leaf in leaves.items():
        want = targets[name]
        if tuple(leaf.shape) != tuple(want.shape):
            raise ValueError(f"{name}: shape {tuple(leaf.shape)}, the model wants {want.shape}")
    return {name: _put(leaf, targets[name].dtype, targets[name]) for name, leaf in leaves.items()}


def _put(
    value: np.ndarray | jax.Array, dtype: jnp.dtype, target: jax.ShapeDtypeStruct
) -> jax.Array:
    sharding = getattr(target, "sharding", None)
    if isinstance(value, np.ndarray):
        value = value.astype(dtype, copy=False)
        return jnp.asarray(value) if sharding is None else jax.device_put(value, sharding)
    value = value.astype(dtype)
    return value if sharding is None else jax.device_put(value, sharding)


def float_paths(targets: AbstractFlat) -> Iterator[str]:
    """The paths a float source must provide: every target except int8 scales and offsets."""
    for path in targets:
        for suffix in (SCALE_SUFFIX, OFFSET_SUFFIX):
            of = path.removesuffix(suffix)
            if path.endswith(suffix) and of in targets and is_quantized(targets[of]):
                break
        else:
            yield path


def weights_id(flat: Mapping[str, jax.Array]) -> str:
    """Content hash of the served params (paths, dtypes, shapes, bytes).

    The weights' identity for the KV wire fingerprint: two workers agree on it only if they
    serve the very same numbers, whatever directory or format the weights came from.
    """
    digest = hashlib.sha256()
    for path in sorted(flat):
        array = np.asarray(flat[path])
        digest.update(f"{path}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data)
    return digest.hexdigest()[:16]

"""Model weights for serving: presets, orbax checkpoints made by `pdserve convert`, and
Hugging Face directories, behind one `load_model(spec)`.

A checkpoint directory written by `save_checkpoint`:
    CKPT/pdserve.json    format version, model config (incl. quantization), weights id,
                         the dtype of its float params
    CKPT/params/         orbax (StandardCheckpointHandler), a flat dict of dotted paths
    CKPT/tokenizer.json  copied from the HF directory when it had one

Restores go straight into `ShapeDtypeStruct` targets (orbax allocates each array once, in
the served dtype), so loading never holds a second full-size copy. Every shape is checked
against the model config from orbax's metadata before anything is read.

Quantization is decided by the weights, then by the caller: a pre-quantized checkpoint is
served as it was stored (int8 values and scales restored as they are); a float source
with `quantize="int8"` is quantized as it loads (convert on load), with the same AQT
quantizer `convert --quantize int8` uses, so both paths serve identical params.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from shared.config import MODEL_PRESETS, EngineConfig, ModelConfig, Quantization, model_preset
from shared.engine.mesh import Parallelism
from shared.engine.params import init_params, param_shardings
from shared.weights import gguf_import, hf
from shared.weights.checkpoint_files import (
    FORMAT_VERSION,
    METADATA_FILE,
    PARAMS_DIR,
    TOKENIZER_FILE,
    read_metadata,
)
from shared.weights.flags import QUANTIZE_CHOICES
from shared.weights.gguf_reader import is_gguf, open_gguf
from shared.weights.gguf_reader import read_config as read_gguf_config
from shared.weights.hf_config import CheckpointError
from shared.weights.hf_config import read_config as read_hf_config
from shared.weights.packaged import PACKAGED_MODELS, resolve_packaged
from shared.weights.tree import (
    AbstractFlat,
    Flat,
    abstract_params,
    flatten,
    float_paths,
    place,
    unflatten,
    weights_id,
)

__all__ = ["CheckpointError", "LoadedModel", "ModelSource", "load_model", "save_checkpoint"]


class ModelSource(enum.Enum):
    PRESET = "preset"  # seeded random weights of a named config
    ORBAX = "orbax"  # a directory written by `pdserve convert`
    HF = "hf"  # a Hugging Face directory, converted on load
    GGUF = "gguf"  # a llama.cpp GGUF file, dequantized on load


@dataclasses.dataclass(frozen=True, slots=True)
class LoadedModel:
    """What a server needs to build its Engine: `Engine(loaded.model_config, engine_config)`
    and pass `loaded.params` to prefill/generate."""

    model_config: ModelConfig  # carries `quantization` when the params are int8
    params: nnx.State
    tokenizer_path: pathlib.Path | None  # tokenizer.json; None: the byte-level tokenizer
    weights_id: str  # content hash of `params`; with model_config.fingerprint() it names
    # the exact numbers served
    source: ModelSource


def quantization_for(quantize: str | Quantization | None) -> Quantization | None:
    """`--quantize` flag value -> Quantization (None, "none": float)."""
    if quantize is None or isinstance(quantize, Quantization):
        return quantize
    if quantize in QUANTIZE_CHOICES:
        return QUANTIZE_CHOICES[quantize]
    raise CheckpointError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")


def load_model(
    spec: str,
    *,
    engine_config: EngineConfig,
    quantize: str | Quantization | None = None,
    seed: int = 0,
    mesh: Mesh | None = None,
) -> LoadedModel:
    """Resolve `--model`: a preset name, a packaged model (`smollm2`), a GGUF file, a
    `pdserve convert` checkpoint, or an HF directory.

    Params come in `engine_config.dtype` (int8 kernels and float32 scales when quantized),
    and with a `mesh`, already sharded over it (each tensor placed on its shards as it is
    read or restored; no device ever holds the whole model).
    Raises CheckpointError (naming the file and tensor) before any server can report
    healthy: missing files, unsupported architecture, wrong shapes, truncated files.
    """
    quant = quantization_for(quantize)
    dtype = jnp.dtype(engine_config.dtype)
    if spec in MODEL_PRESETS:
        return _load_preset(spec, quant, dtype, seed, mesh)
    path = resolve_packaged(spec) or pathlib.Path(spec).expanduser().resolve()
    if is_gguf(path):
        return load_gguf(path, quant, dtype, mesh)
    if (path / METADATA_FILE).is_file():
        return load_checkpoint(path, quant, dtype, mesh)
    if (path / "config.json").is_file():
        return load_hf(path, quant, dtype, mesh)
    if path.is_dir():
        raise CheckpointError(
            f"{path}: neither a pdserve checkpoint ({METADATA_FILE} missing) nor a Hugging "
            "Face directory (config.json missing)"
        )
    raise CheckpointError(
        f"--model {spec!r}: not a preset ({', '.join(sorted(MODEL_PRESETS))}), a packaged "
        f"model ({', '.join(PACKAGED_MODELS)}), a .gguf file or a directory"
    )


def _load_preset(
    name: str, quant: Quantization | None, dtype: jnp.dtype, seed: int, mesh: Mesh | None
) -> LoadedModel:
    """A preset's seeded weights. int8 is the float preset, quantized on load leaf by leaf
    exactly as `convert --quantize int8` would (one quantizer, so `tiny --quantize int8`
    serves the very numbers a converted `tiny` does)."""
    float_config = model_preset(name)
    shardings = None
    if mesh is not None:
        rules = Parallelism.of(float_config, mesh.size).rules()
        shardings = param_shardings(abstract_params(float_config, dtype), mesh, rules)
    params = init_params(float_config, dtype, seed, shardings)
    config = dataclasses.replace(float_config, quantization=quant)
    if quant is not None:
        float_flat = flatten(params)
        abstract = abstract_params(config, dtype, mesh)
        targets = flatten(abstract)
        flat: Flat = {}
        for path in list(float_paths(targets)):
            flat.update(place(path, float_flat.pop(path), targets))
        params = unflatten(abstract, flat)
    return LoadedModel(config, params, None, weights_id(flatten(params)), ModelSource.PRESET)


def load_hf(
    hf_dir: pathlib.Path, quant: Quantization | None, dtype: jnp.dtype, mesh: Mesh | None = None
) -> LoadedModel:
    """An HF directory, converted (and quantized, if asked) tensor by tensor as it loads."""
    config = dataclasses.replace(read_hf_config(hf_dir), quantization=quant)
    abstract = abstract_params(config, dtype, mesh)
    flat = hf.read_params(hf_dir, config, flatten(abstract))
    tokenizer = hf_dir / TOKENIZER_FILE
    return LoadedModel(
        config,
        unflatten(abstract, flat),
        tokenizer if tokenizer.is_file() else None,
        weights_id(flat),
        ModelSource.HF,
    )


def load_gguf(
    path: pathlib.Path, quant: Quantization | None, dtype: jnp.dtype, mesh: Mesh | None = None
) -> LoadedModel:
    """A GGUF file, dequantized (and quantized to int8, if asked) tensor by tensor, each
    placed on its shards when there is a mesh."""
    reader = open_gguf(path)
    config = dataclasses.replace(read_gguf_config(reader, path), quantization=quant)
    abstract = abstract_params(config, dtype, mesh)
    flat = gguf_import.read_params(reader, path, config, flatten(abstract))
    # The tokenizer lives in the file's metadata (shared/weights/gguf_tokenizer.py).
    return LoadedModel(config, unflatten(abstract, flat), None, weights_id(flat), ModelSource.GGUF)


# Orbax ---------------------------------------------------------------------------------------


def _checkpointer() -> ocp.Checkpointer:
    # Synchronous on purpose: `convert` exits right after saving and a server restores
    # before serving, so async saves would buy nothing and add threads to reason about.
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def save_checkpoint(
    out: pathlib.Path,
    config: ModelConfig,
    params: nnx.State,
    *,
    tokenizer: pathlib.Path | None = None,
    weights: str | None = None,
) -> None:
    """Write CKPT/{params, pdserve.json, tokenizer.json}. `out` must not exist or be empty."""
    out = out.expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    flat = flatten(params)
    float_dtypes = {
        str(a.dtype)
        for p, a in flat.items()
        if jnp.issubdtype(a.dtype, jnp.floating) and not p.endswith("_scale")
    }
    _checkpointer().save(out / PARAMS_DIR, args=ocp.args.StandardSave(flat))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_config": config.to_dict(),
        "weights_id": weights or weights_id(flat),
        "param_dtype": float_dtypes.pop() if len(float_dtypes) == 1 else None,
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def load_checkpoint(
    ckpt: pathlib.Path, quant: Quantization | None, dtype: jnp.dtype, mesh: Mesh | None = None
) -> LoadedModel:
    stored, meta = read_metadata(ckpt)
    if stored.quantization is not None and quant not in (None, stored.quantization):
        raise CheckpointError(
            f"{ckpt / METADATA_FILE}: the checkpoint is pre-quantized ({stored.quantization});"
            f" it cannot be re-quantized as {quant}; convert the float model again instead"
        )
    config = (
        stored
        if stored.quantization is not None
        else dataclasses.replace(stored, quantization=quant)
    )
    abstract = abstract_params(config, dtype, mesh)
    targets = flatten(abstract)
    if stored.quantization is None and quant is not None:
        flat = _restore_and_quantize(ckpt, stored, dtype, targets, mesh)
        ident = weights_id(flat)
    else:
        flat = restore_flat(ckpt / PARAMS_DIR, targets)
        same = meta.get("param_dtype") == jnp.dtype(dtype).name
        ident = meta["weights_id"] if same else weights_id(flat)
    tokenizer = ckpt / TOKENIZER_FILE
    return LoadedModel(
        config,
        unflatten(abstract, flat),
        tokenizer if tokenizer.is_file() else None,
        ident,
        ModelSource.ORBAX,
    )


def restore_flat(params_dir: pathlib.Path, targets: AbstractFlat) -> Flat:
    """Restore every target straight into its ShapeDtypeStruct, after checking shapes."""
    _check_stored(params_dir, targets)
    try:
        return _checkpointer().restore(params_dir, args=ocp.args.StandardRestore(targets))
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{params_dir}: orbax restore failed ({err})") from None


def _check_stored(params_dir: pathlib.Path, targets: AbstractFlat) -> None:
    try:
        stored = _checkpointer().metadata(params_dir).item_metadata.tree
    except (FileNotFoundError, ValueError, OSError, AttributeError) as err:
        raise CheckpointError(f"{params_dir}: not an orbax checkpoint ({err})") from None
    for path, target in targets.items():
        if path not in stored:
            raise CheckpointError(f"{params_dir}: param {path!r} is missing")
        if tuple(stored[path].shape) != tuple(target.shape):
            raise CheckpointError(
                f"{params_dir}: param {path!r} has shape {list(stored[path].shape)}, the "
                f"model config implies {list(target.shape)}"
            )
    extra = sorted(set(stored) - set(targets))
    if extra:
        raise CheckpointError(f"{params_dir}: unexpected param {extra[0]!r} for this config")


def _restore_and_quantize(
    ckpt: pathlib.Path,
    stored: ModelConfig,
    dtype: jnp.dtype,
    targets: AbstractFlat,
    mesh: Mesh | None = None,
) -> Flat:
    """Convert on load from a float checkpoint: restore float, quantize leaf by leaf.

    Each float leaf is dropped as soon as its int8 form exists, so the peak is the float
    model plus one leaf, never the float and the int8 model together.
    """
    float_flat = restore_flat(ckpt / PARAMS_DIR, flatten(abstract_params(stored, dtype, mesh)))
    flat: Flat = {}
    for path in list(float_paths(targets)):
        flat.update(place(path, float_flat.pop(path), targets))
    return flat


def param_bytes(params: nnx.State) -> int:
    """Bytes of every param leaf (what `convert --quantize int8` shrinks)."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))

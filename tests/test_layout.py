"""The import rules of the layout (README "Layout", DESIGN.md), checked on the source.

Every module is parsed (not imported), so a rule broken inside a function body counts too,
except where a rule says it only concerns module-level imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVERS = ("prefill_server", "decode_server", "orchestrator")
SUBPACKAGES = ("engine", "weights", "kv", "transport", "serving", "client")


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "rpc" not in p.parts)


def _imports(path: Path, *, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from shared.engine import quantization` imports a submodule.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _violations(paths: list[Path], banned: tuple[str, ...], **kw: bool) -> list[str]:
    return [
        f"{path.relative_to(REPO)} imports {name}"
        for path in paths
        for name in sorted(_imports(path, **kw))
        if any(name == b or name.startswith(b + ".") for b in banned)
    ]


def test_shared_imports_no_server() -> None:
    assert _violations(_modules("shared"), SERVERS) == []


@pytest.mark.parametrize("server", SERVERS)
def test_servers_never_import_each_other(server: str) -> None:
    others = tuple(s for s in SERVERS if s != server)
    assert _violations(_modules(server), others) == []


def test_engine_imports_only_config_from_pdserve() -> None:
    others = [f"shared.{name}" for name in SUBPACKAGES if name != "engine"]
    banned = (*others, "shared.metrics", "shared.tokenizer")
    assert _violations(_modules("shared/engine"), banned) == []


@pytest.mark.parametrize(
    ("package", "banned"),
    [
        ("shared/kv", ("shared.transport", "shared.serving", "shared.weights", "shared.client")),
        ("shared/transport", ("shared.serving", "shared.weights", "shared.client")),
        ("shared/weights", ("shared.transport", "shared.serving", "shared.kv", "shared.client")),
    ],
)
def test_lower_layers_do_not_import_upper_ones(package: str, banned: tuple[str, ...]) -> None:
    assert _violations(_modules(package), banned) == []


def test_client_loads_no_jax_at_import() -> None:
    """A frontend installs the client without paying for JAX (module level; the
    generate-local path imports the engine lazily)."""
    banned = ("jax", "flax", "shared.engine", "shared.weights", "shared.serving", "shared.kv")
    assert _violations(_modules("shared/client"), banned, module_level_only=True) == []


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_every_subpackage_says_what_it_is(name: str) -> None:
    init = REPO / "shared" / name / "__init__.py"
    docstring = ast.get_docstring(ast.parse(init.read_text()))
    assert docstring and len(docstring) > 80, f"{init} needs a docstring saying what it is"
    assert "import" in docstring.lower(), f"{init}'s docstring must say what it may import"

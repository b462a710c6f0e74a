"""The import rules of the layout (ARCHITECTURE.md "Layer rules"), checked on the source,
and the orchestrator's start-up checked for JAX in a real process.

Every module is parsed (not imported), so a rule broken inside a function body counts too,
except where a rule says it only concerns module-level imports.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shared.cluster.ready import parse_ready_line

REPO = Path(__file__).resolve().parent.parent
SERVERS = ("prefill_server", "decode_server", "orchestrator")
SUBPACKAGES = (
    "engine",
    "weights",
    "kv",
    "kv_transfer",
    "transport",
    "serving",
    "cluster",
    "client",
)
DEVICE = ("jax", "jaxlib", "flax", "orbax", "aqt")
# pdserve modules that import JAX: the device code and the weights' tensor readers.
HEAVY = (
    *DEVICE,
    "shared.engine",
    "shared.serving.runtime",
    "shared.weights.checkpoint",
    "shared.weights.hf",
    "shared.weights.gguf_import",
    "shared.weights.tree",
)
# The one module of a server that imports another: the colocated role composes the prefill
# loop (and its service) with the decode worker. Nothing else crosses.
COLOCATED = REPO / "decode_server" / "colocated.py"
COLOCATED_MAY_IMPORT = ("prefill_server.loop", "prefill_server.service")


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


def _banned(name: str, banned: tuple[str, ...]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in banned)


def _violations(paths: list[Path], banned: tuple[str, ...], **kw: bool) -> list[str]:
    return [
        f"{path.relative_to(REPO)} imports {name}"
        for path in paths
        for name in sorted(_imports(path, **kw))
        if _banned(name, banned)
    ]


def test_shared_imports_no_server() -> None:
    assert _violations(_modules("shared"), SERVERS) == []


@pytest.mark.parametrize("server", SERVERS)
def test_servers_never_import_each_other(server: str) -> None:
    others = tuple(s for s in SERVERS if s != server)
    paths = [p for p in _modules(server) if p != COLOCATED]
    assert _violations(paths, others) == []


def test_colocated_imports_only_the_prefill_loop_and_service() -> None:
    crossing = {
        name
        for name in _imports(COLOCATED)
        if _banned(name, ("prefill_server", "orchestrator"))
        and not _banned(name, COLOCATED_MAY_IMPORT)
        and name != "prefill_server"
    }
    assert crossing == set()
    assert {n for n in _imports(COLOCATED) if _banned(n, COLOCATED_MAY_IMPORT)}, (
        "colocated.py no longer composes the prefill loop: update the rule and ARCHITECTURE.md"
    )


def test_engine_imports_only_plain_data_from_pdserve() -> None:
    allowed = ("shared.engine", "shared.config", "shared.logprobs", "shared.sampling_params")
    allowed += ("shared.kv.pages", "shared.kv.prefix")
    pdserve = [
        v
        for v in _violations(_modules("shared/engine"), ("shared",))
        if not _banned(v.split(" imports ")[1], allowed)
    ]
    assert pdserve == []


@pytest.mark.parametrize("package", ["shared/kv", "shared/kv_transfer", "shared/cluster"])
def test_host_side_packages_import_no_jax(package: str) -> None:
    assert _violations(_modules(package), HEAVY) == []


@pytest.mark.parametrize(
    "module", ["shared/config.py", "shared/sampling_params.py", "shared/logprobs.py"]
)
def test_plain_data_modules_import_no_jax(module: str) -> None:
    assert _violations([REPO / module], (*DEVICE, "shared.engine")) == []


@pytest.mark.parametrize(
    ("package", "banned"),
    [
        ("shared/kv", ("shared.kv_transfer", "shared.transport", "shared.serving")),
        ("shared/kv_transfer", ("shared.transport", "shared.serving", "shared.client")),
        ("shared/transport", ("shared.serving", "shared.weights", "shared.client")),
        ("shared/weights", ("shared.transport", "shared.serving", "shared.kv_transfer")),
        ("shared/serving", ("shared.client", "shared.cluster")),
    ],
)
def test_lower_layers_do_not_import_upper_ones(package: str, banned: tuple[str, ...]) -> None:
    # The one exception: the ready line (standard library only), printed by the serving
    # layer and read by the cluster harness, lives in one module for both.
    found = _violations(_modules(package), banned)
    ready_line = ("shared.cluster.ready",)
    assert [v for v in found if not _banned(v.split(" imports ")[1], ready_line)] == []


def test_client_loads_no_jax_at_import() -> None:
    """A frontend installs the client without paying for JAX (module level)."""
    banned = (*DEVICE, "shared.engine", "shared.weights", "shared.serving", "shared.kv_transfer")
    assert _violations(_modules("shared/client"), banned, module_level_only=True) == []


def test_orchestrator_source_imports_no_device_code() -> None:
    assert _violations(_modules("orchestrator"), HEAVY) == []


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_every_subpackage_says_what_it_is(name: str) -> None:
    init = REPO / "shared" / name / "__init__.py"
    docstring = ast.get_docstring(ast.parse(init.read_text()))
    assert docstring and len(docstring) > 80, f"{init} needs a docstring saying what it is"
    assert "import" in docstring.lower(), f"{init}'s docstring must say what it may import"


# The orchestrator process: started for real, refusing to import device libraries.
_GUARD = """
import sys
class _NoDevice:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {banned!r}:
            print('DEVICE IMPORT', name, flush=True)
            raise ImportError('the orchestrator imported ' + name)
sys.meta_path.insert(0, _NoDevice())
import pdserve_cli
sys.exit(pdserve_cli.main(sys.argv[1:]))
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_orchestrator_starts_and_serves_without_jax(model: str) -> None:
    """`pdserve orchestrator` loads its model's tokenizer and chat template, serves, and
    drains with every import of jax, flax, orbax or aqt refused (one would kill it)."""
    argv = ["orchestrator", "--model", model, "--host", "127.0.0.1", "--port", "0"]
    argv += ["--metrics-port", "0", "--decode", "127.0.0.1:1", "--prefill", "127.0.0.1:1"]
    code = _GUARD.format(banned=DEVICE)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if parse_ready_line(line) is not None:
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert ready.wait(60) and proc.poll() is None, "".join(lines)[-2000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "".join(lines)[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert not [line for line in lines if "DEVICE IMPORT" in line], "".join(lines)[-2000:]

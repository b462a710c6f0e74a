"""ARCHITECTURE.md's Layout section against the tree, both ways: every package folder and
module of the server packages and `shared` is listed there, and every path listed there
exists.

The Layout section is the first fenced block after the `## Layout` heading. Each line is
a path from the repository root, then spaces, then its one job; folders end with `/`.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHITECTURE = REPO / "ARCHITECTURE.md"
PACKAGES = ("prefill_server", "decode_server", "orchestrator", "shared")
GENERATED = REPO / "shared" / "rpc"  # listed as one folder; its modules are generated


def layout_entries(markdown: str) -> dict[str, str]:
    """The Layout section's {path: job}; raises ValueError when the section, its block, a
    job or the one-path-per-line shape is missing."""
    section = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    if section is None:
        raise ValueError("ARCHITECTURE.md has no '## Layout' section")
    block = re.search(r"^```[^\n]*\n(.*?)^```", section.group(1), re.M | re.S)
    if block is None:
        raise ValueError("the Layout section has no fenced block")
    entries: dict[str, str] = {}
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        path, _, job = line.strip().partition(" ")
        if not job.strip():
            raise ValueError(f"Layout line {line!r} says no job")
        if path in entries:
            raise ValueError(f"Layout lists {path} twice")
        if "," in path:
            raise ValueError(f"Layout line {line!r}: one path per line")
        entries[path] = job.strip()
    return entries


def tree_paths() -> set[str]:
    """Package folders (with `/`) and modules (`__init__.py` aside) of PACKAGES, outside
    shared/rpc/ (listed as one folder)."""
    paths: set[str] = set()
    for package in PACKAGES:
        for module in (REPO / package).rglob("*.py"):
            if GENERATED in module.parents or "__pycache__" in module.parts:
                continue
            paths.add(module.parent.relative_to(REPO).as_posix() + "/")
            if module.name != "__init__.py":
                paths.add(module.relative_to(REPO).as_posix())
    return paths


def _exists(path: str) -> bool:
    target = REPO / path.rstrip("/")
    return target.is_dir() if path.endswith("/") else target.is_file()


def test_every_module_and_package_is_in_the_layout() -> None:
    listed = layout_entries(ARCHITECTURE.read_text())
    missing = sorted(tree_paths() - listed.keys())
    assert not missing, (
        "ARCHITECTURE.md's Layout section does not list these paths (add one line each: "
        "path, then its one job):\n  " + "\n  ".join(missing)
    )


def test_every_listed_path_exists() -> None:
    listed = layout_entries(ARCHITECTURE.read_text())
    stale = sorted(path for path in listed if not _exists(path))
    assert not stale, (
        "ARCHITECTURE.md's Layout section lists paths that do not exist (moved or "
        "deleted? a folder must end with '/', a file must not):\n  " + "\n  ".join(stale)
    )


def test_the_layout_parser_reports_what_is_wrong() -> None:
    """The parser's checks, on small documents: the format the two tests above rely on."""
    good = "# x\n## Layout\ntext\n```\nshared/  common code\nshared/a.py  does a\n```\n"
    assert layout_entries(good) == {"shared/": "common code", "shared/a.py": "does a"}
    for bad, reason in [
        ("# x\n", "no '## Layout'"),
        ("## Layout\nno block\n## Next\n```\na.py  x\n```\n", "no fenced block"),
        ("## Layout\n```\nshared/a.py\n```\n", "says no job"),
        ("## Layout\n```\na.py  x\na.py  y\n```\n", "twice"),
        ("## Layout\n```\na.py,b.py  x\n```\n", "one path per line"),
    ]:
        try:
            layout_entries(bad)
        except ValueError as err:
            assert reason in str(err), (bad, err)
        else:
            raise AssertionError(f"accepted {bad!r}")


def test_the_tree_walk_sees_folders_and_modules_but_not_generated_code() -> None:
    paths = tree_paths()
    assert {"shared/", "shared/kv/", "decode_server/loop.py"} <= paths
    assert not [p for p in paths if p.startswith("shared/rpc/")]
    assert not [p for p in paths if p.endswith("__init__.py")]

"""The house of docs/architecture.md: layers enforced by import-linter, every package in a layer, thin CLIs."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIS = ("create_index.py", "search_index.py")
# What a CLI may import at module level: Hydra and the settings, nothing that loads torch or a model.
CLI_IMPORTS = {"__future__", "os", "pathlib", "hydra", "omegaconf", "utils.config", "utils.errors", "utils.quiet"}


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def layered_modules() -> list[str]:
    (layers,) = [c["layers"] for c in contracts() if c["type"] == "layers"]
    return [name.strip() for layer in layers for name in layer.replace("|", ":").split(":")]


def source_files() -> list[Path]:
    skip = {".venv", "tests", "outputs", "demo_data", ".git"}
    return [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)]


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
    return found


def test_import_linter_contracts_are_kept():
    """The same check .ci/run makes with `lint-imports` (layers, no cycle between siblings, no script
    importing another), so that the README's test command catches an upward import too. In a process of
    its own: import-linter's CLI reconfigures logging (it would silence every logger made before it)."""
    proc = subprocess.run([Path(sys.executable).parent / "lint-imports"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_every_package_and_every_loose_utils_module_sits_in_a_layer():
    """A new subpackage or a new loose module of utils/ (the base layer's) must be placed in the layers
    contract, or lint-imports would say nothing about it."""
    layered = layered_modules()

    def placed(module: str) -> bool:
        return any(module == name or module.startswith(name + ".") for name in layered)

    packages = [
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in ROOT.rglob("__init__.py")
        if not {".venv", "tests"} & set(init.relative_to(ROOT).parts)
    ]
    loose_utils = [f"utils.{p.stem}" for p in (ROOT / "utils").glob("*.py") if p.stem != "__init__"]
    unplaced = [m for m in packages + loose_utils if m != "utils" and not placed(m)]
    assert unplaced == []


@pytest.mark.parametrize("cli", CLIS)
def test_a_cli_parses_calls_and_exits(cli):
    """create_index.py and search_index.py stay under 150 lines and import, at module level, only Hydra
    and the settings: their work lives in utils/pipeline/ (imported inside main, after the checks)."""
    path = ROOT / cli
    assert len(path.read_text().splitlines()) < 150
    assert imported_modules(path, top_level_only=True) <= CLI_IMPORTS


def test_no_module_imports_a_cli():
    """Scripts are not libraries: nothing imports create_index or search_index (the tests call their
    main, which is the CLI itself)."""
    importers = [
        str(p.relative_to(ROOT)) for p in source_files() if {"create_index", "search_index"} & imported_modules(p)
    ]
    assert importers == []

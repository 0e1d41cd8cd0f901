"""Runtime dependencies are what the product imports: webdataset is only the tests' (they read the cleaned shards
with the loader users train with), so it sits in the `dev` extra, and no product module imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("bicro_clean", "pipeline", "models", "flows", "lab")


def _name(requirement: str) -> str:
    for mark in "<>=!~[; ":
        requirement = requirement.split(mark, 1)[0]
    return requirement.strip().lower()


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return roots


def test_webdataset_is_a_test_dependency_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "webdataset" not in {_name(r) for r in project["dependencies"]}
    assert "webdataset" in {_name(r) for r in project["optional-dependencies"]["dev"]}


def test_no_product_module_imports_webdataset():
    importers = [str(p.relative_to(ROOT)) for folder in PRODUCT for p in (ROOT / folder).rglob("*.py")
                 if "webdataset" in _imported_roots(p)]
    assert importers == []

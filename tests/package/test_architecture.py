"""The package's shape, checked on its source: small modules, no import cycles, Prefect only in flows/, and the
product (pipeline/, models/) never importing the lab. Read from the files with ast, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Import name -> folder, as pyproject.toml maps them.
PACKAGES = {"bicro_clean": "bicro_clean", "bicro_clean.pipeline": "pipeline", "bicro_clean.models": "models",
            "bicro_clean.flows": "flows", "bicro_clean.lab": "lab"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Every module of the distribution by its dotted name (packages by their __init__)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if package == "bicro_clean" and parts[:1] in (("pipeline",), ("models",), ("flows",), ("lab",)):
                continue  # not a real bicro_clean/ subfolder
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Modules `name` imports, at top level or inside functions, resolved to dotted names."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                package = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{package}.{base}" if base else package
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return out


def _graph() -> dict[str, set[str]]:
    return {name: {m for m in _imports(name, path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_module_map_finds_the_stages():
    for name in ("bicro_clean.cli", "bicro_clean.pipeline.run", "bicro_clean.pipeline.report.page",
                 "bicro_clean.models.bicro", "bicro_clean.flows.clean_shards", "bicro_clean.lab.evaluate"):
        assert name in MODULES


@pytest.mark.parametrize("name", [n for n in MODULES if not _in(n, "bicro_clean.lab")])
def test_production_modules_are_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (at most {MAX_LINES})"


def test_there_is_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_prefect_is_imported_only_under_flows():
    offenders = [n for n, p in MODULES.items() if not _in(n, "bicro_clean.flows")
                 and any(_in(m, "prefect") or _in(m, "prefect_dask") or _in(m, "prefect_ray")
                         for m in _imports(n, p))]
    assert offenders == []


@pytest.mark.parametrize("package", ["bicro_clean.pipeline", "bicro_clean.models"])
def test_the_product_never_imports_the_lab(package):
    offenders = [n for n, p in MODULES.items() if _in(n, package)
                 and any(_in(m, "bicro_clean.lab") for m in _imports(n, p))]
    assert offenders == []


def test_models_never_import_the_pipeline():
    """models/ is a PyTorch library: the pipeline uses it, never the other way round."""
    offenders = [n for n, p in MODULES.items() if _in(n, "bicro_clean.models")
                 and any(_in(m, "bicro_clean.pipeline") or _in(m, "bicro_clean.flows") for m in _imports(n, p))]
    assert offenders == []

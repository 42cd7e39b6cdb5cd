"""Every ``from iwtrainer… import …`` of the benchmark and example scripts names something the package has: the
scripts are not imported by the unit tests, so a renamed module would otherwise break them silently (as the
restructuring did to bench_ddp.py and bench_hpo.py, which imported the removed ``iwtrainer.hpo``)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("examples/*.py"), *ROOT.glob("tools/*.py")])


def package_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every ``from iwtrainer[.x] import name`` in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "iwtrainer":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "iwtrainer"]
    return found


def test_the_scripts_are_found():
    names = {p.name for p in SCRIPTS}
    assert {"bench_ddp.py", "bench_hpo.py", "bench_step.py", "glue_table.py"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_package_imports_resolve(path):
    for module, name in package_imports(path):
        loaded = importlib.import_module(module)
        if name:
            assert hasattr(loaded, name) or importlib.util.find_spec(f"{module}.{name}"), f"{module}.{name}"

"""``iwtrainer.cli`` re-exports the pieces of run_glue_iw.py from the modules that now hold them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from iwtrainer import adapters, arguments, cli, data, modeling, schedule

MODULES = (arguments, data, modeling, adapters, schedule)
ROOT = Path(__file__).resolve().parents[1]


def test_every_cli_name_is_the_split_modules_object():
    for name in cli.__all__:
        assert any(getattr(m, name, None) is getattr(cli, name) for m in MODULES), name


@pytest.mark.parametrize("module", [m.__name__ for m in MODULES])
def test_each_module_imports_first(module):
    """No import cycle: every module can be the first one imported."""
    subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, check=True)

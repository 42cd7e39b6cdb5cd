"""Fixtures shared by every test folder (plain constants and functions are in ``helpers.py``)."""

from __future__ import annotations

import datasets
import pytest
from helpers import EXPECTED_ROWS, GLUE_DIR


@pytest.fixture(autouse=True)
def _no_glue_dir_env(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)  # the --glue_dir default must not leak in from the environment


@pytest.fixture(scope="session")
def real() -> dict[str, datasets.DatasetDict]:
    """Every locally available GLUE task (``EXPECTED_ROWS``), loaded once for the session."""
    from iwtrainer.glue.tsv import load_glue_from_dir

    if not GLUE_DIR.is_dir():
        pytest.skip(f"real GLUE data not found at {GLUE_DIR} (set IWTRAINER_GLUE_DIR)")
    return {task: load_glue_from_dir(str(GLUE_DIR), task) for task in EXPECTED_ROWS}

"""Fixtures shared by every test folder (plain constants and functions are in ``helpers.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datasets
import pytest
from helpers import GLUE, GLUE_DIR, HAVE_GLUE_DIR, HAVE_SHARED_GLUE, LOADER_ROWS, has_task, write_sample_task

from iwtrainer.glue.tasks import get_glue_task


@pytest.fixture(autouse=True)
def _no_glue_dir_env(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)  # the --glue_dir default must not leak in from the environment


@pytest.fixture(scope="session")
def real() -> dict[str, datasets.DatasetDict]:
    """The real GLUE rows the loader's tests read, loaded once for the session (``LOADER_ROWS``): every task of
    ``EXPECTED_ROWS`` from ``GLUE_DIR`` (``../shared``), else the STS-B sample embedded in iwtrainer
    (``--glue_dir builtin``)."""
    from iwtrainer.glue.tsv import BUILTIN_GLUE_DIR, load_glue_from_dir

    glue_dir = str(GLUE_DIR) if HAVE_GLUE_DIR else BUILTIN_GLUE_DIR
    return {task: load_glue_from_dir(glue_dir, task) for task in LOADER_ROWS}


@pytest.fixture(scope="session")
def glue_for(tmp_path_factory) -> Callable[[str], Path]:
    """``glue_for(task)``: a ``--glue_dir`` holding ``task``'s train, dev and test rows: ``../shared``'s where it has
    them, else a folder written once per session from the embedded STS-B sample's pairs in ``task``'s layout, with
    classes derived from the scores (``helpers.write_sample_task``). For the tests about the pipeline, not the rows."""
    root = tmp_path_factory.mktemp("sample_glue")

    def glue_dir(task: str) -> Path:
        if HAVE_SHARED_GLUE and has_task(task):
            return GLUE
        if not (root / get_glue_task(task).folder).is_dir():
            write_sample_task(root, task)
        return root

    return glue_dir

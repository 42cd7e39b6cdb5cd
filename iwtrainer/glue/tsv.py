"""Reading the original GLUE TSV layout (``<glue_dir>/<Folder>/{train,dev,test}.tsv``), offline.

``--glue_dir builtin`` reads the sample embedded in this package (``sample/``: 1,000 train and 375 dev rows of
STS-B whose text is CC BY-SA, see ``sample/NOTICE.md``); it holds STS-B only.

The result is a :class:`datasets.DatasetDict` shaped like the Hugging Face hub ``glue`` dataset (same split names,
column names, label order and ``idx`` column). Every malformed input is a :class:`GlueDataError` naming the file,
the row and what was expected.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from .tasks import GlueDataError, GlueTask, get_glue_task

STSB_MIN_SCORE = 0.0
STSB_MAX_SCORE = 5.0

BUILTIN_GLUE_DIR = "builtin"
"""The ``--glue_dir`` value that selects the embedded sample (a folder of that name needs ``./builtin``)."""
SAMPLE_DIR: Path = Path(__file__).resolve().parent / "sample"
"""The embedded sample, in the GLUE TSV layout (``SAMPLE_DIR/STS-B/{train,dev}.tsv``)."""
SAMPLE_TASKS: tuple[str, ...] = ("stsb",)
SAMPLE_DESCRIPTION = (
    "1,000 train / 375 dev rows of STS-B (its images and SNLI captions), CC BY-SA 4.0, "
    "see iwtrainer/glue/sample/NOTICE.md"
)


@dataclass
class _Table:
    """A parsed TSV: header, data rows (all of the header's width) and each row's 1-based file line number."""

    path: Path
    header: list[str]
    rows: list[list[str]]
    lines: list[int]

    def column(self, name: str) -> list[str]:
        j = self.header.index(name)
        return [row[j] for row in self.rows]

    def where(self, i: int) -> str:
        return f"data row {i + 1} (file line {self.lines[i]})"


def _read_tsv(path: Path, headerless_columns: Sequence[str] = ()) -> _Table:
    """Read a GLUE TSV: tab-separated, no quoting (like ``pandas.read_csv(sep="\\t", quoting=csv.QUOTE_NONE,
    keep_default_na=False, dtype=str)``), blank lines skipped, every row must have the header's number of fields.

    With ``headerless_columns`` the file has no header row and those names are used instead.
    """
    header: list[str] | None = list(headerless_columns) or None
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            for fields in reader:
                if not fields:
                    continue
                if header is None:
                    header = fields
                    continue
                if len(fields) != len(header):
                    kind = "column names (no header row)" if headerless_columns else "header columns"
                    raise GlueDataError(
                        f"{path}: line {reader.line_num} has {len(fields)} tab-separated fields; expected "
                        f"{len(header)} like the {kind} {header}"
                    )
                rows.append(fields)
                lines.append(reader.line_num)
    except (csv.Error, UnicodeDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise GlueDataError(f"{path}: not a readable UTF-8 tab-separated file: {detail}") from exc
    if header is None:
        raise GlueDataError(f"{path}: file is empty; expected a header row")
    return _Table(path, header, rows, lines)


def _check_columns(table: _Table, required: Sequence[str]) -> None:
    missing = [col for col in required if col not in table.header]
    if missing:
        raise GlueDataError(f"{table.path}: missing required column(s) {missing}; columns found: {table.header}")


def _encode_labels(table: _Table, task: GlueTask, headerless: bool) -> np.ndarray:
    raw = table.column(task.label_column)
    if task.is_regression:
        scores = np.empty(len(raw), dtype=np.float64)
        for i, value in enumerate(raw):
            try:
                score = float(value)
            except ValueError:
                score = float("nan")
            if not STSB_MIN_SCORE <= score <= STSB_MAX_SCORE:  # also rejects nan
                raise GlueDataError(
                    f"{table.path}: {table.where(i)} has score {value!r}; expected a number in "
                    f"[{STSB_MIN_SCORE:g}, {STSB_MAX_SCORE:g}] in column {task.label_column!r}"
                )
            scores[i] = score
        return scores.astype(np.float32)
    mapping = task.raw_labels
    codes = np.empty(len(raw), dtype=np.int64)
    for i, value in enumerate(raw):
        code = mapping.get(value.strip())
        if code is None:
            note = " (CoLA train/dev are read without a header row)" if headerless else ""
            raise GlueDataError(
                f"{table.path}: {table.where(i)} has label {value!r}; expected one of {sorted(mapping)} "
                f"in column {task.label_column!r}{note}"
            )
        codes[i] = code
    return codes


def _load_split(path: Path, task: GlueTask, labelled: bool) -> datasets.Dataset:
    headerless = labelled and bool(task.headerless_columns)
    table = _read_tsv(path, task.headerless_columns if headerless else ())
    required = list(task.text_columns) + ([task.label_column] if labelled else [])
    _check_columns(table, required)
    n_rows = len(table.rows)
    data: dict[str, Any] = {key: table.column(col) for key, col in zip(task.text_keys, task.text_columns)}
    if labelled:
        data["label"] = _encode_labels(table, task, headerless)
    else:
        data["label"] = np.full(n_rows, -1, dtype=np.float32 if task.is_regression else np.int64)
    data["idx"] = np.arange(n_rows, dtype=np.int32)
    return datasets.Dataset.from_dict(data, features=task.features())


def load_glue_from_dir(glue_dir: str | os.PathLike[str], task_name: str) -> datasets.DatasetDict:
    """Load one GLUE task from the original TSV layout into a hub-shaped :class:`datasets.DatasetDict`.

    Split names, column names, ``ClassLabel`` order and the ``idx`` column follow the hub ``glue`` dataset;
    test splits get ``label == -1``. Splits whose file is absent are left out, but at least one labelled split
    (train or validation) must exist. Raises :class:`GlueDataError` for any bad input.
    """
    task = get_glue_task(task_name)
    if not glue_dir:
        raise GlueDataError("--glue_dir is empty; expected the directory holding the GLUE task folders")
    if str(glue_dir) == BUILTIN_GLUE_DIR:
        if task.name not in SAMPLE_TASKS:
            raise GlueDataError(
                f"--glue_dir {BUILTIN_GLUE_DIR} is the embedded sample, which holds only --task_name "
                f"{' / '.join(SAMPLE_TASKS)}; for --task_name {task.name} pass --glue_dir DIR with the original GLUE "
                f"TSV layout (DIR/{task.folder}/train.tsv, dev.tsv), or no --glue_dir to load it from the hub"
            )
        glue_dir = SAMPLE_DIR
    root = Path(glue_dir).expanduser()
    if not root.is_dir():
        raise GlueDataError(
            f"--glue_dir {str(root)!r} is not an existing directory; expected it to contain {task.folder}/"
        )
    folder = root / task.folder
    expected_files = [name for _, name in task.split_files]
    if not folder.is_dir():
        raise GlueDataError(
            f"--glue_dir {str(root)!r} has no folder {task.folder}/ for --task_name {task.name}; "
            f"expected {folder} with {expected_files}"
        )
    splits: dict[str, datasets.Dataset] = {}
    for split, file_name in task.split_files:
        path = folder / file_name
        if path.is_file():
            splits[split] = _load_split(path, task, labelled=not split.startswith("test"))
    labelled_files = [name for split, name in task.split_files if not split.startswith("test")]
    if not any(not split.startswith("test") for split in splits):
        found = sorted(p.name for p in folder.iterdir())
        raise GlueDataError(
            f"{folder}: no labelled split for --task_name {task.name}; expected at least one of {labelled_files} "
            f"(found {found})"
        )
    return datasets.DatasetDict(splits)

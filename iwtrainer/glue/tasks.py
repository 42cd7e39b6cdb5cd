"""The GLUE task table: each task's columns, labels, TSV layout and the metric a search or a table reports.

The metric comes from the copy of the GLUE ``evaluate`` script shipped in this package
(``iwtrainer/glue/metrics/glue/glue.py``): nothing here touches the network. Reading the original TSV layout is
``tsv.py``'s job.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

__all__ = [
    "GLUE_METRIC_CONFIGS",
    "GLUE_METRIC_PATH",
    "GLUE_OBJECTIVES",
    "GLUE_TASKS",
    "TASK_TO_KEYS",
    "GlueDataError",
    "GlueTask",
    "compute_glue_metrics",
    "get_glue_task",
    "load_glue_metric",
    "objective_metric",
]

GLUE_METRIC_PATH: Path = Path(__file__).resolve().parent / "metrics" / "glue" / "glue.py"
"""Absolute path of the packaged GLUE ``evaluate`` metric script."""

GLUE_METRIC_CONFIGS: tuple[str, ...] = (
    "cola",
    "sst2",
    "mrpc",
    "stsb",
    "qqp",
    "mnli",
    "mnli_matched",
    "mnli_mismatched",
    "qnli",
    "rte",
    "wnli",
    "hans",
)
"""Config names accepted by the packaged GLUE metric (same as the hub ``glue`` metric)."""

GLUE_OBJECTIVES = {
    "cola": "eval_matthews_correlation",
    "mrpc": "eval_combined_score",
    "stsb": "eval_combined_score",
    "qqp": "eval_combined_score",
}
"""The metric a search maximises and a results table reports per task (run_glue.py's first); others: accuracy
(MNLI: matched)."""


class GlueDataError(ValueError):
    """Bad ``--task_name`` / ``--glue_dir`` or a malformed GLUE TSV file; the message is a single line."""


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: hub-style names plus how to read it from the original TSV layout.

    Attributes:
        name: hub task name (``"rte"``).
        folder: folder name in the GLUE layout (``"RTE"``).
        sentence_keys: hub column names of the text inputs, second is ``None`` for single-sentence tasks.
        label_names: hub ``ClassLabel`` names in index order (empty for the regression task ``stsb``).
        is_regression: ``True`` only for ``stsb``.
        text_columns: TSV column for each non-``None`` sentence key, same order.
        label_column: TSV column holding the label.
        raw_labels: TSV label value -> class index (empty for regression).
        split_files: ``(hub split name, TSV file name)`` pairs; splits starting with ``test`` are unlabelled.
        headerless_columns: column names used for labelled files that have no header row (CoLA train/dev).
    """

    name: str
    folder: str
    sentence_keys: tuple[str, str | None]
    label_names: tuple[str, ...]
    is_regression: bool
    text_columns: tuple[str, ...]
    label_column: str
    raw_labels: Mapping[str, int] = field(default_factory=dict)
    split_files: tuple[tuple[str, str], ...] = (
        ("train", "train.tsv"),
        ("validation", "dev.tsv"),
        ("test", "test.tsv"),
    )
    headerless_columns: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        """Number of model outputs: 1 for regression, else the number of classes."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def text_keys(self) -> tuple[str, ...]:
        """The non-``None`` sentence keys."""
        return tuple(key for key in self.sentence_keys if key is not None)

    def features(self) -> datasets.Features:
        """Hub-style features: text columns, ``label`` (ClassLabel or float32) and ``idx`` (int32)."""
        feats: dict[str, Any] = {key: datasets.Value("string") for key in self.text_keys}
        feats["label"] = (
            datasets.Value("float32") if self.is_regression else datasets.ClassLabel(names=list(self.label_names))
        )
        feats["idx"] = datasets.Value("int32")
        return datasets.Features(feats)


def _names_as_labels(names: Sequence[str]) -> dict[str, int]:
    return {name: i for i, name in enumerate(names)}


def _ints_as_labels(names: Sequence[str]) -> dict[str, int]:
    return {str(i): i for i in range(len(names))}


_BINARY_NLI = ("entailment", "not_entailment")
_MNLI_LABELS = ("entailment", "neutral", "contradiction")

GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            name="cola",
            folder="CoLA",
            sentence_keys=("sentence", None),
            label_names=("unacceptable", "acceptable"),
            is_regression=False,
            text_columns=("sentence",),
            label_column="label",
            raw_labels=_ints_as_labels(("unacceptable", "acceptable")),
            headerless_columns=("source", "label", "author_mark", "sentence"),
        ),
        GlueTask(
            name="mnli",
            folder="MNLI",
            sentence_keys=("premise", "hypothesis"),
            label_names=_MNLI_LABELS,
            is_regression=False,
            text_columns=("sentence1", "sentence2"),
            label_column="gold_label",
            raw_labels=_names_as_labels(_MNLI_LABELS),
            split_files=(
                ("train", "train.tsv"),
                ("validation_matched", "dev_matched.tsv"),
                ("validation_mismatched", "dev_mismatched.tsv"),
                ("test_matched", "test_matched.tsv"),
                ("test_mismatched", "test_mismatched.tsv"),
            ),
        ),
        GlueTask(
            name="mrpc",
            folder="MRPC",
            sentence_keys=("sentence1", "sentence2"),
            label_names=("not_equivalent", "equivalent"),
            is_regression=False,
            text_columns=("#1 String", "#2 String"),
            label_column="Quality",
            raw_labels=_ints_as_labels(("not_equivalent", "equivalent")),
        ),
        GlueTask(
            name="qnli",
            folder="QNLI",
            sentence_keys=("question", "sentence"),
            label_names=_BINARY_NLI,
            is_regression=False,
            text_columns=("question", "sentence"),
            label_column="label",
            raw_labels=_names_as_labels(_BINARY_NLI),
        ),
        GlueTask(
            name="qqp",
            folder="QQP",
            sentence_keys=("question1", "question2"),
            label_names=("not_duplicate", "duplicate"),
            is_regression=False,
            text_columns=("question1", "question2"),
            label_column="is_duplicate",
            raw_labels=_ints_as_labels(("not_duplicate", "duplicate")),
        ),
        GlueTask(
            name="rte",
            folder="RTE",
            sentence_keys=("sentence1", "sentence2"),
            label_names=_BINARY_NLI,
            is_regression=False,
            text_columns=("sentence1", "sentence2"),
            label_column="label",
            raw_labels=_names_as_labels(_BINARY_NLI),
        ),
        GlueTask(
            name="sst2",
            folder="SST-2",
            sentence_keys=("sentence", None),
            label_names=("negative", "positive"),
            is_regression=False,
            text_columns=("sentence",),
            label_column="label",
            raw_labels=_ints_as_labels(("negative", "positive")),
        ),
        GlueTask(
            name="stsb",
            folder="STS-B",
            sentence_keys=("sentence1", "sentence2"),
            label_names=(),
            is_regression=True,
            text_columns=("sentence1", "sentence2"),
            label_column="score",
        ),
        GlueTask(
            name="wnli",
            folder="WNLI",
            sentence_keys=("sentence1", "sentence2"),
            label_names=("not_entailment", "entailment"),
            is_regression=False,
            text_columns=("sentence1", "sentence2"),
            label_column="label",
            raw_labels=_ints_as_labels(("not_entailment", "entailment")),
        ),
    )
}
"""Hub task name -> :class:`GlueTask`."""

TASK_TO_KEYS: dict[str, tuple[str, str | None]] = {name: task.sentence_keys for name, task in GLUE_TASKS.items()}
"""Same shape as ``task_to_keys`` in transformers' ``run_glue.py``."""


def get_glue_task(task_name: str) -> GlueTask:
    """Return the :class:`GlueTask` for a hub task name (case-insensitive; GLUE folder names such as
    ``"SST-2"`` are accepted too). Raises :class:`GlueDataError` naming ``--task_name`` otherwise."""
    key = str(task_name).strip().lower()
    if key in GLUE_TASKS:
        return GLUE_TASKS[key]
    for task in GLUE_TASKS.values():
        if key == task.folder.lower():
            return task
    raise GlueDataError(f"--task_name {task_name!r} is not a GLUE task; expected one of {sorted(GLUE_TASKS)}")


def _check_metric_config(task_name: str) -> str:
    key = str(task_name).strip().lower()
    if key not in GLUE_METRIC_CONFIGS:
        raise GlueDataError(
            f"--task_name {task_name!r} has no GLUE metric; expected one of {sorted(GLUE_METRIC_CONFIGS)}"
        )
    return key


def load_glue_metric(task_name: str, **kwargs: Any) -> Any:
    """Return ``evaluate.load(<packaged metrics/glue/glue.py>, config_name=task_name, **kwargs)``.

    Loads the local script only, so it works with ``HF_HUB_OFFLINE=1`` and no network.
    """
    import evaluate

    config = _check_metric_config(task_name)
    return evaluate.load(str(GLUE_METRIC_PATH), config_name=config, **kwargs)


@functools.cache
def _cached_metric(config: str) -> Any:
    return load_glue_metric(config, keep_in_memory=True)


def compute_glue_metrics(
    task_name: str, predictions: Any, references: Any, metric: Any | None = None
) -> dict[str, float]:
    """Compute the GLUE metric for ``task_name`` and add ``combined_score`` (the mean) when it has several values.

    ``predictions`` may be class indices / scores (1-D), or a 2-D array of logits: arg-maxed for classification,
    squeezed for ``stsb``. ``metric`` reuses an already loaded metric; by default one cached in-memory metric per
    task is used.
    """
    config = _check_metric_config(task_name)
    preds = np.asarray(predictions)
    if preds.ndim == 2:
        preds = np.squeeze(preds, axis=1) if config == "stsb" else np.argmax(preds, axis=1)
    refs = np.asarray(references)
    if metric is None:
        metric = _cached_metric(config)
    result = {key: float(value) for key, value in metric.compute(predictions=preds, references=refs).items()}
    if len(result) > 1:
        result["combined_score"] = float(np.mean(list(result.values())))
    return result


def objective_metric(task_name: str | None, is_regression: bool = False) -> str:
    """The evaluation metric a search on ``task_name`` optimises (custom data: accuracy, or mse for regression)."""
    if task_name is not None:
        return GLUE_OBJECTIVES.get(task_name, "eval_accuracy")
    return "eval_mse" if is_regression else "eval_accuracy"

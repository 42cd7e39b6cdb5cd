"""The GLUE task table and metrics (iwtrainer.glue.tasks): run_glue.py's columns and labels, the packaged metric
script (no network) checked against sklearn/scipy, and each task's search objective."""

from __future__ import annotations

import configparser
import fnmatch
import socket
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import ROOT, assert_one_line
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

import iwtrainer
from iwtrainer.glue.tasks import (
    GLUE_METRIC_CONFIGS,
    GLUE_METRIC_PATH,
    GLUE_OBJECTIVES,
    GLUE_TASKS,
    TASK_TO_KEYS,
    GlueDataError,
    compute_glue_metrics,
    get_glue_task,
    load_glue_metric,
    objective_metric,
)

# --------------------------------------------------------------------------------------------------- task table


def test_task_table_mirrors_run_glue() -> None:
    assert TASK_TO_KEYS == {
        "cola": ("sentence", None),
        "mnli": ("premise", "hypothesis"),
        "mrpc": ("sentence1", "sentence2"),
        "qnli": ("question", "sentence"),
        "qqp": ("question1", "question2"),
        "rte": ("sentence1", "sentence2"),
        "sst2": ("sentence", None),
        "stsb": ("sentence1", "sentence2"),
        "wnli": ("sentence1", "sentence2"),
    }
    labels = {name: task.label_names for name, task in GLUE_TASKS.items()}
    assert labels == {
        "cola": ("unacceptable", "acceptable"),
        "mnli": ("entailment", "neutral", "contradiction"),
        "mrpc": ("not_equivalent", "equivalent"),
        "qnli": ("entailment", "not_entailment"),
        "qqp": ("not_duplicate", "duplicate"),
        "rte": ("entailment", "not_entailment"),
        "sst2": ("negative", "positive"),
        "stsb": (),
        "wnli": ("not_entailment", "entailment"),
    }
    folders = {name: task.folder for name, task in GLUE_TASKS.items()}
    assert folders == {
        "cola": "CoLA",
        "mnli": "MNLI",
        "mrpc": "MRPC",
        "qnli": "QNLI",
        "qqp": "QQP",
        "rte": "RTE",
        "sst2": "SST-2",
        "stsb": "STS-B",
        "wnli": "WNLI",
    }
    assert [name for name, task in GLUE_TASKS.items() if task.is_regression] == ["stsb"]
    assert GLUE_TASKS["stsb"].num_labels == 1 and GLUE_TASKS["mnli"].num_labels == 3


def test_get_glue_task_accepts_folder_names_and_case() -> None:
    assert get_glue_task("RTE") is GLUE_TASKS["rte"]
    assert get_glue_task("SST-2") is GLUE_TASKS["sst2"]
    assert get_glue_task("sts-b") is GLUE_TASKS["stsb"]


# ------------------------------------------------------------------------------------------------ metric


def test_metric_file_is_package_data() -> None:
    package_dir = Path(iwtrainer.__file__).resolve().parent
    relative = GLUE_METRIC_PATH.relative_to(package_dir).as_posix()
    assert fnmatch.fnmatch(relative, "glue/metrics/*/*.py") and GLUE_METRIC_PATH.is_file()
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    patterns = setup["options.package_data"]["iwtrainer"].split()
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), patterns  # shipped in the wheel


def test_metric_loads_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    for config in GLUE_METRIC_CONFIGS:
        metric = load_glue_metric(config)
        assert metric.config_name == config
    import evaluate

    folder_metric = evaluate.load(str(GLUE_METRIC_PATH.parent), config_name="rte", keep_in_memory=True)
    assert folder_metric.compute(predictions=[0, 1, 1], references=[0, 1, 0]) == {"accuracy": pytest.approx(2 / 3)}


def test_metric_unknown_config() -> None:
    with pytest.raises(GlueDataError) as exc:
        load_glue_metric("squad")
    assert_one_line(exc, "--task_name", "'squad'", "mnli_mismatched")
    with pytest.raises(GlueDataError):
        compute_glue_metrics("squad", [0], [0])
    import evaluate

    with pytest.raises(KeyError, match="config_name"):
        evaluate.load(str(GLUE_METRIC_PATH), config_name="squad")


def test_metric_classification_against_sklearn() -> None:
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 2, size=200)
    preds = np.where(rng.random(200) < 0.75, refs, 1 - refs)
    accuracy = sum(int(p == r) for p, r in zip(preds.tolist(), refs.tolist())) / len(refs)

    cola = compute_glue_metrics("cola", preds, refs)
    assert cola == {"matthews_correlation": pytest.approx(matthews_corrcoef(refs, preds))}

    for task in ("mrpc", "qqp"):
        result = compute_glue_metrics(task, preds.tolist(), refs.tolist())
        f1 = f1_score(refs, preds)
        assert set(result) == {"accuracy", "f1", "combined_score"}
        assert result["accuracy"] == pytest.approx(accuracy) and result["f1"] == pytest.approx(f1)
        assert result["combined_score"] == pytest.approx((accuracy + f1) / 2)
        assert all(type(value) is float for value in result.values())

    for task in ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans"):
        assert compute_glue_metrics(task, preds, refs) == {"accuracy": pytest.approx(accuracy)}

    raw = load_glue_metric("mrpc", keep_in_memory=True).compute(predictions=preds, references=refs)
    assert set(raw) == {"accuracy", "f1"}  # combined_score is added only by compute_glue_metrics


def test_metric_multiclass_logits_argmax() -> None:
    logits = np.array([[2.0, 0.1, 0.3], [0.0, 0.1, 3.0], [0.2, 1.5, 0.1], [1.0, 0.0, 0.0]])
    assert compute_glue_metrics("mnli", logits, [0, 2, 2, 1]) == {"accuracy": pytest.approx(0.5)}


def test_metric_stsb_against_scipy() -> None:
    rng = np.random.default_rng(1)
    refs = rng.uniform(0, 5, size=100)
    preds = refs + rng.normal(0, 1.0, size=100)
    result = compute_glue_metrics("stsb", preds[:, None], refs)
    pearson = pearsonr(preds, refs)[0]
    spearman = spearmanr(preds, refs)[0]
    assert set(result) == {"pearson", "spearmanr", "combined_score"}
    assert result["pearson"] == pytest.approx(pearson, abs=1e-5)  # inputs are stored as float32
    assert result["spearmanr"] == pytest.approx(spearman, abs=1e-5)
    assert result["combined_score"] == pytest.approx((pearson + spearman) / 2, abs=1e-5)


def test_metric_on_real_labels(real: dict[str, datasets.DatasetDict]) -> None:
    if "rte" in real:  # ../shared: 146 of RTE's 277 dev rows are entailment (class 0)
        refs = real["rte"]["validation"]["label"]
        assert compute_glue_metrics("rte", [0] * len(refs), refs) == {"accuracy": pytest.approx(146 / 277)}
    # STS-B's dev scores (../shared's, else the embedded sample's): Spearman must average their many ties as scipy does
    refs = np.asarray(real["stsb"]["validation"]["label"], dtype=np.float64)
    preds = np.round(refs)  # a monotone map that adds ties: 0, 1, ..., 5
    assert len(np.unique(refs)) < len(refs) and sorted(np.unique(preds)) == [0, 1, 2, 3, 4, 5]
    result = compute_glue_metrics("stsb", preds[:, None], refs)
    assert result["pearson"] == pytest.approx(pearsonr(preds, refs)[0], abs=1e-5)
    assert result["spearmanr"] == pytest.approx(spearmanr(preds, refs)[0], abs=1e-5)
    assert 0 < result["spearmanr"] < 1  # the ties rounding made cost rank agreement, and nothing else does


def test_objective_metric_per_task() -> None:
    assert objective_metric("mnli") == "eval_accuracy" and objective_metric("cola") == "eval_matthews_correlation"
    assert objective_metric("stsb") == objective_metric("qqp") == "eval_combined_score"
    assert objective_metric(None, is_regression=True) == "eval_mse"
    assert objective_metric("rte") == objective_metric(None) == "eval_accuracy"
    assert set(GLUE_OBJECTIVES) <= set(GLUE_TASKS)
    for task in GLUE_TASKS:  # the objective is a key the task's metrics really report
        refs = [1.0, 2.0, 3.5] if GLUE_TASKS[task].is_regression else [0, 1, 1]
        preds = np.array([[1.2], [2.1], [3.0]]) if GLUE_TASKS[task].is_regression else np.array([0, 1, 0])
        metrics = {f"eval_{k}": v for k, v in compute_glue_metrics(task, preds, refs).items()}
        assert objective_metric(task) in metrics, task

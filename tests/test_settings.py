"""IWSettings (iwtrainer.settings): the IW hyperparameters' defaults and validation, written once and read by
IWTrainingArguments, SensitivityCallback and IWTrainer."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
from transformers import TrainingArguments

import iwtrainer
from iwtrainer import IWSettings, IWTrainingArguments, SensitivityCallback

DEFAULTS = {"alpha": 1e-4, "beta": 1.0, "calib_steps": 150, "normalize": "sum", "penalty": "delta",
            "calibration": "separate", "calib_group": 1}  # fmt: skip


def iw_args(tmp_path, **kw) -> IWTrainingArguments:
    return IWTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)


def test_defaults_are_the_documented_ones_and_the_training_arguments_fields():
    assert dataclasses.asdict(IWSettings()) == DEFAULTS  # the source documents' values
    assert iwtrainer.IWSettings is IWSettings
    iw_fields = {f.name[3:]: f.default for f in dataclasses.fields(IWTrainingArguments) if f.name.startswith("iw_")}
    assert iw_fields == DEFAULTS  # one field per setting, same default
    assert IWSettings().as_args() == {f"iw_{k}": v for k, v in DEFAULTS.items()}
    assert IWSettings().active and not IWSettings(alpha=0).active


def test_sensitivity_callback_uses_them_on_plain_training_arguments(tmp_path):
    plain = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert SensitivityCallback().settings(plain) == IWSettings() == IWSettings(**DEFAULTS)
    own = SensitivityCallback(calib_steps=3, normalize="max", beta=2.0).settings(plain)
    assert own == IWSettings(beta=2.0, calib_steps=3, normalize="max")
    # on IWTrainingArguments the callback's own values still win over the arguments', the rest comes from args
    args = iw_args(tmp_path, iw_alpha=0.5, iw_calib_steps=7, iw_penalty="factors")
    assert SensitivityCallback().settings(args) == IWSettings(alpha=0.5, calib_steps=7, penalty="factors")
    assert SensitivityCallback(calib_steps=3).settings(args) == IWSettings(alpha=0.5, calib_steps=3, penalty="factors")


INVALID = [
    ("alpha", -1e-4, "iw_alpha must be a finite number >= 0, got -0.0001"),
    ("alpha", float("nan"), "iw_alpha must be a finite number >= 0, got nan"),
    ("alpha", float("inf"), "iw_alpha must be a finite number >= 0, got inf"),
    ("alpha", True, "iw_alpha must be a finite number >= 0, got True"),
    ("alpha", "1e-4", "iw_alpha must be a finite number >= 0, got '1e-4'"),
    ("beta", -1.0, "iw_beta must be a finite number >= 0, got -1.0"),
    ("calib_steps", 0, "iw_calib_steps must be an integer >= 1, got 0"),
    ("calib_steps", 2.5, "iw_calib_steps must be an integer >= 1, got 2.5"),
    ("calib_steps", True, "iw_calib_steps must be an integer >= 1, got True"),
    ("normalize", "mean", "iw_normalize must be one of ("),
    ("penalty", "l1", "iw_penalty must be one of ('delta', 'factors'), got 'l1'"),
    ("calibration", "warmup", "iw_calibration must be one of ('separate', 'online'), got 'warmup'"),
    ("calib_group", 0, "iw_calib_group must be an integer >= 1, got 0"),
    ("calib_group", 2.0, "iw_calib_group must be an integer >= 1, got 2.0"),
]


@pytest.mark.parametrize(("name", "value", "message"), INVALID, ids=[f"{n}={v!r}" for n, v, _ in INVALID])
def test_every_invalid_value_names_the_iw_argument(tmp_path, name, value, message):
    with pytest.raises(ValueError) as info:
        IWSettings(**{name: value})
    text = str(info.value)
    assert text.startswith(message), text
    if name == "normalize":
        assert "'sum', 'max'" in text and text.endswith("got 'mean'")
    with pytest.raises(ValueError) as again:  # the same message from the training arguments
        IWSettings.from_args(SimpleNamespace(**{f"iw_{name}": value}))
    assert str(again.value) == text
    if not isinstance(value, str) or name in ("normalize", "penalty"):  # argparse converts strings before this
        with pytest.raises(ValueError) as from_args:
            iw_args(tmp_path, **{f"iw_{name}": value})
        assert str(from_args.value) == text


def test_from_args_reads_iw_fields_then_non_none_overrides():
    args = SimpleNamespace(iw_alpha=0.5, iw_beta=2.0, learning_rate=1e-3)  # other fields are ignored
    assert IWSettings.from_args(args) == IWSettings(alpha=0.5, beta=2.0)
    assert IWSettings.from_args(args, beta=None, calib_steps=None) == IWSettings(alpha=0.5, beta=2.0)
    assert IWSettings.from_args(args, beta=3.0, normalize="max") == IWSettings(alpha=0.5, beta=3.0, normalize="max")
    assert IWSettings.from_args(SimpleNamespace()) == IWSettings()
    with pytest.raises(ValueError, match="iw_calib_steps must be an integer >= 1, got 0"):
        IWSettings.from_args(args, calib_steps=0)  # overrides are validated too


def test_frozen_replace_and_round_trip():
    settings = IWSettings(alpha=0.25, normalize="max")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.alpha = 1.0
    assert settings.replace(beta=2.0) == IWSettings(alpha=0.25, beta=2.0, normalize="max")
    assert IWSettings.from_args(SimpleNamespace(**settings.as_args())) == settings
    with pytest.raises(ValueError, match="iw_beta"):
        settings.replace(beta=-1.0)
    assert math.isclose(IWSettings(alpha=0).alpha, 0.0) and not IWSettings(alpha=0).active


def test_training_arguments_view_reads_trial_values_anew(tmp_path):
    args = iw_args(tmp_path, iw_alpha=0.5, iw_normalize="max")
    assert args.iw_settings == IWSettings(alpha=0.5, normalize="max")
    args.iw_alpha, args.iw_beta = 2e-3, 0.5  # what Trainer.hyperparameter_search does with a trial
    assert args.iw_settings == IWSettings(alpha=2e-3, beta=0.5, normalize="max")
    args.iw_calib_steps = 0
    with pytest.raises(ValueError, match="iw_calib_steps must be an integer >= 1, got 0"):
        args.iw_settings  # noqa: B018


def test_calib_group_belongs_to_the_separate_pass():
    with pytest.raises(ValueError, match="iw_calibration='online' has none: leave iw_calib_group at 1"):
        IWSettings(calibration="online", calib_group=4)
    assert IWSettings(calibration="online").calib_group == 1 and IWSettings(calib_group=4).calib_group == 4

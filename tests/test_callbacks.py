"""SensitivityCallback's record: what was measured (batches, time) and the uniform (ΔL2) normalisation, which
measures nothing and gives every matrix coefficient 1."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import RandomClassification, tiny_args, tiny_lora

from iwtrainer import IMPORTANCE_FILE, IWTrainer, IWTrainingArguments, find_lora_targets
from iwtrainer.importance import importance_weights, penalty_coefficients


def train(tmp_path, n: int = 64, **kw) -> IWTrainer:
    args = tiny_args(tmp_path, IWTrainingArguments, max_steps=3, learning_rate=1e-2, per_device_train_batch_size=8,
                     **kw)  # fmt: skip
    trainer = IWTrainer(model=tiny_lora("bert", init_lora_weights=False), args=args,
                        train_dataset=RandomClassification(n=n))  # fmt: skip
    trainer.train()
    return trainer


def test_record_says_how_many_batches_were_measured(tmp_path):
    trainer = train(tmp_path, n=32, iw_alpha=1e-2, iw_calib_steps=1000)  # 32 rows / batch 8: 4 batches exist
    record = json.loads((tmp_path / IMPORTANCE_FILE).read_text())
    assert record["settings"]["iw_calib_steps"] == 1000  # what was asked
    assert record["calibration_batches"] == 4  # what was measured
    assert record["calibration_seconds"] > 0
    assert trainer.iw_callback.record["calibration_batches"] == 4


def test_stacked_calibration_gives_the_same_record(tmp_path):
    """iw_calib_group=3 through the Trainer: the same sensitivities from the same 6 batches (the data stream is
    untouched either way: same final weights), recorded with the setting that produced them."""
    runs = {g: train(tmp_path / f"g{g}", n=48, iw_alpha=1e-2, iw_calib_steps=6, iw_calib_group=g) for g in (1, 3)}
    one, three = (json.loads((tmp_path / f"g{g}" / IMPORTANCE_FILE).read_text()) for g in (1, 3))
    assert three["settings"]["iw_calib_group"] == 3 and three["calibration_batches"] == 6
    assert three["modules"].keys() == one["modules"].keys()
    for name, module in one["modules"].items():
        assert three["modules"][name]["sensitivity"] == pytest.approx(module["sensitivity"], rel=1e-5), name
    weights = [{k: v for k, v in t.model.named_parameters() if v.requires_grad} for t in runs.values()]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-6)


def test_uniform_measures_nothing_and_weights_every_matrix_equally(tmp_path, monkeypatch):
    import iwtrainer.callbacks as callbacks

    def no_calibration(*args, **kwargs):
        raise AssertionError("uniform must not run the calibration pass")

    monkeypatch.setattr(callbacks, "compute_sensitivities", no_calibration)
    trainer = train(tmp_path, iw_alpha=0.5, iw_normalize="uniform", iw_beta=3.0, logging_steps=1)
    record = json.loads((tmp_path / IMPORTANCE_FILE).read_text())
    names = {t.name for t in find_lora_targets(trainer.model)}
    assert set(record["modules"]) == names
    assert all(m == {"sensitivity": None, "weight": 0.0, "coefficient": 1.0} for m in record["modules"].values())
    assert record["calibration_batches"] == 0 and record["settings"]["iw_normalize"] == "uniform"
    # the penalty is the plain sum of s²‖B A‖² over every matrix (an explicit materialisation)
    model = trainer.model
    explicit = sum(t.scaling**2 * (t.lora_B @ t.lora_A).double().square().sum() for t in find_lora_targets(model))
    torch.testing.assert_close(trainer._penalty(model)().double(), explicit, rtol=1e-6, atol=1e-10)
    penalties = [h["iw_penalty"] for h in trainer.state.log_history if "iw_penalty" in h]
    assert penalties and all(p > 0 for p in penalties)


def test_uniform_weights_need_no_values():
    weights = importance_weights({"a": None, "b": None}, "uniform")
    assert weights == {"a": 0.0, "b": 0.0}
    assert penalty_coefficients(weights, beta=2.0) == {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError, match="iw_normalize must be one of .*'uniform'"):
        importance_weights({"a": 1.0}, "softmax")

"""``iw_calibration="online"``: the sensitivities measured by hooks inside the first N training steps equal the
separate pass over the same batches (learning rate 0, dropout-free: the same model at every step), the penalty starts
at step N, and a run resumed mid-calibration ends as the uninterrupted one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny import RandomClassification, lora_state, max_gap, tiny_args, tiny_lora

from iwtrainer import IWTrainer, IWTrainingArguments, SensitivityCallback

RUN = dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=6, learning_rate=0.05, optim="sgd",
           iw_alpha=0.5, iw_calib_steps=3, logging_steps=1, data_seed=0)  # fmt: skip


def fit(tmp_path, resume=None, **kw):
    args = tiny_args(tmp_path, IWTrainingArguments, **{**RUN, **kw})
    trainer = IWTrainer(model=tiny_lora("bert", init_lora_weights=False), args=args,
                        train_dataset=RandomClassification(n=96))  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def sensitivities(trainer) -> dict[str, float]:
    return {k: v["sensitivity"] for k, v in trainer.iw_callback.record["modules"].items()}


@pytest.mark.parametrize("split", [(8, 2), (16, 1)], ids=["accumulated", "one-micro-batch"])
def test_online_sensitivities_equal_the_separate_pass_on_the_same_batches(tmp_path, split):
    """Both ways the sums are kept: a flat buffer spanning the 2 micro-batches of a step, and (16 × 1) per target
    only until its last call's gradient arrives."""
    batch, ga = split  # lr 0: every training step sees the step-0 model
    frozen = dict(learning_rate=0.0, max_steps=3, per_device_train_batch_size=batch, gradient_accumulation_steps=ga)
    separate = fit(tmp_path / "s", **frozen)
    online = fit(tmp_path / "o", iw_calibration="online", **frozen)
    expected, got = sensitivities(separate), sensitivities(online)
    assert got.keys() == expected.keys() and len(got) == 13
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name
    record = online.iw_callback.record
    assert record["calibration_batches"] == 3 and record["calibration_seconds"] is None
    assert record["settings"]["iw_calibration"] == "online"


def test_online_penalty_starts_at_step_n_and_changes_the_run(tmp_path):
    trainer = fit(tmp_path / "on", iw_calibration="online")
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6
    assert all("iw_penalty" not in h for h in logs[:3])  # steps 1-3: measuring, no penalty
    assert all(h["iw_penalty"] > 0 for h in logs[3:])
    assert "iw_coefficient/bert.pooler.dense" in logs[2]  # logged as soon as the importance is known (step 3)
    assert not trainer.iw_callback.measuring and trainer.iw_callback.online is None  # hooks removed
    plain = fit(tmp_path / "off", iw_calibration="online", iw_alpha=0.0)
    assert max_gap(lora_state(trainer.model), lora_state(plain.model)) > 1e-3


def test_online_calibration_resumes_mid_measurement_exactly(tmp_path):
    saving = dict(iw_calibration="online", save_strategy="steps", save_steps=2, iw_calib_steps=4)
    straight = fit(tmp_path / "straight", **saving)
    interrupted = fit(tmp_path / "cut", max_steps=2, **saving)  # stops at step 2 of the 4 calibration steps
    assert (tmp_path / "cut" / "checkpoint-2" / "iw_calibration_partial.pt").is_file()
    assert interrupted.iw_callback.record["calibration_batches"] == 2  # a run shorter than N uses what it measured
    resumed = fit(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"), **saving)
    assert resumed.iw_callback.record["calibration_batches"] == 4
    assert sensitivities(resumed) == sensitivities(straight)
    expected, got = lora_state(straight.model), lora_state(resumed.model)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_online_calibration_refuses_fp16():
    args = SimpleNamespace(iw_alpha=1e-3, iw_calibration="online", fp16=True, bf16=False)
    with pytest.raises(ValueError, match="fp16 scales by a changing loss scale; use bf16"):
        SensitivityCallback().on_train_begin(args, SimpleNamespace(global_step=0), None, model=object(),
                                             train_dataloader=object())  # fmt: skip


def test_online_keeps_a_flat_buffer_only_when_a_step_spans_micro_batches():
    from iwtrainer.online import OnlineSensitivity

    model = tiny_lora("bert")
    one, accumulated = OnlineSensitivity(model), OnlineSensitivity(model, gradient_accumulation_steps=2)
    try:
        assert one.sums.flat is None
        n = sum(t.module.get_base_layer().weight.numel() for t in accumulated.targets)
        assert accumulated.sums.flat is not None and accumulated.sums.flat.numel() == n
    finally:
        one.remove()
        accumulated.remove()

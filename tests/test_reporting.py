"""What reaches the tools people watch: loss_task, iw_penalty and the per-matrix coefficients go through the Trainer's
own log to every report_to integration; TensorBoard is read back from its event files."""

from __future__ import annotations

import pytest
from tiny import RandomClassification, tiny_args, tiny_lora

from iwtrainer import IWTrainer, IWTrainingArguments, find_lora_targets


def test_tensorboard_event_files_hold_the_iw_logs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = tiny_args(tmp_path / "out", IWTrainingArguments, max_steps=3, learning_rate=1e-2, logging_steps=1,
                     iw_alpha=1e-2, iw_calib_steps=2, per_device_train_batch_size=8,
                     report_to=["tensorboard"])  # fmt: skip
    trainer = IWTrainer(model=tiny_lora("bert", init_lora_weights=False), args=args,
                        train_dataset=RandomClassification(n=32))  # fmt: skip
    trainer.train()
    (run_dir,) = (tmp_path / "out" / "runs").iterdir()  # TensorBoardCallback's default: output_dir/runs/<run>
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    history = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("loss_task", "iw_penalty"):
        assert f"train/{key}" in tags
        written = [e.value for e in events.Scalars(f"train/{key}")]
        assert written == pytest.approx([h[key] for h in history], rel=1e-6)
    coefficients = trainer.iw_callback.coefficients
    assert set(coefficients) == {t.name for t in find_lora_targets(trainer.model)}
    for name, value in coefficients.items():  # once, with the first training log
        scalars = events.Scalars(f"train/iw_coefficient/{name}")
        assert [e.step for e in scalars] == [1] and scalars[0].value == pytest.approx(value, rel=1e-6)
    assert sum(any(k.startswith("iw_coefficient/") for k in h) for h in trainer.state.log_history) == 1

"""The divergence guard: a non-finite task loss, IW penalty, regulariser or gradient stops the run naming the term and
the optimizer step; no checkpoint is written after it; finite runs are untouched."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from tiny import RandomClassification, tiny_args, tiny_lora

from iwtrainer import IWTrainer, IWTrainingArguments, TrainingDiverged
from iwtrainer.guard import DivergenceGuard


def checkpoints(path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("checkpoint-"))


def test_guard_records_the_first_step_of_each_term_on_the_device():
    guard = DivergenceGuard()
    guard.reset(global_step=10)  # a resumed run: steps are numbered from the checkpoint on
    guard.track("task loss", torch.tensor(1.0))
    guard.step_done()
    guard.track("task loss", torch.tensor(float("nan")))  # the 12th optimizer step
    guard.track("IW penalty", torch.tensor(2.0))
    guard.step_done()
    guard.track("task loss", torch.tensor(float("inf")))  # later steps do not move the first one
    guard.track("IW penalty", torch.tensor([1.0, float("inf")]))
    with pytest.raises(
        TrainingDiverged, match=r"the task loss became non-finite .* at optimizer step 12 \(then also: IW penalty\)"
    ):  # noqa: E501
        guard.check()
    fine = DivergenceGuard()
    fine.reset(0)
    fine.track("gradient", torch.tensor(3.0))
    fine.check()  # finite: nothing raised


def test_huge_learning_rate_stops_before_the_next_checkpoint(tmp_path):
    args = tiny_args(
        tmp_path, IWTrainingArguments, max_steps=12, learning_rate=1e9, optim="sgd", logging_steps=4,
        save_strategy="steps", save_steps=1, per_device_train_batch_size=8, iw_alpha=1e-3, iw_calib_steps=2,
    )  # fmt: skip
    trainer = IWTrainer(model=tiny_lora("bert"), args=args, train_dataset=RandomClassification(n=64))
    with pytest.raises(TrainingDiverged, match=r"became non-finite \(NaN/inf\) at optimizer step (\d+)") as info:
        trainer.train()
    step = int(info.value.args[0].split("at optimizer step ")[1].split()[0])
    assert step >= 2, info.value
    # every checkpoint written is from before the divergence (finite weights); the diverged step's is not written
    assert checkpoints(tmp_path) == [f"checkpoint-{s}" for s in range(1, step)]
    for name in checkpoints(tmp_path):
        weights = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        assert weights and all(torch.isfinite(w).all() for w in weights.values()), name


def test_non_finite_regulariser_is_named(tmp_path):
    calls = {"n": 0}

    def flaky(model: torch.nn.Module) -> torch.Tensor:
        calls["n"] += 1
        value = torch.tensor(float("nan") if calls["n"] >= 3 else 0.0)
        return value + 0 * next(p for p in model.parameters() if p.requires_grad).sum()

    args = tiny_args(tmp_path, IWTrainingArguments, max_steps=6, learning_rate=1e-3, logging_steps=2, iw_alpha=0.0,
                     per_device_train_batch_size=8)  # fmt: skip
    trainer = IWTrainer(
        model=tiny_lora("bert"), args=args, train_dataset=RandomClassification(n=64), regularizers={"flaky": flaky}
    )
    with pytest.raises(TrainingDiverged, match="the regulariser flaky became non-finite .* at optimizer step 3"):
        trainer.train()


def test_finite_run_is_unchanged_and_logs_finite_losses(tmp_path):
    args = tiny_args(tmp_path, IWTrainingArguments, max_steps=4, learning_rate=1e-3, logging_steps=1, iw_alpha=1e-2,
                     iw_calib_steps=2, per_device_train_batch_size=8)  # fmt: skip
    trainer = IWTrainer(model=tiny_lora("bert"), args=args, train_dataset=RandomClassification(n=64))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)

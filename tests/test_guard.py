"""The divergence guard: a non-finite task loss, IW penalty, regulariser or gradient stops the run naming the term and
the optimizer step; no checkpoint is written after it; finite runs are untouched."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DispatchedOps
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


def test_a_step_is_checked_at_its_end_whatever_the_pattern_of_terms():
    """Terms tracked several times in a step (gradient accumulation) or missing from one, and a term first seen
    late: each keeps the first step at which any of its values was not finite."""
    guard = DivergenceGuard()
    guard.reset(0)
    guard.track("task loss", torch.tensor(1.0))
    guard.track("task loss", torch.tensor(2.0))  # two micro-batches
    guard.track("gradient", torch.tensor(1.0))
    guard.step_done()  # step 1: all finite
    guard.track("task loss", torch.tensor(1.0))
    guard.track("task loss", torch.tensor(float("nan")))  # the second micro-batch of step 2
    guard.step_done()  # no gradient tracked in this step
    guard.track("regulariser r", torch.tensor([[1.0, float("-inf")]]))  # first seen at step 3
    guard.track("gradient", torch.tensor(float("inf"), dtype=torch.bfloat16))
    with pytest.raises(
        TrainingDiverged, match=r"the task loss became non-finite .* step 2 \(then also: gradient, regulariser r\)"
    ):
        guard.check()  # mid-step: step 3's pending values are checked too


def test_a_steps_check_is_a_handful_of_kernels_for_all_its_terms():
    """The cost that matters in a 10 ms compiled step is kernel launches: a step with the IW trainer's terms (task
    loss, IW penalty, gradient) dispatches a fixed handful of ops at its end, none while the terms are tracked (it
    was ~7 per term)."""
    guard = DivergenceGuard()
    guard.reset(0)
    values = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)]
    for _ in range(2):  # the first step creates the slots
        for term, v in zip(("task loss", "IW penalty", "gradient"), values):
            guard.track(term, v)
        guard.step_done()
    with DispatchedOps() as tracking:
        for term, v in zip(("task loss", "IW penalty", "gradient"), values):
            guard.track(term, v)
    with DispatchedOps() as ending:
        guard.step_done()
    assert [op for op in tracking.names if op != "detach"] == []  # detach: a view, no kernel
    assert len(ending.names) <= 7, ending.names  # stack, sub, ne, lt, and, where and the step counter's add_
    guard.check()  # all finite


def test_values_of_a_loop_without_step_ends_stay_bounded():
    """A custom loop that tracks terms but never ends a step (no Trainer callbacks) holds at most a bounded number of
    pending values, and still finds a non-finite one."""
    guard = DivergenceGuard()
    guard.reset(0)
    for i in range(1000):
        guard.track("task loss", torch.tensor(float("nan") if i == 500 else 1.0))
    assert len(guard._pending) <= 256
    with pytest.raises(TrainingDiverged, match="task loss"):
        guard.check()

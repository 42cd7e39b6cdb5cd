"""``IWMixin`` on trainers other than ``IWTrainer``: plain ``Trainer`` with ``iw=IWSettings``, a Trainer subclass with
its own loss, and the one rule for where the settings come from."""

from __future__ import annotations

import pytest
import torch
from tiny import RandomClassification, assert_states_close, lora_state, max_gap, tiny_args, tiny_lora
from transformers import Trainer, TrainingArguments

from iwtrainer import IWMixin, IWSettings, IWTrainer, IWTrainingArguments

RUN = dict(per_device_train_batch_size=16, gradient_accumulation_steps=2, max_steps=3, learning_rate=0.05, optim="sgd",
           logging_steps=1, data_seed=0)  # fmt: skip
IW = IWSettings(alpha=0.5, calib_steps=2)


class SmoothedTrainer(Trainer):
    """A user's Trainer subclass with its own loss: label-smoothed cross-entropy (a per-micro-batch mean)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = torch.nn.functional.cross_entropy(outputs.logits, labels, label_smoothing=0.2)
        return (loss, outputs) if return_outputs else loss


class IWSmoothedTrainer(IWMixin, SmoothedTrainer):
    pass


class IWPlainTrainer(IWMixin, Trainer):
    pass


def fit(cls, tmp_path, args_cls=TrainingArguments, model=None, **kw):
    args = tiny_args(tmp_path, args_cls, **{**RUN, **{k: v for k, v in kw.items() if k != "iw"}})
    model = model or tiny_lora("bert", init_lora_weights=False)
    extra = {"iw": kw["iw"]} if "iw" in kw else {}
    trainer = cls(model=model, args=args, train_dataset=RandomClassification(n=96), **extra)
    trainer.train()
    return trainer, lora_state(model)


def test_mixin_on_trainer_with_iw_settings_equals_iw_trainer(tmp_path):
    mixed, state = fit(IWPlainTrainer, tmp_path / "m", iw=IW)
    reference, expected = fit(IWTrainer, tmp_path / "r", IWTrainingArguments, iw_alpha=0.5, iw_calib_steps=2)
    for key in expected:
        assert torch.equal(state[key], expected[key]), key
    assert mixed.iw_callback.record["settings"] == reference.iw_callback.record["settings"]
    assert mixed.iw_callback.record["settings"]["iw_alpha"] == 0.5  # recorded from iw=, not left unknown
    logs = [h for h in mixed.state.log_history if "loss" in h]
    assert logs == [h for h in reference.state.log_history if "loss" in h]


def test_mixin_on_a_subclass_keeps_its_loss_and_adds_the_penalty(tmp_path):
    whole = dict(per_device_train_batch_size=32, gradient_accumulation_steps=1)
    plain, plain_state = fit(SmoothedTrainer, tmp_path / "p", **whole)
    _, off_state = fit(IWSmoothedTrainer, tmp_path / "o", iw=IW.replace(alpha=0.0), **whole)
    for key in plain_state:  # alpha = 0: exactly the subclass
        assert torch.equal(off_state[key], plain_state[key]), key
    # The subclass's per-micro-batch mean is not divided by the accumulation steps by the Trainer (the model's
    # forward takes **kwargs), so its 16 x 2 run takes double steps; with the mixin 16 x 2 equals 32 x 1.
    _, plain_acc = fit(SmoothedTrainer, tmp_path / "pa")
    _, off_acc = fit(IWSmoothedTrainer, tmp_path / "oa", iw=IW.replace(alpha=0.0))
    assert max_gap(plain_acc, plain_state) > 1e-3
    assert_states_close(off_acc, plain_state)
    on, on_state = fit(IWSmoothedTrainer, tmp_path / "i", iw=IW)
    first, plain_first = on.state.log_history[0], plain.state.log_history[0]  # step 0: the same weights
    assert first["loss_task"] == pytest.approx(plain_first["loss"], rel=1e-6)  # the subclass's weighted loss at step 0
    for h in (h for h in on.state.log_history if "loss" in h):
        assert h["iw_penalty"] > 0 and h["loss"] == pytest.approx(h["loss_task"] + h["iw_penalty"], rel=1e-4)
    assert max_gap(on_state, plain_state) > 1e-3  # the penalty changed the run
    # the penalty enters the subclass's run exactly as the autograd reference computes it
    graph = IWSmoothedTrainer(model=tiny_lora("bert", init_lora_weights=False),
                                   args=tiny_args(tmp_path / "g", TrainingArguments, **RUN),
                                   train_dataset=RandomClassification(n=96), iw=IW)  # fmt: skip
    graph.penalty_backend = "autograd"
    graph.train()
    assert_states_close(on_state, lora_state(graph.model))


def test_settings_come_from_one_place(tmp_path):
    model = tiny_lora("bert")
    data = RandomClassification(n=8)
    iw_args = tiny_args(tmp_path, IWTrainingArguments)
    with pytest.raises(ValueError, match="given twice"):
        IWPlainTrainer(model=model, args=iw_args, train_dataset=data, iw=IW)
    with pytest.raises(TypeError, match=r"iw=IWSettings\(alpha=...\) or args=IWTrainingArguments"):
        IWPlainTrainer(model=model, args=tiny_args(tmp_path, TrainingArguments), train_dataset=data)
    with pytest.raises(TypeError, match="iw must be an iwtrainer.IWSettings"):
        IWPlainTrainer(model=model, args=tiny_args(tmp_path, TrainingArguments), train_dataset=data, iw={"alpha": 1})
    trainer = IWPlainTrainer(model=model, args=tiny_args(tmp_path, TrainingArguments), train_dataset=data, iw=IW)
    assert trainer.iw_settings is IW and trainer.iw_callback.settings(trainer.args) == IW
    args = tiny_args(tmp_path, IWTrainingArguments, iw_alpha=2e-3)
    from_args = IWTrainer(model=model, args=args, train_dataset=data)
    from_args.args.iw_alpha = 3e-3  # what hyperparameter_search does with a trial: read live
    assert from_args.iw_settings == IWSettings(alpha=3e-3)

"""IWTrainer inside the HF Trainer loop: accumulation invariance, α=0 parity, data order, logs, resume, errors."""

import json
import os

import pytest
import torch
from tiny import RandomClassification, assert_states_close, lora_state, tiny_args, tiny_base, tiny_lora
from transformers import Trainer, TrainerCallback, TrainingArguments

import iwtrainer.callbacks as callbacks_module
from iwtrainer import IMPORTANCE_FILE, IWTrainer, IWTrainingArguments, SensitivityCallback, find_lora_targets


def make_args(tmp_path, **kw) -> IWTrainingArguments:
    run = dict(
        per_device_train_batch_size=32, max_steps=3, learning_rate=0.05, optim="sgd", warmup_steps=0,
        weight_decay=0.0, iw_alpha=0.5, iw_calib_steps=2, logging_steps=1, data_seed=0,
    )  # fmt: skip
    return tiny_args(tmp_path, IWTrainingArguments, **{**run, **kw})


def train(tmp_path, trainer_cls=IWTrainer, model=None, args=None, **kw):
    model = model or tiny_lora("bert", init_lora_weights=False)
    trainer = trainer_cls(
        model=model, args=args or make_args(tmp_path, **kw), train_dataset=RandomClassification(n=96)
    )
    trainer.train()
    return trainer, lora_state(model)


def test_accumulation_gives_the_same_update(tmp_path):
    """32 × 1 and 16 × 2 accumulation give the same weights, with the penalty active (and mattering)."""
    t1, one = train(tmp_path / "a", per_device_train_batch_size=32, gradient_accumulation_steps=1)
    t2, acc = train(tmp_path / "b", per_device_train_batch_size=16, gradient_accumulation_steps=2)
    _, plain = train(tmp_path / "c", per_device_train_batch_size=32, iw_alpha=0.0)
    sens = {k: v["sensitivity"] for k, v in t1.iw_callback.record["modules"].items()}
    assert sens == pytest.approx({k: v["sensitivity"] for k, v in t2.iw_callback.record["modules"].items()}, rel=1e-5)
    assert_states_close(one, acc)
    differs = max((one[k] - plain[k]).abs().max().item() for k in one)
    assert differs > 1e-4  # the penalty really changed the update


def test_accumulation_with_model_init_gives_the_same_update(tmp_path):
    """With model_init (no model= argument) 16 × 2 still equals 32 × 1: the accumulation fix checks the model that
    train() builds; the calibration file goes to output_dir whatever a previous run left in the callback."""
    _, one = train(tmp_path / "a", per_device_train_batch_size=32, gradient_accumulation_steps=1)
    models = []

    def model_init():
        models.append(tiny_lora("bert", init_lora_weights=False))
        return models[-1]

    args = make_args(tmp_path / "b", per_device_train_batch_size=16, gradient_accumulation_steps=2)
    trainer = IWTrainer(model_init=model_init, args=args, train_dataset=RandomClassification(n=96))
    assert trainer.model_accepts_loss_kwargs is False  # decided on the model model_init built at construction
    trainer.model_accepts_loss_kwargs = True  # as the Trainer's own introspection of a fresh model would say
    trainer.iw_callback.output_dir = str(tmp_path / "stale")  # e.g. left by a search trial
    trainer.train()
    assert len(models) == 2 and trainer.model is models[1]
    assert trainer.model_accepts_loss_kwargs is False
    assert trainer.iw_callback.output_dir is None and (tmp_path / "b" / IMPORTANCE_FILE).is_file()
    assert not (tmp_path / "stale").exists()
    assert_states_close(one, lora_state(models[1]))


def test_fused_gradient_backend_equals_autograd_backend(tmp_path):
    """The default closed-form .grad path and the penalty-in-the-graph path give the same training run."""
    _, fused = train(tmp_path / "g", per_device_train_batch_size=16, gradient_accumulation_steps=2)
    trainer = IWTrainer(
        model=tiny_lora("bert", init_lora_weights=False),
        args=make_args(tmp_path / "a", per_device_train_batch_size=16, gradient_accumulation_steps=2),
        train_dataset=RandomClassification(n=96),
    )
    assert trainer.penalty_backend == "grad"
    trainer.penalty_backend = "autograd"
    trainer.train()
    assert_states_close(fused, lora_state(trainer.model))


def test_alpha_zero_is_plain_trainer(tmp_path):
    iw, iw_state = train(tmp_path / "iw", iw_alpha=0.0)
    plain_args = TrainingArguments(**{k: v for k, v in make_args(tmp_path / "p").to_dict().items() if "iw_" not in k})
    plain, plain_state = train(tmp_path / "p", trainer_cls=Trainer, args=plain_args)
    for k in iw_state:
        assert torch.equal(iw_state[k], plain_state[k]), k
    losses = [h["loss"] for h in iw.state.log_history if "loss" in h]
    assert losses == [h["loss"] for h in plain.state.log_history if "loss" in h]
    assert iw.iw_callback.record is None
    assert not os.path.exists(tmp_path / "iw" / IMPORTANCE_FILE)


class RecordBatches(TrainerCallback):
    def __init__(self):
        self.seen, self.rng = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.rng.append(torch.get_rng_state())


def test_calibration_keeps_data_order_and_rng(tmp_path):
    """Calibration reads the first training batches but training then sees exactly the same stream."""

    def run(alpha, sub):
        seen = []

        class Spy(IWTrainer):
            def compute_loss(self, model, inputs, **kw):
                if model.training:
                    seen.append(inputs["input_ids"].clone())
                return super().compute_loss(model, inputs, **kw)

        rec = RecordBatches()
        model = tiny_lora("bert", init_lora_weights=False, lora_dropout=0.1)  # dropout draws from the RNG
        args = make_args(tmp_path / sub, iw_alpha=alpha, per_device_train_batch_size=8, max_steps=5, data_seed=None)
        trainer = Spy(model=model, args=args, train_dataset=RandomClassification(n=96), callbacks=[rec])
        trainer.train()
        return seen, rec.rng

    seen_iw, rng_iw = run(0.5, "iw")
    seen_plain, rng_plain = run(0.0, "plain")
    assert len(seen_iw) == 5
    assert all(torch.equal(a, b) for a, b in zip(seen_iw, seen_plain))
    assert all(torch.equal(a, b) for a, b in zip(rng_iw, rng_plain))


def test_logs_task_loss_and_penalty(tmp_path):
    trainer, _ = train(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=16)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert h["iw_penalty"] > 0 and h["loss_task"] > 0
        assert h["loss"] == pytest.approx(h["loss_task"] + h["iw_penalty"], rel=1e-3)
    record = json.loads((tmp_path / IMPORTANCE_FILE).read_text())
    names = [t.name for t in find_lora_targets(trainer.model)]
    assert list(record["modules"]) == names
    assert record["settings"]["iw_calib_steps"] == 2 and record["settings"]["iw_normalize"] == "sum"
    assert 0 < record["calibration_seconds"] < trainer.state.log_history[-1]["train_runtime"]
    for entry in record["modules"].values():
        assert entry["coefficient"] == pytest.approx(1 - entry["weight"])
    assert sum(e["weight"] for e in record["modules"].values()) == pytest.approx(1.0)


def test_resume_reuses_importance_without_recalibrating(tmp_path, monkeypatch):
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, iw_normalize="max")
    first, _ = train(tmp_path, args=args)
    saved = json.loads((tmp_path / "checkpoint-2" / IMPORTANCE_FILE).read_text())
    assert (tmp_path / "checkpoint-4" / IMPORTANCE_FILE).is_file()
    assert saved == first.iw_callback.record

    def no_calibration(*a, **k):
        raise AssertionError("recalibrated on resume")

    monkeypatch.setattr(callbacks_module, "compute_sensitivities", no_calibration)
    model = tiny_lora("bert", init_lora_weights=False)
    resumed = IWTrainer(model=model, args=args, train_dataset=RandomClassification(n=96))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.iw_callback.record == saved
    assert resumed.state.global_step == 4
    after = [h for h in resumed.state.log_history if "loss" in h and h["step"] > 2]
    assert len(after) == 2  # logs of the resumed steps average over those steps only
    for h in after:
        assert h["loss"] == pytest.approx(h["loss_task"] + h["iw_penalty"], rel=1e-3)


def test_resume_without_importance_file_fails_clearly(tmp_path):
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    train(tmp_path, args=args)
    os.remove(tmp_path / "checkpoint-2" / IMPORTANCE_FILE)
    trainer = IWTrainer(
        model=tiny_lora("bert", init_lora_weights=False), args=args, train_dataset=RandomClassification()
    )
    with pytest.raises(FileNotFoundError, match=IMPORTANCE_FILE):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_callback_in_a_plain_trainer_pipeline(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, report_to="none", use_cpu=True,
        save_strategy="steps", save_steps=2, disable_tqdm=True,
    )  # fmt: skip
    cb = SensitivityCallback(calib_steps=3, normalize="max", beta=2.0)
    model = tiny_lora("deberta")
    Trainer(model=model, args=args, train_dataset=RandomClassification(), callbacks=[cb]).train()
    assert len(cb.record["modules"]) == len(find_lora_targets(model))
    assert max(e["weight"] for e in cb.record["modules"].values()) == pytest.approx(1.0)
    assert min(cb.coefficients.values()) == 0.0
    assert json.loads((tmp_path / "checkpoint-2" / IMPORTANCE_FILE).read_text()) == cb.record


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"iw_alpha": -1e-4}, "iw_alpha"),
        ({"iw_alpha": float("nan")}, "iw_alpha"),
        ({"iw_calib_steps": 0}, "iw_calib_steps"),
        ({"iw_normalize": "mean"}, "iw_normalize"),
        ({"iw_penalty": "l1"}, "iw_penalty"),
        ({"iw_beta": -1.0}, "iw_beta"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **kwargs)


def test_bad_models_and_degenerate_sensitivities(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        IWTrainer(model=tiny_base("bert"), args=make_args(tmp_path), train_dataset=RandomClassification())
    with pytest.raises(TypeError, match="IWTrainingArguments"):
        IWTrainer(model=tiny_lora("bert"), args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))

    def zero_loss(model, batch):
        return model(**batch).logits.sum() * 0.0

    cb = SensitivityCallback(loss_fn=zero_loss)
    trainer = IWTrainer(
        model=tiny_lora("bert"), args=make_args(tmp_path), train_dataset=RandomClassification(), callbacks=[cb]
    )
    with pytest.raises(ValueError, match="sensitivities: all zero"):
        trainer.train()
    assert not os.path.exists(tmp_path / IMPORTANCE_FILE)

    def nan_loss(model, batch):
        return model(**batch).loss * float("nan")

    trainer = IWTrainer(
        model=tiny_lora("bert"),
        args=make_args(tmp_path),
        train_dataset=RandomClassification(),
        callbacks=[SensitivityCallback(loss_fn=nan_loss)],
    )
    with pytest.raises(ValueError, match="non-finite"):
        trainer.train()


def test_hpo_style_trial_values_are_validated(tmp_path):
    trainer = IWTrainer(model=tiny_lora("bert"), args=make_args(tmp_path), train_dataset=RandomClassification())
    trainer.args.iw_alpha = -1.0  # what hyperparameter_search does with a bad search space
    with pytest.raises(ValueError, match="iw_alpha"):
        trainer.train()


def test_penalty_steps_unwrap_the_model_no_more_than_lora_steps(tmp_path, monkeypatch):
    """accelerate's unwrapping walks every module (~1 ms a call on a base-size model): the penalty looks its model up
    once per wrapper object, so 20 more IW-LoRA steps unwrap exactly as often as 20 more LoRA steps do."""
    import accelerate.utils.other as acc_other

    calls = []
    walk = acc_other.has_compiled_regions
    monkeypatch.setattr(acc_other, "has_compiled_regions", lambda m: calls.append(1) or walk(m))

    def unwraps(alpha: float, steps: int) -> int:
        calls.clear()
        args = tiny_args(tmp_path / f"{alpha}_{steps}", IWTrainingArguments, max_steps=steps, iw_alpha=alpha,
                         iw_calib_steps=2, per_device_train_batch_size=8, logging_steps=100)  # fmt: skip
        trainer = IWTrainer(model=tiny_lora("bert", init_lora_weights=False), args=args,
                            train_dataset=RandomClassification(n=64))  # fmt: skip
        trainer.train()
        assert trainer.state.global_step == steps
        return len(calls)

    lora, iw = unwraps(0.0, 25) - unwraps(0.0, 5), unwraps(1e-4, 25) - unwraps(1e-4, 5)
    assert iw == lora

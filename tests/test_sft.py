"""``IWSFTTrainer`` (trl's ``SFTTrainer`` + ``IWMixin``) on tiny causal LMs: parity with ``SFTTrainer`` at α = 0,
an update that does not depend on the accumulation split, calibration on SFT's own batches against autograd, and
settings from ``IWSFTConfig``."""

from __future__ import annotations

import datasets
import pytest
import torch
from peft import LoraConfig
from tiny import CAUSAL_TARGETS, causal_rows, lora_state, max_gap, tiny_causal, tiny_tokenizer

from iwtrainer import IWSettings, find_lora_targets

trl = pytest.importorskip("trl", reason="iwtrainer[trl] not installed")
from iwtrainer import IWSFTConfig, IWSFTTrainer  # noqa: E402 - needs trl

IW = IWSettings(alpha=1.0, calib_steps=2)


def sft_config(out, cls=trl.SFTConfig, **kw):
    run = dict(
        output_dir=str(out), per_device_train_batch_size=16, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1, completion_only_loss=True,
    )  # fmt: skip
    return cls(**{**run, **kw})


def fit(cls, out, kind="llama", rows=96, **kw):
    args = kw.pop("args", None) or sft_config(out, **{k: v for k, v in kw.items() if k != "iw"})
    peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=CAUSAL_TARGETS[kind], task_type="CAUSAL_LM",
                      fan_in_fan_out=kind == "gpt2")  # fmt: skip
    torch.manual_seed(0)
    extra = {"iw": kw["iw"]} if "iw" in kw else {}
    trainer = cls(model=tiny_causal(kind), args=args, train_dataset=datasets.Dataset.from_dict(causal_rows(rows, 3)),
                  processing_class=tiny_tokenizer(), peft_config=peft, **extra)  # fmt: skip
    trainer.train()
    return trainer, lora_state(trainer.model)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_alpha_zero_is_plain_sft_trainer(tmp_path, kind):
    plain, expected = fit(trl.SFTTrainer, tmp_path / "p", kind)
    iw, got = fit(IWSFTTrainer, tmp_path / "i", kind, iw=IW.replace(alpha=0.0))
    assert expected.keys() == got.keys() and len(got) > 0
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert losses(iw) == losses(plain) and iw.iw_callback.record is None


def test_accumulation_split_does_not_change_the_update(tmp_path):
    """16 × 2 against 32 × 1 with the penalty on: no further apart than plain SFTTrainer's own two runs."""
    _, plain_acc = fit(trl.SFTTrainer, tmp_path / "pa")
    whole = dict(per_device_train_batch_size=32, gradient_accumulation_steps=1)
    _, plain_one = fit(trl.SFTTrainer, tmp_path / "p1", **whole)
    iw_acc_trainer, iw_acc = fit(IWSFTTrainer, tmp_path / "ia", iw=IW)
    _, iw_one = fit(IWSFTTrainer, tmp_path / "i1", iw=IW, **whole)
    effect = max_gap(iw_acc, plain_acc)
    assert effect > 1e-3  # the penalty matters in these runs
    assert max_gap(iw_acc, iw_one) <= max_gap(plain_acc, plain_one) + 1e-6 * effect
    logs = [h for h in iw_acc_trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all("entropy" in h and "mean_token_accuracy" in h for h in logs)  # trl's own logs
    for h in logs[1:]:  # B = 0 at step 0: the penalty starts at 0
        assert h["iw_penalty"] > 0 and h["loss"] == pytest.approx(h["loss_task"] + h["iw_penalty"], rel=1e-4)


def test_calibration_on_sft_batches_equals_autograd(tmp_path):
    """One calibration step over all 32 rows (16 × 2): s_k = ‖∂L/∂W_k‖ of the token-mean NLL over the rows'
    completion tokens, computed here by hand from SFTTrainer's own collated batch."""
    trainer, _ = fit(IWSFTTrainer, tmp_path, rows=32, iw=IW.replace(calib_steps=1), max_steps=1, learning_rate=0.0)
    record = trainer.iw_callback.record
    assert record["calibration_batches"] == 1
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(32)])
    targets = find_lora_targets(model)
    weights = [t.module.get_base_layer().weight for t in targets]
    for w in weights:
        w.requires_grad_(True)
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["labels"][:, 1:]
    nll = -logits[:, :-1].double().log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = (nll * (target != -100)).sum() / (target != -100).sum()
    grads = torch.autograd.grad(loss, weights)
    for t, g in zip(targets, grads):
        assert record["modules"][t.name]["sensitivity"] == pytest.approx(float(g.double().norm()), rel=2e-5), t.name


def test_settings_from_iw_sft_config(tmp_path):
    args = sft_config(tmp_path, IWSFTConfig, iw_alpha=0.25, iw_calib_steps=1, max_steps=1)
    trainer, _ = fit(IWSFTTrainer, tmp_path, args=args)
    assert trainer.iw_settings == IWSettings(alpha=0.25, calib_steps=1)
    assert trainer.iw_callback.record["settings"]["iw_alpha"] == 0.25
    with pytest.raises(ValueError, match="given twice"):
        fit(IWSFTTrainer, tmp_path / "twice", args=args, iw=IW)
    with pytest.raises(ValueError, match="iw_alpha must be a finite number >= 0"):
        sft_config(tmp_path, IWSFTConfig, iw_alpha=-1.0)


def count_forwards(cls, out, **kw):
    """Forward passes of the model during ``fit`` (calibration's own forwards excluded: max_steps counts training)."""
    calls = {"n": 0}
    original = torch.nn.Module.__call__

    def counting(module, *args, **kwargs):
        name = type(module).__name__
        if name.endswith("ForCausalLM") and not name.startswith("Peft"):  # the model itself, not peft's wrapper
            calls["n"] += 1
        return original(module, *args, **kwargs)

    torch.nn.Module.__call__ = counting
    try:
        trainer, _ = fit(cls, out, **kw)
    finally:
        torch.nn.Module.__call__ = original
    return calls["n"], trainer


def test_no_extra_forward_pass(tmp_path):
    """The mixin asks SFTTrainer.compute_loss for outputs only when its caller does: with return_outputs=True trl
    recomputes the logits with a second forward (and warns), which would make every IW step cost two forwards."""
    plain, _ = count_forwards(trl.SFTTrainer, tmp_path / "p")
    iw, trainer = count_forwards(IWSFTTrainer, tmp_path / "i", iw=IW.replace(alpha=0.0))
    assert plain == 3 * 2  # max_steps 3 × 2 micro-batches
    assert iw == plain
    penalised, trainer = count_forwards(IWSFTTrainer, tmp_path / "w", iw=IW)
    assert penalised == plain + trainer.iw_callback.record["calibration_batches"] * 2  # + calibration's micro-batches

"""FSDP2: calibration and the penalty gradient on ``fully_shard``-ed LoRA factors (two CPU processes over gloo,
``tests/scripts/fsdp2_check.py``) equal single-process references; FSDP1 is refused with the reason."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT, subprocess_env

CHECK = ROOT / "tests" / "scripts" / "fsdp2_check.py"


def test_fsdp2_sensitivities_and_penalty_gradient_equal_the_unsharded_model():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(CHECK)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "FSDP2 OK 14 targets" in done.stdout


def test_fsdp1_is_refused_with_the_reason_and_fsdp2_accepted(tmp_path, monkeypatch):
    import pytest
    from tiny import RandomClassification, tiny_args, tiny_lora

    from iwtrainer import IWTrainer, IWTrainingArguments

    trainer = IWTrainer(model=tiny_lora("bert"), args=tiny_args(tmp_path, IWTrainingArguments, iw_alpha=1e-3),
                        train_dataset=RandomClassification(n=8))  # fmt: skip
    trainer.is_fsdp_enabled = True  # as the Trainer sets it from accelerate's FSDP plugin (GPU only)
    monkeypatch.setattr(type(trainer.accelerator), "is_fsdp2", property(lambda self: False))
    with pytest.raises(ValueError, match=r"needs FSDP2 \(fsdp_version: 2"):
        trainer.train()
    monkeypatch.setattr(type(trainer.accelerator), "is_fsdp2", property(lambda self: True))
    trainer._check_supported()  # FSDP2: supported

"""``iwtrainer.plot``: ‖Δ_k‖_F from a saved adapter and from the model equal an explicitly materialised s·B@A, the
layer/type grid, the PNG of a training run and of ``python -m iwtrainer.plot RUN_DIR``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from tiny import HEAD, TARGETS, RandomClassification, tiny_args, tiny_base, tiny_lora

from iwtrainer import IWTrainer, IWTrainingArguments, find_lora_targets
from iwtrainer.plot import PLOT_FILE, delta_norms_from_adapter, delta_norms_from_model, layer_and_kind, run_panels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def explicit_norms(model) -> dict[str, float]:
    return {
        t.name: float((t.scaling * t.lora_B.double() @ t.lora_A.double()).norm()) for t in find_lora_targets(model)
    }


def test_layer_and_kind():
    assert layer_and_kind("bert.encoder.layer.3.attention.self.query") == (3, "attention.self.query")
    assert layer_and_kind("transformer.h.11.mlp.c_fc") == (11, "mlp.c_fc")
    assert layer_and_kind("classifier") == (0, "classifier")


@pytest.mark.parametrize(
    "extra", [{}, {"use_rslora": True}, {"rank_pattern": {"query": 2}, "alpha_pattern": {"value": 3}}]
)
def test_delta_norms_equal_explicit_products(tmp_path, extra):
    base = tiny_base("bert")
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["bert"], init_lora_weights=False, **extra)
    model = get_peft_model(base, config)
    expected = explicit_norms(model)
    assert all(v > 0 for v in expected.values())
    from_model = delta_norms_from_model(model)
    model.save_pretrained(tmp_path)
    from_file = delta_norms_from_adapter(str(tmp_path))
    assert from_model.keys() == from_file.keys() == expected.keys()
    for name, value in expected.items():
        assert from_model[name] == pytest.approx(value, rel=1e-9)
        assert from_file[name] == pytest.approx(value, rel=1e-6)


def test_adalora_delta_norm_uses_e_and_its_scale(tmp_path):
    config = AdaLoraConfig(target_modules=TARGETS["bert"], init_r=6, target_r=4, lora_alpha=8, total_step=10)
    model = get_peft_model(tiny_base("bert"), config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p.normal_()
    model.save_pretrained(tmp_path)
    norms = delta_norms_from_adapter(str(tmp_path))
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_E")}
    assert norms.keys() == layers.keys()
    for name, m in layers.items():
        a, b, e = m.lora_A["default"], m.lora_B["default"], m.lora_E["default"]
        delta = (b @ (a * e)) * m.scaling["default"] / (m.ranknum["default"] + 1e-5)
        assert norms[name] == pytest.approx(float(delta.double().norm()), rel=1e-4)


def test_training_writes_the_png_and_the_cli_redraws_it(tmp_path):
    args = tiny_args(tmp_path, IWTrainingArguments, max_steps=3, learning_rate=1e-2, iw_alpha=1e-2,
                     iw_calib_steps=2, per_device_train_batch_size=8)  # fmt: skip
    trainer = IWTrainer(model=tiny_lora("bert"), args=args, train_dataset=RandomClassification(n=32))
    trainer.train()
    png = tmp_path / PLOT_FILE
    assert png.read_bytes()[:8] == PNG_MAGIC
    trainer.save_model()
    panels = run_panels(str(tmp_path))
    assert set(panels) == {"importance weight w_k", "coefficient (1-w_k)^beta", "final ||Delta_k||_F"}
    assert panels["final ||Delta_k||_F"] == pytest.approx(explicit_norms(trainer.model), rel=1e-5)
    png.unlink()
    out = subprocess.run([sys.executable, "-m", "iwtrainer.plot", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == PNG_MAGIC
    empty = subprocess.run([sys.executable, "-m", "iwtrainer.plot", str(tmp_path / "nowhere")], capture_output=True,
                           text=True)  # fmt: skip
    assert empty.returncode != 0 and "is not a directory" in empty.stderr and len(empty.stderr.splitlines()) == 1
    assert HEAD  # the tiny classifier's head is trained in full, not plotted: only adapted matrices are
    assert not any(name.startswith("classifier") for name in panels["final ||Delta_k||_F"])

"""Causal LMs: calibration on token-level losses (label masking, padding, micro-batches of different token counts)
and the penalty, on GPT-2 (fused Conv1D projections) and Llama (unfused Linear) layouts, against independent
computations."""

from __future__ import annotations

import pytest
import torch
from tiny import causal_autograd_sensitivities, causal_batch, causal_rows, tiny_causal_lora

from iwtrainer import IWPenalty, compute_sensitivities, find_lora_targets
from iwtrainer.sensitivity import loss_items, loss_shifts_labels

KINDS = ["gpt2", "llama"]


@pytest.mark.parametrize("kind", KINDS)
def test_causal_lm_sensitivities_equal_autograd_on_the_base_weights(kind):
    model = tiny_causal_lora(kind)
    rows = causal_rows(16, seed=1)
    # two optimizer steps of two micro-batches each, of different sizes and token counts (padding, masked prompts)
    steps = [[causal_batch(rows, [0, 1, 2]), causal_batch(rows, [3, 4, 5, 6, 7])],
             [causal_batch(rows, [8, 9, 10, 11, 12]), causal_batch(rows, [13, 14, 15])]]  # fmt: skip
    got = compute_sensitivities(model, [mb for step in steps for mb in step], num_steps=2,
                                gradient_accumulation_steps=2, show_progress=False)  # fmt: skip
    expected = causal_autograd_sensitivities(model, steps)
    assert got.batches == 2 and got.keys() == expected.keys()
    assert len(expected) == 2 * (4 if kind == "gpt2" else 7)  # GPT-2: c_attn, attn.c_proj, c_fc, mlp.c_proj
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=2e-5), name


def test_loss_items_count_label_tokens_like_the_trainer():
    batch = {"labels": torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])}
    assert int(loss_items(batch, shifts_labels=True)) == 4  # position 0 is never a target
    assert int(loss_items({"labels": torch.tensor([[5, 6, -100]])}, shifts_labels=True)) == 1
    assert int(loss_items({"labels": torch.tensor([[5, 6, -100]])}, shifts_labels=False)) == 2  # token classifier
    assert int(loss_items({**batch, "shift_labels": torch.tensor([[5, -100]])}, shifts_labels=True)) == 1
    assert loss_items({"labels": torch.tensor([0, 1, 1])}) == 3  # sequence classification: the examples
    assert loss_shifts_labels(tiny_causal_lora("gpt2")) and loss_shifts_labels(tiny_causal_lora("llama"))


@pytest.mark.parametrize("kind", KINDS)
def test_penalty_on_decoder_layouts_equals_materialised_updates(kind):
    model = tiny_causal_lora(kind, init_lora_weights=False)
    targets = find_lora_targets(model)
    coefficients = {t.name: 0.5 + i / len(targets) for i, t in enumerate(targets)}
    penalty = IWPenalty(targets, coefficients)()
    expected = sum(
        coefficients[t.name] * (t.scaling * t.lora_B.double() @ t.lora_A.double()).pow(2).sum() for t in targets
    )
    assert float(penalty) == pytest.approx(float(expected), rel=1e-5)

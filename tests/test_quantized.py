"""QLoRA: peft LoRA on bitsandbytes 4-bit and 8-bit base layers (bitsandbytes' CPU backend). Calibration needs only
each layer's input and output gradient, never the (packed) base weight: on a 4-bit model it equals autograd on an
fp32 model holding the dequantized weights, and ``IWSFTTrainer`` trains a 4-bit model with the penalty on."""

from __future__ import annotations

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import CAUSAL_TARGETS, VOCAB, causal_autograd_sensitivities, causal_batch, causal_rows, tiny_tokenizer
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from iwtrainer import IWSettings, compute_sensitivities, find_lora_targets

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=CAUSAL_TARGETS["llama"], task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small Llama (hidden 128: bitsandbytes quantizes in blocks of 64) saved in fp32."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=256, pad_token_id=0)  # fmt: skip
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def quantized(path, bits: int):
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32) if bits == 4
              else BitsAndBytesConfig(load_in_8bit=True))  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def steps():
    rows = causal_rows(12, seed=2)
    return [[causal_batch(rows, [0, 1, 2]), causal_batch(rows, [3, 4, 5, 6])],
            [causal_batch(rows, [7, 8]), causal_batch(rows, [9, 10, 11])]]  # fmt: skip


def test_4bit_sensitivities_equal_autograd_on_the_dequantized_weights(saved):
    model = get_peft_model(quantized(saved, 4), LoraConfig(**LORA))
    targets = find_lora_targets(model)
    assert {type(t.module.get_base_layer()).__name__ for t in targets} == {"Linear4bit"}
    # The reference: an fp32 model whose projections hold the 4-bit weights dequantized (the same function). Read
    # before any forward pass: bitsandbytes' CPU kernel repacks the weights in place on the first one.
    dense = LlamaForCausalLM.from_pretrained(saved)
    modules = dict(dense.named_modules())
    for t in targets:
        base = t.module.get_base_layer()
        weight = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
        modules[t.name].weight.data.copy_(weight.float())
    data = steps()
    got = compute_sensitivities(model, [mb for step in data for mb in step], num_steps=2,
                                gradient_accumulation_steps=2, show_progress=False)  # fmt: skip
    expected = causal_autograd_sensitivities(get_peft_model(dense, LoraConfig(**LORA)), data)
    assert got.keys() == expected.keys() and len(got) == 14
    for name, value in expected.items():  # bitsandbytes' CPU 4-bit matmul is ~3e-3 off x·Wᵀ in fp32 (measured)
        assert got[name] == pytest.approx(value, rel=5e-3), name


def test_8bit_sensitivities_match_the_full_precision_model(saved):
    model = get_peft_model(quantized(saved, 8), LoraConfig(**LORA))
    assert {type(t.module.get_base_layer()).__name__ for t in find_lora_targets(model)} == {"Linear8bitLt"}
    data = steps()
    got = compute_sensitivities(model, [mb for step in data for mb in step], num_steps=2,
                                gradient_accumulation_steps=2, show_progress=False)  # fmt: skip
    dense = get_peft_model(LlamaForCausalLM.from_pretrained(saved), LoraConfig(**LORA))
    expected = causal_autograd_sensitivities(dense, data)
    for name, value in expected.items():  # int8 weights and activations: close to, not equal to, fp32
        assert got[name] == pytest.approx(value, rel=0.02), name


def test_iw_sft_trainer_trains_a_4bit_model(saved, tmp_path):
    trl = pytest.importorskip("trl", reason="iwtrainer[trl] not installed")
    from iwtrainer import IWSFTTrainer

    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, learning_rate=1e-2,
                         use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True,
                         logging_steps=1, completion_only_loss=True, gradient_checkpointing=False)  # fmt: skip
    trainer = IWSFTTrainer(model=quantized(saved, 4), args=args, peft_config=LoraConfig(**LORA),
                           train_dataset=datasets.Dataset.from_dict(causal_rows(32, seed=4)),
                           processing_class=tiny_tokenizer(), iw=IWSettings(alpha=1.0, calib_steps=2))  # fmt: skip
    before = {t.name: t.lora_B.detach().clone() for t in find_lora_targets(trainer.model)}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and logs[-1]["iw_penalty"] > 0
    assert len(trainer.iw_callback.record["modules"]) == 14
    assert all(not torch.equal(t.lora_B, before[t.name]) for t in find_lora_targets(trainer.model))

"""AdaLoRA (iwtrainer.methods.adalora): the callback really prunes to the target budget; without it nothing is pruned
(and IWTrainer refuses to train); the method through ``build_adapter``."""

import json
import logging

import pytest
import torch
from peft import get_peft_model
from tiny import HEAD, TARGETS, RandomClassification, tiny_args, tiny_base
from transformers import Trainer, TrainingArguments

from iwtrainer import IWTrainer, IWTrainingArguments
from iwtrainer.methods import AdapterArguments, build_adapter
from iwtrainer.methods.adalora import (
    ADALORA_FILE,
    AdaLoraArguments,
    AdaLoraCallback,
    adalora_config,
    adalora_effective_ranks,
    adalora_nonzero_ranks,
    adalora_schedule,
)

STEPS = 30
N_MATRICES = 13  # tiny BERT: q, k, v, 3 dense per layer × 2 layers + the pooler's dense


def tiny_adalora(total_step=STEPS, lora_r=4, **kw):
    base = tiny_base("bert")
    torch.manual_seed(1)
    kw = {"tinit_frac": 0.1, "tfinal_frac": 0.2, "delta_t": 2, **kw}
    cfg = adalora_config(TARGETS["bert"], lora_r=lora_r, total_step=total_step, modules_to_save=HEAD["bert"], **kw)
    return get_peft_model(base, cfg)


def make_args(tmp_path, cls=TrainingArguments, **kw):
    run = dict(per_device_train_batch_size=8, max_steps=STEPS, learning_rate=1e-2, logging_steps=10)
    return tiny_args(tmp_path, cls, **{**run, **kw})


def run(tmp_path, model, callbacks, **kw):
    trainer = Trainer(model=model, args=make_args(tmp_path, **kw), train_dataset=RandomClassification(n=64),
                      callbacks=callbacks)  # fmt: skip
    trainer.train()
    return trainer


def test_config_budget_and_schedule():
    cfg = adalora_config(["query"], lora_r=8, total_step=100)
    assert (cfg.target_r, cfg.init_r) == (8, 12)
    assert (cfg.tinit, cfg.tfinal, cfg.total_step, cfg.deltaT) == (10, 20, 100, 10)


@pytest.mark.parametrize("kw", [dict(total_step=1), dict(total_step=10, tinit_frac=0.5, tfinal_frac=0.5)])
def test_too_short_run_is_a_clear_error(kw):
    with pytest.raises(ValueError, match="too short.*max_steps.*tinit_frac"):
        adalora_config(["query"], **kw)


def test_too_short_trainer_run_is_a_clear_error(tmp_path):
    model = tiny_adalora()
    with pytest.raises(ValueError, match="too short"):
        run(tmp_path, model, [AdaLoraCallback()], max_steps=5)  # keeps tinit=3, tfinal=6


def test_callback_prunes_to_the_target_budget(tmp_path, caplog):
    model = tiny_adalora(total_step=1000)  # deliberately wrong: the callback must fix it from max_steps
    cb = AdaLoraCallback(tinit_frac=0.1, tfinal_frac=0.2)
    calls, update = [], model.base_model.update_and_allocate

    def spy(step):
        assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)  # before zero_grad
        calls.append(step)
        return update(step)

    model.base_model.update_and_allocate = spy
    with caplog.at_level(logging.INFO, logger="iwtrainer.methods.adalora"):
        run(tmp_path, model, [cb], gradient_accumulation_steps=2, per_device_train_batch_size=4)
    assert calls == list(range(STEPS))  # once per optimizer step (not per micro-batch), with the 0-based step
    assert "total_step, tinit, tfinal) (1000, 100, 200) -> (30, 3, 6)" in caplog.text
    cfg = model.peft_config["default"]
    assert (cfg.total_step, cfg.tinit, cfg.tfinal) == (STEPS, 3, 6)
    assert model.base_model.rankallocator.peft_config.total_step == STEPS

    init_total, target_total = 6 * N_MATRICES, 4 * N_MATRICES
    budgets = [h["budget"] for h in cb.history]
    # masks at steps 4, 6, ..., 22 (deltaT=2, after tinit=3) and the final one at T - tfinal = 24
    assert [h["global_step"] for h in cb.history] == list(range(4, 23, 2)) + [24]
    assert budgets[0] < init_total and budgets[-1] == target_total
    assert all(a >= b for a, b in zip(budgets, budgets[1:])) and len(set(budgets)) > 3
    assert [h["total_rank"] for h in cb.history] == budgets  # the mask meets each budget exactly

    ranks = adalora_effective_ranks(model)
    assert len(ranks) == N_MATRICES and sum(ranks.values()) == target_total
    assert len(set(ranks.values())) > 1  # an uneven allocation, not uniform pruning
    assert adalora_nonzero_ranks(model) == ranks  # the pruned singular values are really zero after training

    record = json.loads((tmp_path / ADALORA_FILE).read_text())
    assert record["final_budget"] == target_total and record["final_rank_pattern"] == ranks
    assert (record["target_r"], record["init_r"], record["total_step"]) == (4, 6, STEPS)
    assert record["history"] == cb.history


def test_without_callback_nothing_is_pruned(tmp_path):
    """The silent trap: a plain Trainer never calls update_and_allocate, so AdaLoRA is a rank-init_r LoRA."""
    model = tiny_adalora()
    run(tmp_path, model, [])
    assert model.peft_config["default"].rank_pattern is None
    assert adalora_nonzero_ranks(model) == {k: 6 for k in adalora_effective_ranks(model)}
    assert sum(adalora_effective_ranks(model).values()) == 6 * N_MATRICES


def test_works_in_iwtrainer_with_alpha_zero(tmp_path):
    model = tiny_adalora()
    cb = AdaLoraCallback()
    trainer = IWTrainer(model=model, args=make_args(tmp_path, cls=IWTrainingArguments, iw_alpha=0.0),
                        train_dataset=RandomClassification(n=64), callbacks=[cb])  # fmt: skip
    trainer.train()
    assert sum(adalora_effective_ranks(model).values()) == 4 * N_MATRICES
    assert cb.record["final_budget"] == 4 * N_MATRICES


def test_iwtrainer_refuses_adalora_without_its_callback(tmp_path):
    from peft import get_peft_model

    cfg = adalora_config(TARGETS["bert"], lora_r=2, total_step=10, modules_to_save=HEAD["bert"])
    model = get_peft_model(tiny_base("bert"), cfg)
    trainer = IWTrainer(model=model, args=make_args(tmp_path, cls=IWTrainingArguments, max_steps=10, iw_alpha=0.0),
                        train_dataset=RandomClassification(n=16))  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"AdaLoraModel needs update_and_allocate after each optimizer step: add "
        r"iwtrainer\.methods\.adalora\.AdaLoraCallback; .*plain LoRA",
    ):
        trainer.train()
    assert trainer.state.global_step == 0


def test_method_builds_the_schedule_from_its_flags_and_checks_the_run_length(tmp_path):
    args = IWTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=40, iw_alpha=0.0)
    options = AdaLoraArguments(adalora_tinit_frac=0.25, adalora_tfinal_frac=0.25, adalora_delta_t=3)
    setup = build_adapter(tiny_base("bert"), AdapterArguments(adapter="adalora", lora_r=2), args, options=options)
    cfg = setup.model.peft_config["default"]
    assert (cfg.target_r, cfg.init_r, cfg.total_step, cfg.tinit, cfg.tfinal, cfg.deltaT) == (2, 3, 40, 10, 10, 3)
    assert cfg.orth_reg_weight == 0.5 and set(cfg.modules_to_save) >= {"classifier", "bert.pooler"}
    assert [type(c) for c in setup.callbacks] == [AdaLoraCallback]
    assert (setup.callbacks[0].tinit_frac, setup.callbacks[0].tfinal_frac) == (0.25, 0.25)
    assert len(adalora_effective_ranks(setup.model)) == len(setup.target_names) == 12
    assert adalora_schedule(40, 0.25, 0.25) == (10, 10)
    short = IWTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", iw_alpha=0.0,
                                num_train_epochs=1, per_device_train_batch_size=8)  # fmt: skip
    for rows in (16, 8):
        setup = build_adapter(tiny_base("bert"), AdapterArguments(adapter="adalora", lora_r=2), short, options=options)
        if rows == 16:  # 2 optimizer steps: tinit 0 + tfinal 1 leave one step to prune in
            setup.prepare_training(RandomClassification(n=rows), None, short)
            continue
        with pytest.raises(ValueError, match="too short for its rank schedule: total_step=1"):
            setup.prepare_training(RandomClassification(n=rows), None, short)  # 8 rows / 8: one optimizer step

"""gradnorm rank allocation (iwtrainer.methods.gradnorm): exact budgets, the ema mode (in-place rebuild mid-run) and
the calibration mode (ranks allocated before the Trainer exists), built through ``build_adapter``."""

import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import read
from peft import PeftModel
from tiny import RandomClassification, batches, tiny_args, tiny_base, tiny_lora
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
from transformers.trainer_callback import TrainerControl, TrainerState

from iwtrainer import IWTrainer, IWTrainingArguments, find_lora_targets
from iwtrainer.methods import AdapterArguments, build_adapter
from iwtrainer.methods.base import estimate_train_steps, optimizer_steps_per_epoch
from iwtrainer.methods.gradnorm import (
    RANK_ALLOCATION_FILE,
    GradNormArguments,
    GradNormRankCallback,
    RankCalibration,
    _check_warmup,
    allocate_ranks,
    check_single_process,
    rebuild_lora_ranks,
)
from iwtrainer.targets import layout_version

R = 4  # LoRA rank of the tiny models
K = 13  # tiny BERT targets: q, k, v and 3 dense per layer × 2 layers + the pooler's dense


# -- allocate_ranks ------------------------------------------------------------------------------------------------


def random_importance(rng: random.Random, k: int) -> list[float]:
    kind = rng.choice(["uniform", "lognormal", "ties", "tiny", "zeros", "one_hot"])
    if kind == "uniform":
        return [rng.random() for _ in range(k)]
    if kind == "lognormal":
        return [rng.lognormvariate(0, 3) for _ in range(k)]
    if kind == "ties":
        return [float(rng.choice([1, 2, 2, 3])) for _ in range(k)]
    if kind == "tiny":
        return [rng.choice([1e-300, 1e-30, 1e-12, 1.0]) * rng.random() for _ in range(k)]
    if kind == "zeros":
        return [rng.choice([0.0, 0.0, rng.random()]) for _ in range(k)]
    return [1.0 if i == 0 else 0.0 for i in range(k)]


def test_allocation_meets_the_budget_and_is_monotone():
    rng = random.Random(0)
    for trial in range(400):
        k = rng.randint(1, 40)
        total = rng.randint(0, 12 * k)
        values = random_importance(rng, k)
        imp = {f"m{i}": v for i, v in enumerate(values)}
        ranks = allocate_ranks(imp, total)
        assert list(ranks) == list(imp)
        assert sum(ranks.values()) == total, (trial, values, total)
        g = np.array(values)
        quota = total * g / g.sum() if g.sum() > 0 else np.full(k, total / k)
        for i, r in enumerate(ranks.values()):
            assert math.floor(quota[i] - 1e-9) <= r <= math.ceil(quota[i] + 1e-9), (trial, i)
        names = list(imp)
        for i in range(k):  # pairwise: more important never gets less
            for j in range(k):
                if values[i] > values[j]:
                    assert ranks[names[i]] >= ranks[names[j]], (trial, i, j)
        # raising one module's importance never lowers its rank
        i = rng.randrange(k)
        bigger = dict(imp, **{names[i]: values[i] * rng.uniform(1.0, 3.0) + rng.random()})
        assert allocate_ranks(bigger, total)[names[i]] >= ranks[names[i]], trial


def test_allocation_with_bounds():
    rng = random.Random(1)
    for trial in range(300):
        k = rng.randint(1, 30)
        lo = rng.randint(0, 3)
        caps = {f"m{i}": rng.randint(lo, lo + 10) for i in range(k)}
        total = rng.randint(lo * k, sum(caps.values()))
        imp = {f"m{i}": v for i, v in enumerate(random_importance(rng, k))}
        ranks = allocate_ranks(imp, total, min_rank=lo, max_rank=caps)
        assert sum(ranks.values()) == total, trial
        assert all(lo <= ranks[n] <= caps[n] for n in imp), trial


def test_allocation_examples_and_errors():
    assert allocate_ranks({"a": 3.0, "b": 1.0}, 8) == {"a": 6, "b": 2}
    assert allocate_ranks({"a": 1.0, "b": 1.0, "c": 1.0}, 8) == {"a": 3, "b": 3, "c": 2}  # ties: by order
    assert allocate_ranks({"a": 1.0, "b": 0.0}, 4) == {"a": 4, "b": 0}  # zero importance: no adapter
    assert allocate_ranks({"a": 1.0, "b": 0.0}, 4, max_rank=3) == {"a": 3, "b": 1}
    assert allocate_ranks({"a": 0.0, "b": 0.0}, 4) == {"a": 2, "b": 2}
    assert allocate_ranks({"a": 100.0, "b": 1.0, "c": 1.0}, 6, min_rank=1) == {"a": 4, "b": 1, "c": 1}
    with pytest.raises(ValueError, match="cannot be met"):
        allocate_ranks({"a": 1.0, "b": 1.0}, 10, max_rank=4)
    with pytest.raises(ValueError, match="finite"):
        allocate_ranks({"a": float("nan")}, 4)
    with pytest.raises(ValueError, match="non-negative integer"):
        allocate_ranks({"a": 1.0}, 2.5)


def lora_shapes(model) -> dict[str, int]:
    return {t.name: t.lora_A.shape[0] for t in find_lora_targets(model)}


# -- rebuild ---------------------------------------------------------------------------------------------------------


def factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    return {
        t.name: (t.lora_A.detach().clone(), t.lora_B.detach().clone(), t.scaling) for t in find_lora_targets(model)
    }


def check_rebuilt(before, after, ranks, kept):
    """Shapes follow the ranks; Δ equals the old Δ on the kept directions (all of it when r_k ≥ r)."""
    assert set(after) == {n for n, r in ranks.items() if r > 0}
    for name, (a, b, s) in after.items():
        old_a, old_b, old_s = before[name]
        keep = kept[name]
        assert a.shape[0] == ranks[name] == b.shape[1] and s == old_s
        assert len(keep) == min(ranks[name], old_a.shape[0])
        torch.testing.assert_close(s * b @ a, old_s * old_b[:, keep] @ old_a[keep])
        if ranks[name] >= old_a.shape[0]:
            torch.testing.assert_close(s * b @ a, old_s * old_b @ old_a)
        else:  # the kept directions are those with the largest ‖B[:, i]‖·‖A[i, :]‖
            contrib = old_b.norm(dim=0) * old_a.norm(dim=1)
            dropped = [i for i in range(old_a.shape[0]) if i not in keep]
            assert contrib[keep].min() >= contrib[dropped].max()


def check_optimizer(optimizer, model):
    live = [p for p in model.parameters() if p.requires_grad]
    in_groups = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in in_groups} == {id(p) for p in live} and len(in_groups) == len(live)
    for p, st in optimizer.state.items():
        assert any(p is q for q in live), "stale parameter in optimizer.state"
        for key in ("exp_avg", "exp_avg_sq"):
            assert st[key].shape == p.shape


def test_rebuild_in_place_keeps_delta_optimizer_and_save_load(tmp_path):
    model = tiny_lora("bert", r=R, init_lora_weights=False)
    ds = RandomClassification(n=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        model(**batches(ds, 16)[0]).loss.backward()
        opt.step()
        opt.zero_grad()
    names = list(lora_shapes(model))
    ranks = dict.fromkeys(names, R)
    ranks.update({names[0]: 0, names[1]: 1, names[2]: 2 * R, names[3]: R - 1, names[4]: R + 2})  # drop/cut/pad
    before, old_state = factors(model), {}
    for t in find_lora_targets(model):
        old_state[t.name] = (opt.state[t.lora_A], opt.state[t.lora_B])
    info = rebuild_lora_ranks(model, ranks, opt)
    assert layout_version(model) == 1
    check_rebuilt(before, factors(model), ranks, {n: i["kept"] for n, i in info.items()})
    check_optimizer(opt, model)
    for t in find_lora_targets(model):
        (sa, sb), keep, r = old_state[t.name], info[t.name]["kept"], ranks[t.name]
        new_a, new_b = opt.state[t.lora_A], opt.state[t.lora_B]
        torch.testing.assert_close(new_a["exp_avg"][: len(keep)], sa["exp_avg"][keep])
        torch.testing.assert_close(new_b["exp_avg_sq"][:, : len(keep)], sb["exp_avg_sq"][:, keep])
        assert not new_a["exp_avg"][len(keep) :].any() and not new_b["exp_avg_sq"][:, len(keep) :].any()
        assert new_a["step"] == sa["step"] == 2
        if r > R:  # padded: A rows are fresh (non-zero), B columns zero
            assert t.lora_A[R:].abs().sum() > 0 and not t.lora_B[:, R:].any()
    cfg = model.peft_config["default"]
    assert cfg.rank_pattern == {n: r for n, r in ranks.items() if r > 0}
    assert names[0] not in cfg.target_modules and isinstance(model.get_submodule(f"base_model.model.{names[0]}"),
                                                            torch.nn.Linear)  # fmt: skip
    model(**batches(ds, 16)[0]).loss.backward()  # training goes on with the new shapes
    opt.step()

    model.eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_base("bert"), tmp_path).eval()
    assert lora_shapes(loaded) == {n: r for n, r in ranks.items() if r > 0}
    for t in find_lora_targets(loaded):
        assert t.scaling == pytest.approx(2.0)
    inputs = {k: v for k, v in batches(ds, 16)[0].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


# -- ema mode through the Trainer ----------------------------------------------------------------------------


class FirstTokenTask(RandomClassification):
    """Learnable: the label is the parity of the first token."""

    def __init__(self, n: int = 64, seed: int = 0):
        super().__init__(n=n, seed=seed)
        self.labels = self.input_ids[:, 0] % 2


class Snapshot(TrainerCallback):
    """Copies the LoRA factors and optimizer state at ``on_step_end`` of step ``at`` (before or after the rebuild)."""

    def __init__(self, at: int):
        self.at, self.factors, self.optimizer, self.state = at, None, None, None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == self.at:
            self.factors = factors(model)
            self.optimizer = optimizer.optimizer
            self.state = {t.name: {k: v.clone() for k, v in self.optimizer.state[t.lora_A].items()}
                          for t in find_lora_targets(model)}  # fmt: skip


def make_args(tmp_path, cls=TrainingArguments, **kw):
    run = dict(
        per_device_train_batch_size=16, max_steps=16, learning_rate=1e-2, optim="adamw_torch", weight_decay=0.01,
        logging_steps=1,
    )  # fmt: skip
    return tiny_args(tmp_path, cls, **{**run, **kw})


WARMUP = 4


def train_ema(tmp_path, trainer_cls=Trainer, args_cls=TrainingArguments, **kw):
    model = tiny_lora("bert", r=R)
    pre, post = Snapshot(WARMUP), Snapshot(WARMUP)
    gradnorm = GradNormRankCallback(warmup_steps=WARMUP)
    trainer = trainer_cls(model=model, args=make_args(tmp_path, cls=args_cls, **kw), train_dataset=FirstTokenTask(),
                          callbacks=[pre, gradnorm, post])  # fmt: skip
    trainer.train()
    return trainer, model, pre, gradnorm, post


def test_ema_mode_rebuilds_mid_run(tmp_path):
    trainer, model, pre, gradnorm, post = train_ema(tmp_path)
    record = json.loads((tmp_path / RANK_ALLOCATION_FILE).read_text())
    assert record == json.loads(json.dumps(gradnorm.record))
    assert (record["mode"], record["rank_allocation_mode"], record["warmup_steps"]) == ("gradnorm", "ema", WARMUP)
    ranks = {n: m["rank"] for n, m in record["modules"].items()}
    assert record["budget"] == K * R and sum(ranks.values()) == K * R and len(ranks) == K
    assert any(r != R for r in ranks.values())  # the allocation really changed shapes
    assert all(m["ema_grad_norm"] > 0 for m in record["modules"].values())
    # the allocation follows the EMA gradient norms
    assert ranks == allocate_ranks({n: m["ema_grad_norm"] for n, m in record["modules"].items()}, K * R,
                                   max_rank={n: 32 for n in ranks})  # fmt: skip
    assert lora_shapes(model) == {n: r for n, r in ranks.items() if r > 0}
    assert layout_version(model) == 1

    kept = {n: m["kept"] for n, m in record["modules"].items()}
    check_rebuilt(pre.factors, post.factors, ranks, kept)
    check_optimizer(post.optimizer, model)
    for name, st in post.state.items():  # AdamW state carried over: same step, kept rows, zeros for new rows
        assert st["step"] == pre.state[name]["step"] == WARMUP
        keep = kept[name]
        torch.testing.assert_close(st["exp_avg"][: len(keep)], pre.state[name]["exp_avg"][keep])
        assert not st["exp_avg"][len(keep) :].any()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 16
    right_after, last = np.mean(losses[WARMUP : WARMUP + 3]), np.mean(losses[-3:])
    assert last < 0.8 * right_after, losses


def test_ema_mode_with_iw_penalty(tmp_path):
    trainer, model, _, gradnorm, _ = train_ema(
        tmp_path,
        trainer_cls=IWTrainer,
        args_cls=IWTrainingArguments,
        iw_alpha=0.5,
        iw_calib_steps=2,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
    )
    assert gradnorm.record["budget"] == K * R
    assert layout_version(model) == 1 and trainer._iw_penalty_key[2] == 1  # the penalty regrouped
    coefs = trainer.iw_callback.coefficients
    explicit = sum(
        coefs[t.name] * t.scaling**2 * (t.lora_B @ t.lora_A).square().sum() for t in find_lora_targets(model)
    )
    model.train()
    torch.testing.assert_close(trainer._penalty(model)(), explicit, rtol=1e-5, atol=1e-8)
    penalties = [h["iw_penalty"] for h in trainer.state.log_history if "iw_penalty" in h]
    assert len(penalties) == 16 and all(p > 0 for p in penalties[1:])
    assert sum(r for r in lora_shapes(model).values()) == K * R


def test_ema_mode_refuses_distributed_and_short_runs():
    cb = GradNormRankCallback(warmup_steps=4)
    with pytest.raises(ValueError, match="single process, not with 2 processes: use --rank_allocation_mode calib"):
        cb.on_train_begin(SimpleNamespace(world_size=2), TrainerState(max_steps=10), TrainerControl())
    with pytest.raises(ValueError, match="never be re-allocated"):
        cb.on_train_begin(SimpleNamespace(world_size=1), TrainerState(max_steps=4), TrainerControl())


# -- through build_adapter: the method's checks and the calibration mode -------------------------------------------


def iw_args(tmp_path, **kw) -> IWTrainingArguments:
    return IWTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)


def test_ema_mode_refuses_several_processes(tmp_path, monkeypatch):
    args = iw_args(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun / accelerate launch
    adapter_args = AdapterArguments(lora_r=2, rank_allocation="gradnorm")
    with pytest.raises(ValueError, match="ema .*single process.*2 processes: use --rank_allocation_mode calibration"):
        build_adapter(tiny_base("bert"), adapter_args, args)
    calibration = GradNormArguments(rank_allocation_mode="calibration")
    setup = build_adapter(tiny_base("bert"), adapter_args, args, options=calibration)
    assert setup.state is not None and setup.state.budget == 12 * 2
    assert isinstance(setup.state, RankCalibration) and setup.state.calib_steps == 150  # --rank_calib_steps' default


def test_calibration_before_the_trainer_on_a_tiny_model(tmp_path):
    """prepare_training allocates the ranks in place; the trainer then starts with them and writes the record."""
    from datasets import Dataset

    data = RandomClassification(n=32)
    rows = {"input_ids": data.input_ids.tolist(), "attention_mask": data.attention_mask.tolist()}
    dataset = Dataset.from_dict({**rows, "label": data.labels.tolist(), "idx": list(range(32))})  # idx: unused
    adapter_args = AdapterArguments(lora_r=2, adapter="gradnorm")
    options = {GradNormArguments: GradNormArguments("calibration", rank_budget=30, rank_min=1, rank_calib_steps=3)}
    args = iw_args(tmp_path, max_steps=2, per_device_train_batch_size=8, iw_calib_steps=50, iw_alpha=0.0)
    setup = build_adapter(tiny_base("bert"), adapter_args, args, options=options)
    model = setup.model
    calls = []
    real_run = setup.state.run
    setup.state.run = lambda *a: calls.append(a) or real_run(*a)
    setup.prepare_training(dataset, default_data_collator, args)
    setup.prepare_training(dataset, default_data_collator, args)  # runs once
    assert len(calls) == 1 and setup.model is model
    assert setup.state.record["rank_calib_steps"] == 3  # its own flag, not --iw_calib_steps
    ranks = {n: m["rank"] for n, m in setup.state.record["modules"].items()}
    assert sum(ranks.values()) == 30 and min(ranks.values()) >= 1 and len(set(ranks.values())) > 1
    shapes = {n: m.lora_A["default"].weight.shape[0] for n, m in model.base_model.model.named_modules()
              if hasattr(m, "lora_A") and "default" in m.lora_A}  # fmt: skip
    assert shapes == ranks
    IWTrainer(model=model, args=args, train_dataset=dataset, callbacks=setup.callbacks).train()
    assert read(tmp_path / "rank_allocation.json") == json.loads(json.dumps(setup.state.record))


def test_calibration_mode_refuses_to_train_without_prepare_training(tmp_path):
    adapter_args = AdapterArguments(lora_r=2, rank_allocation="gradnorm")
    args = iw_args(tmp_path, max_steps=2, iw_alpha=0.0)
    setup = build_adapter(tiny_base("bert"), adapter_args, args, options=GradNormArguments("calibration"))
    trainer = IWTrainer(
        model=setup.model, args=args, train_dataset=RandomClassification(n=16), callbacks=setup.callbacks
    )
    with pytest.raises(RuntimeError, match="ranks were not allocated; call MethodSetup.prepare_training"):
        trainer.train()


def test_default_warmup_is_one_epoch_of_the_trainers_optimizer_steps(tmp_path):
    model = tiny_lora("bert", r=R)
    gradnorm = GradNormRankCallback(warmup_steps=None)
    args = make_args(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=6)
    Trainer(model=model, args=args, train_dataset=FirstTokenTask(n=40), callbacks=[gradnorm]).train()
    # 40 rows / batch 8 = 5 batches per epoch, 2 per optimizer step: 3 optimizer steps (the last one short)
    assert gradnorm.warmup_steps == 3 == optimizer_steps_per_epoch(40, args)
    assert gradnorm.record["warmup_steps"] == 3 and gradnorm.record["rank_allocation_mode"] == "ema"
    assert sum(lora_shapes(model).values()) == K * R


def test_run_length_and_warmup_checks(tmp_path, monkeypatch):
    args = iw_args(tmp_path, per_device_train_batch_size=8, num_train_epochs=2)
    assert optimizer_steps_per_epoch(60, args) == 8 and estimate_train_steps(60, args) == 16
    monkeypatch.setenv("WORLD_SIZE", "2")  # 30 rows per process: 4 batches
    assert optimizer_steps_per_epoch(60, args) == 4 and estimate_train_steps(60, args) == 8
    with pytest.raises(ValueError, match="not with 2 processes"):
        check_single_process(args)
    monkeypatch.delenv("WORLD_SIZE")
    assert estimate_train_steps(60, iw_args(tmp_path, max_steps=5)) == 5
    check_single_process(args)  # one process: fine
    with pytest.raises(ValueError, match=r"in a single process, not with DeepSpeed/FSDP: use --rank_allocation_mode"):
        check_single_process(SimpleNamespace(world_size=1, deepspeed="ds_config.json"))
    _check_warmup(3, 4, 10)  # an explicit warm-up shorter than the run
    _check_warmup(None, 5, 4)  # one epoch of 4 steps in a 5-step run
    with pytest.raises(ValueError, match=r"--rank_warmup_steps \(one epoch: 4\) must be < the run's 4 optimizer"):
        _check_warmup(None, 4, 4)
    with pytest.raises(ValueError, match="--rank_warmup_steps 6 must be < the run's 6 optimizer steps"):
        _check_warmup(6, 6, 2)

"""gradnorm rank allocation: exact budgets, cheap mode (rank_pattern), faithful mode (in-place rebuild mid-run)."""

import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny import HEAD, RandomClassification, batches, tiny_args, tiny_base, tiny_lora
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import TrainerControl, TrainerState

from iwtrainer import IWTrainer, IWTrainingArguments, compute_sensitivities, find_lora_targets
from iwtrainer.rank_allocation import (
    RANK_ALLOCATION_FILE,
    GradNormRankCallback,
    allocate_ranks,
    gradnorm_rank_pattern,
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


# -- cheap mode ----------------------------------------------------------------------------------------------------


def lora_shapes(model) -> dict[str, int]:
    return {t.name: t.lora_A.shape[0] for t in find_lora_targets(model)}


def test_cheap_mode_lora_config_meets_the_budget():
    ds = RandomClassification(n=32)
    sens = compute_sensitivities(tiny_lora("bert", r=R), batches(ds, 16), num_steps=2, show_progress=False)
    assert len(sens) == K
    plan = gradnorm_rank_pattern(sens, lora_r=R, lora_alpha=2 * R)
    assert plan.budget == K * R and sum(plan.rank_pattern.values()) == K * R
    model = get_peft_model(tiny_base("bert"), plan.lora_config(modules_to_save=HEAD["bert"]))
    shapes = lora_shapes(model)
    assert shapes == plan.rank_pattern and sum(shapes.values()) == K * R
    assert len(set(shapes.values())) > 1
    for t in find_lora_targets(model):
        assert t.scaling == pytest.approx(2.0)  # uniform lora_alpha / lora_r, whatever r_k


def test_cheap_mode_rank_zero_means_no_adapter():
    sens = {t: 1.0 for t in lora_shapes(tiny_lora("bert", r=R))}
    dropped = "bert.encoder.layer.1.attention.self.key"
    sens[dropped] = 0.0
    record = {
        "modules": {k: {"sensitivity": v, "weight": 0.1} for k, v in sens.items()}
    }  # a SensitivityCallback record
    plan = gradnorm_rank_pattern(record, lora_r=R, lora_alpha=8, use_rslora=True)
    assert plan.ranks[dropped] == 0 and dropped not in plan.target_modules and dropped not in plan.rank_pattern
    model = get_peft_model(tiny_base("bert"), plan.lora_config())
    shapes = lora_shapes(model)
    assert dropped not in shapes and sum(shapes.values()) == K * R
    assert isinstance(model.get_submodule(f"base_model.model.{dropped}"), torch.nn.Linear)
    for t in find_lora_targets(model):
        assert t.scaling == pytest.approx(8 / math.sqrt(R))


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


# -- faithful mode through the Trainer ----------------------------------------------------------------------------


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


def train_faithful(tmp_path, trainer_cls=Trainer, args_cls=TrainingArguments, **kw):
    model = tiny_lora("bert", r=R)
    pre, post = Snapshot(WARMUP), Snapshot(WARMUP)
    gradnorm = GradNormRankCallback(warmup_steps=WARMUP)
    trainer = trainer_cls(model=model, args=make_args(tmp_path, cls=args_cls, **kw), train_dataset=FirstTokenTask(),
                          callbacks=[pre, gradnorm, post])  # fmt: skip
    trainer.train()
    return trainer, model, pre, gradnorm, post


def test_faithful_mode_rebuilds_mid_run(tmp_path):
    trainer, model, pre, gradnorm, post = train_faithful(tmp_path)
    record = json.loads((tmp_path / RANK_ALLOCATION_FILE).read_text())
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


def test_faithful_mode_with_iw_penalty(tmp_path):
    trainer, model, _, gradnorm, _ = train_faithful(
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


def test_faithful_mode_refuses_distributed_and_short_runs():
    cb = GradNormRankCallback(warmup_steps=4)
    with pytest.raises(RuntimeError, match="cheap mode"):
        cb.on_train_begin(SimpleNamespace(world_size=2), TrainerState(max_steps=10), TrainerControl())
    with pytest.raises(ValueError, match="never be re-allocated"):
        cb.on_train_begin(SimpleNamespace(world_size=1), TrainerState(max_steps=4), TrainerControl())

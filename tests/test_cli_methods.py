"""``run_glue_iw.py --adapter adalora`` and ``--rank_allocation gradnorm`` (ema and calibration modes).

End-to-end runs use the real MiniLM and RTE rows from ``../shared`` (see ``test_run_glue.py``) with a few optimizer
steps. ``--rank_allocation_mode calibration`` needs ``run_glue_iw.py``'s ``prepare()`` to call
``setup.prepare_training(splits, tokenizer, data_args, training_args)`` after tokenizing; until the script has that
line, the ``glue`` fixture adds the call around ``prepare``.
"""

from __future__ import annotations

import json

import pytest
from test_run_glue import SCRIPT, base_args, needs_shared, read, script, user_error  # noqa: F401 - fixture
from tiny import HEAD, TARGETS, RandomClassification, tiny_base

from iwtrainer import IWTrainer, IWTrainingArguments
from iwtrainer.cli import AdapterArguments, build_adapter, parse_args

N_MATRICES = 36  # MiniLM-L6: 6 layers × (query, key, value, attention.output.dense, intermediate.dense, output.dense)
HEAD_PARAMS = 385 * 384 + 385 * 2  # bert.pooler + classifier, trained in full


@pytest.fixture(autouse=True)
def _no_glue_dir_env(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)


@pytest.fixture
def glue(script, monkeypatch):  # noqa: F811 - the fixture imported above
    """``run_glue_iw.py`` whose ``prepare()`` ends with ``setup.prepare_training(...)``."""
    if "prepare_training" not in SCRIPT.read_text():
        real = script.prepare

        def prepare(argv):
            run = real(argv)
            run.setup.prepare_training(run.splits, run.tokenizer, run.data_args, run.training_args)
            return run

        monkeypatch.setattr(script, "prepare", prepare)
    return script


def lora_dims(name: str) -> int:
    """``d_in + d_out`` of a MiniLM block matrix (hidden 384, intermediate 1536)."""
    ffn = name.endswith("intermediate.dense") or (name.endswith("output.dense") and ".attention." not in name)
    return 384 + (1536 if ffn else 384)


# ---- flags -------------------------------------------------------------------------------------------------------
def test_defaults_and_invalid_values(tmp_path):
    common = ["--model_name_or_path", "m/x", "--task_name", "rte", "--output_dir", str(tmp_path)]
    adapter_args = parse_args(common)[2]
    assert (adapter_args.adalora_tinit_frac, adapter_args.adalora_tfinal_frac) == (0.1, 0.2)
    assert (adapter_args.adalora_delta_t, adapter_args.adalora_orth_reg_weight) == (10, 0.5)
    assert (adapter_args.rank_allocation, adapter_args.rank_allocation_mode) == ("none", "ema")
    assert (adapter_args.rank_budget, adapter_args.rank_min, adapter_args.rank_warmup_steps) == (None, 0, None)
    bad = {
        "--adalora_tinit_frac 0.6 + --adalora_tfinal_frac 0.4 must be < 1": dict(
            adalora_tinit_frac=0.6, adalora_tfinal_frac=0.4
        ),
        "--adalora_delta_t must be >= 1": dict(adalora_delta_t=0),
        "--rank_min must be >= 0": dict(rank_min=-1),
        "--rank_budget must be >= 1": dict(rank_budget=0),
        "--rank_allocation_mode must be one of": dict(rank_allocation_mode="faithful"),
        "--rank_allocation gradnorm allocates LoRA ranks and needs --adapter lora, got --adapter wsa": dict(
            rank_allocation="gradnorm", adapter="wsa"
        ),
    }
    for message, kwargs in bad.items():
        with pytest.raises(ValueError, match=message.replace("+", r"\+")):
            AdapterArguments(**kwargs)


def tiny_args(tmp_path, **kw) -> IWTrainingArguments:
    return IWTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)


def test_ema_mode_refuses_several_processes(tmp_path, monkeypatch):
    args = tiny_args(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun / accelerate launch
    adapter_args = AdapterArguments(lora_r=2, rank_allocation="gradnorm")
    with pytest.raises(ValueError, match="ema .*single process.*2 processes: use --rank_allocation_mode calibration"):
        build_adapter(tiny_base("bert"), adapter_args, args)
    calibration = AdapterArguments(lora_r=2, rank_allocation="gradnorm", rank_allocation_mode="calibration")
    setup = build_adapter(tiny_base("bert"), calibration, args)
    assert setup.rank_calibration is not None and setup.rank_calibration.budget == 12 * 2


def test_calibration_before_the_trainer_on_a_tiny_model(tmp_path):
    """prepare_training allocates the ranks in place; the trainer then starts with them and writes the record."""
    from datasets import Dataset

    data = RandomClassification(n=32)
    rows = {"input_ids": data.input_ids.tolist(), "attention_mask": data.attention_mask.tolist()}
    dataset = Dataset.from_dict({**rows, "label": data.labels.tolist(), "idx": list(range(32))})  # idx: unused
    adapter_args = AdapterArguments(
        lora_r=2, rank_allocation="gradnorm", rank_allocation_mode="calibration", rank_budget=30, rank_min=1
    )
    args = tiny_args(tmp_path, max_steps=2, per_device_train_batch_size=8, iw_calib_steps=3, iw_alpha=0.0)
    setup = build_adapter(tiny_base("bert"), adapter_args, args)
    model = setup.model
    data_args = parse_args(["--model_name_or_path", "m/x", "--task_name", "rte"])[1]
    setup.prepare_training({"train": [("rte", dataset)]}, None, data_args, args)
    setup.prepare_training({"train": [("rte", dataset)]}, None, data_args, args)  # runs once
    assert setup.model is model
    ranks = {n: m["rank"] for n, m in setup.rank_calibration.record["modules"].items()}
    assert sum(ranks.values()) == 30 and min(ranks.values()) >= 1 and len(set(ranks.values())) > 1
    shapes = {n: m.lora_A["default"].weight.shape[0] for n, m in model.base_model.model.named_modules()
              if hasattr(m, "lora_A") and "default" in m.lora_A}  # fmt: skip
    assert shapes == ranks
    IWTrainer(model=model, args=args, train_dataset=dataset, callbacks=setup.callbacks).train()
    assert read(tmp_path / "rank_allocation.json") == json.loads(json.dumps(setup.rank_calibration.record))


def test_calibration_mode_refuses_to_train_without_prepare_training(tmp_path):
    adapter_args = AdapterArguments(lora_r=2, rank_allocation="gradnorm", rank_allocation_mode="calibration")
    args = tiny_args(tmp_path, max_steps=2, iw_alpha=0.0)
    setup = build_adapter(tiny_base("bert"), adapter_args, args)
    trainer = IWTrainer(
        model=setup.model, args=args, train_dataset=RandomClassification(n=16), callbacks=setup.callbacks
    )
    with pytest.raises(RuntimeError, match="ranks were not allocated; call AdapterSetup.prepare_training"):
        trainer.train()


def test_iwtrainer_refuses_adalora_without_its_callback(tmp_path):
    from peft import get_peft_model

    from iwtrainer.adalora import adalora_config

    cfg = adalora_config(TARGETS["bert"], lora_r=2, total_step=10, modules_to_save=HEAD["bert"])
    model = get_peft_model(tiny_base("bert"), cfg)
    trainer = IWTrainer(model=model, args=tiny_args(tmp_path, max_steps=10, iw_alpha=0.0),
                        train_dataset=RandomClassification(n=16))  # fmt: skip
    with pytest.raises(ValueError, match=r"AdaLoRA needs iwtrainer\.adalora\.AdaLoraCallback .*plain LoRA"):
        trainer.train()
    assert trainer.state.global_step == 0


# ---- end to end ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_shared
def test_adalora(script, tmp_path):  # noqa: F811
    out = tmp_path / "adalora"
    # 12 steps: tinit = 1, tfinal = 2, a new mask every 2 steps in between, the final budget from step 10 on.
    flags = ["--adapter", "adalora", "--lora_r", "4", "--max_steps", "12", "--adalora_delta_t", "2"]
    script.main(base_args(out, "rte", "--do_train", "--do_eval", *flags))
    record = read(out / "adalora_ranks.json")
    assert (record["target_r"], record["init_r"], record["total_step"]) == (4, 6, 12)
    assert record["final_budget"] == record["target_budget"] == 4 * N_MATRICES
    assert len(record["final_rank_pattern"]) == N_MATRICES
    budgets = [h["budget"] for h in record["history"]]
    assert budgets[0] < 6 * N_MATRICES and budgets[-1] == 4 * N_MATRICES and budgets[0] > budgets[-1]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    results = read(out / "all_results.json")
    assert results["adapter"] == "adalora" and "eval_accuracy" in results
    assert read(out / "adapter_config.json")["peft_type"] == "ADALORA"
    assert not (out / "iw_importance.json").exists()  # --iw_alpha defaults to 0 for adalora


@pytest.mark.slow
@needs_shared
def test_gradnorm_ema_with_iw(script, tmp_path):  # noqa: F811
    out = tmp_path / "ema"
    # 64 rows / batch 8: the default warm-up is one epoch, 8 optimizer steps, of the 10.
    flags = ["--rank_allocation", "gradnorm", "--iw_alpha", "1e-4", "--max_steps", "10"]
    script.main(base_args(out, "rte", "--do_train", *flags))
    record = read(out / "rank_allocation.json")
    assert (record["rank_allocation_mode"], record["warmup_steps"], record["budget"]) == ("ema", 8, 8 * N_MATRICES)
    ranks = {n: m["rank"] for n, m in record["modules"].items()}
    assert len(ranks) == N_MATRICES and sum(ranks.values()) == 8 * N_MATRICES and len(set(ranks.values())) > 1
    assert len(read(out / "iw_importance.json")["modules"]) == N_MATRICES
    assert read(out / "trainer_state.json")["global_step"] == 10
    config = read(out / "adapter_config.json")
    assert config["rank_pattern"] == {n: r for n, r in ranks.items() if r > 0}


@pytest.mark.slow
@needs_shared
def test_gradnorm_calibration_with_iw(glue, tmp_path):
    out = tmp_path / "calibration"
    flags = [
        "--rank_allocation", "gradnorm", "--rank_allocation_mode", "calibration", "--rank_budget", "100",
        "--rank_min", "1", "--iw_alpha", "1e-4",
    ]  # fmt: skip
    glue.main(base_args(out, "rte", "--do_train", *flags))
    record = read(out / "rank_allocation.json")
    assert (record["rank_allocation_mode"], record["budget"], record["iw_calib_steps"]) == ("calibration", 100, 2)
    ranks = {n: m["rank"] for n, m in record["modules"].items()}
    assert len(ranks) == N_MATRICES and sum(ranks.values()) == 100 and min(ranks.values()) >= 1
    assert all(m["sensitivity"] > 0 for m in record["modules"].values())
    assert read(out / "adapter_config.json")["rank_pattern"] == ranks
    assert len(read(out / "iw_importance.json")["modules"]) == N_MATRICES  # the IW penalty on the allocated ranks
    results = read(out / "all_results.json")  # training started with the allocated ranks
    assert results["trainable_params"] == sum(r * lora_dims(n) for n, r in ranks.items()) + HEAD_PARAMS


BAD = {
    "gradnorm with adalora": (
        ["--adapter", "adalora", "--rank_allocation", "gradnorm"],
        ["--rank_allocation gradnorm", "needs --adapter lora", "--adapter adalora"],
    ),
    "adalora with iw_alpha": (["--adapter", "adalora", "--iw_alpha", "1e-4"], ["--iw_alpha 0.0001", "adalora"]),
    "adalora run too short": (
        ["--adapter", "adalora", "--adalora_tinit_frac", "0.4", "--adalora_tfinal_frac", "0.5"],
        ["too short", "total_step=4", "--max_steps", "--adalora_tinit_frac / --adalora_tfinal_frac"],
    ),
    "adalora epochs too short": (
        ["--adapter", "adalora", "--max_steps", "-1", "--num_train_epochs", "1", "--max_train_samples", "8"],
        ["too short", "total_step=1", "--num_train_epochs"],
    ),
    "warm-up not shorter than the run": (
        ["--rank_allocation", "gradnorm", "--rank_warmup_steps", "4"],
        ["--rank_warmup_steps 4 must be < the run's 4 optimizer steps"],
    ),
    "default warm-up is the whole run": (
        ["--rank_allocation", "gradnorm", "--max_steps", "-1", "--num_train_epochs", "1", "--max_train_samples", "8"],
        ["--rank_warmup_steps (one epoch: 1) must be < the run's 1 optimizer steps"],
    ),
    "budget too large": (
        ["--rank_allocation", "gradnorm", "--rank_budget", "100000"],
        ["--rank_budget 100000 exceeds", "Σ min(d_in, d_out)"],
    ),
    "budget below the minimum ranks": (
        ["--rank_allocation", "gradnorm", "--rank_allocation_mode", "calibration", "--rank_min", "2",
         "--rank_budget", "50"],
        ["--rank_budget 50 is below --rank_min 2 × 36 adapted matrices"],
    ),
}  # fmt: skip


@pytest.mark.slow
@needs_shared
@pytest.mark.parametrize("case", list(BAD))
def test_invalid_combinations_exit_with_one_line(glue, tmp_path, case):
    flags, expected = BAD[case]
    out = tmp_path / "out"
    message = user_error(glue, base_args(out, "rte", "--do_train", *flags))
    for text in expected:
        assert text in message, message
    assert not out.exists()

"""run_glue_iw.py with every method besides LoRA, end to end: ``--adapter full``, ``wsa``, ``adalora`` and ``gradnorm``
(``--adapter gradnorm`` and its deprecated spelling ``--rank_allocation gradnorm``, ema and calibration modes), and
their invalid combinations.

End-to-end runs use the real MiniLM and RTE rows from ``../shared`` (else the embedded STS-B sample's pairs in RTE's
layout: the ``glue_for`` fixture; see ``helpers.py``) with a few optimizer steps.
The methods themselves are tested on tiny models in ``tests/methods/``.
"""

from __future__ import annotations

import pytest
from helpers import base_args, needs_shared, read

from iwtrainer.glue.run import Run, main, prepare, train_and_evaluate

N_MATRICES = 36  # MiniLM-L6: 6 layers × (query, key, value, attention.output.dense, intermediate.dense, output.dense)
HEAD_PARAMS = 385 * 384 + 385 * 2  # bert.pooler + classifier, trained in full


def lora_dims(name: str) -> int:
    """``d_in + d_out`` of a MiniLM block matrix (hidden 384, intermediate 1536)."""
    ffn = name.endswith("intermediate.dense") or (name.endswith("output.dense") and ".attention." not in name)
    return 384 + (1536 if ffn else 384)


# ---- end to end ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_shared
def test_full_fine_tuning(tmp_path, glue_for):
    out = tmp_path / "full"
    main(
        base_args(out, "rte", "--do_train", "--do_eval", "--adapter", "full", "--max_steps", "2", glue=glue_for("rte"))
    )
    results = read(out / "all_results.json")
    assert results["adapter"] == "full" and results["trainable_params"] > 22_000_000  # every weight
    assert "eval_accuracy" in results and (out / "model.safetensors").is_file()
    assert not (out / "iw_importance.json").exists() and not (out / "adapter_config.json").exists()


@pytest.mark.slow
@needs_shared
def test_wsa(tmp_path, glue_for):
    out = tmp_path / "wsa"
    main(
        base_args(out, "rte", "--do_train", "--do_eval", "--adapter", "wsa", "--max_steps", "2", glue=glue_for("rte"))
    )
    ranks = read(out / "wsa_ranks.json")
    assert len(ranks) == 36 and all(r["r_init"] == 16 and 0 <= r["r_eff"] <= 16 for r in ranks.values())
    assert (out / "wsa_config.json").is_file() and (out / "wsa_model.safetensors").is_file()
    results = read(out / "all_results.json")
    assert results["adapter"] == "wsa" and "eval_accuracy" in results
    assert not (out / "iw_importance.json").exists()


@pytest.mark.slow
@needs_shared
def test_adalora(tmp_path, glue_for):
    out = tmp_path / "adalora"
    # 12 steps: tinit = 1, tfinal = 2, a new mask every 2 steps in between, the final budget from step 10 on.
    flags = ["--adapter", "adalora", "--lora_r", "4", "--max_steps", "12", "--adalora_delta_t", "2"]
    main(base_args(out, "rte", "--do_train", "--do_eval", *flags, glue=glue_for("rte")))
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
def test_gradnorm_ema_with_iw(tmp_path):
    out = tmp_path / "ema"
    # 64 rows / batch 8: the default warm-up is one epoch, 8 optimizer steps, of the 10.
    flags = ["--adapter", "gradnorm", "--iw_alpha", "1e-4", "--max_steps", "10"]  # the new spelling (see below)
    main(base_args(out, "rte", "--do_train", *flags))
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
def test_gradnorm_calibration_with_iw(tmp_path, glue_for):
    out = tmp_path / "calibration"
    flags = [
        "--rank_allocation", "gradnorm", "--rank_allocation_mode", "calibration", "--rank_budget", "100",  # deprecated
        "--rank_min", "1", "--iw_alpha", "1e-4", "--rank_calib_steps", "3",
    ]  # fmt: skip
    run = prepare(base_args(out, "rte", "--do_train", *flags, glue=glue_for("rte")))
    assert isinstance(run, Run) and not out.exists()  # the ranks are allocated in prepare, before any file
    assert run.setup.method == "gradnorm" and run.setup.state.record is not None
    train_and_evaluate(run)
    record = read(out / "rank_allocation.json")
    assert (record["rank_allocation_mode"], record["budget"], record["rank_calib_steps"]) == ("calibration", 100, 3)
    assert "iw_calib_steps" not in record  # its own flag: the IW calibration's --iw_calib_steps 2 is not borrowed
    ranks = {n: m["rank"] for n, m in record["modules"].items()}
    assert len(ranks) == N_MATRICES and sum(ranks.values()) == 100 and min(ranks.values()) >= 1
    assert all(m["sensitivity"] > 0 for m in record["modules"].values())
    assert read(out / "adapter_config.json")["rank_pattern"] == ranks
    importance = read(out / "iw_importance.json")  # the IW penalty on the allocated ranks
    assert len(importance["modules"]) == N_MATRICES and importance["settings"]["iw_calib_steps"] == 2
    results = read(out / "all_results.json")  # training started with the allocated ranks
    assert results["trainable_params"] == sum(r * lora_dims(n) for n, r in ranks.items()) + HEAD_PARAMS

"""What a run leaves in ``--output_dir``, checked against what transformers' run_glue.py leaves: the model card, the
trainer state saved before evaluation, label values in ``id2label``, float64 metrics, INFO logging; plus our own
outputs: the importance picture, the merged model, and the new methods (ΔL2, PiSSA, DoRA, EVA) end to end."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
from helpers import GLUE, MODEL, SCRIPT, TINY, base_args, e2e, read, subprocess_env, user_error

from iwtrainer.glue.run import main

pytestmark = e2e


def write_csv(path, rows: list[tuple[str, int]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)


def test_run_glue_files_and_trainer_state_before_evaluation(tmp_path):
    out = tmp_path / "rte"
    main(base_args(out, "rte", "--do_train", "--do_eval", "--iw_alpha", "1e-3", "--logging_steps", "2"))
    files = {p.name for p in out.iterdir()}
    assert {
        "README.md",
        "all_results.json",
        "train_results.json",
        "eval_results.json",
        "trainer_state.json",
        "adapter_model.safetensors",
        "adapter_config.json",
        "iw_importance.json",
        "iw_importance.png",
    } <= files
    card = (out / "README.md").read_text()
    assert "glue" in card.lower() and str(MODEL) in card  # create_model_card(finetuned_from=..., dataset_tags="glue")
    history = read(out / "trainer_state.json")["log_history"]
    assert not any(k.startswith("eval_") for entry in history for k in entry)  # saved right after training
    assert any("train_runtime" in entry for entry in history)
    assert set(read(out / "all_results.json")) >= set(read(out / "eval_results.json")) | {"adapter", "train_loss"}


def test_custom_csv_id2label_values_and_float64_accuracy(tmp_path):
    rows = [(f"sentence number {i} is {'good' if i % 3 else 'bad'}", int(i % 3 != 0)) for i in range(50)]
    write_csv(tmp_path / "train.csv", rows[:40])
    write_csv(tmp_path / "dev.csv", rows[25:50])  # 25 rows: every accuracy is k/25
    out = tmp_path / "csv"
    main([
        "--model_name_or_path", str(MODEL), "--train_file", str(tmp_path / "train.csv"), "--validation_file",
        str(tmp_path / "dev.csv"), "--output_dir", str(out), *TINY, "--max_steps", "2", "--do_train", "--do_eval",
    ])  # fmt: skip
    accuracy = read(out / "eval_results.json")["eval_accuracy"]
    assert accuracy == round(accuracy * 25) / 25  # float64, as evaluate's accuracy: 0.52, not 0.5199999809265137
    full = tmp_path / "full"
    main([
        "--model_name_or_path", str(MODEL), "--train_file", str(tmp_path / "train.csv"), "--validation_file",
        str(tmp_path / "dev.csv"), "--output_dir", str(full), *TINY, "--max_steps", "1", "--do_train",
        "--adapter", "full", "--learning_rate", "1e-5",
    ])  # fmt: skip
    saved = read(full / "config.json")
    assert saved["id2label"] == {"0": 0, "1": 1} and saved["label2id"] == {"0": 0, "1": 1}  # values, not "0"


def test_info_logging_at_the_default_verbosity(tmp_path):
    out = tmp_path / "log"
    cmd = [sys.executable, str(SCRIPT), *base_args(out, "rte", "--do_train", "--max_steps", "1")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "INFO" in done.stdout and "Training/evaluation parameters" in done.stdout  # as run_glue.py


@pytest.mark.parametrize("adapter", ["lora", "wsa", "dora"])
def test_merged_model_loads_alone_and_predicts_the_same(tmp_path, adapter):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / adapter
    keep_all = ["--wsa_prune_threshold", "0"] if adapter == "wsa" else []  # compare every trained direction
    main(base_args(out, "rte", "--do_train", "--adapter", adapter, "--merge_adapter", *keep_all))
    tokenizer = AutoTokenizer.from_pretrained(str(out / "merged"))
    batch = tokenizer(["A man plays a guitar.", "The cat sat."], ["Someone plays music.", "A dog barks."],
                      return_tensors="pt", padding=True)  # fmt: skip
    merged = AutoModelForSequenceClassification.from_pretrained(str(out / "merged")).eval()
    base = AutoModelForSequenceClassification.from_pretrained(str(MODEL), num_labels=merged.config.num_labels)
    if adapter == "wsa":
        from iwtrainer.methods.wsa import load_wsa

        adapted = load_wsa(base, str(out)).eval()
    else:
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, rtol=1e-4, atol=1e-5)
    assert not any("lora" in n or "delta_U" in n for n, _ in merged.named_parameters())


def test_delta_l2_pissa_dora_eva_end_to_end(tmp_path):
    uniform = tmp_path / "dl2"
    main(base_args(uniform, "rte", "--do_train", "--iw_alpha", "1e-2", "--iw_normalize", "uniform"))
    record = read(uniform / "iw_importance.json")
    assert {m["coefficient"] for m in record["modules"].values()} == {1.0} and record["calibration_batches"] == 0
    for adapter in ("pissa", "dora"):
        out = tmp_path / adapter
        main(base_args(out, "rte", "--do_train", "--do_eval", "--adapter", adapter))
        assert read(out / "all_results.json")["adapter"] == adapter and not (out / "iw_importance.json").exists()
        message = user_error(base_args(tmp_path / f"{adapter}_iw", "rte", "--do_train", "--adapter", adapter,
                                       "--iw_alpha", "1e-4"))  # fmt: skip
        assert f"--adapter {adapter} has none to weight" in message and not (tmp_path / f"{adapter}_iw").exists()
    assert read(tmp_path / "pissa" / "adapter_config.json")["init_lora_weights"] == "pissa"
    assert read(tmp_path / "dora" / "adapter_config.json")["use_dora"] is True
    eva = tmp_path / "eva"
    main(base_args(eva, "rte", "--do_train", "--adapter", "eva", "--iw_alpha", "1e-2", "--eva_rho", "2"))
    config = read(eva / "adapter_config.json")
    assert config["init_lora_weights"] == "eva" and config["rank_pattern"]  # EVA redistributed the ranks
    ranks = {config["r"], *config["rank_pattern"].values()}
    assert len(ranks) > 1
    record = read(eva / "iw_importance.json")  # IW calibrated on the ranks EVA chose
    assert len(record["modules"]) >= len(config["rank_pattern"]) and record["calibration_batches"] == 2
    assert GLUE.is_dir()

"""run_glue_iw.py end to end (iwtrainer.glue.run): GLUE runs on CPU, outputs, bad input, the script and the console
command in a subprocess.

The end-to-end tests use the real small encoder and real GLUE rows from ``../shared`` (override with
``IWTRAINER_SHARED``) with a handful of steps, tiny sequences and a few dozen dev rows; without ``../shared`` a task's
rows are the embedded STS-B sample's sentence pairs in that task's layout (the ``glue_for`` fixture). The methods
other than LoRA are run in ``test_glue_methods.py``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from helpers import (
    GLUE,
    MODEL,
    RESULT_FILES,
    ROOT,
    SCRIPT,
    TINY,
    base_args,
    e2e_task,
    needs_shared,
    read,
    subprocess_env,
)

from iwtrainer.glue.run import Run, main, prepare, train_and_evaluate

needs_command = pytest.mark.skipif(
    shutil.which("iwtrainer-glue") is None, reason="the console command iwtrainer-glue is not installed"
)


# ---- end to end -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_shared
def test_iw_lora_rte_train_eval_predict(tmp_path, glue_for):
    out = tmp_path / "iw"
    flags = ["--do_train", "--do_eval", "--do_predict", "--max_predict_samples", "10"]
    main(base_args(out, "rte", *flags, glue=glue_for("rte")))
    for name in (*RESULT_FILES, "iw_importance.json", "adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).is_file(), name
    results = read(out / "all_results.json")
    assert 0 <= results["eval_accuracy"] <= 1 and results["eval_samples"] == 32
    assert results["adapter"] == "lora" and results["train_samples"] == 64
    assert results["trainable_params"] == 6 * (4 * 8 * (384 + 384) + 2 * 8 * (384 + 1536)) + 385 * 384 + 385 * 2
    assert results["train_ms_per_step"] == pytest.approx(results["train_runtime"] / 4 * 1000, rel=1e-6)
    assert ("peak_gpu_memory_mb" in results) == __import__("torch").cuda.is_available()
    assert read(out / "trainer_state.json")["global_step"] == 4
    importance = read(out / "iw_importance.json")
    assert len(importance["modules"]) == 36  # 6 layers x 6 linear types, the default targets
    assert all(".encoder.layer." in name for name in importance["modules"])
    assert set(read(out / "adapter_config.json")["modules_to_save"]) >= {"classifier", "bert.pooler"}
    lines = (out / "predict_results_rte.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 11
    assert {line.split("\t")[1] for line in lines[1:]} <= {"entailment", "not_entailment"}


@pytest.mark.slow
@needs_shared
@pytest.mark.parametrize(
    ("task", "flags", "metrics"),
    [
        ("cola", ["--do_eval"], {"eval_matthews_correlation"}),
        ("mrpc", ["--do_eval"], {"eval_accuracy", "eval_f1", "eval_combined_score"}),
        ("sst2", ["--do_eval"], {"eval_accuracy"}),
        (
            "stsb",
            ["--do_train", "--do_eval", "--do_predict", "--max_steps", "2", "--max_predict_samples", "4"],
            {"eval_pearson", "eval_spearmanr", "eval_combined_score"},
        ),
    ],
)
def test_glue_metric_names(tmp_path, glue_for, task, flags, metrics):
    out = tmp_path / task
    main(base_args(out, task, "--iw_alpha", "0", *flags, glue=glue_for(task)))
    results = read(out / "eval_results.json")
    assert metrics <= set(results), results
    if "eval_combined_score" in metrics:
        parts = [v for k, v in results.items() if k in metrics and k != "eval_combined_score"]
        assert results["eval_combined_score"] == pytest.approx(sum(parts) / len(parts))
    if task == "stsb":
        lines = (out / "predict_results_stsb.txt").read_text().splitlines()
        assert len(lines) == 5 and all(0 <= int(line.split("\t")[0]) < 4 for line in lines[1:])
        [float(line.split("\t")[1]) for line in lines[1:]]  # scores, not class names
        assert not (out / "iw_importance.json").exists()  # iw_alpha 0: plain LoRA, no calibration


def rte_rows(glue, n: int, start: int = 0) -> list[tuple[str, str, str]]:
    """``n`` (sentence1, sentence2, label) rows of the training file of ``glue``'s RTE (``glue_for("rte")``)."""
    lines = (glue / "RTE" / "train.tsv").read_text(encoding="utf-8").splitlines()[1 + start : 1 + start + n]
    return [tuple(line.split("\t")[1:4]) for line in lines]


@pytest.mark.slow
@needs_shared
def test_mnli_evaluates_matched_and_mismatched(tmp_path, glue_for):
    # MNLI is not available offline: RTE's sentence pairs in MNLI's file layout exercise the two-dev-set path.
    labels = ("entailment", "neutral", "contradiction")
    folder = tmp_path / "glue" / "MNLI"
    folder.mkdir(parents=True)
    for name, start in (("train.tsv", 0), ("dev_matched.tsv", 100), ("dev_mismatched.tsv", 200)):
        rows = [f"{i}\t{a}\t{b}\t{labels[i % 3]}" for i, (a, b, _) in enumerate(rte_rows(glue_for("rte"), 24, start))]
        (folder / name).write_text("\n".join(["index\tsentence1\tsentence2\tgold_label", *rows]) + "\n")
    out = tmp_path / "mnli"
    flags = ["--do_train", "--do_eval", "--max_steps", "2", "--max_eval_samples", "20"]
    main(base_args(out, "mnli", *flags, glue=tmp_path / "glue"))
    results = read(out / "eval_results.json")
    assert {"eval_accuracy", "eval_accuracy_mm", "eval_loss_mm"} <= set(results)
    assert results["eval_samples"] == results["eval_samples_mm"] == 20
    assert read(out / "all_results.json")["eval_accuracy_mm"] == results["eval_accuracy_mm"]


@pytest.mark.slow
@needs_shared
def test_csv_files_as_run_glue(tmp_path, glue_for):  # RTE's sentence pairs as CSV files
    import csv

    for name, start in (("train.csv", 0), ("dev.csv", 300), ("test.csv", 600)):
        with open(tmp_path / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sentence1", "sentence2", "label"])
            writer.writerows(rte_rows(glue_for("rte"), 40, start))
    out = tmp_path / "csv"
    argv = [
        "--model_name_or_path", str(MODEL), "--train_file", str(tmp_path / "train.csv"),
        "--validation_file", str(tmp_path / "dev.csv"), "--test_file", str(tmp_path / "test.csv"),
        "--output_dir", str(out), *TINY, "--max_steps", "2", "--do_train", "--do_eval", "--do_predict",
    ]  # fmt: skip
    main(argv)
    assert set(read(out / "eval_results.json")) >= {"eval_accuracy", "eval_loss"}
    lines = (out / "predict_results_None.txt").read_text().splitlines()  # run_glue.py's name without a task
    assert len(lines) == 41 and {line.split("\t")[1] for line in lines[1:]} <= {"entailment", "not_entailment"}


@pytest.mark.slow
@needs_shared
def test_yaml_config_with_overrides_in_a_subprocess(tmp_path):
    out = tmp_path / "yaml"
    cmd = [
        sys.executable, str(SCRIPT), "configs/minilm_rte_iwlora.yaml",
        "--model_name_or_path", str(MODEL), "--glue_dir", str(GLUE), "--output_dir", str(out),
        *TINY, "--max_steps", "3", "--eval_strategy", "no", "--task_name", e2e_task("rte"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read(out / "trainer_state.json")["global_step"] == 3  # flag beat the file's 3 epochs
    settings = read(out / "iw_importance.json")["settings"]
    assert settings["iw_calib_steps"] == 2 and settings["iw_alpha"] == pytest.approx(1e-4)  # file's alpha kept
    assert read(out / "all_results.json")["eval_samples"] == 32


# ---- run_glue_iw.py and the console command are the same program ----------------------------------------------------
def test_script_is_a_wrapper_of_the_package_main():
    import runpy

    import iwtrainer.glue.run

    namespace = runpy.run_path(str(SCRIPT), run_name="run_glue_iw_wrapper")  # not "__main__": nothing runs
    assert namespace["main"] is iwtrainer.glue.run.main
    assert callable(namespace["_mp_fn"])  # xla_spawn's entry point, as run_glue.py
    assert len(SCRIPT.read_text().splitlines()) < 40  # the program lives in the package, not in the script


def test_console_command_is_installed_as_the_glue_main():
    from importlib.metadata import entry_points

    commands = {e.name: e for e in entry_points(group="console_scripts")}
    if "iwtrainer-glue" not in commands:
        pytest.skip("the package is not installed (pip install -e .)")
    entry = commands["iwtrainer-glue"]
    assert entry.value == "iwtrainer.glue:main"
    import iwtrainer.glue

    assert entry.load() is iwtrainer.glue.main


@needs_command
def test_console_command_help_in_a_subprocess():
    proc = subprocess.run(
        ["iwtrainer-glue", "--help"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: iwtrainer-glue ")
    for flag in ("--model_name_or_path", "--task_name", "--glue_dir", "--adapter", "--iw_alpha", "--hpo_trials"):
        assert flag in proc.stdout, flag


@needs_command
def test_console_command_bad_input_is_one_line(tmp_path):
    out = tmp_path / "out"
    cmd = ["iwtrainer-glue", "--model_name_or_path", "m/x", "--task_name", "mnli2", "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("iwtrainer-glue: error: --task_name 'mnli2'") and "expected one of" in lines[0]
    assert not out.exists()


# ---- prepare, then train_and_evaluate -------------------------------------------------------------------------------
@pytest.mark.slow
@needs_shared
def test_prepare_writes_nothing_and_train_and_evaluate_writes_the_results(tmp_path, glue_for):
    out = tmp_path / "two_steps"
    run = prepare(base_args(out, "rte", "--do_train", "--do_eval", "--max_steps", "2", glue=glue_for("rte")))
    assert isinstance(run, Run) and not out.exists()
    assert run.setup.method == "lora" and len(run.setup.target_names) == 36
    assert run.setup.head_names == ["classifier", "bert.pooler"]
    assert [name for name, _ in run.splits["train"]] == ["rte"] and len(run.splits["train"][0][1]) == 64
    assert len(run.splits["eval"][0][1]) == 32 and run.splits["predict"] == []
    assert {"input_ids", "attention_mask", "label"} <= set(run.splits["train"][0][1].column_names)
    train_and_evaluate(run)
    for name in (*RESULT_FILES, "iw_importance.json", "adapter_model.safetensors"):
        assert (out / name).is_file(), name
    results = read(out / "all_results.json")
    assert results["adapter"] == "lora" and results["train_samples"] == 64 and results["eval_samples"] == 32
    assert results["trainable_params"] == run.setup.model.num_parameters(only_trainable=True)
    assert read(out / "trainer_state.json")["global_step"] == 2


@pytest.mark.parametrize(
    "module",
    ["iwtrainer.glue", "iwtrainer.glue.arguments", "iwtrainer.glue.run", "iwtrainer.glue.search",
     "iwtrainer.glue.data", "iwtrainer.glue.tsv", "iwtrainer.glue.trainer", "iwtrainer.search"],
)  # fmt: skip
def test_each_module_imports_first(module):
    """No import cycle: every module of the GLUE application can be the first one imported."""
    subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, check=True)


@needs_shared
def test_drop_last_drops_training_batches_only(tmp_path, glue_for, monkeypatch):
    """``--dataloader_drop_last`` (the compiled recipe) keeps every eval and predict row: 20 eval and 10 predict rows
    at batch 16 are scored in full (the Trainer alone would score 16 and 0), while training still drops its last
    short batch (60 rows at batch 8: 7 steps an epoch)."""
    import iwtrainer.glue.data as glue_data

    scored = []
    make = glue_data.make_compute_metrics

    def counting(*args, **kwargs):
        compute = make(*args, **kwargs)
        return lambda p: scored.append(len(p.label_ids)) or compute(p)

    monkeypatch.setattr("iwtrainer.glue.run.make_compute_metrics", counting)
    out = tmp_path / "drop"
    flags = ["--do_train", "--do_eval", "--do_predict", "--dataloader_drop_last", "true", "--max_train_samples", "60",
             "--max_eval_samples", "20", "--max_predict_samples", "10", "--max_steps", "-1", "--num_train_epochs", "1",
             "--iw_alpha", "0"]  # fmt: skip
    main(base_args(out, "rte", *flags, glue=glue_for("rte")))
    assert scored == [20]
    assert read(out / "trainer_state.json")["global_step"] == 7
    assert len((out / "predict_results_rte.txt").read_text().splitlines()) == 1 + 10

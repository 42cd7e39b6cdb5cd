"""Tests for run_glue_iw.py and iwtrainer.cli: config parsing, target/head discovery, end-to-end GLUE runs on CPU.

The end-to-end tests use the real small encoder and real GLUE rows from ``../shared`` (override with
``IWTRAINER_SHARED``) with a handful of steps, tiny sequences and a few dozen dev rows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from iwtrainer.cli import (
    discover_target_modules,
    find_head_modules,
    match_target_modules,
    parse_args,
    targets_regex,
)
from iwtrainer.hpo import search_space, split_hpo_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_glue_iw.py"
SHARED = Path(os.environ.get("IWTRAINER_SHARED") or Path(__file__).resolve().parents[2] / "shared")
MODEL = SHARED / "models" / "all-MiniLM-L6-v2"
GLUE = SHARED / "data" / "glue"
HAVE_SHARED = MODEL.is_dir() and GLUE.is_dir()
needs_shared = pytest.mark.skipif(
    not HAVE_SHARED, reason=f"real model/GLUE data not found under {SHARED} (set IWTRAINER_SHARED)"
)
e2e = [pytest.mark.slow, needs_shared]

# A few optimizer steps on tiny sequences: enough to run every code path, seconds on a CPU.
TINY = [
    "--max_train_samples", "64", "--max_steps", "4", "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "16", "--iw_calib_steps", "2", "--max_seq_length", "32",
    "--max_eval_samples", "32", "--save_strategy", "no", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
]  # fmt: skip
RESULT_FILES = ("all_results.json", "train_results.json", "eval_results.json", "trainer_state.json")


@pytest.fixture(autouse=True)
def _no_glue_dir_env(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)  # the --glue_dir default must not leak in from the environment


@pytest.fixture(scope="module")
def script():
    """run_glue_iw.py imported as a module (it sits at the repository root, outside the package)."""
    spec = importlib.util.spec_from_file_location("run_glue_iw", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_glue_iw"] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("run_glue_iw", None)


def base_args(out: Path, task: str = "rte", *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(MODEL), "--glue_dir", str(GLUE), "--task_name", task,
        "--output_dir", str(out), *TINY, *extra,
    ]  # fmt: skip


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def user_error(script, argv: list[str]) -> str:
    """Run main() expecting a user error; return its one-line message."""
    with pytest.raises(SystemExit) as info:
        script.main(argv)
    message = info.value.code
    assert isinstance(message, str), f"expected an error message, got exit code {message!r}"
    assert message.startswith("run_glue_iw.py: error: ")
    assert "\n" not in message
    return message


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GLUE_DIR"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


# ---- parsing: config files and overrides -------------------------------------------------------------------------
def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_values_are_defaults_and_flags_override(tmp_path):
    cfg = write_yaml(
        tmp_path / "x.yaml",
        {
            "model_name_or_path": "some/model",
            "task_name": "RTE",
            "output_dir": str(tmp_path / "from_yaml"),
            "iw_alpha": 1e-4,
            "learning_rate": "2e-4",  # YAML 1.1 reads 2e-4 as a string: argparse converts it like a typed flag
            "lora_target_modules": ["query", "value"],
            "do_train": True,
        },
    )
    model_args, data_args, adapter_args, training_args = parse_args(
        [str(cfg), "--iw_alpha", "0", "--output_dir", str(tmp_path / "y"), "--lora_target_modules", "key,dense"]
    )
    assert model_args.model_name_or_path == "some/model"
    assert data_args.task_name == "rte"
    assert training_args.iw_alpha == 0 and training_args.learning_rate == pytest.approx(2e-4)
    assert training_args.output_dir == str(tmp_path / "y") and training_args.do_train
    assert adapter_args.lora_target_modules == ["key", "dense"]  # replaces the file's list, does not extend it
    _, _, adapter_args, training_args = parse_args([str(cfg)])
    assert adapter_args.lora_target_modules == ["query", "value"] and training_args.iw_alpha == pytest.approx(1e-4)
    _, _, adapter_args, _ = parse_args(
        [str(cfg), "--lora_target_modules", "query", "key", "--lora_target_modules", "value,dense"]
    )
    assert adapter_args.lora_target_modules == ["query", "key", "value", "dense"]


def test_json_config_and_unknown_keys(tmp_path):
    good = tmp_path / "x.json"
    good.write_text(json.dumps({"model_name_or_path": "m/x", "task_name": "sst2", "output_dir": str(tmp_path)}))
    assert parse_args([str(good)])[1].task_name == "sst2"
    bad = write_yaml(tmp_path / "bad.yaml", {"model_name_or_path": "m/x", "task_name": "rte", "lora_alfa": 4})
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown key 'lora_alfa' \(did you mean 'lora_alpha'\?\)"):
        parse_args([str(bad)])
    with pytest.raises(ValueError, match="config file .* does not exist"):
        parse_args([str(tmp_path / "missing.yaml")])


def test_iw_alpha_for_adapters_without_lora_factors(tmp_path):
    common = ["--model_name_or_path", "m/x", "--task_name", "rte", "--output_dir", str(tmp_path)]
    for adapter in ("full", "wsa"):
        *_, training_args = parse_args([*common, "--adapter", adapter])
        assert training_args.iw_alpha == 0  # the default 1e-4 means "IW on LoRA": off when there is no LoRA
        assert parse_args([*common, "--adapter", adapter, "--iw_alpha", "0"])[3].iw_alpha == 0
        with pytest.raises(ValueError, match=rf"--iw_alpha 0.0001 needs LoRA .*--adapter {adapter}"):
            parse_args([*common, "--adapter", adapter, "--iw_alpha", "1e-4"])
    cfg = write_yaml(tmp_path / "iw.yaml", {"iw_alpha": 1e-4})  # an explicit value in a file counts as given
    with pytest.raises(ValueError, match="--iw_alpha .*--adapter full"):
        parse_args([str(cfg), *common, "--adapter", "full"])
    assert parse_args(common)[3].iw_alpha == pytest.approx(1e-4)


def test_env_placeholders(tmp_path, monkeypatch):
    cfg = write_yaml(
        tmp_path / "p.yaml", {"model_name_or_path": "m/x", "task_name": "rte", "glue_dir": "${IWT_TEST_GLUE}"}
    )
    monkeypatch.delenv("IWT_TEST_GLUE", raising=False)
    with pytest.raises(ValueError, match=r"--glue_dir is '\$\{IWT_TEST_GLUE\}' \(from .*p\.yaml\).*export IWT_TEST"):
        parse_args([str(cfg), "--output_dir", str(tmp_path)])
    assert parse_args([str(cfg), "--output_dir", str(tmp_path), "--glue_dir", "/g"])[1].glue_dir == "/g"
    monkeypatch.setenv("IWT_TEST_GLUE", "/from/env")
    assert parse_args([str(cfg), "--output_dir", str(tmp_path)])[1].glue_dir == "/from/env"
    monkeypatch.setenv("GLUE_DIR", "/env/glue")
    assert parse_args(["--model_name_or_path", "m/x", "--task_name", "rte"])[1].glue_dir == "/env/glue"


SEARCH_SPACES = ("hpo_space.yaml",)  # search spaces for --hpo_space, not run configs (tested in test_hpo.py)
RUN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name not in SEARCH_SPACES)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse(path, tmp_path):
    args = [str(path), "--model_name_or_path", "m/x", "--glue_dir", "/g", "--output_dir", str(tmp_path)]
    raw = yaml.safe_load(path.read_text())
    with split_hpo_args(args) as (hpo_args, rest):  # as run_glue_iw.py: hpo_* keys are not parse_args flags
        _, data_args, adapter_args, training_args = parse_args(rest)
    hpo_keys = {k: v for k, v in raw.items() if k.startswith("hpo_")}
    assert {k: getattr(hpo_args, k) for k in hpo_keys} == hpo_keys
    assert (hpo_args.hpo_trials > 0) == bool(hpo_keys.get("hpo_trials"))
    if hpo_args.hpo_trials > 0:
        search_space(hpo_args)  # the backend is installed and the space loads
    assert training_args.do_train and training_args.do_eval
    if path.name.startswith("deberta_"):  # SPEC.md §4, exactly
        assert raw["model_name_or_path"] == "microsoft/deberta-v3-base"
        assert (training_args.num_train_epochs, training_args.learning_rate) == (3, pytest.approx(2e-4))
        assert (training_args.per_device_train_batch_size, training_args.weight_decay) == (32, 0.01)
        assert training_args.lr_scheduler_type.value == "linear" and training_args.warmup_steps == 500
        assert training_args.optim.value == "adamw_torch"
        assert (data_args.max_seq_length, training_args.fp16, training_args.seed) == (256, True, 42)
        assert (adapter_args.adapter, adapter_args.lora_r, adapter_args.lora_alpha) == ("lora", 8, 16)
        assert training_args.iw_alpha == (pytest.approx(1e-4) if "iwlora" in path.name else 0)
        assert (training_args.iw_beta, training_args.iw_calib_steps) == (1.0, 150)
        assert training_args.metric_for_best_model == "accuracy"
    else:
        text = path.read_text()
        assert "${MINILM_DIR}" in text  # placeholder, documented in the header
        # the quickstart falls back to $GLUE_DIR / the hub (--glue_dir's own default); the others name the folder
        assert ("${GLUE_DIR}" in text) != (path.name == "quickstart.yaml")
        assert text.startswith("#")


# ---- target and head discovery ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "heads", "per_layer"),
    [
        ("bert", ["classifier", "bert.pooler"], ["attention.self.query", "attention.self.key", "attention.self.value",
                                                 "attention.output.dense", "intermediate.dense", "output.dense"]),
        ("deberta", ["pooler", "classifier"], ["attention.self.query_proj", "attention.self.key_proj",
                                               "attention.self.value_proj", "attention.output.dense",
                                               "intermediate.dense", "output.dense"]),
        ("gpt2", ["score"], ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    ],
)  # fmt: skip
def test_default_targets_are_the_block_linears(kind, heads, per_layer):
    import re

    from tiny import tiny_base

    model = tiny_base(kind)
    assert find_head_modules(model) == heads
    targets = discover_target_modules(model, exclude=heads)
    prefix = {"bert": "bert.encoder.layer", "deberta": "deberta.encoder.layer", "gpt2": "transformer.h"}[kind]
    assert targets == [f"{prefix}.{i}.{rel}" for i in range(2) for rel in per_layer]
    spec = targets_regex(model, targets)
    assert {n for n, _ in model.named_modules() if n and re.fullmatch(spec, n)} == set(targets)


def test_head_includes_modules_missing_from_the_checkpoint():
    from tiny import tiny_base

    model = tiny_base("bert")
    missing = ["classifier.weight", "bert.encoder.layer.1.output.dense.weight", "bert.embeddings.position_ids"]
    heads = find_head_modules(model, missing)
    assert heads == ["classifier", "bert.pooler", "bert.encoder.layer.1.output.dense"]
    assert "bert.encoder.layer.1.output.dense" not in discover_target_modules(model, exclude=heads)


def test_user_targets_match_like_peft_and_list_candidates_otherwise():
    from tiny import tiny_base

    model = tiny_base("bert")
    assert len(match_target_modules(model, ["query", "value"])) == 4
    assert match_target_modules(model, [r".*\.0\.attention\.self\.query"]) == [
        "bert.encoder.layer.0.attention.self.query"
    ]
    with pytest.raises(ValueError) as info:
        match_target_modules(model, ["q_proj"], exclude=["classifier", "bert.pooler"])
    message = str(info.value)
    assert "\n" not in message and "--lora_target_modules ['q_proj'] matched no" in message
    assert "attention.self.query" in message and "inside bert.encoder.layer.N" in message


# ---- end to end -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_shared
def test_iw_lora_rte_train_eval_predict(script, tmp_path):
    out = tmp_path / "iw"
    script.main(base_args(out, "rte", "--do_train", "--do_eval", "--do_predict", "--max_predict_samples", "10"))
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
def test_glue_metric_names(script, tmp_path, task, flags, metrics):
    out = tmp_path / task
    script.main(base_args(out, task, "--iw_alpha", "0", *flags))
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


def rte_rows(n: int, start: int = 0) -> list[tuple[str, str, str]]:
    """``n`` real (sentence1, sentence2, label) rows of RTE's training file."""
    lines = (GLUE / "RTE" / "train.tsv").read_text(encoding="utf-8").splitlines()[1 + start : 1 + start + n]
    return [tuple(line.split("\t")[1:4]) for line in lines]


@pytest.mark.slow
@needs_shared
def test_mnli_evaluates_matched_and_mismatched(script, tmp_path):
    # MNLI is not available offline: real RTE sentence pairs in MNLI's file layout exercise the two-dev-set path.
    labels = ("entailment", "neutral", "contradiction")
    folder = tmp_path / "glue" / "MNLI"
    folder.mkdir(parents=True)
    for name, start in (("train.tsv", 0), ("dev_matched.tsv", 100), ("dev_mismatched.tsv", 200)):
        rows = [f"{i}\t{a}\t{b}\t{labels[i % 3]}" for i, (a, b, _) in enumerate(rte_rows(24, start))]
        (folder / name).write_text("\n".join(["index\tsentence1\tsentence2\tgold_label", *rows]) + "\n")
    out = tmp_path / "mnli"
    argv = base_args(out, "mnli", "--do_train", "--do_eval", "--max_steps", "2", "--max_eval_samples", "20")
    argv[argv.index("--glue_dir") + 1] = str(tmp_path / "glue")
    script.main(argv)
    results = read(out / "eval_results.json")
    assert {"eval_accuracy", "eval_accuracy_mm", "eval_loss_mm"} <= set(results)
    assert results["eval_samples"] == results["eval_samples_mm"] == 20
    assert read(out / "all_results.json")["eval_accuracy_mm"] == results["eval_accuracy_mm"]


@pytest.mark.slow
@needs_shared
def test_csv_files_as_run_glue(script, tmp_path):
    import csv

    for name, start in (("train.csv", 0), ("dev.csv", 300), ("test.csv", 600)):
        with open(tmp_path / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sentence1", "sentence2", "label"])
            writer.writerows(rte_rows(40, start))
    out = tmp_path / "csv"
    argv = [
        "--model_name_or_path", str(MODEL), "--train_file", str(tmp_path / "train.csv"),
        "--validation_file", str(tmp_path / "dev.csv"), "--test_file", str(tmp_path / "test.csv"),
        "--output_dir", str(out), *TINY, "--max_steps", "2", "--do_train", "--do_eval", "--do_predict",
    ]  # fmt: skip
    script.main(argv)
    assert set(read(out / "eval_results.json")) >= {"eval_accuracy", "eval_loss"}
    lines = (out / "predict_results_None.txt").read_text().splitlines()  # run_glue.py's name without a task
    assert len(lines) == 41 and {line.split("\t")[1] for line in lines[1:]} <= {"entailment", "not_entailment"}


def test_checkpoint_label_order_is_kept():
    from tiny import tiny_base

    from iwtrainer.cli import DataTrainingArguments, TaskData, label_mapping

    model = tiny_base("bert", num_labels=3)
    model.config.label2id = {"CONTRADICTION": 0, "NEUTRAL": 1, "ENTAILMENT": 2}  # e.g. an MNLI checkpoint
    data = TaskData(None, False, ["entailment", "neutral", "contradiction"], ("premise", "hypothesis"), "test")
    mapping = label_mapping(model, data, DataTrainingArguments(task_name="mnli", glue_dir=None))
    assert mapping == {0: 2, 1: 1, 2: 0}
    assert model.config.id2label == {2: "entailment", 1: "neutral", 0: "contradiction"}


@pytest.mark.slow
@needs_shared
def test_full_fine_tuning(script, tmp_path):
    out = tmp_path / "full"
    script.main(base_args(out, "rte", "--do_train", "--do_eval", "--adapter", "full", "--max_steps", "2"))
    results = read(out / "all_results.json")
    assert results["adapter"] == "full" and results["trainable_params"] > 22_000_000  # every weight
    assert "eval_accuracy" in results and (out / "model.safetensors").is_file()
    assert not (out / "iw_importance.json").exists() and not (out / "adapter_config.json").exists()


@pytest.mark.slow
@needs_shared
def test_wsa(script, tmp_path):
    out = tmp_path / "wsa"
    script.main(base_args(out, "rte", "--do_train", "--do_eval", "--adapter", "wsa", "--max_steps", "2"))
    ranks = read(out / "wsa_ranks.json")
    assert len(ranks) == 36 and all(r["r_init"] == 16 and 0 <= r["r_eff"] <= 16 for r in ranks.values())
    assert (out / "wsa_config.json").is_file() and (out / "wsa_model.safetensors").is_file()
    results = read(out / "all_results.json")
    assert results["adapter"] == "wsa" and "eval_accuracy" in results
    assert not (out / "iw_importance.json").exists()


@pytest.mark.slow
@needs_shared
def test_yaml_config_with_overrides_in_a_subprocess(tmp_path):
    out = tmp_path / "yaml"
    cmd = [
        sys.executable, str(SCRIPT), "configs/minilm_rte_iwlora.yaml",
        "--model_name_or_path", str(MODEL), "--glue_dir", str(GLUE), "--output_dir", str(out),
        *TINY, "--max_steps", "3", "--eval_strategy", "no",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read(out / "trainer_state.json")["global_step"] == 3  # flag beat the file's 3 epochs
    settings = read(out / "iw_importance.json")["settings"]
    assert settings["iw_calib_steps"] == 2 and settings["iw_alpha"] == pytest.approx(1e-4)  # file's alpha kept
    assert read(out / "all_results.json")["eval_samples"] == 32


# ---- bad input: one line naming the flag or file, non-zero exit, nothing written ----------------------------------
def glue_copy(tmp_path: Path, train_lines: list[str]) -> Path:
    """A GLUE dir whose RTE/train.tsv is ``train_lines`` (dev.tsv is the real one)."""
    root = tmp_path / "glue"
    (root / "RTE").mkdir(parents=True)
    (root / "RTE" / "train.tsv").write_text("\n".join(train_lines) + "\n")
    (root / "RTE" / "dev.tsv").write_text((GLUE / "RTE" / "dev.tsv").read_text())
    return root


BAD_INPUTS = {
    "unknown task": (lambda tmp: ["--task_name", "mnli2"], ["--task_name 'mnli2'", "expected one of"]),
    "glue_dir without the task": (lambda tmp: ["--glue_dir", str(tmp)], ["--glue_dir", "has no folder RTE/"]),
    "tsv missing a column": (
        lambda tmp: ["--glue_dir", str(glue_copy(tmp, ["index\tsentence1\tlabel", "0\ta\tentailment"]))],
        ["train.tsv", "missing required column(s) ['sentence2']"],
    ),
    "label outside the task's set": (
        lambda tmp: ["--glue_dir", str(glue_copy(tmp, ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tmaybe"]))],
        ["train.tsv", "label 'maybe'", "expected one of ['entailment', 'not_entailment']"],
    ),
    "targets matching nothing": (
        lambda tmp: ["--lora_target_modules", "q_proj,v_proj"],
        ["--lora_target_modules ['q_proj', 'v_proj'] matched no", "candidates:", "attention.self.query"],
    ),
    "missing model path": (
        lambda tmp: ["--model_name_or_path", str(tmp / "no_model")],
        ["--model_name_or_path", "no_model' does not exist"],
    ),
    "iw_alpha with full": (
        lambda tmp: ["--adapter", "full", "--iw_alpha", "1e-4"],
        ["--iw_alpha 0.0001", "--adapter full"],
    ),
    "iw_alpha with wsa": (
        lambda tmp: ["--adapter", "wsa", "--iw_alpha", "0.01"],
        ["--iw_alpha 0.01", "--adapter wsa"],
    ),
    "predict without a test split": (
        lambda tmp: ["--glue_dir", str(glue_copy(tmp, ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"])),
                     "--do_predict"],
        ["--do_predict needs a 'test' split", "--glue_dir"],
    ),
}  # fmt: skip


@pytest.mark.slow
@needs_shared
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_with_one_line_and_writes_nothing(script, tmp_path, case):
    make_args, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    tmp = tmp_path / "in"
    tmp.mkdir()
    argv = base_args(out, "rte", "--do_train", "--do_eval") + make_args(tmp)  # later flags win
    message = user_error(script, argv)
    for text in expected:
        assert text in message, message
    assert not out.exists()


@pytest.mark.slow
@needs_shared
def test_bad_input_in_a_subprocess_prints_one_line(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), *base_args(out, "rte", "--do_train"), "--lora_target_modules", "nope"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("run_glue_iw.py: error: --lora_target_modules ['nope'] matched no")
    assert not out.exists()

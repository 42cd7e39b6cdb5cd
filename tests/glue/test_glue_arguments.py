"""run_glue_iw.py's command line (iwtrainer.glue.arguments): config files and overrides, ``--hpo_*`` flags and keys,
the methods' own flags, per-method defaults, and the shipped configs."""

from __future__ import annotations

import dataclasses
import json
import tempfile

import pytest
import yaml
from helpers import ROOT, common_flags
from tiny import tiny_base

from iwtrainer import IWTrainingArguments
from iwtrainer.glue.arguments import (
    DataTrainingArguments,
    HpoArguments,
    ModelArguments,
    ParsedArgs,
    build_parser,
    parse_args,
)
from iwtrainer.glue.search import search_space
from iwtrainer.methods import METHODS, AdapterArguments, build_adapter
from iwtrainer.methods.adalora import AdaLoraArguments
from iwtrainer.methods.gradnorm import GradNormArguments
from iwtrainer.methods.wsa import WSAArguments


def write_yaml(path, data: dict):
    path.write_text(yaml.safe_dump(data))
    return path


# ---- config files and overrides -----------------------------------------------------------------------------------
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
    )[:4]
    assert model_args.model_name_or_path == "some/model"
    assert data_args.task_name == "rte"
    assert training_args.iw_alpha == 0 and training_args.learning_rate == pytest.approx(2e-4)
    assert training_args.output_dir == str(tmp_path / "y") and training_args.do_train
    assert adapter_args.lora_target_modules == ["key", "dense"]  # replaces the file's list, does not extend it
    _, _, adapter_args, training_args = parse_args([str(cfg)])[:4]
    assert adapter_args.lora_target_modules == ["query", "value"] and training_args.iw_alpha == pytest.approx(1e-4)
    _, _, adapter_args, _ = parse_args(
        [str(cfg), "--lora_target_modules", "query", "key", "--lora_target_modules", "value,dense"]
    )[:4]
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


def test_parsed_args_keep_the_old_order_and_map_each_methods_arguments(tmp_path):
    parsed = parse_args([*common_flags(tmp_path), "--adapter", "gradnorm", "--rank_budget", "30"])
    assert isinstance(parsed, ParsedArgs) and isinstance(parsed, tuple)
    names = ("model_args", "data_args", "adapter_args", "training_args", "hpo_args", "method_args")
    assert ParsedArgs._fields[:6] == names  # later additions go at the end
    types = (ModelArguments, DataTrainingArguments, AdapterArguments, IWTrainingArguments, HpoArguments, dict)
    assert all(isinstance(value, kind) for value, kind in zip(parsed, types))
    assert parsed[2] is parsed.adapter_args and parsed[3] is parsed.training_args  # earlier releases' positions
    expected = {m.arguments for m in METHODS.values() if m.arguments is not None}
    assert {AdaLoraArguments, GradNormArguments, WSAArguments} <= expected
    assert set(parsed.method_args) == expected
    assert all(type(value) is cls for cls, value in parsed.method_args.items())
    assert parsed.method_args[GradNormArguments] == GradNormArguments(rank_budget=30)
    assert (
        parsed.method_args[WSAArguments] == WSAArguments()
        and parsed.method_args[AdaLoraArguments] == AdaLoraArguments()
    )
    wsa = parse_args([*common_flags(tmp_path), "--adapter", "wsa", "--wsa_r_init", "4"])
    assert wsa.method_args[WSAArguments] == WSAArguments(wsa_r_init=4)
    with pytest.raises(ValueError) as info:  # another method's flag would silently do nothing
        parse_args([*common_flags(tmp_path), "--rank_budget", "30"])
    assert str(info.value).startswith(
        "--rank_budget is a flag of --adapter gradnorm; it has no effect with --adapter lora"
    )


def test_config_with_hpo_keys_and_overrides_in_one_parse_without_temp_files(tmp_path, monkeypatch):
    cfg = write_yaml(
        tmp_path / "run.yaml",
        {"model_name_or_path": "m/x", "task_name": "rte", "hpo_trials": 4, "hpo_study_name": "s", "lora_r": 4,
         "adapter": "adalora", "adalora_delta_t": 5, "iw_beta": 2.0},
    )  # fmt: skip

    def no_temp_files(*args, **kwargs):
        raise AssertionError("parse_args must not write temporary files")

    for name in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryFile", "TemporaryDirectory"):
        monkeypatch.setattr(tempfile, name, no_temp_files)
    parser_calls = []
    real_parse = type(build_parser()).parse_args

    def counting(self, *args, **kwargs):
        parser_calls.append(args)
        return real_parse(self, *args, **kwargs)

    monkeypatch.setattr(type(build_parser()), "parse_args", counting)
    parsed = parse_args([str(cfg), "--hpo_trials", "2", "--lora_r", "6", "--hpo_direction", "minimize"])
    assert len(parser_calls) == 1  # one parser, one pass: no second parser for the hpo_* keys
    assert parsed.hpo_args == HpoArguments(hpo_trials=2, hpo_study_name="s", hpo_direction="minimize")
    assert parsed.adapter_args.lora_r == 6 and parsed.training_args.iw_beta == 2.0
    assert parsed.method_args[AdaLoraArguments].adalora_delta_t == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_help_lists_search_and_method_flags(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    flags = ["--hpo_trials", "--hpo_backend", "--hpo_space", "--hpo_storage", "--hpo_direction", "--adapter",
             "--rank_allocation", "--lora_target_modules", "--iw_alpha", "--iw_normalize"]  # fmt: skip
    for method in METHODS.values():
        if method.arguments is not None:
            flags += [f"--{f.name}" for f in dataclasses.fields(method.arguments)]
    assert {"--adalora_tinit_frac", "--rank_allocation_mode", "--rank_calib_steps", "--wsa_r_init"} <= set(flags)
    missing = [flag for flag in flags if flag not in text]
    assert not missing, missing
    assert "{" + ",".join(METHODS) + "}" in text  # --adapter's choices, in the registry's order


def test_adapter_choices_are_the_registry():
    parser = build_parser()
    action = parser._option_string_actions["--adapter"]
    assert list(action.choices) == list(METHODS)
    assert {"lora", "gradnorm", "adalora", "wsa", "full"} <= set(METHODS)
    with pytest.raises(SystemExit):  # argparse refuses a name outside the registry
        parser.parse_args(["--model_name_or_path", "m/x", "--adapter", "lorax"])


# ---- per-method defaults ------------------------------------------------------------------------------------------
def test_iw_alpha_for_adapters_without_lora_factors(tmp_path):
    common = common_flags(tmp_path)
    for adapter in ("full", "wsa", "adalora"):
        training_args = parse_args([*common, "--adapter", adapter]).training_args
        assert training_args.iw_alpha == 0  # the default 1e-4 means "IW on LoRA": off when there is no LoRA
        assert parse_args([*common, "--adapter", adapter, "--iw_alpha", "0"])[3].iw_alpha == 0
        with pytest.raises(ValueError, match=rf"--iw_alpha 0.0001 needs plain LoRA factors .*--adapter {adapter}"):
            parse_args([*common, "--adapter", adapter, "--iw_alpha", "1e-4"])
    cfg = write_yaml(tmp_path / "iw.yaml", {"iw_alpha": 1e-4})  # an explicit value in a file counts as given
    with pytest.raises(ValueError, match="--iw_alpha .*--adapter full"):
        parse_args([str(cfg), *common, "--adapter", "full"])
    assert parse_args(common)[3].iw_alpha == pytest.approx(1e-4)


def test_explicit_iw_alpha_without_lora_factors_names_the_methods_that_have_them(tmp_path):
    with pytest.raises(ValueError) as info:
        parse_args([*common_flags(tmp_path), "--adapter", "adalora", "--iw_alpha", "1e-4"])
    message = str(info.value)
    with_factors = [name for name, method in METHODS.items() if method.uses_iw]
    assert message.startswith(f"--iw_alpha 0.0001 needs plain LoRA factors (--adapter {' or '.join(with_factors)}); ")
    assert "lora or gradnorm" in message and "--adapter adalora has none to weight: pass --iw_alpha 0" in message
    for name in with_factors:  # methods with LoRA factors keep the IW default and accept a value
        assert parse_args([*common_flags(tmp_path), "--adapter", name])[3].iw_alpha == pytest.approx(1e-4)
        assert parse_args([*common_flags(tmp_path), "--adapter", name, "--iw_alpha", "0.5"])[3].iw_alpha == 0.5


def test_adapter_gradnorm_is_the_deprecated_rank_allocation_gradnorm(tmp_path):
    new = parse_args([*common_flags(tmp_path), "--adapter", "gradnorm", "--lora_r", "2", "--rank_min", "1"])
    old = parse_args([*common_flags(tmp_path), "--rank_allocation", "gradnorm", "--lora_r", "2", "--rank_min", "1"])
    assert new.adapter_args.adapter == old.adapter_args.adapter == "gradnorm"
    assert (new.adapter_args.rank_allocation, old.adapter_args.rank_allocation) == ("none", "gradnorm")
    assert dataclasses.replace(old.adapter_args, rank_allocation="none") == new.adapter_args
    assert old.method_args == new.method_args and old.hpo_args == new.hpo_args
    assert old.training_args.iw_alpha == new.training_args.iw_alpha == pytest.approx(1e-4)
    assert old.training_args.to_dict() == new.training_args.to_dict()
    setups = [
        build_adapter(tiny_base("bert"), p.adapter_args, p.training_args, options=p.method_args) for p in (new, old)
    ]
    assert setups[0].method == setups[1].method == "gradnorm"
    assert setups[0].target_names == setups[1].target_names and setups[0].head_names == setups[1].head_names
    assert [type(c) for c in setups[0].callbacks] == [type(c) for c in setups[1].callbacks]
    assert setups[0].options == setups[1].options == GradNormArguments(rank_min=1)
    assert setups[0].callbacks[0].min_rank == setups[1].callbacks[0].min_rank == 1
    assert setups[0].callbacks[0].total_rank == setups[1].callbacks[0].total_rank == 12 * 2  # K × r


def test_method_flag_defaults_and_invalid_values(tmp_path):
    parsed = parse_args(common_flags(tmp_path))
    adalora, gradnorm = parsed.method_args[AdaLoraArguments], parsed.method_args[GradNormArguments]
    assert (adalora.adalora_tinit_frac, adalora.adalora_tfinal_frac) == (0.1, 0.2)
    assert (adalora.adalora_delta_t, adalora.adalora_orth_reg_weight) == (10, 0.5)
    assert (parsed.adapter_args.rank_allocation, gradnorm.rank_allocation_mode) == ("none", "ema")
    assert (gradnorm.rank_budget, gradnorm.rank_min, gradnorm.rank_warmup_steps) == (None, 0, None)
    assert gradnorm.rank_calib_steps == 150  # its own flag, no longer --iw_calib_steps
    bad = {
        "--adalora_tinit_frac 0.6 + --adalora_tfinal_frac 0.4 must be < 1": (
            AdaLoraArguments, dict(adalora_tinit_frac=0.6, adalora_tfinal_frac=0.4)
        ),
        "--adalora_delta_t must be >= 1": (AdaLoraArguments, dict(adalora_delta_t=0)),
        "--rank_min must be >= 0": (GradNormArguments, dict(rank_min=-1)),
        "--rank_budget must be >= 1": (GradNormArguments, dict(rank_budget=0)),
        "--rank_allocation_mode must be one of": (GradNormArguments, dict(rank_allocation_mode="faithful")),
        "--rank_calib_steps must be >= 1": (GradNormArguments, dict(rank_calib_steps=0)),
        "--rank_allocation gradnorm allocates LoRA ranks and needs --adapter lora, got --adapter wsa": (
            AdapterArguments, dict(rank_allocation="gradnorm", adapter="wsa")
        ),
    }  # fmt: skip
    for message, (cls, kwargs) in bad.items():
        with pytest.raises(ValueError, match=message.replace("+", r"\+")):
            cls(**kwargs)
    with pytest.raises(ValueError, match="--rank_allocation gradnorm allocates LoRA ranks .*--adapter adalora"):
        parse_args([*common_flags(tmp_path), "--adapter", "adalora", "--rank_allocation", "gradnorm"])


# ---- hpo_* flags and config keys ----------------------------------------------------------------------------------
def test_hpo_flags_and_config_keys(tmp_path, monkeypatch):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"model_name_or_path": "m/x", "task_name": "rte", "do_train": True, "learning_rate": 1e-4,
             "hpo_trials": 4, "hpo_storage": "sqlite:///${HPO_DB}", "output_dir": str(tmp_path / "o")}
        )
    )  # fmt: skip
    monkeypatch.setenv("HPO_DB", "/x/hpo.db")
    argv = [str(cfg), "--hpo_trials=6", "--learning_rate", "3e-4", "--hpo_direction", "minimize"]
    parsed = parse_args(argv)
    hpo, data_args, training_args = parsed.hpo_args, parsed.data_args, parsed.training_args
    assert hpo == HpoArguments(hpo_trials=6, hpo_storage="sqlite:////x/hpo.db", hpo_direction="minimize")
    assert data_args.task_name == "rte" and training_args.learning_rate == 3e-4 and training_args.do_train
    parsed = parse_args(["--model_name_or_path", "m/x", "--task_name", "rte"])
    assert parsed.hpo_args == HpoArguments()
    assert parsed.model_args.model_name_or_path == "m/x" and parsed.data_args.task_name == "rte"  # the rest as given


def test_hpo_config_errors_name_the_original_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": "m/x", "task_name": "rte", "hpo_trails": 2}))
    with pytest.raises(ValueError, match=r"run\.yaml: unknown key 'hpo_trails' \(did you mean 'hpo_trials'\?\)"):
        parse_args([str(cfg)])
    cfg.write_text(yaml.safe_dump({"model_name_or_path": "m/x", "task_name": "rte", "hpo_trials": 2, "lr": 1}))
    with pytest.raises(ValueError) as info:
        parse_args([str(cfg)])
    assert f"{cfg}: unknown key 'lr'" in str(info.value)
    with pytest.raises(ValueError, match="--hpo_backend must be one of"):
        parse_args([*common_flags(tmp_path), "--hpo_backend", "hyperopt"])


def test_minilm_hpo_config_parses(tmp_path, monkeypatch):
    path = ROOT / "configs" / "minilm_rte_hpo.yaml"
    argv = [str(path), "--model_name_or_path", "m/x", "--glue_dir", "/g"]
    parsed = parse_args([*argv, "--output_dir", str(tmp_path)])
    hpo, data_args, adapter_args, training_args = parsed.hpo_args, *parsed[1:4]
    assert (hpo.hpo_trials, hpo.hpo_backend, hpo.hpo_direction, hpo.hpo_space) == (8, "optuna", "maximize", None)
    assert data_args.task_name == "rte" and adapter_args.adapter == "lora" and training_args.iw_alpha > 0
    assert training_args.do_train and training_args.do_eval
    monkeypatch.setenv("MINILM_DIR", "/m")
    monkeypatch.setenv("GLUE_DIR", "/g")
    assert parse_args([str(path), "--hpo-trials", "2"]).hpo_args.hpo_trials == 2  # the dashed spelling too
    monkeypatch.delenv("MINILM_DIR", raising=False)
    with pytest.raises(ValueError) as info:  # the message names the file given
        parse_args([str(path), "--hpo-trials", "2"])
    assert f"(from {path}) but $MINILM_DIR is not set" in str(info.value)
    text = path.read_text()
    assert text.startswith("#") and "${MINILM_DIR}" in text and "${GLUE_DIR}" in text


# ---- the shipped configs ------------------------------------------------------------------------------------------
SEARCH_SPACES = ("hpo_space.yaml",)  # search spaces for --hpo_space, not run configs (tested in test_search.py)
RUN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name not in SEARCH_SPACES)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse(path, tmp_path):
    args = [str(path), "--model_name_or_path", "m/x", "--glue_dir", "/g", "--output_dir", str(tmp_path)]
    raw = yaml.safe_load(path.read_text())
    if raw.get("bf16"):
        args += [
            "--bf16",
            "false",
        ]  # transformers refuses bf16 on a machine without a bf16 GPU; the file's value is raw's
    parsed = parse_args(args)  # hpo_* keys are plain keys of the one parser
    hpo_args, data_args, adapter_args, training_args = parsed.hpo_args, *parsed[1:4]
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
    elif path.name.startswith("mpnet_"):  # the compiled recipe: exactly the flags of the run SPEED.md measured
        assert raw["model_name_or_path"] == "sentence-transformers/all-mpnet-base-v2" and raw["bf16"] is True
        measured = recipe_run_args(tmp_path)
        for group in (1, 2, 3):  # data, adapter and training arguments
            for name in RECIPE_FIELDS[group]:
                assert getattr(parsed[group], name) == getattr(measured[group], name), name
        assert training_args.accelerator_config.non_blocking and not training_args.logging_nan_inf_filter
        assert training_args.iw_calib_group == 8  # measured apart (calib_group.md): the same s_k in fewer passes
    else:
        text = path.read_text()
        assert "${MINILM_DIR}" in text  # placeholder, documented in the header
        # the quickstart falls back to $GLUE_DIR / the hub (--glue_dir's own default); the others name the folder
        assert ("${GLUE_DIR}" in text) != (path.name == "quickstart.yaml")
        assert text.startswith("#")


RECIPE_FIELDS = {
    1: ("task_name", "max_seq_length", "pad_to_max_length", "pad_to_multiple_of"),
    2: ("adapter", "lora_r", "lora_alpha", "lora_dropout"),
    3: ("per_device_train_batch_size", "learning_rate", "warmup_steps", "weight_decay", "num_train_epochs", "iw_alpha",
        "iw_normalize", "iw_calib_steps", "seed", "ddp_find_unused_parameters", "torch_compile", "torch_compile_mode",
        "logging_nan_inf_filter", "accelerator_config", "dataloader_drop_last", "max_steps"),
}  # fmt: skip
"""What configs/mpnet_sst2_iwlora_compiled.yaml shares with the measured run (the rest is where it writes, logs and
evaluates, and the measurement's row limit)."""


def recipe_run_args(tmp_path):
    """run_glue_iw's parsed arguments for bench_run's ``iw:reduce-overhead+nosync`` run, the command behind
    compile_whole_run_nosync.md (its bf16 turned off only to validate on CPU, as the config's is)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_run

    bench_args = bench_run.parser().parse_args(
        ["--model", "m/x", "--glue_dir", "/g", "--configs", "iw:reduce-overhead+nosync@0"]
    )
    cmd, _ = bench_run.build_command(bench_args, "m/x", bench_run.parse_configs(bench_args.configs)[0], tmp_path / "b")
    return parse_args([*cmd[2:], "--bf16", "false"])  # past the interpreter and the script

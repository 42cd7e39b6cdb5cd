"""``run_glue_iw.py --hpo_trials`` (iwtrainer.glue.search): checking a search request against the prepared run, and
the search itself on the real MiniLM and RTE rows from ``../shared`` (else the embedded STS-B sample's pairs in RTE's
layout: the ``glue_for`` fixture). The generic search is tested in ``test_search.py``; the ``hpo_*`` flags and config
keys in ``test_glue_arguments.py``."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import MODEL, in_space, needs_shared, user_error
from tiny import tiny_base

from iwtrainer import IMPORTANCE_FILE, IWTrainingArguments
from iwtrainer.glue.arguments import HpoArguments
from iwtrainer.glue.run import main
from iwtrainer.glue.search import check_search, search_space
from iwtrainer.methods import METHODS, AdapterArguments, build_adapter
from iwtrainer.search import BEST_FILE, DEFAULT_SPACE, RAY_EXTRA, RESULTS_FILE

HAVE_RAY = importlib.util.find_spec("ray") is not None

TINY = [
    "--max_train_samples", "32", "--max_eval_samples", "16", "--max_steps", "2", "--max_seq_length", "32",
    "--iw_calib_steps", "1", "--per_device_eval_batch_size", "16", "--save_strategy", "no", "--disable_tqdm", "true",
    "--dataloader_pin_memory", "false", "--report_to", "none",
]  # fmt: skip


def glue_args(glue: Path, out: Path, *extra: str) -> list[str]:
    """A tiny RTE run of ``glue``'s rows (``glue_for("rte")``)."""
    return [
        "--model_name_or_path", str(MODEL), "--glue_dir", str(glue), "--task_name", "rte", "--do_train", "--do_eval",
        "--output_dir", str(out), *TINY, *extra,
    ]  # fmt: skip


# ---- checking a request against the run ----------------------------------------------------------------------------
def test_search_space_defaults_to_a_copy_of_the_default_space(tmp_path):
    space = search_space(HpoArguments(hpo_trials=2))
    assert space == DEFAULT_SPACE and space is not DEFAULT_SPACE
    space["learning_rate"]["low"] = 1.0
    assert DEFAULT_SPACE["learning_rate"]["low"] == 1e-5  # the module's default is not modified through the copy
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"seed": {"type": "categorical", "choices": [1, 2]}}))
    assert search_space(HpoArguments(hpo_trials=2, hpo_space=str(path))) == {
        "seed": {"type": "categorical", "choices": [1, 2]}
    }


def fake_run(tmp_path, adapter: str, **training) -> SimpleNamespace:
    """What ``check_search`` reads of a prepared ``Run``, with the method really built on a tiny BERT."""
    values = {"do_train": True, "do_eval": True, "iw_alpha": 0.0, **training}
    args = IWTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **values)
    setup = build_adapter(tiny_base("bert"), AdapterArguments(adapter=adapter, lora_r=2), args)
    return SimpleNamespace(
        training_args=args,
        splits={"train": [("rte", None)], "eval": [("rte", None)]},
        setup=setup,
        data_args=SimpleNamespace(task_name="rte"),
        data=SimpleNamespace(is_regression=False),
    )


@pytest.mark.parametrize("adapter", list(METHODS))
def test_check_search_refuses_methods_whose_callbacks_are_bound_to_one_model(tmp_path, adapter):
    space = {k: v for k, v in copy.deepcopy(DEFAULT_SPACE).items() if k != "iw_alpha"}
    run = fake_run(tmp_path, adapter)
    if adapter in ("gradnorm", "adalora"):  # rank allocators: callbacks holding the model they were built for
        with pytest.raises(ValueError) as info:
            check_search(run, HpoArguments(hpo_trials=2), space)
        assert str(info.value) == (
            f"--hpo_trials with --adapter {adapter} is not supported: its trainer callbacks are bound to one model, "
            "but every trial builds a fresh one"
        )
    else:
        assert check_search(run, HpoArguments(hpo_trials=2), space) is None
    if not METHODS[adapter].uses_iw:
        with pytest.raises(ValueError, match=f"'iw_alpha' is searched but --adapter {adapter} has no LoRA factors"):
            check_search(run, HpoArguments(hpo_trials=2), DEFAULT_SPACE)


def test_check_search_needs_train_eval_and_the_right_direction(tmp_path):
    space = copy.deepcopy(DEFAULT_SPACE)
    with pytest.raises(ValueError, match="--hpo_trials > 0 trains one model per trial: it needs --do_train"):
        check_search(fake_run(tmp_path, "lora", do_train=False), HpoArguments(hpo_trials=2), space)
    run = fake_run(tmp_path, "lora")
    run.splits["eval"] = []
    with pytest.raises(ValueError, match="scores each trial on the validation split: it needs --do_eval"):
        check_search(run, HpoArguments(hpo_trials=2), space)
    run = fake_run(tmp_path, "lora")
    run.data_args.task_name, run.data.is_regression = None, True
    with pytest.raises(ValueError, match="the objective is eval_mse; pass --hpo_direction minimize"):
        check_search(run, HpoArguments(hpo_trials=2), space)
    assert check_search(run, HpoArguments(hpo_trials=2, hpo_direction="minimize"), space) is None


# ---- run_glue_iw.py --hpo_trials -----------------------------------------------------------------------------------
@pytest.mark.skipif(HAVE_RAY, reason="ray is installed")
def test_script_ray_backend_without_ray_is_one_line(tmp_path):
    out = tmp_path / "out"
    argv = ["--model_name_or_path", "m/x", "--task_name", "rte", "--do_train", "--do_eval", "--output_dir", str(out)]
    message = user_error([*argv, "--hpo_trials", "2", "--hpo_backend", "ray"])
    assert RAY_EXTRA in message and "ray" in message
    assert not out.exists()


@pytest.mark.slow
@needs_shared
def test_script_search_on_minilm_rte(tmp_path, glue_for):
    out = tmp_path / "out"
    main(glue_args(glue_for("rte"), out, "--hpo_trials", "2", "--do_predict"))
    results = json.loads((out / RESULTS_FILE).read_text())
    assert len(results["trials"]) == 2 and results["n_complete"] == 2
    assert all(in_space(t["params"]) and 0 <= t["objective"] <= 1 for t in results["trials"])
    best = json.loads((out / BEST_FILE).read_text())
    assert in_space(best) and best == results["best"]["params"]
    assert results["best"]["objective"] == max(t["objective"] for t in results["trials"])
    for n in (0, 1):
        record = json.loads((out / f"run-{n}" / IMPORTANCE_FILE).read_text())
        assert len(record["modules"]) == 36  # 6 layers x 6 matrices, calibrated on the trial's model
    assert sorted(p.name for p in out.iterdir()) == [BEST_FILE, RESULTS_FILE, "run-0", "run-1"]  # no run's files


@pytest.mark.slow
@needs_shared
def test_script_search_bad_input_is_one_line_before_anything_is_written(tmp_path, glue_for):
    out, rte = tmp_path / "out", glue_for("rte")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"lora_r": {"type": "int", "low": 2, "high": 8}}))
    message = user_error(glue_args(rte, out, "--hpo_trials", "2", "--hpo_space", str(space)))
    assert str(space) in message and "'lora_r' is not a field of IWTrainingArguments" in message
    message = user_error(glue_args(rte, out, "--hpo_trials", "2", "--adapter", "full", "--iw_alpha", "0"))
    assert "'iw_alpha' is searched but --adapter full" in message
    message = user_error(glue_args(rte, out, "--hpo_trials", "2", "--do_eval", "false"))
    assert "needs --do_eval" in message
    no_iw_alpha = no_alpha(tmp_path)
    message = user_error(glue_args(rte, out, "--hpo_trials", "2", "--adapter", "adalora", "--hpo_space", no_iw_alpha))
    assert "--hpo_trials with --adapter adalora is not supported: its trainer callbacks are bound" in message
    assert not out.exists()


def no_alpha(tmp_path: Path) -> str:
    """The default search space without ``iw_alpha`` (for methods without LoRA factors)."""
    path = tmp_path / "no_alpha.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in DEFAULT_SPACE.items() if k != "iw_alpha"}))
    return str(path)

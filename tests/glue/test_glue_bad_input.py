"""The catalogue of bad input: every case exits non-zero with one line on stderr naming the flag or file and what
was expected, and nothing is written into --output_dir (nothing is created at all).

Cases that parse (no model needed) run in-process; the rest load the real MiniLM and GLUE rows from ../shared.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import GLUE, ROOT, SCRIPT, base_args, common_flags, needs_shared, subprocess_env, user_error

from iwtrainer.glue.run import main


def assert_refused(argv: list[str], expected: list[str], out: Path) -> None:
    """``main(argv)`` stops with one line holding every ``expected`` text, and ``out`` was never created."""
    message = user_error(argv)
    for text in expected:
        assert text in message, message
    assert not out.exists()


def expect_exit(argv: list[str], capsys) -> tuple[int, str]:
    """Run main(argv) expecting it to stop; return (exit status, the one error line)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    code = info.value.code
    if isinstance(code, str):  # our own errors: sys.exit("run_glue_iw.py: error: ...") -> status 1
        return 1, code
    err = capsys.readouterr().err.strip().splitlines()  # argparse's: status 2, printed
    assert err, "no message printed"
    return int(code), err[-1]


# ---- flags and config files (parsing only: no model is loaded) ------------------------------------------------------
def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


PARSE_CASES = {
    "non-numeric alpha": (lambda tmp: ["--iw_alpha", "abc"], 2, ["--iw_alpha", "invalid float value: 'abc'"]),
    "negative alpha": (lambda tmp: ["--iw_alpha", "-1"], 1, ["iw_alpha must be a finite number >= 0, got -1.0"]),
    "unknown normalisation": (lambda tmp: ["--iw_normalize", "softmax"], 2,
                              ["--iw_normalize", "invalid choice: 'softmax'", "'sum', 'max', 'uniform'"]),
    "calibration steps < 1": (lambda tmp: ["--iw_calib_steps", "0"], 1, ["iw_calib_steps must be an integer >= 1"]),
    "max_seq_length <= 0": (lambda tmp: ["--max_seq_length", "0"], 1, ["--max_seq_length must be a positive integer"]),
    "pad multiple <= 0": (lambda tmp: ["--pad_to_max_length", "false", "--pad_to_multiple_of", "0"], 1,
                          ["--pad_to_multiple_of must be a positive integer, got 0"]),
    "pad multiple without dynamic padding": (lambda tmp: ["--pad_to_multiple_of", "32"], 1,
                                             ["--pad_to_multiple_of 32 pads dynamic batches",
                                              "--pad_to_max_length false"]),
    "pad multiple past max_seq_length": (
        lambda tmp: ["--pad_to_max_length", "false", "--pad_to_multiple_of", "48", "--max_seq_length", "128"], 1,
        ["--pad_to_multiple_of 48 must divide --max_seq_length 128"]),
    "batch size 0": (lambda tmp: ["--per_device_train_batch_size", "0"], 1,
                     ["--per_device_train_batch_size must be an integer >= 1, got 0"]),
    "unknown adapter": (lambda tmp: ["--adapter", "lokr"], 2, ["--adapter", "invalid choice: 'lokr'", "'eva'"]),
    "another method's flag": (lambda tmp: ["--adapter", "full", "--rank_budget", "10"], 1,
                              ["--rank_budget is a flag of --adapter gradnorm", "no effect with --adapter full"]),
    "output_dir is a file": (lambda tmp: ["--output_dir", str(write(tmp / "afile", "x"))], 1,
                             ["--output_dir", "afile' is a file; expected a folder"]),
    "resume from nowhere": (lambda tmp: ["--do_train", "--resume_from_checkpoint", str(tmp / "none")], 1,
                            ["--resume_from_checkpoint", "none' does not exist", "checkpoint folder"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PARSE_CASES))
def test_bad_flags_exit_with_one_line(tmp_path, capsys, case):
    make, status, expected = PARSE_CASES[case]
    out = tmp_path / "out"
    code, message = expect_exit([*common_flags(out), *make(tmp_path)], capsys)
    assert code == status and ": error: " in message, message  # argparse's prog is the command's own name
    for text in expected:
        assert text in message, message
    assert not out.exists()


def test_unknown_yaml_key_is_named_with_a_suggestion(tmp_path):
    config = write(tmp_path / "typo.yaml", "task_name: rte\nlearnign_rate: 1.0e-4\n")
    out = tmp_path / "out"
    message = user_error([str(config), "--model_name_or_path", "m/x", "--output_dir", str(out)])
    assert "typo.yaml: unknown key 'learnign_rate' (did you mean 'learning_rate'?)" in message
    assert not out.exists()


# ---- data, files and runs (load the real encoder and GLUE rows) -----------------------------------------------------
def glue_copy(tmp_path: Path, train_lines: list[str]) -> Path:
    """A GLUE dir whose RTE/train.tsv is ``train_lines`` (dev.tsv: the real one, else one synthetic row)."""
    root = tmp_path / "glue"
    (root / "RTE").mkdir(parents=True)
    (root / "RTE" / "train.tsv").write_text("\n".join(train_lines) + "\n")
    dev = GLUE / "RTE" / "dev.tsv"
    rows = dev.read_text() if dev.is_file() else "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n"
    (root / "RTE" / "dev.tsv").write_text(rows)
    return root


def rte_copy(tmp_path: Path, train_lines: list[str]) -> list[str]:
    """``--glue_dir`` of :func:`glue_copy` and ``--task_name rte`` (base_args runs STS-B without ../shared)."""
    return ["--glue_dir", str(glue_copy(tmp_path, train_lines)), "--task_name", "rte"]


def csv_file(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def custom_files(tmp: Path, train_lines: list[str]) -> list[str]:
    """--train_file/--validation_file flags for a CSV task (the GLUE task flags are dropped)."""
    dev = csv_file(tmp / "dev.csv", ["sentence,label", "ok,1"])
    return ["--train_file", str(csv_file(tmp / "train.csv", train_lines)), "--validation_file", str(dev)]


BAD_INPUTS = {
    "unknown task": (lambda tmp: ["--task_name", "mnli2"], ["--task_name 'mnli2'", "expected one of"]),
    "glue_dir without the task": (lambda tmp: ["--glue_dir", str(tmp)], ["--glue_dir", "has no folder "]),
    "tsv missing a column": (
        lambda tmp: rte_copy(tmp, ["index\tsentence1\tlabel", "0\ta\tentailment"]),
        ["train.tsv", "missing required column(s) ['sentence2']"],
    ),
    "label outside the task's set": (
        lambda tmp: rte_copy(tmp, ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tmaybe"]),
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
    "train TSV with only a header": (
        lambda tmp: rte_copy(tmp, ["index\tsentence1\tsentence2\tlabel"]),
        ["--do_train", "the 'train' split", "has no rows"],
    ),
    "empty CSV train file": (lambda tmp: custom_files(tmp, []), ["--train_file", "train.csv' is empty", "header row"]),
    "CSV train file with only a header": (
        lambda tmp: custom_files(tmp, ["sentence,label"]), ["--train_file", "has a header but no rows"],
    ),
    "predict without a test split": (
        lambda tmp: [*rte_copy(tmp, ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"]), "--do_predict"],
        ["--do_predict needs a 'test' split", "--glue_dir"],
    ),
}  # fmt: skip


@pytest.mark.slow
@needs_shared
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_with_one_line_and_writes_nothing(tmp_path, case):
    make_args, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    tmp = tmp_path / "in"
    tmp.mkdir()
    extra = make_args(tmp)
    argv = base_args(out, "rte", "--do_train", "--do_eval")
    if "--train_file" in extra:  # a custom-file task: no GLUE task, no GLUE dir
        for flag in ("--task_name", "--glue_dir"):
            i = argv.index(flag)
            del argv[i : i + 2]
    assert_refused([*argv, *extra], expected, out)  # later flags win


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
def test_invalid_combinations_exit_with_one_line(tmp_path, case):
    flags, expected = BAD[case]
    out = tmp_path / "out"
    assert_refused(base_args(out, "rte", "--do_train", *flags), expected, out)


@pytest.mark.slow
@needs_shared
def test_report_to_an_integration_that_is_not_installed(tmp_path, monkeypatch):
    import transformers.integrations.integration_utils as integrations

    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: False)  # as on a machine without it
    out = tmp_path / "out"
    message = user_error(base_args(out, "rte", "--do_train", "--report_to", "tensorboard"))
    assert message.startswith("run_glue_iw.py: error: --report_to tensorboard: ") and "tensorboard" in message[40:]
    assert not out.exists()


@pytest.mark.slow
@needs_shared
def test_resume_with_other_targets_or_without_the_importance_record(tmp_path):
    out = tmp_path / "run"
    flags = ["--do_train", "--save_strategy", "steps", "--save_steps", "2", "--iw_alpha", "1e-3"]
    main(base_args(out, "rte", *flags))
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    message = user_error(base_args(out, "rte", *flags, "--lora_target_modules", "query,value"))
    assert "lora_target_modules: None there, ['query', 'value'] now" in message  # not an optimizer-state size error
    (out / "checkpoint-4" / "iw_importance.json").unlink()
    message = user_error(base_args(out, "rte", *flags))
    assert "(checkpoint-4) has no iw_importance.json" in message and "original calibration" in message
    after = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert after == [n for n in before if n != "checkpoint-4/iw_importance.json"]  # the refusals wrote nothing

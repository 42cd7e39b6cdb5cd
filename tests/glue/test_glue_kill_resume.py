"""Exact resume after a real crash: a run SIGKILLed right after a checkpoint and started again with the same command
ends with the same weights as the uninterrupted run (CPU, dropout on), for every method that can resume; AdaLoRA,
which cannot resume exactly, refuses with the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, SCRIPT, base_args, e2e, subprocess_env
from safetensors.torch import load_file

pytestmark = e2e
KILLER = ROOT / "tests" / "scripts" / "killed_run.py"
RUN = ["--do_train", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--lora_dropout", "0.1"]
CASES = {
    "iw-lora": ["--iw_alpha", "1e-2"],
    "delta-l2": ["--iw_alpha", "1e-2", "--iw_normalize", "uniform"],
    "gradnorm, in the warm-up": ["--adapter", "gradnorm", "--rank_warmup_steps", "3"],
    "gradnorm, allocated": ["--adapter", "gradnorm", "--rank_warmup_steps", "1", "--iw_alpha", "1e-2"],
    "gradnorm calibration": ["--adapter", "gradnorm", "--rank_allocation_mode", "calibration",
                             "--rank_calib_steps", "2"],
    "wsa": ["--adapter", "wsa", "--wsa_prune_threshold", "0"],
    "full": ["--adapter", "full", "--learning_rate", "1e-5"],
    "pissa": ["--adapter", "pissa"],
    "dora": ["--adapter", "dora"],
    "eva": ["--adapter", "eva", "--iw_alpha", "1e-2"],
}  # fmt: skip
WEIGHTS = ("adapter_model.safetensors", "wsa_model.safetensors", "model.safetensors")


def run(args: list[str], kill_at: int | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(KILLER), str(kill_at), *args] if kill_at else [sys.executable, str(SCRIPT), *args]
    # Bitwise equality across processes needs one summation order in every matrix product: MKL may otherwise run a
    # product on fewer threads when the machine is busy (a full fine-tuning case once failed so in CI, rarely).
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    name = next(n for n in WEIGHTS if (folder / n).is_file())
    return load_file(str(folder / name))


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path, case):
    flags = [*RUN, *CASES[case]]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    done = run(base_args(straight, "rte", *flags))
    assert done.returncode == 0, done.stderr[-3000:]
    killed = run(base_args(crashed, "rte", *flags), kill_at=2)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])  # SIGKILL: no cleanup ran
    assert (crashed / "checkpoint-2").is_dir() and not (crashed / "checkpoint-4").exists()
    resumed = run(base_args(crashed, "rte", *flags))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming training at" in resumed.stdout
    if "--iw_alpha" in flags:
        assert "reusing importance weights" in resumed.stdout  # never recalibrated
    expected, got = weights(straight), weights(crashed)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key


def test_adalora_refuses_to_resume_with_the_reason(tmp_path):
    out = tmp_path / "adalora"
    flags = [*RUN, "--adapter", "adalora", "--adalora_delta_t", "1"]
    killed = run(base_args(out, "rte", *flags), kill_at=2)
    assert killed.returncode == -9
    again = run(base_args(out, "rte", *flags))
    assert again.returncode == 1
    message = again.stderr.strip().splitlines()[-1]
    assert message.startswith("run_glue_iw.py: error:") and "cannot be resumed" in message
    assert "importance EMAs" in message and "--overwrite_output_dir" in message

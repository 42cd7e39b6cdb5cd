"""Exact resume after a real crash: a run SIGKILLed right after a checkpoint and started again with the same command
ends with the same weights as the uninterrupted run (CPU, dropout on), for every method — AdaLoRA killed during its
budgeting (masks changing every step) and after its final mask too."""

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
    "iw-lora, killed mid online calibration": ["--iw_alpha", "1e-2", "--iw_calibration", "online",
                                               "--iw_calib_steps", "3"],
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
    # 4 steps, tinit 0, tfinal 1: steps 0-2 budget (a mask every step), step 3 final; killed after step 2
    "adalora, budgeting": ["--adapter", "adalora", "--adalora_delta_t", "1", "--adalora_tinit_frac", "0",
                           "--adalora_tfinal_frac", "0.25"],
    # tfinal 2: the final mask at step index 2; killed after 2 steps, resumed at step 2 -> the final mask is applied
    # in the resumed run; with tfinal 3 it falls at index 1, before the kill, and the resumed run masks by pattern
    "adalora, after the final mask": ["--adapter", "adalora", "--adalora_delta_t", "1", "--adalora_tinit_frac", "0",
                                      "--adalora_tfinal_frac", "0.7"],
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
    if "online" in flags:
        assert "continuing online calibration" in resumed.stdout  # the partial sums, not a fresh start
    elif "--iw_alpha" in flags:
        assert "reusing importance weights" in resumed.stdout  # never recalibrated
    expected, got = weights(straight), weights(crashed)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key


def test_adalora_checkpoint_without_its_state_is_refused_in_one_line(tmp_path):
    out = tmp_path / "adalora"
    flags = [*RUN, "--adapter", "adalora", "--adalora_delta_t", "1"]
    killed = run(base_args(out, "rte", *flags), kill_at=2)
    assert killed.returncode == -9
    (out / "checkpoint-2" / "adalora_state.pt").unlink()  # as a checkpoint of an older iwtrainer
    again = run(base_args(out, "rte", *flags))
    assert again.returncode == 1
    message = again.stderr.strip().splitlines()[-1]
    assert message.startswith("run_glue_iw.py: error:") and "adalora_state.pt" in message
    assert "importance EMAs" in message and "--overwrite_output_dir" in message

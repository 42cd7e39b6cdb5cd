"""Two CPU processes (gloo) vs one process with the same global batch: same sensitivities, same adapter weights
(the trainer alone, and run_glue_iw.py under torchrun)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import GLUE, MODEL, SCRIPT, e2e_task, needs_shared

from iwtrainer.importance import IMPORTANCE_FILE

WORKER = Path(__file__).parent / "scripts" / "ddp_train.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("calibration", ["separate", "online"])
def test_two_processes_match_one(tmp_path, calibration):
    """``online``: one process keeps each target's sum only until its last gradient arrives, two processes keep a
    flat buffer and all-reduce it after the step; the training moves the model between the measured steps."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(WORKER), str(one), "16", calibration])
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(WORKER), str(two), "16", calibration]
    )  # fmt: skip
    single = torch.load(one / "rank0.pt")
    r0, r1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")

    # Every rank holds bit-identical numbers (all-reduced), equal to the one-process full-batch measurement.
    assert r0["sensitivities"] == r1["sensitivities"]
    assert r0["sensitivities"] == pytest.approx(single["sensitivities"], rel=1e-5)
    # The penalty is added once per rank and DDP averages: same update as one process.
    for k, v in single["state"].items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-4, atol=1e-6, msg=k)
        assert torch.equal(r0["state"][k], r1["state"][k])
    losses = lambda log: [h["loss"] for h in log if "loss" in h]  # noqa: E731
    assert losses(r0["log"]) == pytest.approx(losses(single["log"]), rel=1e-4)


@pytest.mark.slow
@needs_shared
def test_run_glue_iw_under_torchrun_matches_one_process(tmp_path):
    """The script itself under a launcher (real MiniLM, real SST-2 rows): one set of output files, and the
    calibration of 2 processes × 4 rows equals 1 process × 8 rows."""
    common = [
        str(SCRIPT), "--model_name_or_path", str(MODEL), "--glue_dir", str(GLUE), "--task_name", e2e_task("sst2"),
        "--do_train", "--do_eval", "--max_train_samples", "64", "--max_eval_samples", "32", "--max_steps", "2",
        "--iw_calib_steps", "3", "--max_seq_length", "32", "--save_strategy", "no", "--disable_tqdm", "true",
        "--report_to", "none", "--seed", "3",
    ]  # fmt: skip
    _run([sys.executable, *common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "8"])
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), *common, "--output_dir", str(tmp_path / "two"),
         "--per_device_train_batch_size", "4", "--ddp_backend", "gloo", "--use_cpu", "true"]
    )  # fmt: skip
    one = json.loads((tmp_path / "one" / IMPORTANCE_FILE).read_text())["modules"]
    two = json.loads((tmp_path / "two" / IMPORTANCE_FILE).read_text())["modules"]
    assert set(one) == set(two) and len(one) == 36  # 6 layers × (q, k, v, o, up, down)
    for k in one:
        assert two[k]["sensitivity"] == pytest.approx(one[k]["sensitivity"], rel=1e-5), k
    results = json.loads((tmp_path / "two" / "all_results.json").read_text())
    assert results["train_samples"] == 64 and results["eval_samples"] == 32
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix == ".tmp") == []

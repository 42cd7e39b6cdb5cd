"""Two CPU processes (gloo) vs one process with the same global batch: same sensitivities, same adapter weights."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(WORKER), str(one), "16"])
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(WORKER), str(two), "16"]
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

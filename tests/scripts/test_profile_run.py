"""benchmarks/profile_run.py: ``run_glue_iw.py`` with ``torch.profiler`` over a window of optimizer steps. On CPU: a
tiny real run writes the rank's summary for exactly the profiled steps, and bad flags give one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import base_args, needs_shared

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import profile_run  # noqa: E402

import iwtrainer.glue.run as run  # noqa: E402


@needs_shared
def test_profiles_the_window_and_writes_the_rank_summary(tmp_path):
    prof = tmp_path / "prof"
    argv = ["--profile_dir", str(prof), "--profile_start", "1", "--profile_steps", "2", "--",
            *base_args(tmp_path / "run", "rte", "--do_train", "--iw_alpha", "1e-4")]  # fmt: skip
    original = run.GlueTrainer
    profile_run.main(argv)
    assert run.GlueTrainer is original  # the patch does not outlive the run
    summary = json.loads((prof / "rank0.json").read_text())
    assert summary["rank"] == 0 and summary["steps"] == 2 and summary["wall_ms_per_step"] > 0
    names = [r["name"] for r in summary["top_host"]]
    assert len(names) == profile_run.TOP and any(n.startswith("aten::") for n in names)
    # every op of a training step ran in each profiled step: the optimizer's AdamW step, once a step
    adam = [r for r in summary["top_host"] + summary["top_device"] if "AdamW" in r["name"]]
    assert adam and all(r["calls_per_step"] == pytest.approx(1.0) for r in adam)
    assert summary["host_waits"] == [] and summary["device_busy_ms_per_step"] == 0  # CPU: nothing to wait for
    md = (prof / "rank0.md").read_text()
    assert md.startswith("# Profile of 2 Trainer steps, rank 0") and "### Host waits" in md


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--profile_dir", "d"], "expected `-- <run_glue_iw.py flags>`"),
        (["--profile_dir", "d", "--profile_steps", "0", "--"], "--profile_steps: expected a positive integer, got 0"),
    ],
)
def test_bad_flags_give_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        profile_run.main(argv)
    assert exc.value.code == 2 and expected in capsys.readouterr().err


def test_profile_ddp_gives_each_run_exactly_its_gpus(tmp_path):
    """benchmarks/profile_ddp.sh: a 1-process run must see one GPU (seeing two, the Trainer would wrap the model in
    nn.DataParallel over both), a 2-process run two; PROCS selects the process counts, VARIANTS the variants. A
    stand-in for python prints what each launch would get."""
    import subprocess

    fake = tmp_path / "py"
    fake.write_text('#!/bin/sh\necho "visible=$CUDA_VISIBLE_DEVICES procs=$4"\n')
    fake.chmod(0o755)

    def launches(procs: str | None, variants: str | None = None) -> list[str]:
        env = {"PATH": "/usr/bin:/bin", "PY": str(fake)} | ({"PROCS": procs} if procs else {})
        env |= {"VARIANTS": variants} if variants else {}
        cmd = ["bash", str(ROOT / "benchmarks" / "profile_ddp.sh"), "M", "G", str(tmp_path / "out"), "lora"]
        (tmp_path / "out").mkdir(exist_ok=True)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        return [line for line in out.splitlines() if line.startswith("visible=")]

    assert launches(None) == ["visible=0 procs=1"] * 2 + ["visible=0,1 procs=2"] * 2  # plain, nosync each
    assert launches("2") == ["visible=0,1 procs=2"] * 2
    assert launches("1", "nosync") == ["visible=0 procs=1"]


def test_gpu_busy_counts_each_kernel_once_and_collectives_apart():
    """key_averages() lists a kernel's time three times over: on the kernel's own row, as the "self" device time of
    the host op that launched it, and inside an annotated range on the GPU's timeline. Only kernel rows count, and the
    collectives' kernels (which run until every rank has joined) are reported apart."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(key, device_us, device_type=DeviceType.CUDA, annotation=False, cpu_us=0.0):
        return SimpleNamespace(key=key, count=2, self_cpu_time_total=cpu_us, self_device_time_total=device_us,
                               device_type=device_type, is_user_annotation=annotation)  # fmt: skip

    events = [
        event("aten::mm", 4000.0, DeviceType.CPU, cpu_us=300.0),  # the host op: its kernel's time again
        event("nvjet_sm90_gemm", 4000.0),  # the kernel
        event("triton_poi_fused_add", 1000.0),
        event("## Call CompiledFxGraph abc ##", 5000.0, annotation=True),  # a range spanning both kernels
        event("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 6000.0),
        event("nccl:all_reduce", 6000.0, annotation=True),
        event("cudaStreamSynchronize", 0.0, DeviceType.CPU, cpu_us=800.0),
    ]
    s = profile_run.summarize(events, steps=2, wall_s=0.02, rank=0)
    assert s["device_busy_ms_per_step"] == pytest.approx(2.5)  # (4 + 1 ms) over 2 steps
    assert s["collective_kernels_ms_per_step"] == pytest.approx(3.0)
    assert s["wall_ms_per_step"] == pytest.approx(10.0)
    assert [r["name"] for r in s["host_waits"]] == ["cudaStreamSynchronize"]
    md = profile_run.markdown(s, "cmd")
    assert "- GPU compute kernels: 2.50 ms/step (25% of the wall time); collective kernels 3.00 ms/step" in md

"""``run_glue_iw.py`` with ``torch.profiler`` over a window of optimizer steps, on every rank: where a step goes.

    python benchmarks/profile_run.py --profile_dir DIR [--profile_start 100] [--profile_steps 10] \\
        -- <run_glue_iw.py flags>
    accelerate launch --num_processes 2 --multi_gpu benchmarks/profile_run.py --profile_dir DIR -- <flags>

Why: a compiled step of the Trainer takes 22–32 ms on all-mpnet-base-v2 where the same compiled graphs alone take
9–17 ms (``bench_step``), and DDP adds a roughly fixed 3–13 ms a step (SPEED.md). Step rates cannot say where that
time goes; a profile of real Trainer steps can: how long the host waits for the device (stream and device
synchronisations, blocking copies) and how often, what the collectives cost, the busiest host ops, and how busy the
GPU is over the window.

The window starts at the optimizer step ``--profile_start`` (after calibration and the first compile) and covers
``--profile_steps`` steps; the device is synchronised at both ends of the window (two waits outside it). Each rank
writes ``DIR/rank{R}.json`` and ``DIR/rank{R}.md``; ``--trace`` also writes the Chrome trace (tens of MB).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from transformers import TrainerCallback

import iwtrainer.glue.run as run

# CUDA runtime calls that block the host until the device is done (a blocking copy and a host read of a device value
# both end in cudaStreamSynchronize): a step waiting on any of these cannot queue the next one while the GPU works.
# (aten::_local_scalar_dense is not one: it also reads CPU tensors, e.g. AdamW's step counts, ~80 a step here.)
WAITS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"})
TOP = 25


def _device_us(event) -> float:
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))


def _is_kernel(event) -> bool:
    """A kernel (or device copy) on the GPU's timeline, not a host op or an annotated range: a host op's "self"
    device time is its kernels' time again, and a range (``record_function``: ``## Call CompiledFxGraph ##``,
    ``DistributedDataParallel.forward``, ``nccl:all_reduce``) also shows on the GPU's timeline spanning its kernels,
    so summing every row counts the same kernel two or three times."""
    return getattr(event, "device_type", DeviceType.CPU) != DeviceType.CPU and not getattr(
        event, "is_user_annotation", False
    )


def summarize(events, steps: int, wall_s: float, rank: int) -> dict:
    """Per-step figures of the profiled window from ``profile.key_averages()``'s events."""
    rows = [
        {
            "name": e.key,
            "calls_per_step": e.count / steps,
            "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / steps,
            "device_ms_per_step": _device_us(e) / 1000 / steps,
            "kernel": _is_kernel(e),
        }
        for e in events
    ]
    waits = [r for r in rows if r["name"] in WAITS]
    collectives = [r for r in rows if "nccl" in r["name"].lower() or r["name"].startswith("c10d::")]
    kernels = [r for r in rows if r["kernel"]]
    nccl = sum(r["device_ms_per_step"] for r in kernels if "nccl" in r["name"].lower())
    return {
        "rank": rank,
        "steps": steps,
        "wall_ms_per_step": wall_s * 1000 / steps,
        # the kernels' device time, each kernel once (0 on CPU): compute apart from collectives, whose kernels run
        # from their launch until every rank has joined, so their time is mostly one rank waiting for the other
        "device_busy_ms_per_step": sum(r["device_ms_per_step"] for r in kernels) - nccl,
        "collective_kernels_ms_per_step": nccl,
        "host_waits": sorted(waits, key=lambda r: -r["self_cpu_ms_per_step"]),
        "collectives": sorted(collectives, key=lambda r: -r["self_cpu_ms_per_step"]),
        "top_host": sorted(rows, key=lambda r: -r["self_cpu_ms_per_step"])[:TOP],
        "top_device": sorted(rows, key=lambda r: -r["device_ms_per_step"])[:TOP],
    }


def markdown(s: dict, command: str) -> str:
    def table(title: str, rows: list[dict]) -> list[str]:
        header = "| op | calls/step | self host ms/step | device ms/step |"
        lines = [f"### {title}", "", header, "|---|---:|---:|---:|"]
        lines += [f"| `{r['name']}` | {r['calls_per_step']:.1f} | {r['self_cpu_ms_per_step']:.3f} | "
                  f"{r['device_ms_per_step']:.3f} |" for r in rows]  # fmt: skip
        return [*lines, ""] if rows else [*lines, "| (none) | | | |", ""]

    waited = sum(r["self_cpu_ms_per_step"] for r in s["host_waits"])
    lines = [
        f"# Profile of {s['steps']} Trainer steps, rank {s['rank']}",
        "",
        f"`{command}`",
        "",
        f"- wall time: {s['wall_ms_per_step']:.2f} ms/step",
        f"- GPU compute kernels: {s['device_busy_ms_per_step']:.2f} ms/step "
        f"({s['device_busy_ms_per_step'] / s['wall_ms_per_step']:.0%} of the wall time); collective kernels "
        f"{s.get('collective_kernels_ms_per_step', 0.0):.2f} ms/step (from launch until every rank joined: mostly "
        "waiting for the other ranks)",
        f"- host waiting on the device: {waited:.2f} ms/step in "
        f"{sum(r['calls_per_step'] for r in s['host_waits']):.1f} calls/step",
        "",
        *table("Host waits", s["host_waits"]),
        *table("Collectives", s["collectives"]),
        *table(f"Top {TOP} by self host time", s["top_host"]),
        *table(f"Top {TOP} by device time", s["top_device"]),
    ]
    return "\n".join(lines)


class ProfileSteps(TrainerCallback):
    """Profiles optimizer steps ``start .. start + steps - 1`` and writes the summary of the calling rank."""

    def __init__(self, out: Path, start: int, steps: int, trace: bool, command: str) -> None:
        self.out, self.start, self.steps, self.trace, self.command = out, start, steps, trace, command
        self.prof: torch.profiler.profile | None = None
        self.t0 = 0.0

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.start and self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._sync()
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is None or state.global_step != self.start + self.steps:
            return
        self._sync()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        rank = int(os.environ.get("RANK", "0"))
        summary = summarize(self.prof.key_averages(), self.steps, wall, rank)
        summary["command"] = self.command
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{rank}.json").write_text(json.dumps(summary, indent=1))
        (self.out / f"rank{rank}.md").write_text(markdown(summary, self.command))
        if self.trace:
            self.prof.export_chrome_trace(str(self.out / f"rank{rank}.trace.json"))
        self.prof = None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile_dir", required=True, help="where each rank writes rank{R}.json / .md")
    p.add_argument("--profile_start", type=int, default=100, help="the first profiled optimizer step")
    p.add_argument("--profile_steps", type=int, default=10)
    p.add_argument("--trace", action="store_true", help="also write each rank's Chrome trace")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    if "--" not in argv:
        p.error("expected `-- <run_glue_iw.py flags>` after the profiler's own flags")
    split = argv.index("--")
    args = p.parse_args(argv[:split])
    for flag in ("profile_start", "profile_steps"):
        if getattr(args, flag) < (0 if flag == "profile_start" else 1):
            p.error(f"--{flag}: expected a {'non-negative' if flag == 'profile_start' else 'positive'} integer, "
                    f"got {getattr(args, flag)}")  # fmt: skip
    run_argv = argv[split + 1 :]
    command = " ".join(["run_glue_iw.py", *run_argv])
    callback = ProfileSteps(Path(args.profile_dir), args.profile_start, args.profile_steps, args.trace, command)
    original = run.GlueTrainer

    class Profiled(original):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback(callback)

    run.GlueTrainer = Profiled
    try:
        run.main(run_argv)
    finally:
        run.GlueTrainer = original


if __name__ == "__main__":
    main()

"""benchmarks/bench_run.py: its ``--configs`` parsing and GPU lanes, the run_glue_iw.py command lines (one process,
whole epochs, padding buckets for every run, compile flags, the run's GPU), the timeline arithmetic (steady step,
compile warm-up, later recompiles, the full run by arithmetic), the report from fake runs (ratios to eager LoRA
within the invocation, loss checks, a run skipped by ``--stop_after``, the markdown regenerated from the JSON), and
an end-to-end CPU smoke run (real MiniLM, eager and ``aot_eager``-compiled runs on two lanes at once)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
from helpers import GLUE, MODEL, e2e_task, needs_shared

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_run.py"
sys.path.insert(0, str(BENCH.parent))
import bench_ddp  # noqa: E402
import bench_run  # noqa: E402
from bench_run import Config, parse_configs  # noqa: E402
from test_bench_ddp import run_report  # noqa: E402


def test_configs_parse_into_gpu_lanes():
    configs = parse_configs(bench_run.DEFAULT_CONFIGS)
    assert configs == [Config("lora", "none", 0), Config("iw", "none", 0), Config("lora", "reduce-overhead", 1),
                       Config("iw", "reduce-overhead", 1)]  # fmt: skip
    assert [c.name for c in configs] == ["lora_eager", "iw_eager", "lora_reduce-overhead", "iw_reduce-overhead"]
    lanes = bench_run.lanes(parse_configs("iw:default@1,lora:none,lora:default@1"))
    assert list(lanes) == [1, 0] and [c.name for c in lanes[1]] == ["iw_default", "lora_default"]


@pytest.mark.parametrize(
    "text", ["lora:none@x", "dora:none", "lora:fast", "lora", "lora:none@0,lora:none@1", "lora:none@-1"]
)
def test_bad_configs_give_one_error_line(capsys, text):
    with pytest.raises(SystemExit) as info:
        bench_run.main(["--model", "m", "--glue_dir", "g", "--configs", text])
    assert info.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "--configs:" in line and ("METHOD:MODE[@GPU]" in line or "at most once" in line)


def command(argv: list[str], config: Config) -> tuple[list[str], dict]:
    args = bench_run.parser().parse_args(["--model", "m", "--glue_dir", "g", *argv])
    return bench_run.build_command(args, "m", config, Path("/tmp/out"))


def flag(cmd: list[str], name: str) -> str:
    assert cmd.count(name) == 1, name
    return cmd[cmd.index(name) + 1]


def test_whole_epochs_one_process_on_its_gpu():
    cmd, env = command(["--max_train_samples", "32000"], Config("iw", "reduce-overhead", 1))
    assert cmd[:2] == [sys.executable, bench_run.SCRIPT]  # no launcher: one process
    assert (flag(cmd, "--max_steps"), flag(cmd, "--num_train_epochs")) == ("-1", "3.0")
    assert (flag(cmd, "--torch_compile"), flag(cmd, "--torch_compile_mode")) == ("true", "reduce-overhead")
    assert "--torch_compile_backend" not in cmd  # inductor: the Trainer's default
    assert (flag(cmd, "--iw_alpha"), flag(cmd, "--iw_calib_steps")) == ("1e-4", "150")
    assert (flag(cmd, "--per_device_train_batch_size"), flag(cmd, "--max_train_samples")) == ("32", "32000")
    assert (flag(cmd, "--max_seq_length"), flag(cmd, "--per_device_eval_batch_size")) == ("128", "8")
    assert (flag(cmd, "--logging_steps"), flag(cmd, "--bf16"), flag(cmd, "--seed")) == ("50", "true", "1")
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["PYTHONUNBUFFERED"] == "1" and env["HF_HUB_OFFLINE"] == "1"


def test_every_run_gets_the_padding_buckets_and_compile_only_the_compiled_ones():
    buckets = {"--pad_to_max_length": "false", "--pad_to_multiple_of": "32", "--dataloader_drop_last": "true"}
    eager, _ = command([], Config("lora", "none"))
    compiled, _ = command(["--compile_backend", "aot_eager", "--cpu", "--max_steps", "8"], Config("lora", "default"))
    for cmd in (eager, compiled):
        assert {k: flag(cmd, k) for k in buckets} == buckets
    assert "--torch_compile" not in eager and flag(eager, "--iw_alpha") == "0"
    assert (flag(compiled, "--torch_compile_backend"), flag(compiled, "--max_steps")) == ("aot_eager", "8")
    assert flag(compiled, "--use_cpu") == "true"


def test_timeline_separates_compile_from_steady_steps():
    """train() from 10 s to 40 s: 2 s of calibration, the first log (step 10) at 27 s — 15 s after calibration, 10
    steps of 0.1 s at the steady speed, so 14 s of warm-up above it; then a log every 10 steps at 0.1 s a step except
    one interval of 3 s (a new shape compiled: 2 s above steady), and the end at step 50."""
    steps = [10, 20, 30, 40, 50]
    times = [27.0, 28.0, 31.0, 32.0, 33.0]
    t = bench_run.timeline(
        steps, times, train_end=40.0, train_runtime=30.0, calibration=2.0, total_steps=50, wall=45.0
    )
    assert t["interval_ms"] == pytest.approx([300.0, 100.0, 100.0])  # from the 2nd logged step on
    assert t["steady_ms"] == pytest.approx(100.0) and t["steady_mean_ms"] == pytest.approx(5000 / 30 * 1)
    assert (t["startup_s"], t["after_train_s"], t["first_log_step"]) == (10.0, 5.0, 10)
    assert t["to_first_log_s"] == pytest.approx(15.0) and t["warmup_above_steady_s"] == pytest.approx(14.0)
    assert t["later_above_steady_s"] == pytest.approx(13.0 - 4.0)  # the slow interval, and 7 s after the last log
    assert (t["slow_intervals"], t["slow_intervals_s"]) == (1, pytest.approx(2.0))
    assert t["train_above_steady_s"] == pytest.approx(30.0 - 2.0 - 5.0)
    short = bench_run.timeline([10, 20], [1.0, 2.0], None, 3.0, 0.0, 20, 4.0)
    assert short["steady_ms"] is None and short["startup_s"] is None and short["warmup_above_steady_s"] is None


def test_full_run_is_arithmetic_from_the_steady_step():
    run = {"steps": 3000, "steady_ms": 10.0, "process_wall_s": 200.0, "train_runtime_s": 150.0}
    assert bench_run.full_run_estimate(run, 6312) == {
        "steps": 6312,
        "wall_s": pytest.approx(200.0 + 33.12),
        "train_s": pytest.approx(150.0 + 33.12),
    }
    assert bench_run.full_run_estimate({**run, "steps": 6312}, 6312) is None
    assert bench_run.full_run_estimate({**run, "steady_ms": None}, 6312) is None


def test_run_timed_stamps_other_lines():
    code = "print(\"{'loss': 1}\"); print('x'); print(\"{'train_runtime': 2}\")"
    stamps: dict[str, list[float]] = {bench_run.TRAIN_END_LINE: []}
    rc, out, _, wall, times = bench_ddp.run_timed([sys.executable, "-c", code], {}, stamps)
    assert rc == 0 and len(times) == 1 and len(stamps[bench_run.TRAIN_END_LINE]) == 1
    assert times[0] <= stamps[bench_run.TRAIN_END_LINE][0] <= wall


def fake_run(config: Config, steady_ms: float, warmup_s: float, losses: dict) -> dict:
    """A finished run as ``launch`` returns it: 3,000 steps at ``steady_ms``, ``warmup_s`` of compiling."""
    iw = config.method == "iw"
    calib = 8.0 if iw else 0.0
    train = calib + warmup_s + 3000 * steady_ms / 1000
    return {
        "name": config.name, "method": config.method, "torch_compile": config.mode, "gpu": config.gpu,
        "command": "python run_glue_iw.py", "process_wall_s": train + 30.0, "train_runtime_s": train,
        "calibration_s": calib, "calibration_batches": 150 if iw else 0, "eval_runtime_s": 2.0, "steps": 3000,
        "epochs": 3.0, "train_loss": 0.25, "last_logged_loss": losses[3000], "eval": {"eval_accuracy": 0.93},
        "steady_ms": steady_ms, "steady_mean_ms": steady_ms * 1.01, "startup_s": 20.0, "to_first_log_s": 1.0,
        "warmup_above_steady_s": warmup_s, "later_above_steady_s": 0.5, "train_above_steady_s": warmup_s + 0.5,
        "after_train_s": 10.0, "slow_intervals": 0, "slow_intervals_s": 0.0, "first_log_step": 50,
        "interval_ms": [steady_ms] * 3, "samples_per_s": 1.0, "step_samples_per_s": 1.0,
        "steady_samples_per_s": 32000 / steady_ms, "sensitivities": {"a": 1.0, "b": 2.0} if iw else None,
        "coefficients": {"a": 0.6, "b": 0.3} if iw else None, "losses": losses, "log_seconds": {},
    }  # fmt: skip


def test_report_from_fake_runs(tmp_path, monkeypatch):
    """Eager LoRA 50 ms, eager IW-LoRA 51 ms, reduce-overhead LoRA 9 ms (100 s compiling), IW-LoRA 9.2 ms: the
    ratios to eager LoRA are taken within the invocation; each compiled run's losses against its eager run; the
    third run of GPU 0 starts after --stop_after and is skipped; the markdown regenerates from the JSON."""
    spec = {"lora_eager": (50.0, 1.0), "iw_eager": (51.0, 1.0), "lora_reduce-overhead": (9.0, 100.0),
            "iw_reduce-overhead": (9.2, 101.0), "lora_default": (40.0, 120.0)}  # fmt: skip
    curves = {"lora_eager": {50: 0.70, 3000: 0.20}, "iw_eager": {50: 0.70, 3000: 0.21},
              "lora_reduce-overhead": {50: 0.71, 3000: 0.18},
              "iw_reduce-overhead": {50: 0.70, 3000: 0.21}}  # fmt: skip
    launched = []

    def launch(args, model, config):
        launched.append(config.name)
        time.sleep(1.0 if config.gpu == 0 else 0.0)
        return fake_run(config, *spec[config.name], curves.get(config.name, {50: 0.7, 3000: 0.2}))

    monkeypatch.setattr(bench_run, "launch", launch)
    monkeypatch.setattr(bench_run, "data_rows", lambda args: (67349, 872))
    prefix = tmp_path / "whole"
    argv = ["--model", "m", "--glue_dir", "g", "--cpu", "--configs",
            "lora:none@0,iw:none@0,lora:default@0,lora:reduce-overhead@1,iw:reduce-overhead@1",
            "--max_train_samples", "32000", "--stop_after", "1.5", "--out", str(prefix)]  # fmt: skip
    report = bench_run.main(argv)
    assert report["skipped"] == ["lora_default"] and "lora_default" not in launched
    assert [r["name"] for r in report["runs"]] == ["lora_eager", "iw_eager", "lora_reduce-overhead",
                                                    "iw_reduce-overhead"]  # fmt: skip
    assert report["full_steps"] == 3 * 2104 and report["eval_rows"] == 872
    ratios = {q["run"]: q for q in report["ratios"]}
    ro = ratios["iw_reduce-overhead"]
    assert ro["steady_vs_eager_lora"] == pytest.approx(9.2 / 50) and ro[
        "steady_vs_eager_same_method"
    ] == pytest.approx(9.2 / 51)
    base = report["runs"][0]
    assert ro["train_vs_eager_lora"] == pytest.approx((8.0 + 101.0 + 27.6) / base["train_runtime_s"])
    assert ro["compile_above_eager_s"] == pytest.approx(100.0)
    checks = {(c["run"], c["eager"]): c for c in report["loss_checks"]}
    lora = checks[("lora_reduce-overhead", "lora_eager")]
    assert (lora["loss_points"], lora["loss_max_abs_diff"]) == (2, pytest.approx(0.02))
    iw = checks[("iw_reduce-overhead", "iw_eager")]
    assert iw["loss_max_abs_diff"] == 0 and iw["sensitivity_max_rel_diff"] == 0 and iw["dev_metric"] == [0.93, 0.93]
    assert checks[("iw_eager", "lora_eager")]["reference"] is True
    full = {e["run"]: e for e in report["full_run"]}
    assert full["lora_eager"]["wall_s"] == pytest.approx(base["process_wall_s"] + 3312 * 0.05)
    assert full["lora_reduce-overhead"]["wall_vs_eager_lora"] == pytest.approx(
        (157.0 + 3312 * 0.009) / (base["process_wall_s"] + 3312 * 0.05)
    )
    saved = json.loads(prefix.with_suffix(".json").read_text())
    md = prefix.with_suffix(".md").read_text()
    assert md == bench_run.markdown(saved)  # the markdown regenerates from the JSON alone
    assert "- skipped (`--stop_after 1.5`): lora_default" in md
    assert f"| iw_reduce-overhead | {166.6 / 181:.3f} | {136.6 / 151:.3f} | 0.184 | 0.184 | 0.180 | 100.0 |" in md
    assert "## 3 epochs of all 67349 training rows (6312 steps): arithmetic" in md
    assert "| iw_eager (reference) | lora_eager | 2 |" in md


@pytest.mark.slow
@needs_shared
def test_smoke_run_on_cpu(tmp_path):
    """Eager LoRA and an aot_eager-compiled LoRA on lane 0, eager IW-LoRA on lane 1 at the same time: 8 steps each,
    logged every 2; the timings, losses and comparisons are all there."""
    prefix = tmp_path / "whole"
    cmd = [
        sys.executable, str(BENCH), "--cpu", "--model", str(MODEL), "--glue_dir", str(GLUE), "--task",
        e2e_task("sst2"), "--configs", "lora:none@0,iw:none@1,lora:default@0", "--compile_backend", "aot_eager",
        "--precision", "fp32", "--batch", "4", "--max_steps", "8", "--logging_steps", "2", "--calib_steps", "2",
        "--max_train_samples", "64", "--max_eval_samples", "16", "--eval_batch", "8", "--threads", "1",
        "--runs_dir", str(tmp_path / "runs"), "--out", str(prefix),
    ]  # fmt: skip
    report = run_report(cmd, prefix)
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {"lora_eager", "iw_eager", "lora_default"} and not report["skipped"]
    for r in runs.values():
        assert "error" not in r and r["steps"] == 8 and sorted(r["losses"], key=int) == ["2", "4", "6", "8"]
        for key in ("steady_ms", "startup_s", "warmup_above_steady_s", "process_wall_s", "train_runtime_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["name"], key)
    assert runs["iw_eager"]["calibration_batches"] == 2 and runs["iw_eager"]["sensitivities"]
    assert runs["lora_default"]["warmup_above_steady_s"] > runs["lora_eager"]["warmup_above_steady_s"]  # compiling
    (q,) = report["ratios"]
    assert q["run"] == "lora_default" and q["steady_vs_eager_lora"] > 0
    assert {(c["run"], c["eager"]) for c in report["loss_checks"]} == {("lora_default", "lora_eager"),
                                                                       ("iw_eager", "lora_eager")}  # fmt: skip
    md = prefix.with_suffix(".md").read_text()
    assert md.startswith("# Whole runs of run_glue_iw.py: eager vs torch.compile (CPU)") and "## Same losses" in md

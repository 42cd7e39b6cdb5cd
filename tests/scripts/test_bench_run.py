"""benchmarks/bench_run.py: its ``--configs`` parsing and GPU lanes, the run_glue_iw.py command lines (one process,
whole epochs, padding buckets for every run, compile flags, the run's GPU, the ``+nosync`` variant's sync-free recipe
and what run_glue_iw's parser and the Trainer make of it), the timeline arithmetic (steady step, compile warm-up,
later recompiles, the full run by arithmetic), the report from fake runs (ratios to eager LoRA within the invocation,
``+nosync`` runs against their run without the variant, loss checks, a run skipped by ``--stop_after``, the
markdown regenerated from the JSON), and an end-to-end CPU smoke run (real MiniLM, eager, ``aot_eager``-compiled and
compiled ``+nosync`` runs on two lanes at once)."""

from __future__ import annotations

import json
import math
import shlex
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


def test_nosync_variant_configs_parse():
    """``+nosync`` after MODE, before ``@GPU``: the same method and mode with and without it in one invocation."""
    text = "lora:reduce-overhead@0,lora:reduce-overhead+nosync@0,iw:reduce-overhead+nosync@1,iw:none+nosync"
    configs = parse_configs(text)
    assert configs == [
        Config("lora", "reduce-overhead", 0),
        Config("lora", "reduce-overhead", 0, "nosync"),
        Config("iw", "reduce-overhead", 1, "nosync"),
        Config("iw", "none", 0, "nosync"),
    ]
    assert [c.name for c in configs] == ["lora_reduce-overhead", "lora_reduce-overhead_nosync",
                                         "iw_reduce-overhead_nosync", "iw_eager_nosync"]  # fmt: skip
    assert [c.without_variant for c in configs] == ["lora_reduce-overhead", "lora_reduce-overhead",
                                                    "iw_reduce-overhead", "iw_eager"]  # fmt: skip
    assert bench_run.CONFIG_FORMAT == "METHOD:MODE[+nosync][@GPU]"
    help_text = " ".join(bench_run.parser().format_help().split())
    assert "comma list of METHOD:MODE[+nosync][@GPU]" in help_text and "+nosync the sync-free recipe" in help_text


@pytest.mark.parametrize(
    "text",
    ["lora:none@x", "dora:none", "lora:fast", "lora", "lora:none@-1", "lora:none+sync", "lora:none+",
     "lora:none+nosync+nosync", "lora+nosync:none", "lora:none@0+nosync", "lora:+nosync", "lora:none+plain"],
)  # fmt: skip
def test_bad_configs_give_one_error_line(capsys, text):
    with pytest.raises(SystemExit) as info:
        bench_run.main(["--model", "m", "--glue_dir", "g", "--configs", f"iw:none,{text}"])
    assert info.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"--configs: {text!r}: expected METHOD:MODE[+nosync][@GPU], METHOD iw|lora, MODE none|" in line
    assert "+nosync optional (the sync-free recipe)" in line


@pytest.mark.parametrize("text", ["lora:none@0,lora:none@1", "lora:default+nosync@0,lora:default+nosync@1"])
def test_a_configuration_twice_is_one_error_line(capsys, text):
    with pytest.raises(SystemExit) as info:
        bench_run.main(["--model", "m", "--glue_dir", "g", "--configs", text])
    assert info.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert line.endswith(f"--configs: {text!r}: each METHOD:MODE[+nosync] at most once")


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


def test_a_nosync_run_gets_the_sync_free_recipe_once():
    """``+nosync``: bench_ddp's SYNC_FREE_FLAGS (the JSON one argument) once, after the padding and compile flags;
    the plain run of the same method and mode has none of them, and nothing else differs."""
    argv = ["--max_train_samples", "32000"]
    nosync, env = command(argv, Config("lora", "reduce-overhead", 1, "nosync"))
    plain, _ = command(argv, Config("lora", "reduce-overhead", 1))
    flags = bench_ddp.SYNC_FREE_FLAGS
    assert flags == ("--logging_nan_inf_filter", "false", "--accelerator_config", '{"non_blocking": true}')
    (at,) = [i for i in range(len(nosync)) if tuple(nosync[i : i + 4]) == flags]
    assert (flag(nosync, "--logging_nan_inf_filter"), flag(nosync, "--accelerator_config")) == flags[1::2]
    assert "--logging_nan_inf_filter" not in plain and "--accelerator_config" not in plain
    assert nosync[:at] + nosync[at + 4 :] == plain and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert "--dataloader_pin_memory" not in nosync  # the Trainer's default, True on a GPU: pinned batches


def test_run_glue_iw_and_the_trainer_take_the_sync_free_recipe(tmp_path):
    """The ``+nosync`` command line through run_glue_iw's own parser: the NaN/inf filter off, the Trainer's
    accelerator and its prepared training dataloader non-blocking (the plain run: the defaults), batches pinned in
    the GPU form of the command; on the CPU (``--use_cpu``) the Trainer turns pinning off."""
    from tiny import RandomClassification, tiny_base
    from transformers import Trainer

    from iwtrainer.glue.arguments import parse_args

    args = bench_run.parser().parse_args(["--model", "m", "--glue_dir", "g", "--precision", "fp32"])
    gpu_cmd, _ = bench_run.build_command(args, "m", Config("lora", "reduce-overhead", 0, "nosync"), tmp_path / "gpu")
    assert gpu_cmd[1] == bench_run.SCRIPT
    gpu = parse_args(gpu_cmd[2:]).training_args
    assert (gpu.use_cpu, gpu.dataloader_pin_memory, gpu.torch_compile_mode) == (False, True, "reduce-overhead")
    assert gpu.accelerator_config.non_blocking is True and gpu.logging_nan_inf_filter is False
    args = bench_run.parser().parse_args(["--model", "m", "--glue_dir", "g", "--precision", "fp32", "--cpu"])
    for variant, non_blocking in (("nosync", True), ("plain", False)):
        cmd, _ = bench_run.build_command(args, "m", Config("lora", "default", 0, variant), tmp_path / variant)
        training = parse_args(cmd[2:]).training_args
        assert training.accelerator_config.non_blocking is non_blocking
        assert training.logging_nan_inf_filter is not non_blocking
        trainer = Trainer(model=tiny_base("bert"), args=training, train_dataset=RandomClassification(8))
        assert trainer.accelerator.non_blocking is non_blocking
        assert trainer.get_train_dataloader()._non_blocking is non_blocking  # accelerate's send_to_device flag


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
        **bench_run.config_fields(config), "command": "python run_glue_iw.py", "process_wall_s": train + 30.0,
        "train_runtime_s": train,
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


def test_report_with_nosync_runs(tmp_path, monkeypatch):
    """Eager LoRA 50 ms and with the recipe 45 ms; reduce-overhead LoRA 22 ms (100 s compiling) and with the recipe
    15 ms (cached: 15 s); reduce-overhead IW-LoRA with the recipe alone (no run without it, no eager IW-LoRA): each
    nosync run against eager LoRA, the eager run of its method and its run without the variant where there is one."""
    spec = {"lora_eager": (50.0, 1.0), "lora_eager_nosync": (45.0, 1.0), "lora_reduce-overhead": (22.0, 100.0),
            "lora_reduce-overhead_nosync": (15.0, 15.0), "iw_reduce-overhead_nosync": (16.0, 20.0)}  # fmt: skip
    curves = {"lora_reduce-overhead": {50: 0.71, 3000: 0.18}, "lora_reduce-overhead_nosync": {50: 0.72, 3000: 0.18}}
    monkeypatch.setattr(
        bench_run,
        "launch",
        lambda args, model, c: fake_run(c, *spec[c.name], curves.get(c.name, {50: 0.7, 3000: 0.2})),
    )
    monkeypatch.setattr(bench_run, "data_rows", lambda args: (67349, 872))
    prefix = tmp_path / "whole"
    configs = ("lora:none@0,lora:none+nosync@0,lora:reduce-overhead@1,lora:reduce-overhead+nosync@1,"
               "iw:reduce-overhead+nosync@0")  # fmt: skip
    argv = ["--model", "m", "--glue_dir", "g", "--cpu", "--configs", configs, "--out", str(prefix)]
    report = bench_run.main(argv)
    assert report["sync_free_flags"] == list(bench_ddp.SYNC_FREE_FLAGS)
    assert [c["variant"] for c in report["configs"]] == ["plain", "nosync", "plain", "nosync", "nosync"]
    runs = {r["name"]: r for r in report["runs"]}
    assert runs["lora_reduce-overhead_nosync"]["without_variant"] == "lora_reduce-overhead"
    assert "variant" not in runs["lora_reduce-overhead"]  # plain runs recorded as before
    ratios = {q["run"]: q for q in report["ratios"]}
    assert list(ratios) == ["lora_eager_nosync", "lora_reduce-overhead", "lora_reduce-overhead_nosync",
                            "iw_reduce-overhead_nosync"]  # fmt: skip
    eager = ratios["lora_eager_nosync"]  # an eager variant: its run without the variant is eager LoRA itself
    assert eager["steady_vs_eager_lora"] == eager["steady_vs_without_variant"] == pytest.approx(0.9)
    ro = ratios["lora_reduce-overhead_nosync"]
    assert (ro["variant"], ro["without_variant"]) == ("nosync", "lora_reduce-overhead")
    assert ro["steady_vs_eager_lora"] == pytest.approx(15 / 50) and ro["steady_vs_without_variant"] == pytest.approx(
        15 / 22
    )
    assert ro["steady_mean_vs_without_variant"] == pytest.approx(15 / 22)
    assert ro["train_vs_without_variant"] == pytest.approx((15.0 + 45.0) / (100.0 + 66.0))
    assert "steady_vs_without_variant" not in ratios["lora_reduce-overhead"]
    iw = ratios["iw_reduce-overhead_nosync"]
    assert iw["without_variant"] == "iw_reduce-overhead" and iw["steady_vs_without_variant"] is None
    assert iw["steady_vs_eager_lora"] == pytest.approx(16 / 50) and iw["steady_vs_eager_same_method"] is None
    pairs = [(c["run"], c["eager"]) for c in report["loss_checks"]]
    assert pairs == [("lora_eager_nosync", "lora_eager"), ("lora_reduce-overhead", "lora_eager"),
                     ("lora_reduce-overhead_nosync", "lora_eager"),
                     ("lora_reduce-overhead_nosync", "lora_reduce-overhead")]  # fmt: skip
    twin = report["loss_checks"][-1]
    assert (twin["loss_points"], twin["loss_max_abs_diff"]) == (2, pytest.approx(0.01))
    saved = json.loads(prefix.with_suffix(".json").read_text())
    md = prefix.with_suffix(".md").read_text()
    assert md == bench_run.markdown(saved)
    recipe = """`--logging_nan_inf_filter false --accelerator_config '{"non_blocking": true}'`"""
    assert f"`_nosync` runs: the same run_glue_iw command line with the sync-free recipe {recipe} appended" in md
    assert "## Compiled ÷ eager LoRA and each variant ÷ its run without it, measured in this invocation" in md
    assert "| compile above eager s | without variant | steady ÷ without (median) | (mean) | train() ÷ without |" in md
    section = md[md.index("## Compiled ÷ eager LoRA") :]
    section = section[: section.index("\n## ")]
    rows = {line.split(" | ")[0][2:]: line for line in section.splitlines() if line.startswith("| ")}
    assert list(rows)[1:] == list(ratios)
    assert rows["lora_reduce-overhead_nosync"].endswith(
        f"| lora_reduce-overhead | {15 / 22:.3f} | {15 / 22:.3f} | {60 / 166:.3f} |"
    )
    assert rows["lora_eager_nosync"].endswith(f"| lora_eager | 0.900 | 0.900 | {(1.0 + 135.0) / (1.0 + 150.0):.3f} |")
    assert rows["iw_reduce-overhead_nosync"].endswith("| iw_reduce-overhead | — | — | — |")
    assert rows["lora_reduce-overhead"].endswith("| — | — | — | — |")  # the plain run: no variant columns
    assert "| lora_reduce-overhead_nosync | lora_reduce-overhead | 2 | 0.0100 |" in md


def test_committed_report_regenerates():
    """compile_whole_run.json (no variants) still gives its committed markdown's generated part: plain reports'
    tables and header are unchanged."""
    results = ROOT / "benchmarks" / "results"
    generated = bench_run.markdown(json.loads((results / "compile_whole_run.json").read_text()))
    assert (results / "compile_whole_run.md").read_text().startswith(generated)
    assert "nosync" not in generated and "without variant" not in generated


@pytest.mark.slow
@needs_shared
def test_smoke_run_on_cpu(tmp_path):
    """Eager LoRA and an aot_eager-compiled LoRA on lane 0, eager IW-LoRA then the compiled LoRA with the sync-free
    recipe (``+nosync``) on lane 1 at the same time: 8 steps each, logged every 2; the timings, losses and
    comparisons are all there, and run_glue_iw's Trainer took the recipe in the nosync run only."""
    prefix = tmp_path / "whole"
    cmd = [
        sys.executable, str(BENCH), "--cpu", "--model", str(MODEL), "--glue_dir", str(GLUE), "--task",
        e2e_task("sst2"), "--configs", "lora:none@0,iw:none@1,lora:default@0,lora:default+nosync@1",
        "--compile_backend", "aot_eager",
        "--precision", "fp32", "--batch", "4", "--max_steps", "8", "--logging_steps", "2", "--calib_steps", "2",
        "--max_train_samples", "64", "--max_eval_samples", "16", "--eval_batch", "8", "--threads", "1",
        "--runs_dir", str(tmp_path / "runs"), "--out", str(prefix),
    ]  # fmt: skip
    report = run_report(cmd, prefix)
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {"lora_eager", "iw_eager", "lora_default", "lora_default_nosync"} and not report["skipped"]
    for r in runs.values():
        assert "error" not in r and r["steps"] == 8 and sorted(r["losses"], key=int) == ["2", "4", "6", "8"]
        for key in ("steady_ms", "startup_s", "warmup_above_steady_s", "process_wall_s", "train_runtime_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["name"], key)
    assert runs["iw_eager"]["calibration_batches"] == 2 and runs["iw_eager"]["sensitivities"]
    assert runs["lora_default"]["warmup_above_steady_s"] > runs["lora_eager"]["warmup_above_steady_s"]  # compiling
    assert runs["lora_default_nosync"]["warmup_above_steady_s"] > runs["lora_eager"]["warmup_above_steady_s"]
    q, nosync = report["ratios"]
    assert q["run"] == "lora_default" and q["steady_vs_eager_lora"] > 0 and "variant" not in q
    assert (nosync["run"], nosync["without_variant"]) == ("lora_default_nosync", "lora_default")
    for key in ("steady_vs_eager_lora", "steady_vs_without_variant", "train_vs_without_variant"):
        assert isinstance(nosync[key], float) and nosync[key] > 0, key
    checks = {(c["run"], c["eager"]): c for c in report["loss_checks"]}
    assert set(checks) == {("lora_default", "lora_eager"), ("iw_eager", "lora_eager"),
                           ("lora_default_nosync", "lora_eager"), ("lora_default_nosync", "lora_default")}  # fmt: skip
    twin = checks[("lora_default_nosync", "lora_default")]
    assert twin["loss_points"] == 4 and twin["loss_max_abs_diff"] == 0  # the recipe changes no arithmetic
    flags = bench_ddp.SYNC_FREE_FLAGS
    for name, r in runs.items():
        log = (tmp_path / "runs" / f"{name}.log").read_text()  # the Trainer's arguments, as run_glue_iw logs them
        on = name == "lora_default_nosync"
        assert (shlex.join(flags) in r["command"]) is on, name
        assert f"'non_blocking': {on}" in log and f"logging_nan_inf_filter={not on}" in log, name
        # transformers' Trainer warns when it hands accelerate non_blocking without pinned memory (off on the CPU)
        assert ("`non_blocking` is enabled but `dataloader_pin_memory` is not" in log) is on, name
    md = prefix.with_suffix(".md").read_text()
    assert md.startswith("# Whole runs of run_glue_iw.py: eager vs torch.compile (CPU)") and "## Same losses" in md
    assert "| lora_default_nosync | lora_default | 4 | 0.0000 |" in md

"""benchmarks/bench_ddp.py: its ``--pairs`` / ``--methods`` / ``--torch_compile`` / ``--variants`` parsing, the
run_glue_iw.py command lines it builds (compile flags, plain LoRA, per-device batches, the sync-free recipe of the
``nosync`` variant, the DDP flags of ``lean``, ``onegraph``'s wrapper), the launch order and the report with variants
side by side, and CPU smoke runs (torchrun + gloo, real MiniLM) of the per-device mode with 2 processes: both methods
(the JSON records every run's batches and the markdown has a row per method), plain LoRA with the sync-free recipe
(every rank's Trainer takes it) and IW-LoRA through ``onegraph`` (the same losses as ``nosync``). Also
benchmarks/ddp_knobs.py, ``onegraph``'s wrapper: its flags, and its knobs: set, reaching the Trainer's accelerator
(or one error line) and undone after the run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import GLUE, MODEL, e2e_task, needs_shared, subprocess_env

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_ddp.py"
sys.path.insert(0, str(BENCH.parent))
import bench_ddp  # noqa: E402
import ddp_knobs  # noqa: E402
from bench_ddp import Pair, Run, build_command, parse_pairs  # noqa: E402

import iwtrainer.glue.run as glue_run  # noqa: E402

RUN_GLUE = str(ROOT / "run_glue_iw.py")
KNOBS = str(ROOT / "benchmarks" / "ddp_knobs.py")


def error_line(capsys, argv: list[str]) -> str:
    """bench_ddp's argparse error for ``argv``: exit code 2 and its one ``error:`` line."""
    with pytest.raises(SystemExit) as info:
        bench_ddp.main(["--model", "m", "--glue_dir", "g", *argv])
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    return errors[0]


def test_the_original_pairs_parse_unchanged():
    assert parse_pairs(bench_ddp.DEFAULT_PAIRS, 2) == [
        Pair("fp32", 32, 200, nodrop=True),
        Pair("bf16", 32, 400),
        Pair("bf16", 256, 150),
    ]
    (pair,) = parse_pairs("fp32:8:6:nodrop", 2)
    assert (pair.per_device_batch(1), pair.global_batch(1)) == (8, 8)
    assert (pair.per_device_batch(2), pair.global_batch(2)) == (4, 8)


def test_per_device_pairs_fix_the_batch_of_each_process():
    pairs = parse_pairs("bf16:32:400:per_device,fp32:3:6:per_device:nodrop,fp32:3:6:nodrop:per_device", 2)
    assert pairs == [Pair("bf16", 32, 400, per_device=True), *[Pair("fp32", 3, 6, nodrop=True, per_device=True)] * 2]
    assert (pairs[0].per_device_batch(1), pairs[0].global_batch(1)) == (32, 32)
    assert (pairs[0].per_device_batch(2), pairs[0].global_batch(2)) == (32, 64)  # a per-device 3 needs no divisor


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("fp16:32:10", "PRECISION must be fp32 or bf16"),
        ("bf16:x:10", "positive integers"),
        ("bf16:32:0", "positive integers"),
        ("bf16:32", "expected PRECISION:BATCH:STEPS[:nodrop][:per_device]"),
        ("bf16:32:10:fast", "tags must be nodrop and/or per_device"),
        ("bf16:32:10:nodrop:nodrop", "each at most once"),
        ("bf16:33:10", "divisible by --nproc 2"),
        ("", "expected PRECISION:BATCH:STEPS"),
    ],
)
def test_bad_pairs_name_the_entry(spec, fragment):
    with pytest.raises(ValueError) as info:
        parse_pairs(f"bf16:32:10,{spec}", 2)
    message = str(info.value)
    assert "\n" not in message and repr(spec) in message and fragment in message


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--pairs", "bf16:33:10"], "--pairs: 'bf16:33:10': a global BATCH must be divisible by --nproc 2"),
        (["--methods", "iw,dora"], "--methods: expected a comma list of distinct values from iw|lora"),
        (["--methods", "iw,iw"], "--methods: expected"),
        (["--torch_compile", "fast"], "--torch_compile: expected a comma list of distinct values from none|default"),
        (["--nproc", "1"], "--nproc: expected an integer >= 2"),
        (["--logging_steps", "0"], "--logging_steps: expected a positive integer"),
        (["--variants", "plain,fast"], "--variants: expected a comma list of distinct values from plain|nosync"),
        (["--variants", "nosync,nosync"], "--variants: expected"),
        (["--variants", "lean,fast"], "expected a comma list of distinct values from plain|nosync|lean|onegraph, got"),
    ],
)
def test_bad_flags_give_one_error_line(capsys, argv, fragment):
    assert fragment in error_line(capsys, argv)


def command(
    argv: list[str], pair: Pair, nproc: int, method: str = "iw", mode: str = "none", variant: str = "plain"
) -> list[str]:
    args = bench_ddp.parser().parse_args(["--model", "m", "--glue_dir", "g", *argv])
    cmd, env = build_command(args, "m", Run(nproc, pair, method, mode, Path("/tmp/out"), variant=variant), 12345)
    assert env["PYTHONUNBUFFERED"] == "1"  # the log lines' arrival times are the steady throughput's clock
    return cmd


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("nproc", [1, 2])
def test_compile_flags_reach_both_runs(mode, nproc):
    cmd = command([], Pair("bf16", 32, 10, per_device=True), nproc, mode=mode)
    assert (flag(cmd, "--torch_compile"), flag(cmd, "--torch_compile_mode")) == ("true", mode)
    assert flag(cmd, "--dynamo_backend") == "no"  # the Trainer compiles, not accelerate a second time
    assert "--torch_compile" not in command([], Pair("bf16", 32, 10), nproc)


def test_methods_and_batches_on_the_command_line():
    iw = command(["--calib_steps", "7"], Pair("bf16", 32, 10), 2)
    assert (flag(iw, "--iw_alpha"), flag(iw, "--iw_calib_steps"), flag(iw, "--iw_normalize")) == ("1e-4", "7", "sum")
    assert flag(iw, "--per_device_train_batch_size") == "16"  # global 32 over 2 processes
    lora = command(["--calib_steps", "7"], Pair("bf16", 32, 10, per_device=True), 2, method="lora")
    assert flag(lora, "--iw_alpha") == "0" and "--iw_calib_steps" not in lora
    assert flag(lora, "--per_device_train_batch_size") == "32"
    cpu = command(["--cpu", "--max_eval_samples", "16"], Pair("fp32", 4, 6, per_device=True), 2)
    assert cpu[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node"] and flag(cpu, "--nproc_per_node") == "2"
    assert (flag(cpu, "--ddp_backend"), flag(cpu, "--max_eval_samples"), flag(cpu, "--bf16")) == (
        "gloo",
        "16",
        "false",
    )


def occurrences(cmd: list[str], flags: tuple[str, ...]) -> list[int]:
    """Where ``flags`` stand in ``cmd`` as one contiguous run of arguments."""
    return [i for i in range(len(cmd)) if tuple(cmd[i : i + len(flags)]) == flags]


@pytest.mark.parametrize("cpu", [[], ["--cpu"]])
@pytest.mark.parametrize("nproc", [1, 2])
def test_the_nosync_variant_appends_the_sync_free_recipe_once(cpu, nproc):
    """The recipe's four arguments (the JSON one argument), once, after run_glue_iw.py; none in a plain run."""
    assert bench_ddp.SYNC_FREE_FLAGS == (
        "--logging_nan_inf_filter", "false", "--accelerator_config", '{"non_blocking": true}'
    )  # fmt: skip
    pair = Pair("bf16", 32, 10, per_device=True)
    nosync = command(cpu, pair, nproc, method="lora", mode="reduce-overhead", variant="nosync")
    plain = command(cpu, pair, nproc, method="lora", mode="reduce-overhead")
    (at,) = occurrences(nosync, bench_ddp.SYNC_FREE_FLAGS)
    assert at > nosync.index(str(ROOT / "run_glue_iw.py"))
    assert nosync.count("--logging_nan_inf_filter") == nosync.count("--accelerator_config") == 1
    assert "--logging_nan_inf_filter" not in plain and "--accelerator_config" not in plain
    assert nosync[:at] + nosync[at + 4 :] == plain  # nothing else differs


@pytest.mark.parametrize("cpu", [[], ["--cpu"]])
@pytest.mark.parametrize("nproc", [1, 2])
def test_the_lean_variant_appends_the_ddp_flags_to_the_recipe(cpu, nproc):
    """lean: the nosync command line, then exactly ``--ddp_static_graph true --ddp_broadcast_buffers false
    --ddp_bucket_cap_mb 32``."""
    lean_flags = ("--ddp_static_graph", "true", "--ddp_broadcast_buffers", "false", "--ddp_bucket_cap_mb", "32")
    assert bench_ddp.LEAN_DDP_FLAGS == lean_flags
    pair = Pair("bf16", 32, 10, per_device=True)
    lean = command(cpu, pair, nproc, method="lora", mode="reduce-overhead", variant="lean")
    nosync = command(cpu, pair, nproc, method="lora", mode="reduce-overhead", variant="nosync")
    assert lean == nosync + list(bench_ddp.LEAN_DDP_FLAGS) and lean.count("--ddp_static_graph") == 1
    assert RUN_GLUE in lean and KNOBS not in lean


@pytest.mark.parametrize("cpu", [[], ["--cpu"]])
@pytest.mark.parametrize("nproc", [1, 2])
def test_the_onegraph_variant_runs_the_lean_command_through_ddp_knobs(cpu, nproc):
    """onegraph: the launcher, then ddp_knobs.py with its two knobs and ``--`` in place of run_glue_iw.py, then the
    lean variant's run_glue_iw flags unchanged."""
    pair = Pair("bf16", 32, 10, per_device=True)
    onegraph = command(cpu, pair, nproc, method="lora", mode="reduce-overhead", variant="onegraph")
    lean = command(cpu, pair, nproc, method="lora", mode="reduce-overhead", variant="lean")
    at = onegraph.index(KNOBS)
    assert onegraph[at : at + 5] == [KNOBS, "--optimize_ddp", "false", "--gradient_as_bucket_view", "--"]
    assert RUN_GLUE not in onegraph and onegraph.count("--") == 1
    assert onegraph[:at] == lean[: lean.index(RUN_GLUE)]  # the same launcher
    assert onegraph[at + 5 :] == lean[lean.index(RUN_GLUE) + 1 :]  # the lean flags, after --
    knobs, run_argv = ddp_knobs.parse(onegraph[at + 1 :])  # the wrapper's own parser takes its part
    assert (knobs.optimize_ddp, knobs.gradient_as_bucket_view) == ("false", True)
    assert run_argv == lean[lean.index(RUN_GLUE) + 1 :]


def test_the_ddp_flags_reach_the_trainers_accelerator(tmp_path):
    """The onegraph command line through ddp_knobs' and run_glue_iw's own parsers, and a Trainer built under the
    knobs: its accelerator hands DDP static_graph, no buffer broadcast, a 32 MB bucket cap (given, so no 1 MiB first
    bucket) and gradients as bucket views (accelerate passes DDP only the fields that differ from
    DistributedDataParallelKwargs' defaults: a cap of 25, its default, would not reach DDP)."""
    from tiny import RandomClassification, tiny_base

    from iwtrainer.glue.arguments import parse_args

    cmd = command(["--cpu"], Pair("fp32", 4, 6, per_device=True), 1, method="lora", variant="onegraph")
    knobs, run_argv = ddp_knobs.parse(cmd[cmd.index(KNOBS) + 1 :])
    training = parse_args(run_argv).training_args
    assert (training.ddp_static_graph, training.ddp_broadcast_buffers, training.ddp_bucket_cap_mb) == (True, False, 32)
    training.output_dir = str(tmp_path)
    with ddp_knobs.knobs(knobs):
        trainer = glue_run.GlueTrainer(model=tiny_base("bert"), args=training, train_dataset=RandomClassification(8))
    assert trainer.accelerator.ddp_handler.to_kwargs() == {
        "broadcast_buffers": False,
        "bucket_cap_mb": 32,
        "static_graph": True,
        "gradient_as_bucket_view": True,
    }


def test_ddp_knobs_sets_both_knobs_and_undoes_them(monkeypatch):
    """Under the wrapper's knobs dynamo compiles a DDP model as one graph and the Trainer's DDP arguments ask for
    gradients as bucket views; after the block (run_glue_iw's end) both are as they were, and so is GlueTrainer."""
    import torch._dynamo
    import transformers.trainer

    monkeypatch.setattr(torch._dynamo.config, "optimize_ddp", True)  # the default, whatever an earlier test did
    real_kwargs, real_trainer = transformers.trainer.DistributedDataParallelKwargs, glue_run.GlueTrainer
    args, run_argv = ddp_knobs.parse(["--optimize_ddp", "false", "--gradient_as_bucket_view", "--", "--do_train"])
    assert run_argv == ["--do_train"]
    with ddp_knobs.knobs(args):
        assert torch._dynamo.config.optimize_ddp is False
        handler = transformers.trainer.DistributedDataParallelKwargs(find_unused_parameters=False)
        assert isinstance(handler, real_kwargs) and handler.gradient_as_bucket_view is True
        assert handler.to_kwargs() == {"gradient_as_bucket_view": True}  # what accelerate hands DDP
        assert issubclass(glue_run.GlueTrainer, real_trainer) and glue_run.GlueTrainer is not real_trainer
    assert torch._dynamo.config.optimize_ddp is True
    assert transformers.trainer.DistributedDataParallelKwargs is real_kwargs and glue_run.GlueTrainer is real_trainer
    assert not real_kwargs(find_unused_parameters=False).gradient_as_bucket_view
    with ddp_knobs.knobs(ddp_knobs.parse(["--optimize_ddp", "true", "--"])[0]):  # true alone: the bucket view not
        assert torch._dynamo.config.optimize_ddp is True
        assert transformers.trainer.DistributedDataParallelKwargs is real_kwargs
    assert ddp_knobs.describe(args) == (
        "ddp_knobs.py: torch._dynamo.config.optimize_ddp = False; DDP gradient_as_bucket_view = True"
    )


def test_ddp_knobs_fails_loudly_when_the_trainer_builds_ddp_otherwise(tmp_path, monkeypatch):
    """A transformers whose Trainer does not build its DDP arguments from transformers.trainer's
    DistributedDataParallelKwargs: one error line, from the wrapper's setup or the Trainer's construction, rather
    than a run without the knob."""
    import transformers.trainer
    from tiny import RandomClassification, tiny_args, tiny_base

    from iwtrainer import IWTrainingArguments

    training = tiny_args(tmp_path, IWTrainingArguments, iw_alpha=0.0)
    args, _ = ddp_knobs.parse(["--gradient_as_bucket_view", "--"])
    real_kwargs = transformers.trainer.DistributedDataParallelKwargs
    with ddp_knobs.knobs(args), monkeypatch.context() as m:
        m.setattr(transformers.trainer, "DistributedDataParallelKwargs", real_kwargs)  # the swap bypassed
        with pytest.raises(SystemExit) as info:
            glue_run.GlueTrainer(model=tiny_base("bert"), args=training, train_dataset=RandomClassification(8))
    message = str(info.value.code)
    assert "\n" not in message and message.startswith("ddp_knobs.py: error: the Trainer's accelerator does not pass")
    monkeypatch.delattr(transformers.trainer, "DistributedDataParallelKwargs")
    with pytest.raises(SystemExit) as info, ddp_knobs.knobs(args):
        pass
    assert "has no transformers.trainer.DistributedDataParallelKwargs" in str(info.value.code)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--gradient_as_bucket_view"], "error: expected `-- <run_glue_iw.py flags>`"),
        (["--optimize_ddp", "maybe", "--"], "error: argument --optimize_ddp: invalid choice: 'maybe'"),
        (["--optimize_ddp", "--"], "error: argument --optimize_ddp: expected one argument"),
        (["--static_graph", "--"], "error: unrecognized arguments: --static_graph"),
    ],
)
def test_ddp_knobs_bad_flags_give_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        ddp_knobs.main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exc.value.code == 2 and len(errors) == 1 and expected in errors[0]


def test_bare_torch_compile_is_the_default_mode():
    args = bench_ddp.parser().parse_args(["--model", "m", "--glue_dir", "g", "--torch_compile", "--methods", "lora"])
    assert (args.torch_compile, args.methods) == ("default", "lora")


def run_report(cmd: list[str], prefix: Path) -> dict:
    """Run a benchmark's command line (in the repository, the tests' environment): it must succeed; its
    ``PREFIX.json``."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    return json.loads(prefix.with_suffix(".json").read_text())


def per_device_smoke_command(tmp_path: Path, prefix: Path, *flags: str) -> list[str]:
    """bench_ddp on CPU: 2 gloo processes against 1, per-device batch 4, 6 steps logged every 2, tiny data; plus
    ``flags`` (methods, variants, calibration)."""
    return [
        sys.executable, str(BENCH), "--model", str(MODEL), "--glue_dir", str(GLUE), "--task", e2e_task("sst2"),
        "--cpu", "--nproc", "2", "--pairs", "fp32:4:6:per_device", "--logging_steps", "2", "--max_train_samples",
        "64", "--max_eval_samples", "16", "--threads", "1", "--runs_dir", str(tmp_path / "runs"), "--out", str(prefix),
        *flags,
    ]  # fmt: skip


@pytest.mark.slow
@needs_shared
def test_per_device_smoke_run_on_cpu(tmp_path):
    """2 CPU processes × per-device batch 4 against 1 × 4, IW-LoRA and plain LoRA, 6 steps logged every 2."""
    prefix = tmp_path / "ddp"
    cmd = per_device_smoke_command(tmp_path, prefix, "--methods", "iw,lora", "--calib_steps", "2")
    report = run_report(cmd, prefix)
    assert (report["methods"], report["torch_compile"], report["batch_modes"]) == (
        ["iw", "lora"],
        ["none"],
        ["per_device"],
    )
    assert [p["method"] for p in report["pairs"]] == ["iw", "lora"]
    for p in report["pairs"]:
        one, many = p["one"], p["many"]
        assert (p["batch_mode"], p["per_device_batch"], p["torch_compile"]) == ("per_device", 4, "none")
        assert (one["nproc"], one["per_device_batch"], one["global_batch"]) == (1, 4, 4)
        assert (many["nproc"], many["per_device_batch"]) == (2, 4)
        assert many["global_batch"] == many["nproc"] * many["per_device_batch"] == 8
        assert {r["method"] for r in (one, many)} == {p["method"]} and {
            one["torch_compile"],
            many["torch_compile"],
        } == {"none"}
        assert sorted(one["losses"], key=int) == ["2", "4", "6"] and len(many["log_seconds"]) == 3
        for key in ("speedup_train", "speedup_steps", "speedup_steady"):
            value = p["compare"][key]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (p["method"], key, value)
    iw, lora = report["pairs"]
    assert -1 <= iw["compare"]["sensitivity_spearman"] <= 1 and iw["one"]["calibration_s"] > 0
    assert lora["compare"]["sensitivity_spearman"] is None and lora["one"]["sensitivities"] is None
    md = prefix.with_suffix(".md").read_text()
    assert md.startswith("# IW-LoRA / LoRA: 1 vs 2 processes, same per-device batch (CPU (gloo))")
    rows = [line for line in md.splitlines() if line.startswith(("| IW-LoRA |", "| LoRA |"))]
    assert [row.split(" | ")[0] for row in rows] == ["| IW-LoRA", "| LoRA"]
    assert all("| none | fp32 | on | 4 | 4 → 8 | 6 |" in row for row in rows)
    order = [(r["position"], r["method"], r["nproc"], r["repeat"]) for r in report["sequence"]]
    assert order == [(1, "iw", 1, 0), (2, "iw", 2, 0), (3, "lora", 1, 0), (4, "lora", 2, 0)]
    assert iw["one"]["calibration_batches"] == 2 and lora["one"]["calibration_batches"] == 0
    calib = [r["calib_ms_per_batch"] for r in report["sequence"]]
    assert calib[2:] == [None, None] and all(c > 0 for c in calib[:2])
    assert "## Every run, in launch order" in md and "| 1 | fp32_b4_n1_per_device | IW-LoRA | none | 1 | 1 |" in md


@pytest.mark.slow
@needs_shared
def test_nosync_smoke_run_on_cpu(tmp_path):
    """--variants nosync through torchrun + gloo: 1 and 2 processes of plain LoRA, 6 steps; every rank's Trainer
    takes the recipe (each warns that non_blocking is on without pinned memory, which the CPU turns off)."""
    prefix = tmp_path / "ddp"
    cmd = per_device_smoke_command(tmp_path, prefix, "--methods", "lora", "--variants", "nosync")
    report = run_report(cmd, prefix)
    assert report["variants"] == ["nosync"] and report["sync_free_flags"] == list(bench_ddp.SYNC_FREE_FLAGS)
    (entry,) = report["pairs"]
    assert (entry["method"], entry["variant"]) == ("lora", "nosync") and report["variant_ratios"] == []
    assert sorted(entry["many"]["losses"], key=int) == ["2", "4", "6"] and entry["compare"]["speedup_steady"] > 0
    for nproc in (1, 2):
        log = (tmp_path / "runs" / f"fp32_b4_n{nproc}_per_device_lora_nosync.log").read_text()
        assert "'non_blocking': True" in log and "logging_nan_inf_filter=False" in log  # rank 0's arguments
        assert log.count("`non_blocking` is enabled but `dataloader_pin_memory` is not") == nproc
    md = prefix.with_suffix(".md").read_text()
    assert md.startswith("# LoRA: 1 vs 2 processes, same per-device batch, sync-free recipe (CPU (gloo))")
    assert "| LoRA + nosync | none | fp32 | on | 4 | 4 → 8 | 6 |" in md


@pytest.mark.slow
@needs_shared
def test_onegraph_smoke_run_on_cpu_logs_the_nosync_losses(tmp_path):
    """--variants nosync,onegraph through torchrun + gloo: IW-LoRA (2 calibration batches) on 1 and 2 processes, 6
    steps. Rank 0 names the knobs, every rank's Trainer checks its accelerator hands DDP gradient_as_bucket_view
    (else the run fails), and the knobs change no arithmetic: each onegraph run logs its nosync twin's losses and
    calibrates the same sensitivities (same seed, same data, eager: optimize_ddp only acts on a compiled model)."""
    prefix = tmp_path / "ddp"
    cmd = per_device_smoke_command(tmp_path, prefix, "--methods", "iw", "--calib_steps", "2", "--variants",
                                   "nosync,onegraph")  # fmt: skip
    report = run_report(cmd, prefix)
    nosync, onegraph = report["pairs"]
    assert (nosync["variant"], onegraph["variant"]) == ("nosync", "onegraph")
    for side in ("one", "many"):
        a, b = nosync[side], onegraph[side]
        assert sorted(b["losses"], key=int) == ["2", "4", "6"] and a["losses"].keys() == b["losses"].keys()
        assert all(b["losses"][k] == pytest.approx(a["losses"][k], abs=1e-6) for k in a["losses"]), (side, a, b)
        assert b["sensitivities"] == pytest.approx(a["sensitivities"], rel=1e-6)
    for nproc in (1, 2):
        log = (tmp_path / "runs" / f"fp32_b4_n{nproc}_per_device_onegraph.log").read_text()
        assert (
            log.count("ddp_knobs.py: torch._dynamo.config.optimize_ddp = False; DDP gradient_as_bucket_view = True")
            == 1
        )
        assert "ddp_static_graph=True" in log and "ddp_broadcast_buffers=False" in log  # rank 0's arguments
    (ratios,) = report["variant_ratios"]
    assert (ratios["variant"], ratios["baseline"]) == ("onegraph", "nosync")
    md = prefix.with_suffix(".md").read_text()
    assert "| IW-LoRA + onegraph | none | fp32 | on | 4 | 4 → 8 | 6 |" in md and "## `onegraph` ÷ nosync" in md


def test_grouped_order_is_the_original_order():
    """Default: each method's 1- then N-process run, method after method (the order of the committed runs)."""
    runs = bench_ddp.schedule(1, ["none"], ["iw", "lora"], 2)
    assert runs == [
        (0, "none", "iw", "plain", 1, 0),
        (0, "none", "iw", "plain", 2, 0),
        (0, "none", "lora", "plain", 1, 0),
        (0, "none", "lora", "plain", 2, 0),
    ]
    two = bench_ddp.schedule(2, ["none", "default"], ["lora"], 4, repeats=2)
    assert [(p, m, n, r) for p, m, _, _, n, r in two[:4]] == [(0, "none", 1, 0), (0, "none", 4, 0),
                                                               (0, "none", 1, 1), (0, "none", 4, 1)]  # fmt: skip
    assert [(p, m) for p, m, *_ in two[::4]] == [(0, "none"), (0, "default"), (1, "none"), (1, "default")]


def test_variants_run_side_by_side_in_either_order():
    """--variants plain,nosync: each method's plain runs, then its nosync runs (1 and N processes), before the next
    method; alternating, every round holds every method × variant × process count, reversed every other round."""
    runs = bench_ddp.schedule(1, ["reduce-overhead"], ["lora", "iw"], 2, variants=["plain", "nosync"])
    assert [(m, v, n) for _, _, m, v, n, _ in runs] == [
        ("lora", "plain", 1), ("lora", "plain", 2), ("lora", "nosync", 1), ("lora", "nosync", 2),
        ("iw", "plain", 1), ("iw", "plain", 2), ("iw", "nosync", 1), ("iw", "nosync", 2),
    ]  # fmt: skip
    alt = bench_ddp.schedule(1, ["none"], ["lora"], 2, repeats=2, order="alternate", variants=["plain", "nosync"])
    assert [(v, n, r) for _, _, _, v, n, r in alt] == [
        ("plain", 1, 0), ("plain", 2, 0), ("nosync", 1, 0), ("nosync", 2, 0),
        ("nosync", 2, 1), ("nosync", 1, 1), ("plain", 2, 1), ("plain", 1, 1),
    ]  # fmt: skip


def test_alternate_order_reverses_every_other_round():
    """--order alternate: a round of every method × process count per repeat, reversed every other round, so each
    run's mean position is the same (a first-run or drift effect cannot favour one method)."""
    runs = bench_ddp.schedule(1, ["none"], ["lora", "iw"], 2, repeats=3, order="alternate")
    assert [(m, n, r) for _, _, m, _, n, r in runs] == [
        ("lora", 1, 0), ("lora", 2, 0), ("iw", 1, 0), ("iw", 2, 0),
        ("iw", 2, 1), ("iw", 1, 1), ("lora", 2, 1), ("lora", 1, 1),
        ("lora", 1, 2), ("lora", 2, 2), ("iw", 1, 2), ("iw", 2, 2),
    ]  # fmt: skip
    even = bench_ddp.schedule(1, ["none"], ["lora", "iw"], 2, repeats=2, order="alternate")
    positions: dict = {}
    for i, (_, _, m, _, n, _) in enumerate(even):
        positions.setdefault((m, n), []).append(i)
    assert {sum(p) for p in positions.values()} == {7}  # ABBA: every run's positions sum alike
    with pytest.raises(ValueError, match="grouped|alternate"):
        bench_ddp.schedule(1, ["none"], ["iw"], 2, order="random")


def test_repeats_and_order_flags(capsys):
    args = bench_ddp.parser().parse_args(["--model", "m", "--glue_dir", "g", "--repeats", "2", "--order", "alternate"])
    assert (args.repeats, args.order) == (2, "alternate")
    assert bench_ddp.parser().parse_args(["--model", "m", "--glue_dir", "g"]).order == "grouped"
    assert "--repeats: expected a positive integer" in error_line(capsys, ["--repeats", "0"])
    with pytest.raises(SystemExit):
        bench_ddp.parser().parse_args(["--model", "m", "--glue_dir", "g", "--order", "random"])


def fake_launch(rates: dict):
    """A stand-in for ``launch``: records the launch order; a run's steady rate from ``rates[(method, nproc)]`` (for
    a variant other than plain ``rates[(method, variant, nproc)]``), a list consumed one repeat at a time; IW-LoRA
    runs have 10 calibration batches of 1 s in all."""
    order = []

    def launch(args, model, run):
        plain = run.variant == "plain"
        order.append((run.method, run.nproc, run.repeat) if plain else (run.method, run.variant, run.nproc))
        rate = rates[(run.method, run.nproc) if plain else (run.method, run.variant, run.nproc)].pop(0)
        iw = run.method == "iw"
        losses = {2: 0.7, 4: 0.6}
        return {
            "nproc": run.nproc, "repeat": run.repeat, "per_device_batch": 4, "global_batch": 4 * run.nproc,
            "method": run.method, "variant": run.variant, "torch_compile": run.compile_mode, "process_wall_s": 10.0,
            "train_runtime_s": 5.0,
            "calibration_s": 1.0 if iw else 0.0, "calibration_batches": 10 if iw else 0, "samples_per_s": rate / 2,
            "step_samples_per_s": rate, "steady_samples_per_s": rate, "log_seconds": {}, "eval": {},
            "sensitivities": {"a": 1.0, "b": 2.0} if iw else None,
            "coefficients": {"a": 0.5, "b": 0.1} if iw else None,
            "losses": losses,
        }  # fmt: skip

    return launch, order


def test_repeats_give_median_rates_and_a_launch_order_table(tmp_path, monkeypatch, capsys):
    """Two alternating repeats: launched ABBA, each side's rates the median over its repeats, every run of every
    repeat in the JSON, and the markdown's launch-order table shows a slow first run as what it is."""
    rates = {
        ("lora", 1): [100.0, 300.0],
        ("lora", 2): [400.0, 420.0],
        ("iw", 1): [200.0, 220.0],
        ("iw", 2): [380.0, 400.0],
    }
    launch, order = fake_launch(rates)
    monkeypatch.setattr(bench_ddp, "launch", launch)
    prefix = tmp_path / "ddp"
    argv = ["--model", "m", "--glue_dir", "g", "--cpu", "--pairs", "fp32:4:4:per_device", "--methods", "lora,iw",
            "--repeats", "2", "--order", "alternate", "--runs_dir", str(tmp_path), "--out", str(prefix)]  # fmt: skip
    report = bench_ddp.main(argv)
    assert order == [("lora", 1, 0), ("lora", 2, 0), ("iw", 1, 0), ("iw", 2, 0),
                     ("iw", 2, 1), ("iw", 1, 1), ("lora", 2, 1), ("lora", 1, 1)]  # fmt: skip
    assert json.loads(prefix.with_suffix(".json").read_text()) == json.loads(json.dumps(report))
    assert (report["repeats"], report["order"]) == (2, "alternate")
    lora, iw = report["pairs"]  # in --methods order, whatever the launch order
    assert (lora["method"], iw["method"]) == ("lora", "iw")
    assert lora["one"]["steady_samples_per_s"] == 200.0 and lora["many"]["steady_samples_per_s"] == 410.0
    assert iw["one"]["steady_samples_per_s"] == 210.0 and iw["compare"]["speedup_steady"] == pytest.approx(390 / 210)
    assert [r["steady_samples_per_s"] for r in lora["runs"]["1"]] == [100.0, 300.0]
    assert [r["repeat"] for r in iw["runs"]["2"]] == [0, 1] and iw["one"]["repeats"] == 2
    assert iw["compare"]["sensitivity_spearman"] == pytest.approx(1.0)
    rows = report["sequence"]
    assert [(r["position"], r["name"]) for r in rows[:3]] == [
        (1, "fp32_b4_n1_per_device_lora_r1"),
        (2, "fp32_b4_n2_per_device_lora_r1"),
        (3, "fp32_b4_n1_per_device_r1"),
    ]
    assert rows[0]["steady_ms_per_step"] == pytest.approx(40.0) and rows[0]["calib_ms_per_batch"] is None
    assert rows[2]["calib_ms_per_batch"] == pytest.approx(100.0)
    md = prefix.with_suffix(".md").read_text()
    assert md == bench_ddp.markdown(report)
    assert "Every run 2× (alternate order, see the last table): each samples/s is the median" in md
    table = md[md.index("## Every run, in launch order") :].splitlines()
    assert table[-8] == "| 1 | fp32_b4_n1_per_device_lora_r1 | LoRA | none | 1 | 1 | 100 | 40.0 | — |"
    assert table[-1] == "| 8 | fp32_b4_n1_per_device_lora_r2 | LoRA | none | 1 | 2 | 300 | 13.3 | — |"
    assert "| 3 | fp32_b4_n1_per_device_r1 | IW-LoRA | none | 1 | 1 | 200 | 20.0 | 100.0 |" in table
    out = capsys.readouterr().out
    assert out.count('"speedup_steady"') == 2  # each pair's comparison printed once, when its last run ends


def test_one_repeat_keeps_the_pairs_as_before(tmp_path, monkeypatch):
    """--repeats 1 (default): each side is its one run, no per-repeat copies, run names without _rK."""
    launch, order = fake_launch({("iw", 1): [200.0], ("iw", 2): [380.0]})
    monkeypatch.setattr(bench_ddp, "launch", launch)
    argv = ["--model", "m", "--glue_dir", "g", "--cpu", "--pairs", "fp32:4:4:per_device", "--methods", "iw",
            "--runs_dir", str(tmp_path), "--out", str(tmp_path / "ddp")]  # fmt: skip
    (pair,) = bench_ddp.main(argv)["pairs"]
    assert order == [("iw", 1, 0), ("iw", 2, 0)] and "runs" not in pair and "repeats" not in pair["one"]
    assert pair["one"]["steady_samples_per_s"] == 200.0


def compiled_lora_variants(tmp_path, monkeypatch, rates: dict, variants: str):
    """bench_ddp's main for LoRA under ``reduce-overhead`` with ``--variants variants``, runs faked by
    ``fake_launch(rates)``: the report, the launch order and the output prefix."""
    launch, order = fake_launch(rates)
    monkeypatch.setattr(bench_ddp, "launch", launch)
    prefix = tmp_path / "ddp"
    argv = ["--model", "m", "--glue_dir", "g", "--cpu", "--pairs", "fp32:4:4:per_device", "--methods", "lora",
            "--torch_compile", "reduce-overhead", "--variants", variants, "--runs_dir", str(tmp_path),
            "--out", str(prefix)]  # fmt: skip
    return bench_ddp.main(argv), order, prefix


def test_plain_and_nosync_side_by_side_in_one_report(tmp_path, monkeypatch):
    """--variants plain,nosync: every run twice, the nosync runs named and labelled as such, the recipe stated in the
    header and recorded in the JSON, and a table of nosync ÷ plain for 1 and 2 processes."""
    rates = {("lora", 1): [800.0], ("lora", 2): [1200.0], ("lora", "nosync", 1): [1000.0],
             ("lora", "nosync", 2): [1800.0]}  # fmt: skip
    report, order, prefix = compiled_lora_variants(tmp_path, monkeypatch, rates, "plain,nosync")
    assert order == [("lora", 1, 0), ("lora", 2, 0), ("lora", "nosync", 1), ("lora", "nosync", 2)]
    assert report["variants"] == ["plain", "nosync"]
    assert report["sync_free_flags"] == list(bench_ddp.SYNC_FREE_FLAGS)
    assert [r["name"] for r in report["sequence"]] == [
        "fp32_b4_n1_per_device_lora_compile_reduce-overhead",
        "fp32_b4_n2_per_device_lora_compile_reduce-overhead",
        "fp32_b4_n1_per_device_lora_compile_reduce-overhead_nosync",
        "fp32_b4_n2_per_device_lora_compile_reduce-overhead_nosync",
    ]
    plain, nosync = report["pairs"]
    assert (plain["variant"], nosync["variant"]) == ("plain", "nosync")
    assert nosync["compare"]["speedup_steady"] == pytest.approx(1.8)
    (v,) = report["variant_ratios"]
    assert (v["method"], v["variant"], v["torch_compile"], v["per_device_batch"]) == (
        "lora", "nosync", "reduce-overhead", 4
    )  # fmt: skip
    assert v["one_steady_samples_per_s"] == [800.0, 1000.0] and v["one_steady_samples_per_s_ratio"] == 1.25
    assert v["many_steady_samples_per_s_ratio"] == pytest.approx(1.5)
    assert v["speedup_steady"] == [pytest.approx(1.5), pytest.approx(1.8)]
    md = prefix.with_suffix(".md").read_text()
    assert md == bench_ddp.markdown(json.loads(prefix.with_suffix(".json").read_text()))
    assert md.startswith("# LoRA: 1 vs 2 processes, same per-device batch, plain vs sync-free recipe (CPU (gloo))")
    recipe = """`--logging_nan_inf_filter false --accelerator_config '{"non_blocking": true}'`"""
    assert f"`+ nosync` rows: the same runs with the sync-free recipe {recipe} appended to run_glue_iw's" in md
    rows = [line for line in md.splitlines() if line.startswith("| LoRA")]
    assert [row.split(" | ")[0] for row in rows[:2]] == ["| LoRA", "| LoRA + nosync"]
    assert "## Sync-free recipe ÷ plain, measured in this invocation" in md
    assert (
        "| LoRA + nosync | reduce-overhead | fp32 | 4 per device | 4 | 800 → 1000 | 1.250 | 1200 → 1800 | 1.500 | "
        "1.250 / 1.500 | 1.50× / 1.80× |"
    ) in md
    assert "| 3 | fp32_b4_n1_per_device_lora_compile_reduce-overhead_nosync | LoRA + nosync | reduce-overhead |" in md


def test_nosync_alone_runs_every_run_with_the_recipe(tmp_path, monkeypatch):
    """--variants nosync: only the recipe's runs, the header says so, no nosync ÷ plain table (no plain runs)."""
    launch, order = fake_launch({("iw", "nosync", 1): [200.0], ("iw", "nosync", 2): [380.0]})
    monkeypatch.setattr(bench_ddp, "launch", launch)
    argv = ["--model", "m", "--glue_dir", "g", "--cpu", "--pairs", "fp32:4:4:per_device", "--variants", "nosync",
            "--runs_dir", str(tmp_path), "--out", str(tmp_path / "ddp")]  # fmt: skip
    report = bench_ddp.main(argv)
    assert order == [("iw", "nosync", 1), ("iw", "nosync", 2)] and report["variant_ratios"] == []
    md = (tmp_path / "ddp.md").read_text()
    assert md.startswith("# IW-LoRA: 1 vs 2 processes, same per-device batch, sync-free recipe (CPU (gloo))")
    assert "Every run with the sync-free recipe `--logging_nan_inf_filter false" in md
    assert "| IW-LoRA + nosync | none | fp32 | on | 4 | 4 → 8 | 4 |" in md and "Sync-free recipe ÷ plain" not in md


def test_ddp_variants_side_by_side_against_the_first_listed(tmp_path, monkeypatch):
    """--variants nosync,lean,onegraph (no plain): every run three times, each variant's flags and wrapper stated in
    the header and recorded in the JSON, and lean and onegraph compared with nosync."""
    rates = {("lora", v, n): [r] for (v, n), r in {("nosync", 1): 1000.0, ("nosync", 2): 1600.0, ("lean", 1): 1000.0,
             ("lean", 2): 1700.0, ("onegraph", 1): 1100.0, ("onegraph", 2): 2000.0}.items()}  # fmt: skip
    report, order, prefix = compiled_lora_variants(tmp_path, monkeypatch, rates, "nosync,lean,onegraph")
    assert [v for _, v, _ in order] == ["nosync", "nosync", "lean", "lean", "onegraph", "onegraph"]
    lean = [*bench_ddp.SYNC_FREE_FLAGS, *bench_ddp.LEAN_DDP_FLAGS]
    assert report["variant_flags"] == {"nosync": list(bench_ddp.SYNC_FREE_FLAGS), "lean": lean, "onegraph": lean}
    assert report["variant_wrappers"] == {"onegraph": list(bench_ddp.WRAPPERS["onegraph"])}
    assert [(v["variant"], v["baseline"]) for v in report["variant_ratios"]] == [
        ("lean", "nosync"),
        ("onegraph", "nosync"),
    ]
    onegraph = report["variant_ratios"][1]
    assert onegraph["one_steady_samples_per_s_ratio"] == pytest.approx(1.1)
    assert onegraph["many_steady_samples_per_s_ratio"] == pytest.approx(1.25)
    md = prefix.with_suffix(".md").read_text()
    assert md == bench_ddp.markdown(json.loads(prefix.with_suffix(".json").read_text()))
    assert md.startswith("# LoRA: 1 vs 2 processes, same per-device batch, variants nosync / lean / onegraph (CPU")
    assert "`+ nosync` rows: the same runs with the sync-free recipe `--logging_nan_inf_filter false" in md
    assert (
        "`+ lean` rows: the same runs with the sync-free recipe and three DDP flags `--logging_nan_inf_filter false "
        """--accelerator_config '{"non_blocking": true}' --ddp_static_graph true --ddp_broadcast_buffers false """
        "--ddp_bucket_cap_mb 32` "
        "appended to run_glue_iw's command line"
    ) in md
    assert (
        "appended to run_glue_iw's command line, run by `benchmarks/ddp_knobs.py --optimize_ddp false "
        "--gradient_as_bucket_view -- <run_glue_iw.py flags>` in place of run_glue_iw.py"
    ) in md
    assert "## Each variant ÷ nosync, measured in this invocation" in md and "| variant ÷ nosync 2 |" in md
    assert (
        "| LoRA + onegraph | reduce-overhead | fp32 | 4 per device | 4 | 1000 → 1100 | 1.100 | 1600 → 2000 | 1.250 | "
    ) in md


def test_plain_reports_keep_their_header():
    """Without --variants the header says nothing of the recipe (the committed reports' markdown stays as it was)."""
    report = json.loads((ROOT / "benchmarks" / "results" / "ddp_per_device_eager.json").read_text())
    md = bench_ddp.markdown({**report, "variants": ["plain"]})
    assert "sync-free" not in md and "nosync" not in md and md == bench_ddp.markdown(report)


@pytest.mark.parametrize(
    "name",
    [
        "ddp",
        "ddp_deberta",
        "ddp_per_device_eager",
        "ddp_per_device_compiled",
        "ddp_per_device_reduce_overhead",
        "ddp_per_device_nosync_lora",
    ],  # fmt: skip
)
def test_committed_reports_regenerate(name):
    """The committed JSONs (written before --repeats existed) give their committed markdown's generated part."""
    results = ROOT / "benchmarks" / "results"
    md = (results / f"{name}.md").read_text()
    generated = bench_ddp.markdown(json.loads((results / f"{name}.json").read_text()))
    assert md.startswith(generated)

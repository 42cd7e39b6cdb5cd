"""Whole training runs of ``run_glue_iw.py``, eager vs ``torch.compile``: what compiling saves over a run once its
compile time is paid, and whether the losses stay the same.

Each configuration ``METHOD:MODE[+nosync][@GPU]`` is one process, ``python run_glue_iw.py`` on one GPU
(``CUDA_VISIBLE_DEVICES=GPU``): METHOD ``lora`` (``--iw_alpha 0``: plain peft LoRA) or ``iw`` (IW-LoRA, ``sum``,
α=1e-4, ``--calib_steps`` calibration batches), MODE ``none`` (eager) or a ``torch.compile`` mode of the Trainer
(``--torch_compile true --torch_compile_mode MODE``). Configurations on the same GPU run one after the other, in the
order given; those on different GPUs run at the same time (the host is shared: while one process compiles, the
compiler's workers take CPU time from the other GPU's steps). Every run trains the same data the same way (seed 1,
batch ``--batch``, ``--epochs`` epochs, LoRA r=8, lr 5e-4, bf16), with the padding buckets that compiled runs need
in all of them, eager included: ``--pad_to_max_length false --pad_to_multiple_of 32 --dataloader_drop_last true``
(``--max_seq_length 128``: batch lengths 32, 64, 96, 128), so compiling is the only difference. The command lines
come from ``bench_ddp.build_command`` (the launcher left out: one process).

The variant ``+nosync`` (``lora:reduce-overhead+nosync@1``, run name ``lora_reduce-overhead_nosync``) appends the
sync-free recipe ``bench_ddp.SYNC_FREE_FLAGS`` to that run's command line: ``--logging_nan_inf_filter false
--accelerator_config '{"non_blocking": true}'`` (one argument holding the JSON, parsed by the Trainer's own
``TrainingArguments`` into ``accelerator_config.non_blocking = True``). Without it the Trainer synchronises the host
with the GPU several times a step, which serialises its host work (optimizer, collation, callbacks) with the GPU's:
its NaN/inf filter reads each step's loss (``torch.isnan(tr_loss_step) or torch.isinf(tr_loss_step)``) and
accelerate's prepared dataloader copies each batch with ``non_blocking=False`` (non-blocking copies need pinned
batches: ``--dataloader_pin_memory true``, the Trainer's default on a GPU). A non-finite loss still stops the run
(iwtrainer's DivergenceGuard checks on the device). The recipe changes no arithmetic. A ``_nosync`` run is compared
like any other against the eager run of its method and, when the invocation has it, against the same method and
mode without the recipe (X ÷ X without variant: steady step, ``train()``; its loss curve).

Per run, from the process's own clock and the arrival times of its log lines on stdout (``--disable_tqdm true``:
the Trainer prints each log dict, ``{'train_runtime'...}`` when ``train()`` ends):

* process wall time (start to exit: imports, model load, tokenising, ``train()``, evaluation), ``train_runtime``
  (``train()``: calibration, compiling and every step), calibration seconds, evaluation seconds;
* steady ms/step: the median over the logging intervals from the 2nd logged step on (robust to an interval that
  compiled a new batch shape) and the mean over the same span (``bench_ddp``'s steady rate);
* where the rest of ``train()`` went, with ``train()`` started at the ``train_runtime`` line's arrival minus
  ``train_runtime``: time to the first logged step after calibration, minus that many steps at the steady speed
  (**warm-up above steady**: the first compile and graph capture, for eager runs the first kernels); after the first
  logged step, the time above ``steps × steady`` (**later above steady**: each new shape's compile, logging); and
  intervals slower than 1.5× the median (count and excess seconds);
* the logged training loss at every logging step, the run's mean training loss (``train_loss``), the last logged
  loss and the dev metric.

Within the one invocation: compiled ÷ eager LoRA for the process wall time, ``train()`` and the steady step (and
÷ the eager run of the same method); each compiled run's loss curve against the eager run of its method (same seed,
same batches: max and mean absolute difference over the logged steps; compiled dropout draws its masks from another
generator, so the curves agree statistically, not step by step — ``--nodrop`` turns every dropout off), the final
losses, the dev metrics and, for IW-LoRA, the calibrated sensitivities (calibration runs eagerly on the uncompiled
model in both: they should agree to round-off); the eager IW-LoRA vs eager LoRA curves as a reference (two runs
α=1e-4 apart). When a run trains fewer steps than ``--full_epochs`` epochs of the whole training set (``--epochs``,
``--max_train_samples``), the whole run is **arithmetic**: the run's wall time minus its steps at the steady speed
(startup, calibration, compiling, evaluation: the same for more steps), plus the full run's steps at that speed.

The GPU command (nvidia-h200-x2; all-mpnet-base-v2 staged at /tmp/models by earlier calls from the four ``.mp/``
parts, ``sh .mp/reassemble.sh .mp /tmp/models``, each call carrying one part; this call carries ``.gpu/glue`` and
``.whl``: datasets, dill, multiprocess, evaluate). Eager LoRA then eager IW-LoRA on GPU 0, ``reduce-overhead`` LoRA
then IW-LoRA on GPU 1, 3 epochs of 32,000 SST-2 rows (3,000 steps a run: a 3-epoch run of all 67,349 rows is 6,312
steps, ~5.5–8 min eager at 53–78 ms a step, and two of them do not fit in one 10-minute call; the whole run's
numbers are then arithmetic, from each run's measured compile, calibration, startup and steady step):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
      .whl/*.whl && export PYTHONPATH=/tmp/site && python3 benchmarks/bench_run.py \\
      --model /tmp/models/all-mpnet-base-v2 --glue_dir .gpu/glue --task sst2 \\
      --configs lora:none@0,iw:none@0,lora:reduce-overhead@1,iw:reduce-overhead@1 --max_train_samples 32000 \\
      --stop_after 300 --out $OUT/compile_whole_run

Expected (estimates from ``compile_step_pairs.md`` / ``compile_step_time.md``, not measured whole): GPU 0 ≈ 2 ×
(3,000 × 53–78 ms + ~30 s) ≈ 380–530 s; GPU 1 ≈ 2 × (~100 s compiling + 3,000 × ~9 ms + ~30 s, and any compile of
the evaluation's graphs) ≈ 320–420 s; run it with timeout_s 600. ``--stop_after 300`` starts no run after 300 s (a
second eager run started later could not end in the call); a run not started is listed as skipped. The JSON and
markdown are rewritten after every run, so a call stopped at its limit keeps the runs that ended. The default
compile mode in a second call, eager LoRA again as the reference: ``--configs
lora:none@0,iw:default@0,lora:default@1 --max_train_samples 32000 --stop_after 270 --out
$OUT/compile_whole_run_default`` (default mode: ~126 s compiling + 3,000 × ~40 ms; IW-LoRA starts only if eager
LoRA ended by 270 s). ``--deberta_shapes`` trains a random DeBERTa-v3-base-shaped model instead
(``bench_ddp.deberta_shapes_model``: its speed, not its accuracy; slower steps: fewer rows); its compiled step is
measured by ``bench_step.py --deberta only`` (that file's docstring).

The sync-free recipe against the current one, in one invocation (same machine and staging, ``.gpu/glue`` and
``.whl`` carried as above; ``reduce-overhead`` only: LoRA without then with the recipe on GPU 0, IW-LoRA with then
without it on GPU 1):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
      .whl/*.whl && export PYTHONPATH=/tmp/site && python3 benchmarks/bench_run.py \\
      --model /tmp/models/all-mpnet-base-v2 --glue_dir .gpu/glue --task sst2 --configs \\
      lora:reduce-overhead@0,lora:reduce-overhead+nosync@0,iw:reduce-overhead+nosync@1,iw:reduce-overhead@1 \\
      --max_train_samples 32000 --stop_after 450 --out $OUT/compile_whole_run_nosync

Expected (from ``compile_whole_run.md``: a ``reduce-overhead`` run of 3,000 steps took 210 s wall with ~120 s of
compiling when its graphs were new, ~112 s when the inductor cache held them, steady 22 ms/step): each GPU's first
run compiles (both at once, from an empty cache: ~210–250 s with IW-LoRA's ~9 s of calibration), its second finds
the graphs cached (~100–115 s, less if the recipe shortens the step): ≈ 330–370 s per GPU, ≈ 230 s when the cache
is already warm; timeout_s 600. The recipe runs second on GPU 0 and first on GPU 1, so the compile share of a
``train()`` ÷ without-variant ratio leans opposite ways for the two methods; the steady ratios hold no compile.

And 1 vs 2 processes with and without the recipe (``bench_ddp.py --variants plain,nosync``: each run side by side
with its ``+ nosync`` twin, and a table of nosync ÷ plain; per-device batch 32, 300 steps), one call per method:

    python3 benchmarks/bench_ddp.py --model /tmp/models/all-mpnet-base-v2 --glue_dir .gpu/glue --task sst2 \\
      --nproc 2 --pairs bf16:32:300:per_device --methods lora --torch_compile reduce-overhead \\
      --variants plain,nosync --calib_steps 50 --logging_steps 20 --out $OUT/ddp_per_device_nosync_lora

then the same with ``--methods iw --out $OUT/ddp_per_device_nosync_iw``. Expected (from
``ddp_per_device_reduce_overhead.md``: 124 and 153 s for the first 1- and 2-process runs, compiling, then 57 and
95 s with the graphs cached): ≈ 430 s for the first call on a fresh machine, ≈ 300 s for the second (the same
graphs: IW-LoRA's compile hit LoRA's cache there). ``--methods lora,iw`` in one call would take ≈ 730 s, above a
call's 600 s.

A CPU smoke run of the whole pipeline (MiniLM, a few steps, ``aot_eager``; ``@GPU`` only groups the runs into lanes
that run at the same time; the numbers mean nothing):

    python benchmarks/bench_run.py --cpu --model ../shared/models/all-MiniLM-L6-v2 --glue_dir ../shared/data/glue \\
      --configs lora:none@0,iw:none@1,lora:default@0 --compile_backend aot_eager --precision fp32 --batch 4 \\
      --max_steps 8 --logging_steps 2 --calib_steps 2 --max_train_samples 64 --max_eval_samples 16 --eval_batch 8 \\
      --threads 1 --out /tmp/bench_run_smoke
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_ddp  # noqa: E402
from bench_ddp import METHODS, Pair, Run, fmt, median, ratio  # noqa: E402

from iwtrainer.glue.tasks import objective_metric  # noqa: E402

SCRIPT = str(ROOT / "run_glue_iw.py")
CONFIG_FORMAT = "METHOD:MODE[+nosync][@GPU]"
VARIANT_SUFFIXES = tuple(v for v in bench_ddp.VARIANTS if v != "plain")
"""The variants a configuration may add after its MODE (``+nosync``: ``bench_ddp.SYNC_FREE_FLAGS``)."""
DEFAULT_CONFIGS = "lora:none@0,iw:none@0,lora:reduce-overhead@1,iw:reduce-overhead@1"
TRAIN_END_LINE = "{'train_runtime'"
"""The log dict the Trainer prints when ``train()`` ends (``PrinterCallback``): its arrival marks the end."""
SETTINGS = (
    "batch", "epochs", "max_steps", "max_train_samples", "precision", "nodrop", "calib_steps", "logging_steps",
    "max_seq_length", "pad_to_multiple_of", "eval_batch", "compile_backend", "stop_after",
)  # fmt: skip
"""The flags every run shares, recorded in the report's ``setting``."""
SLOW_INTERVAL = 1.5
"""A logging interval slower than this × the median is counted as slow (a new batch shape compiled in it)."""


@dataclass(frozen=True)
class Config:
    """One ``--configs`` entry: a method, a compile mode (``none`` = eager), the GPU that runs it and its variant
    (``plain``, or ``nosync``: the sync-free recipe ``bench_ddp.SYNC_FREE_FLAGS`` appended to its command line)."""

    method: str
    mode: str
    gpu: int = 0
    variant: str = "plain"

    @property
    def name(self) -> str:
        name = f"{self.method}_{'eager' if self.mode == 'none' else self.mode}"
        return name + ("" if self.variant == "plain" else f"_{self.variant}")

    @property
    def without_variant(self) -> str:
        """The name of the same method and mode without the variant (the plain run it is compared against)."""
        return Config(self.method, self.mode, self.gpu).name


def parse_configs(text: str) -> list[Config]:
    """``--configs``' comma list; a ValueError with one line naming the bad entry and what was expected."""
    configs = []
    for spec in text.split(","):
        expected = (
            f"expected {CONFIG_FORMAT}, METHOD {'|'.join(METHODS)}, MODE {'|'.join(bench_ddp.COMPILE_MODES)}, "
            f"+{'|+'.join(VARIANT_SUFFIXES)} optional (the sync-free recipe), GPU a CUDA device number"
        )
        head, _, gpu = spec.partition("@")
        method, _, mode = head.partition(":")
        mode, plus, variant = mode.partition("+")
        if (
            method not in METHODS
            or mode not in bench_ddp.COMPILE_MODES
            or (plus and variant not in VARIANT_SUFFIXES)
            or (gpu and not gpu.isdigit())
        ):
            raise ValueError(f"{spec!r}: {expected}")
        configs.append(Config(method, mode, int(gpu or 0), variant or "plain"))
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"{text!r}: each METHOD:MODE[+nosync] at most once")
    return configs


def lanes(configs: list[Config]) -> dict[int, list[Config]]:
    """GPU -> its configurations in the order given (run one after the other); GPUs in order of first mention."""
    out: dict[int, list[Config]] = {}
    for c in configs:
        out.setdefault(c.gpu, []).append(c)
    return out


def set_flags(cmd: list[str], flags: dict[str, str]) -> list[str]:
    """``cmd`` with each flag's value replaced where it is there, else the flag appended."""
    cmd = list(cmd)
    for name, value in flags.items():
        if name in cmd:
            cmd[cmd.index(name) + 1] = value
        else:
            cmd += [name, value]
    return cmd


def build_command(args: argparse.Namespace, model: str, config: Config, out: Path) -> tuple[list[str], dict]:
    """One run's ``python run_glue_iw.py`` command and environment: bench_ddp's 1-process command without the
    launcher, for whole epochs (or ``--max_steps``) with the padding buckets, on ``config.gpu``."""
    pair = Pair(args.precision, args.batch, max(args.max_steps, 1), nodrop=args.nodrop)
    run = Run(1, pair, config.method, config.mode, out, variant=config.variant)
    cmd, env = bench_ddp.build_command(args, model, run, 0)
    cmd = [sys.executable, *cmd[cmd.index(SCRIPT) :]]
    flags = {
        "--max_steps": str(args.max_steps or -1),
        "--num_train_epochs": str(args.epochs),
        "--max_seq_length": str(args.max_seq_length),
        "--per_device_eval_batch_size": str(args.eval_batch),
        "--pad_to_max_length": "false",
        "--pad_to_multiple_of": str(args.pad_to_multiple_of),
        "--dataloader_drop_last": "true",
    }
    if config.mode != "none" and args.compile_backend != "inductor":
        flags["--torch_compile_backend"] = args.compile_backend
    env = {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if not args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = str(config.gpu)
    return set_flags(cmd, flags), env


def timeline(
    steps: list[int],
    times: list[float],
    train_end: float | None,
    train_runtime: float,
    calibration: float,
    total_steps: int,
    wall: float,
) -> dict:
    """Where a run's time went, from the arrival times (seconds since the process started) of its logged steps
    ``steps`` and of the end of ``train()``; every field None that its inputs cannot give (fewer than 3 logged
    steps: no steady speed; no end line: no start of ``train()``)."""
    out: dict = dict.fromkeys(
        ("steady_ms", "steady_mean_ms", "startup_s", "to_first_log_s", "warmup_above_steady_s",
         "later_above_steady_s", "train_above_steady_s", "after_train_s", "slow_intervals", "slow_intervals_s")
    )  # fmt: skip
    out["first_log_step"] = steps[0] if steps else None
    out["interval_ms"] = [
        1000 * (times[i] - times[i - 1]) / (steps[i] - steps[i - 1]) for i in range(2, min(len(steps), len(times)))
    ]
    rate = bench_ddp.steady_rate(1, steps, times)  # steps/s from the 2nd to the last logged step
    if rate and out["interval_ms"]:
        steady = median(out["interval_ms"])
        out.update(steady_ms=steady, steady_mean_ms=1000 / rate)
        slow = [(i, ms) for i, ms in enumerate(out["interval_ms"], 2) if ms > SLOW_INTERVAL * steady]
        out["slow_intervals"] = len(slow)
        out["slow_intervals_s"] = sum((ms - steady) * (steps[i] - steps[i - 1]) / 1000 for i, ms in slow)
        out["train_above_steady_s"] = train_runtime - calibration - total_steps * steady / 1000
    if train_end is not None:
        start = train_end - train_runtime
        out.update(startup_s=start, after_train_s=wall - train_end)
        if times:
            out["to_first_log_s"] = times[0] - start - calibration
        if times and out["steady_ms"] is not None:
            out["warmup_above_steady_s"] = out["to_first_log_s"] - steps[0] * out["steady_ms"] / 1000
            out["later_above_steady_s"] = train_end - times[0] - (total_steps - steps[0]) * out["steady_ms"] / 1000
    return out


def full_run_estimate(run: dict, full_steps: int) -> dict | None:
    """Arithmetic: the run's wall time and ``train()`` with ``full_steps`` steps at its steady speed instead of its
    own steps (everything else as measured); None when it trained exactly those steps or has no steady speed."""
    if run.get("steady_ms") is None or run["steps"] == full_steps:
        return None
    extra = (full_steps - run["steps"]) * run["steady_ms"] / 1000
    return {"steps": full_steps, "wall_s": run["process_wall_s"] + extra, "train_s": run["train_runtime_s"] + extra}


def config_fields(config: Config) -> dict:
    """A run's record of its configuration (the variant only where it is not plain: reports as before)."""
    run = {"name": config.name, "method": config.method, "torch_compile": config.mode, "gpu": config.gpu}
    if config.variant != "plain":
        run.update(variant=config.variant, without_variant=config.without_variant)
    return run


def launch(args: argparse.Namespace, model: str, config: Config) -> dict:
    """One run: its command, timings, losses, sensitivities and dev metrics (or ``error`` with its output's end)."""
    out = Path(args.runs_dir) / config.name
    cmd, env = build_command(args, model, config, out)
    stamps: dict[str, list[float]] = {TRAIN_END_LINE: []}
    rc, stdout, stderr, wall, times = bench_ddp.run_timed(cmd, env, stamps)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.log").write_text(stdout + stderr)
    run = config_fields(config)
    run["command"] = shlex.join(cmd)
    if rc != 0:
        return {**run, "error": f"rc {rc}: {(stderr or stdout)[-2000:]}", "process_wall_s": wall}
    results, importance, state = bench_ddp.run_outputs(out)
    losses = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    calibration = importance.get("calibration_seconds") or 0.0
    steps = state["global_step"]
    run.update(
        process_wall_s=wall,
        train_runtime_s=results["train_runtime"],
        calibration_s=calibration,
        calibration_batches=importance.get("calibration_batches") or 0,
        eval_runtime_s=results.get("eval_runtime"),
        steps=steps,
        epochs=state.get("num_train_epochs"),
        train_loss=results.get("train_loss"),
        last_logged_loss=losses[max(losses)] if losses else None,
        eval=bench_ddp.eval_metrics(results),
    )
    train_end = stamps[TRAIN_END_LINE][0] if stamps[TRAIN_END_LINE] else None
    run.update(timeline(list(losses), times, train_end, run["train_runtime_s"], calibration, steps, wall))
    modules = importance.get("modules", {})
    run.update(  # the fields bench_ddp.compare reads
        samples_per_s=results["train_samples_per_second"],
        step_samples_per_s=args.batch * steps / (run["train_runtime_s"] - calibration),
        steady_samples_per_s=1000 * args.batch / run["steady_ms"] if run["steady_ms"] else None,
        sensitivities={k: m["sensitivity"] for k, m in modules.items()} or None,
        coefficients={k: m["coefficient"] for k, m in modules.items()} or None,
        losses=losses,
        log_seconds=dict(zip(losses, times)) if len(losses) == len(times) else {},
    )
    return run


def loss_check(eager: dict, other: dict, key: str) -> dict:
    """``other``'s losses, dev metric and sensitivities against ``eager``'s (bench_ddp.compare's loss and
    sensitivity fields), and the differences of the final losses and the dev metric."""
    c = bench_ddp.compare(eager, other)
    fields = ("loss_points", "loss_max_abs_diff", "loss_mean_abs_diff", "loss_mean_1", "loss_mean_n",
              "sensitivity_max_rel_diff", "sensitivity_spearman", "coefficient_max_abs_diff")  # fmt: skip
    out = {"eager": eager["name"], "run": other["name"], **{k: c[k] for k in fields}}
    for name in ("train_loss", "last_logged_loss"):
        out[name] = [eager.get(name), other.get(name)]
    out["dev_metric"] = [eager["eval"].get(key), other["eval"].get(key)]
    return out


def summarise(report: dict) -> None:
    """Fill ``report``'s ratios, loss checks and full-run estimates from its finished runs (in place)."""
    done = {r["name"]: r for r in report["runs"] if "error" not in r}
    base = done.get("lora_eager")
    key = objective_metric(report["task"])
    report["ratios"], report["loss_checks"], report["full_run"] = [], [], []
    for r in done.values():
        variant = r.get("variant", "plain")
        if r["torch_compile"] != "none" or variant != "plain":
            same = done.get(f"{r['method']}_eager")  # the eager run of its method, without a variant
            plain = done.get(r["without_variant"]) if variant != "plain" else None
            report["ratios"].append(
                {
                    "run": r["name"],
                    "wall_vs_eager_lora": ratio(r["process_wall_s"], base and base["process_wall_s"]),
                    "train_vs_eager_lora": ratio(r["train_runtime_s"], base and base["train_runtime_s"]),
                    "steady_vs_eager_lora": ratio(r["steady_ms"], base and base["steady_ms"]),
                    "steady_mean_vs_eager_lora": ratio(r["steady_mean_ms"], base and base["steady_mean_ms"]),
                    "steady_vs_eager_same_method": ratio(r["steady_ms"], same and same["steady_ms"]),
                    "compile_above_eager_s": (
                        r["train_above_steady_s"] - same["train_above_steady_s"]
                        if same and r["train_above_steady_s"] is not None and same["train_above_steady_s"] is not None
                        else None
                    ),
                }
            )
            if variant != "plain":
                report["ratios"][-1].update(
                    variant=variant,
                    without_variant=r["without_variant"],
                    steady_vs_without_variant=ratio(r["steady_ms"], plain and plain["steady_ms"]),
                    steady_mean_vs_without_variant=ratio(r["steady_mean_ms"], plain and plain["steady_mean_ms"]),
                    train_vs_without_variant=ratio(r["train_runtime_s"], plain and plain["train_runtime_s"]),
                )
            if same:
                report["loss_checks"].append(loss_check(same, r, key))
            if plain and plain is not same:  # a compiled run with the variant: also against its plain twin
                report["loss_checks"].append(loss_check(plain, r, key))
        estimate = full_run_estimate(r, report["full_steps"])
        if estimate:
            report["full_run"].append({"run": r["name"], **estimate})
    if base and "iw_eager" in done:
        report["loss_checks"].append({**loss_check(base, done["iw_eager"], key), "reference": True})
    base_full = next((e for e in report["full_run"] if e["run"] == "lora_eager"), None)
    for e in report["full_run"]:
        e["wall_vs_eager_lora"] = ratio(e["wall_s"], base_full and base_full["wall_s"])
        e["train_vs_eager_lora"] = ratio(e["train_s"], base_full and base_full["train_s"])


def markdown(report: dict) -> str:
    """The report's tables: every run, compiled ÷ eager, the full run by arithmetic, same losses."""
    key = objective_metric(report["task"])
    s = report["setting"]
    lines = [
        f"# Whole runs of run_glue_iw.py: eager vs torch.compile ({report['device']})",
        "",
        f"`benchmarks/bench_run.py`: task {report['task']}, {report['model']}, each configuration one process "
        f"(`CUDA_VISIBLE_DEVICES` = its GPU; several GPUs at once), LoRA r=8 (IW-LoRA: sum, α=1e-4, "
        f"{s['calib_steps']} calibration batches), batch {s['batch']}, "
        + (f"{s['max_steps']} steps" if s["max_steps"] else f"{s['epochs']:g} epochs")
        + (f" of {s['max_train_samples']} training rows" if s["max_train_samples"] else "")
        + f", {s['precision']}, seed 1, dropout {'off' if s['nodrop'] else 'on'}, every run with "
        f"`--max_seq_length {s['max_seq_length']} --pad_to_max_length false --pad_to_multiple_of "
        f"{s['pad_to_multiple_of']} --dataloader_drop_last true`, compile backend {s['compile_backend']}; "
        f"training loss logged every {s['logging_steps']} steps, dev metric at eval batch {s['eval_batch']} "
        f"over all {report['eval_rows']} dev rows (`--dataloader_drop_last` drops training's short batch only). "
        "Steady: ms/step over the logging intervals from the 2nd logged step on "
        "(median; mean in brackets), from the arrival times of the log lines. Warm-up above steady: from the end of "
        "calibration to the first logged step, minus those steps at the steady speed (the first compile); later: the "
        "rest of `train()` above its steps at the steady speed (new shapes' compiles, logging)."
        + variant_note(report),
        "",
        "## Every run",
        "",
        "| run | GPU | process wall s | train() s | calibration s | steps | startup s | warm-up above steady s "
        "(first logged step) | later above steady s | slow intervals (s) | steady ms/step (mean) | eval s | "
        "dev metric | train loss (run mean) | last logged loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['gpu']} | failed: {r['error'].splitlines()[0][:80]} |")
            continue
        lines.append(
            f"| {r['name']} | {r['gpu']} | {fmt(r['process_wall_s'], '.1f')} | {fmt(r['train_runtime_s'], '.1f')} | "
            f"{fmt(r['calibration_s'], '.1f')} | {r['steps']} | {fmt(r['startup_s'], '.1f')} | "
            f"{fmt(r['warmup_above_steady_s'], '.1f')} ({r['first_log_step']}) | "
            f"{fmt(r['later_above_steady_s'], '.1f')} | {fmt(r['slow_intervals'], 'd')} "
            f"({fmt(r['slow_intervals_s'], '.1f')}) | {fmt(r['steady_ms'], '.2f')} "
            f"({fmt(r['steady_mean_ms'], '.2f')}) | {fmt(r['eval_runtime_s'], '.1f')} | "
            f"{fmt(r['eval'].get(key), '.4f')} | {fmt(r['train_loss'], '.4f')} | {fmt(r['last_logged_loss'], '.4f')} |"
        )
    lines += [f"- skipped (`--stop_after {s['stop_after']}`): {name}" for name in report["skipped"]]
    if report["ratios"]:
        variants = any("variant" in q for q in report["ratios"])
        lines += [
            "",
            "## Compiled ÷ eager LoRA"
            + (" and each variant ÷ its run without it" if variants else "")
            + ", measured in this invocation",
            "",
            "Compile above eager: the run's `train()` above its steps at the steady speed, minus the eager run's of "
            "the same method (calibration left out of both): what compiling cost this run, recompiles included."
            + (
                " X ÷ X without variant: a `_nosync` run's steady step (median, mean) and `train()` over those of "
                "the same method and mode without the recipe (below 1: the recipe is faster); `train()` includes "
                "the compile, which the first run of a fresh inductor cache pays in full and a later run of the "
                "same graphs mostly finds cached: read the steady ratios."
                if variants
                else ""
            ),
            "",
            "| run | process wall | train() | steady step (median) | steady step (mean) | steady ÷ eager same method "
            "| compile above eager s |"
            + (" without variant | steady ÷ without (median) | (mean) | train() ÷ without |" if variants else ""),
            "|---|---:|---:|---:|---:|---:|---:|" + ("---|---:|---:|---:|" if variants else ""),
        ]
        for q in report["ratios"]:
            row = (
                f"| {q['run']} | {fmt(q['wall_vs_eager_lora'], '.3f')} | {fmt(q['train_vs_eager_lora'], '.3f')} | "
                f"{fmt(q['steady_vs_eager_lora'], '.3f')} | {fmt(q['steady_mean_vs_eager_lora'], '.3f')} | "
                f"{fmt(q['steady_vs_eager_same_method'], '.3f')} | {fmt(q['compile_above_eager_s'], '.1f')} |"
            )
            if "variant" in q:
                without = [q[f"{k}_vs_without_variant"] for k in ("steady", "steady_mean", "train")]
                row += f" {q['without_variant']} | " + " | ".join(fmt(v, ".3f") for v in without) + " |"
            elif variants:
                row += " — | — | — | — |"
            lines.append(row)
    if report["full_run"]:
        lines += [
            "",
            f"## {report['full_epochs']:g} epochs of all {report['train_rows']} training rows ({report['full_steps']} "
            "steps): arithmetic",
            "",
            "Not measured: each run's wall time and `train()` with its own steps replaced by the full run's at its "
            "steady speed; startup, calibration, compiling and evaluation as measured (tokenising more rows would add "
            "a few seconds).",
            "",
            "| run | wall s | train() s | wall ÷ eager LoRA | train() ÷ eager LoRA |",
            "|---|---:|---:|---:|---:|",
        ]
        for e in report["full_run"]:
            lines.append(
                f"| {e['run']} | {fmt(e['wall_s'], '.0f')} | {fmt(e['train_s'], '.0f')} | "
                f"{fmt(e['wall_vs_eager_lora'], '.3f')} | {fmt(e['train_vs_eager_lora'], '.3f')} |"
            )
    if report["loss_checks"]:
        lines += [
            "",
            "## Same losses",
            "",
            "Each compiled run against the eager run of its method (same seed, same batches); the last row, eager "
            "IW-LoRA against eager LoRA, is the reference: two runs α=1e-4 apart. Logged training loss at each logged "
            "step (max and mean absolute difference, mean of each curve); sensitivities: IW-LoRA's calibration (eager "
            "on the uncompiled model in both runs)."
            + (
                " A compiled `_nosync` run is also compared against the same mode without the recipe (the recipe "
                "changes no arithmetic: they should agree as two runs of one mode do)."
                if any("variant" in r for r in report["runs"])
                else ""
            ),
            "",
            "| run | against | logged steps | loss max abs diff | mean abs diff | mean loss (against / run) | train "
            "loss (run mean) | last logged loss | dev metric | sensitivity max rel. diff |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def pair(values: list, spec: str) -> str:
            return " / ".join(fmt(v, spec) for v in values)

        for c in report["loss_checks"]:
            lines.append(
                f"| {c['run']}{' (reference)' if c.get('reference') else ''} | {c['eager']} | {c['loss_points']} | "
                f"{fmt(c['loss_max_abs_diff'], '.4f')} | {fmt(c['loss_mean_abs_diff'], '.4f')} | "
                f"{fmt(c['loss_mean_1'], '.4f')} / {fmt(c['loss_mean_n'], '.4f')} | {pair(c['train_loss'], '.4f')} | "
                f"{pair(c['last_logged_loss'], '.4f')} | {pair(c['dev_metric'], '.4f')} | "
                f"{fmt(c['sensitivity_max_rel_diff'], '.1e')} |"
            )
    lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def variant_note(report: dict) -> str:
    """The header's sentence on the variant runs ('' without any: the header as before)."""
    if not any("variant" in r for r in report["runs"]):
        return ""
    flags = shlex.join(report.get("sync_free_flags", bench_ddp.SYNC_FREE_FLAGS))
    return (
        f" `_nosync` runs: the same run_glue_iw command line with the sync-free recipe `{flags}` appended (the "
        "Trainer's NaN/inf filter reads each step's loss on the host; accelerate copies each batch to the GPU with "
        "a stream synchronise unless non-blocking)."
    )


def parser() -> argparse.ArgumentParser:
    cpu = "on the CPU (a smoke test of the script, not a benchmark)"
    p = bench_ddp.run_parser(__file__, __doc__, 50, cpu, "/tmp/iw_whole_runs", "benchmarks/results/compile_whole_run")
    p.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help=f"comma list of {CONFIG_FORMAT}: METHOD {'|'.join(METHODS)}, MODE {'|'.join(bench_ddp.COMPILE_MODES)} "
        "(none = eager), +nosync the sync-free recipe (run_glue_iw with "
        f"{shlex.join(bench_ddp.SYNC_FREE_FLAGS)}), GPU the CUDA device (default 0); a GPU's "
        "configurations run in turn, GPUs at once",
    )
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max_steps", type=int, default=0, help="train this many steps instead of --epochs (smoke runs)")
    p.add_argument("--full_epochs", type=float, default=3.0, help="the whole run the arithmetic estimates")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--pad_to_multiple_of", type=int, default=32)
    p.add_argument(
        "--eval_batch", type=int, default=8, help="eval batch (run_glue_iw scores every dev row at any batch)"
    )
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--nodrop", action="store_true", help="every dropout off (encoder config and LoRA)")
    p.add_argument("--compile_backend", default="inductor", help="aot_eager: CPU smoke runs (modes none,default)")
    p.add_argument("--stop_after", type=float, default=0, help="start no run after this many seconds (0: no limit)")
    return p


def device_name(args: argparse.Namespace, gpus: list[int]) -> str:
    if args.cpu:
        return "CPU"
    import torch

    names = sorted({torch.cuda.get_device_name(g) for g in gpus})
    return f"{len(gpus)}× {' / '.join(names)}"


def data_rows(args: argparse.Namespace) -> tuple[int, int]:
    """The task's training rows (all of them: the full run) and the dev rows evaluated (``--max_eval_samples``)."""
    from iwtrainer.glue.tsv import load_glue_from_dir

    data = load_glue_from_dir(args.glue_dir, args.task)
    dev = next(data[k].num_rows for k in data if k.startswith("validation"))
    return data["train"].num_rows, min(dev, args.max_eval_samples or dev)


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    try:
        configs = parse_configs(args.configs)
    except ValueError as e:
        p.error(f"--configs: {e}")
    for flag in ("batch", "calib_steps", "logging_steps", "eval_batch", "pad_to_multiple_of"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag}: expected a positive integer, got {getattr(args, flag)}")
    if args.max_seq_length % args.pad_to_multiple_of:
        p.error(f"--pad_to_multiple_of {args.pad_to_multiple_of} must divide --max_seq_length {args.max_seq_length}")
    model = args.model
    if args.deberta_shapes:
        model = bench_ddp.deberta_shapes_model(args.model, Path(args.runs_dir) / "deberta_v3_base_shapes")
    if args.nodrop:
        model = bench_ddp.no_dropout_model(model, Path(args.runs_dir) / "model_nodrop")
    by_gpu = lanes(configs)
    train_rows, eval_rows = data_rows(args)
    report: dict = {
        "device": device_name(args, list(by_gpu)),
        "task": args.task,
        "model": "DeBERTa-v3-base shapes (random init)" if args.deberta_shapes else Path(args.model).name,
        "command": shlex.join(["python", "benchmarks/bench_run.py", *(sys.argv[1:] if argv is None else argv)]),
        "versions": versions(),
        "setting": {k: getattr(args, k) for k in SETTINGS},
        "configs": [c.__dict__ for c in configs],
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "full_epochs": args.full_epochs,
        "full_steps": math.floor(args.full_epochs * (train_rows // args.batch)),
        "runs": [],
        "skipped": [],
    }
    if any(c.variant != "plain" for c in configs):
        report["sync_free_flags"] = list(bench_ddp.SYNC_FREE_FLAGS)
    out = Path(args.out)
    lock = threading.Lock()
    t0 = time.perf_counter()

    def save() -> None:
        summarise(report)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))  # after every run: partial results
        out.with_suffix(".md").write_text(markdown(report))

    def lane(gpu_configs: list[Config]) -> None:
        for config in gpu_configs:
            start = time.perf_counter() - t0
            if args.stop_after and start > args.stop_after:
                with lock:
                    report["skipped"].append(config.name)
                    save()
                continue
            try:
                run = launch(args, model, config)
            except Exception as exc:  # a run's unreadable outputs must not end the other runs of its GPU
                run = {**config_fields(config), "error": f"{type(exc).__name__}: {exc}"}
            run["started_s"] = start
            print(f"{config.name} (GPU {config.gpu}): {json.dumps({k: v for k, v in run.items() if k in SHOWN})}")
            with lock:
                report["runs"].append(run)
                report["runs"].sort(key=lambda r: [c.name for c in configs].index(r["name"]))
                save()

    threads = [threading.Thread(target=lane, args=(cs,)) for cs in by_gpu.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with lock:
        save()
    print(markdown(report))
    return report


SHOWN = ("process_wall_s", "train_runtime_s", "calibration_s", "steady_ms", "warmup_above_steady_s", "eval", "error")
"""The fields of a run printed as it ends."""


def versions() -> dict:
    """Library versions and the commit, for the report: bench_qlora's (imported here: it loads torch and iwtrainer,
    which this launcher itself does not need)."""
    import bench_qlora

    return {**bench_qlora.versions(), "commit": bench_qlora.commit()}


if __name__ == "__main__":
    main()

"""Calibration time with stacked batches (``iw_calib_group``) against one batch per pass, in one process.

    python benchmarks/bench_calib_group.py --model /tmp/models/all-mpnet-base-v2 --sst2 .gpu/glue/SST-2 \\
        --groups 1,4,8,16 --out $OUT --name calib_group

150 real SST-2 batches of 32, padded to multiples of 32 tokens (``run_glue_iw.py --pad_to_multiple_of 32``'s
shapes), LoRA r=8 on all-mpnet-base-v2, bf16 autocast as training runs it. Each ``--groups`` value is timed
``--repeats`` times in rotating order (drift between rounds cancels in the medians); every value's sensitivities are
compared with group 1's (max relative difference, Spearman of the ranking). An eager LoRA training step is timed in
the same process (bench_step's step: forward, backward, AdamW), so each calibration's share of a 3-epoch SST-2 LoRA
run (6,315 steps at that speed, arithmetic) and its peak memory against the step's come from one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr
from transformers import AutoModelForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_calibration_memory import peak_mib  # noqa: E402
from bench_step import SST2_TRAIN_ROWS, _lora, _sync, _trainer, make_step, sst2_batches  # noqa: E402

from iwtrainer import compute_sensitivities  # noqa: E402


def timed_calibration(model: torch.nn.Module, batches: list[dict], group: int, autocast) -> tuple[float, dict, float]:
    """Seconds, sensitivities and peak MiB above the start of one calibration over ``batches``."""
    out: dict = {}

    def calibrate() -> None:
        t0 = time.perf_counter()
        out["sens"] = compute_sensitivities(
            model, batches, num_steps=len(batches), autocast_dtype=autocast, show_progress=False, group=group
        )
        _sync()
        out["seconds"] = time.perf_counter() - t0

    peak = peak_mib(calibrate, next(model.parameters()).device)
    return out["seconds"], dict(out["sens"]), peak


def lora_step_ms(model: torch.nn.Module, batches: list[dict], tmp: str, steps: int) -> tuple[float, float]:
    """Median ms of bench_step's eager LoRA training step over ``steps`` steps, and their peak MiB above the start."""
    trainer = _trainer(model, 0.0, tmp)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    step = make_step("lora", trainer, model, opt)
    for b in batches[:3]:
        step(b)  # warm-up: first kernels, AdamW state
    times: list[float] = []

    def timed_steps() -> None:
        for i in range(steps):
            _sync()
            t0 = time.perf_counter()
            step(batches[i % len(batches)])
            _sync()
            times.append((time.perf_counter() - t0) * 1000)

    peak = peak_mib(timed_steps, next(model.parameters()).device)
    return statistics.median(times), peak


def run(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = torch.bfloat16 if device == "cuda" else None
    batches = sst2_batches(args.model, args.sst2, args.calib_steps, args.batch, 128, device, args.pad_to_multiple_of)
    base = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    model = _lora(copy.deepcopy(base)).to(device)
    step_ms, step_peak = lora_step_ms(_lora(copy.deepcopy(base)).to(device), batches, args.tmp, args.steps)
    compute_sensitivities(model, batches[:2], num_steps=2, autocast_dtype=autocast, show_progress=False)  # warm-up
    groups = args.groups
    seconds: dict[int, list[float]] = {g: [] for g in groups}
    sens: dict[int, dict] = {}
    peaks: dict[int, float] = {}
    for r in range(args.repeats):
        for g in groups[r % len(groups) :] + groups[: r % len(groups)]:  # rotate the order every round
            s, sens[g], peaks[g] = timed_calibration(model, batches, g, autocast)
            seconds[g].append(s)
            print(f"group {g}: {s:.2f} s", flush=True)
    shapes = sorted({tuple(b["input_ids"].shape) for b in batches})
    run_s = 3 * -(-SST2_TRAIN_ROWS // args.batch) * step_ms / 1000
    ref = sens[groups[0]]
    names = list(ref)
    rows = {}
    for g in groups:
        med = statistics.median(seconds[g])
        rows[g] = {
            "seconds_median": med,
            "seconds": seconds[g],
            "vs_first": med / statistics.median(seconds[groups[0]]),
            "ms_per_batch": med * 1000 / len(batches),
            "batch_over_lora_step": med * 1000 / len(batches) / step_ms,
            "share_of_sst2_3epoch_lora_run": med / (med + run_s),
            "peak_mib": peaks[g],
            "peak_over_lora_step": peaks[g] / step_peak if step_peak else None,
            "max_rel_diff": max(abs(sens[g][k] - ref[k]) / ref[k] for k in names),
            "spearman": float(spearmanr([ref[k] for k in names], [sens[g][k] for k in names])[0]),
        }
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": Path(args.model).name,
        "batches": len(batches),
        "batch": args.batch,
        "shapes": [list(s) for s in shapes],
        "lora_step_ms": step_ms,
        "lora_step_peak_mib": step_peak,
        "sst2_3epoch_lora_seconds_est": run_s,
        "repeats": args.repeats,
        "groups": rows,
        "command": " ".join(["python", "benchmarks/bench_calib_group.py", *sys.argv[1:]]),
    }


def markdown(r: dict) -> str:
    first = next(iter(r["groups"]))
    lines = [
        "# Calibration with stacked batches (`iw_calib_group`)",
        "",
        f"Device: {r['device']}; torch {r['torch']}; {r['model']} + LoRA r=8, {r['batches']} real SST-2 batches of "
        f"{r['batch']} (shapes {', '.join('×'.join(map(str, s)) for s in r['shapes'])}), bf16 autocast; median of "
        f"{r['repeats']} rounds in rotating order. Eager LoRA training step in the same process: "
        f"{r['lora_step_ms']:.1f} ms, so a 3-epoch SST-2 LoRA run ≈ {r['sst2_3epoch_lora_seconds_est']:.0f} s "
        "(arithmetic). Produced by `benchmarks/bench_calib_group.py`.",
        "",
        f"| group | seconds | × group {first} | ms/batch | batch ÷ LoRA step | share of 3-epoch run "
        "| peak ÷ LoRA step | max rel. diff of s_k | Spearman |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g, e in r["groups"].items():
        peak = f"{e['peak_over_lora_step']:.2f}" if e["peak_over_lora_step"] else "—"
        lines.append(
            f"| {g} | {e['seconds_median']:.2f} | {e['vs_first']:.3f} | {e['ms_per_batch']:.1f} | "
            f"{e['batch_over_lora_step']:.2f} | {100 * e['share_of_sst2_3epoch_lora_run']:.2f} % | {peak} | "
            f"{e['max_rel_diff']:.1e} | {e['spearman']:.4f} |"
        )
    return "\n".join([*lines, "", f"Command: `{r['command']}`", ""])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a local encoder folder (all-mpnet-base-v2)")
    p.add_argument("--sst2", required=True, help="GLUE SST-2 folder (train.tsv)")
    p.add_argument("--groups", default="1,4,8,16", help="comma list of iw_calib_group values; the first is the base")
    p.add_argument("--calib_steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pad_to_multiple_of", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="timed eager LoRA steps")
    p.add_argument("--tmp", default="/tmp/iw_calib_group")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="calib_group")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    try:
        groups = [int(g) for g in args.groups.split(",")]
    except ValueError:
        p.error(f"--groups: expected a comma list of integers >= 1, got {args.groups!r}")
    if not groups or min(groups) < 1:
        p.error(f"--groups: expected a comma list of integers >= 1, got {args.groups!r}")
    args.groups = groups
    for flag in ("calib_steps", "batch", "repeats", "steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag}: expected a positive integer, got {getattr(args, flag)}")
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()

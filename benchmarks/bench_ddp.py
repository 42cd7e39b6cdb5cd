"""1 GPU vs N GPUs with the same global batch, through ``accelerate launch run_glue_iw.py`` (``torchrun`` with gloo
under ``--cpu``): same sensitivities? matching loss curves? how much faster?

Each pair trains IW-LoRA (``sum``, α=1e-4, r=8) on one GLUE task twice: on 1 process with batch B, then on N
processes with batch B/N each (same seed, same global batch, same steps). It compares the two runs' calibrated
sensitivities (relative difference, Spearman of the ranking, coefficient difference), their logged loss curves and
final dev metric, and the training throughput: samples/s of the whole ``train()`` (what run_glue reports, calibration
included) and of the steps alone (calibration time taken out). Runs are sequential, so timings never overlap.

    python benchmarks/bench_ddp.py --model MINILM_DIR --glue_dir GLUE_DIR --nproc 2 --out benchmarks/results/ddp
    python benchmarks/bench_ddp.py ... --deberta_shapes --calib_steps 50 --pairs bf16:32:150,bf16:128:60 \\
        --max_train_samples 20000 --out benchmarks/results/ddp_deberta
    python benchmarks/bench_ddp.py ... --cpu --pairs fp32:8:6:nodrop --max_train_samples 256   # CPU smoke test

Pairs are ``PRECISION:GLOBAL_BATCH:STEPS[:nodrop]``: fp32 shows the equivalence without bf16 round-off; ``nodrop``
turns every dropout off (encoder config and LoRA), so the two runs see the same samples through the same function
and their loss curves must agree to float round-off (with dropout, each rank draws its own masks: the curves agree
only statistically); bf16 at batch 32 is the GLUE grid's setting; bf16 at a larger batch tests whether more work
per GPU lets data parallelism pay off. The 1-process run sees one GPU (``CUDA_VISIBLE_DEVICES``), else the Trainer
would wrap the model in ``nn.DataParallel`` over all of them and double its batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from iwtrainer.glue.tasks import objective_metric  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def deberta_shapes_model(tokenizer_from: str, folder: Path) -> str:
    """A randomly initialised DeBERTa-v3-base-shaped classifier saved to ``folder`` with ``tokenizer_from``'s
    tokenizer: the real model's compute per step, for throughput (its accuracy means nothing)."""
    if (folder / "config.json").is_file():
        return str(folder)
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_step import deberta_v3_base_config

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(deberta_v3_base_config()).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_from) / name).is_file():
            shutil.copy(Path(tokenizer_from) / name, folder / name)
    return str(folder)


DEFAULT_PAIRS = "fp32:32:200:nodrop,bf16:32:400,bf16:256:150"


def no_dropout_model(model: str, folder: Path) -> str:
    """A copy of ``model`` (weights symlinked) whose config turns every dropout off."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in Path(model).iterdir():
        if f.name != "config.json" and not (folder / f.name).exists():
            (folder / f.name).symlink_to(f.resolve())
    config = json.loads((Path(model) / "config.json").read_text())
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        config[key] = 0.0
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return str(folder)


def launch(
    args: argparse.Namespace,
    model: str,
    nproc: int,
    precision: str,
    global_batch: int,
    steps: int,
    out: Path,
    nodrop: bool,
) -> dict:
    """One run of run_glue_iw.py under ``accelerate launch``; returns its results, importance and log."""
    if args.cpu:  # accelerate's CPU multi-process path needs MPI; torchrun sets up the same gloo group
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", str(29500 + nproc)]
    else:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc)]
        launcher += ["--num_machines", "1", "--dynamo_backend", "no"]
        launcher += ["--main_process_port", str(29500 + nproc)] + (["--multi_gpu"] if nproc > 1 else [])
    cmd = [
        *launcher, str(ROOT / "run_glue_iw.py"), "--model_name_or_path", model, "--glue_dir", args.glue_dir,
        "--task_name", args.task, "--max_seq_length", "64", "--output_dir", str(out), "--do_train", "--do_eval",
        "--per_device_train_batch_size", str(global_batch // nproc), "--per_device_eval_batch_size", "128",
        "--max_steps", str(steps), "--learning_rate", "5e-4", "--warmup_steps", "0.06", "--weight_decay", "0.01",
        "--adapter", "lora", "--iw_alpha", "1e-4", "--iw_normalize", "sum", "--iw_calib_steps", str(args.calib_steps),
        "--logging_steps", str(args.logging_steps), "--save_strategy", "no", "--eval_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", "--seed", "1", "--dataloader_num_workers", "0",
        "--bf16", str(precision == "bf16").lower(), "--ddp_find_unused_parameters", "false",
    ]  # fmt: skip
    if nodrop:
        cmd += ["--lora_dropout", "0"]
    if args.max_train_samples:
        cmd += ["--max_train_samples", str(args.max_train_samples)]
    if args.cpu:  # (transformers refuses --ddp_backend in a single process that no launcher set up)
        cmd += ["--use_cpu", "true"] + (["--ddp_backend", "gloo"] if nproc > 1 else [])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    if not args.cpu:  # exactly nproc GPUs: one process on several would be nn.DataParallel with nproc× the batch
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(nproc))
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(
            f"bench_ddp: run {out.name} failed (rc {proc.returncode}):\n{(proc.stderr or proc.stdout)[-3000:]}"
        )
    results = json.loads((out / "all_results.json").read_text())
    importance = json.loads((out / "iw_importance.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    losses = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    calib = importance.get("calibration_seconds", 0.0)
    return {
        "nproc": nproc,
        "per_device_batch": global_batch // nproc,
        "process_wall_s": wall,
        "train_runtime_s": results["train_runtime"],
        "calibration_s": calib,
        "samples_per_s": results["train_samples_per_second"],
        "step_samples_per_s": global_batch * steps / (results["train_runtime"] - calib),
        "eval": {
            k: v for k, v in results.items() if k.startswith("eval_") and "runtime" not in k and "per_second" not in k
        },
        "sensitivities": {k: m["sensitivity"] for k, m in importance["modules"].items()},
        "coefficients": {k: m["coefficient"] for k, m in importance["modules"].items()},
        "losses": losses,
    }


def compare(one: dict, many: dict) -> dict:
    names = sorted(one["sensitivities"])
    s1 = [one["sensitivities"][k] for k in names]
    sn = [many["sensitivities"][k] for k in names]
    rel = [abs(a - b) / max(abs(a), 1e-30) for a, b in zip(s1, sn)]
    coef = [abs(one["coefficients"][k] - many["coefficients"][k]) for k in names]
    steps = sorted(set(one["losses"]) & set(many["losses"]))
    dl = [abs(one["losses"][s] - many["losses"][s]) for s in steps]
    return {
        "sensitivity_max_rel_diff": max(rel),
        "sensitivity_spearman": float(spearmanr(s1, sn).statistic),
        "coefficient_max_abs_diff": max(coef),
        "loss_points": len(steps),
        "loss_max_abs_diff": max(dl) if dl else None,
        "loss_mean_abs_diff": sum(dl) / len(dl) if dl else None,
        "loss_mean_1": sum(one["losses"][s] for s in steps) / len(steps) if steps else None,
        "loss_mean_n": sum(many["losses"][s] for s in steps) / len(steps) if steps else None,
        "speedup_train": many["samples_per_s"] / one["samples_per_s"],
        "speedup_steps": many["step_samples_per_s"] / one["step_samples_per_s"],
    }


def markdown(report: dict) -> str:
    n = report["nproc"]
    lines = [
        f"# IW-LoRA: 1 vs {n} processes, same global batch ({report['device']})",
        "",
        f"`benchmarks/bench_ddp.py`: `{report['launcher']} run_glue_iw.py` with 1 and {n} processes, task "
        f"{report['task']}, {report.get('model', 'all-MiniLM-L6-v2')}, LoRA r=8 + IW (sum, α=1e-4), "
        f"{report['calib_steps']} calibration "
        "batches, seed 1. Sensitivities: relative difference per matrix between the two runs; loss: the logged "
        f"training loss every {report['logging_steps']} steps; throughput: samples/s of `train()` (calibration "
        "included) and of the steps alone (calibration time taken out).",
        "",
        f"| precision | dropout | global batch | per-GPU batch ({n} GPUs) | steps | sensitivity max rel. diff | "
        "Spearman | coef. max diff | loss mean abs diff (max) | mean loss 1 / N | dev metric 1 / N | "
        "samples/s 1 → N (train) | speedup train | speedup steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["pairs"]:
        c = p["compare"]
        m1, mn = p["one"]["eval"], p["many"]["eval"]
        key = objective_metric(report["task"])
        lines.append(
            f"| {p['precision']} | {'on' if p['dropout'] else 'off'} | {p['global_batch']} | "
            f"{p['global_batch'] // n} | {p['steps']} | "
            f"{c['sensitivity_max_rel_diff']:.1e} | {c['sensitivity_spearman']:.4f} | "
            f"{c['coefficient_max_abs_diff']:.1e} | {c['loss_mean_abs_diff']:.1e} ({c['loss_max_abs_diff']:.1e}) | "
            f"{c['loss_mean_1']:.4f} / {c['loss_mean_n']:.4f} | {m1[key]:.4f} / {mn[key]:.4f} | "
            f"{p['one']['samples_per_s']:.0f} → {p['many']['samples_per_s']:.0f} | {c['speedup_train']:.2f}× | "
            f"{c['speedup_steps']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--glue_dir", required=True)
    p.add_argument("--task", default="sst2")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--pairs", default=DEFAULT_PAIRS, help="PRECISION:GLOBAL_BATCH:STEPS[:nodrop],... (fp32|bf16)")
    p.add_argument("--calib_steps", type=int, default=150)
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--max_train_samples", type=int, default=0)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument(
        "--deberta_shapes", action="store_true", help="a random DeBERTa-v3-base-shaped model (--model's tokenizer)"
    )
    p.add_argument("--cpu", action="store_true", help="gloo on CPU (a smoke test of the script, not a benchmark)")
    p.add_argument("--runs_dir", default="/tmp/iw_ddp_runs")
    p.add_argument("--out", default="benchmarks/results/ddp", help="writes OUT.json and OUT.md")
    args = p.parse_args()
    pairs = []
    for spec in args.pairs.split(","):
        precision, batch, steps, *rest = spec.split(":")
        if precision not in ("fp32", "bf16") or int(batch) % args.nproc or rest not in ([], ["nodrop"]):
            raise SystemExit(
                f"--pairs: {spec!r}: expected fp32|bf16:GLOBAL_BATCH:STEPS[:nodrop], batch divisible by --nproc"
            )
        pairs.append((precision, int(batch), int(steps), rest == ["nodrop"]))
    import torch

    if args.deberta_shapes:
        args.model = deberta_shapes_model(args.model, Path(args.runs_dir) / "deberta_v3_base_shapes")
    device = "CPU (gloo)" if args.cpu else f"{args.nproc}× {torch.cuda.get_device_name(0)}"
    model_name = "DeBERTa-v3-base shapes (random init)" if args.deberta_shapes else Path(args.model).name
    report: dict = {"device": device, "nproc": args.nproc, "task": args.task, "calib_steps": args.calib_steps}
    report["model"] = model_name
    launcher = "torchrun --nproc_per_node N (gloo)" if args.cpu else "accelerate launch --num_processes N"
    report.update(launcher=launcher, logging_steps=args.logging_steps, pairs=[])
    for precision, batch, steps, nodrop in pairs:
        model = no_dropout_model(args.model, Path(args.runs_dir) / "model_nodrop") if nodrop else args.model
        runs = {}
        for nproc in (1, args.nproc):
            name = f"{precision}_b{batch}_n{nproc}" + ("_nodrop" if nodrop else "")
            runs[nproc] = launch(args, model, nproc, precision, batch, steps, Path(args.runs_dir) / name, nodrop)
            r = runs[nproc]
            print(f"{name}: {r['samples_per_s']:.0f} samples/s (steps {r['step_samples_per_s']:.0f}), {r['eval']}")
        pair = {
            "precision": precision,
            "dropout": not nodrop,
            "global_batch": batch,
            "steps": steps,
            "one": runs[1],
            "many": runs[args.nproc],
        }
        pair["compare"] = compare(runs[1], runs[args.nproc])
        print(json.dumps(pair["compare"]), flush=True)
        report["pairs"].append(pair)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))  # after every pair: partial results kept
        out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

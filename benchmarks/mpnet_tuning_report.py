"""Summarise the all-mpnet-base-v2 tuning runs (glue_table.py --tune) and, if run, the dev-set runs.

Reads ``glue_mpnet_tuning.jsonl`` (+ the split manifest written by tuning_split.py, + ``glue_mpnet_dev.jsonl`` if
present) and writes ``glue_mpnet_tuning.json`` (protocol, split, every config's held-out score, the selections and the
dev-set cells they imply) and ``GLUE_MPNET_TUNING.md``. Every number comes from the run lines; a missing cell is
"not run".

    python benchmarks/mpnet_tuning_report.py --split .gpu/tune_glue/split.json

SST-2 is an optional fifth task: its stages appear once it has held-out runs (its own 3-epoch protocol,
``glue_table.TUNE_PROTOCOL``), it is never in ``dev_cells`` (the small tasks' 5-seed dev runs with the frozen code;
SST-2's 3-seed dev runs of every row go through mpnet_grid.sh), and ``stage_cells`` lists a stage's cells from the
runs so far (``glue_table.py --tune_stage_cells``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from glue_table import (  # noqa: E402
    COMMON,
    DL2_FLAGS,
    PROTOCOL,
    SMALL_TASKS,
    TUNE_FAMILIES,
    TUNE_PROTOCOL,
    WSA_LOW_LR,
    WSA_SWEEP,
    method_flags,
    tune_name,
    wsa_name,
    wsa_points,
)

TASKS = SMALL_TASKS  # the small tasks: always reported; the evidence grid averages and pools them
# Reported once they have held-out runs, never part of the small tasks' average or pooled intervals: SST-2 (67k rows)
# has its own held-out protocol (glue_table.TUNE_PROTOCOL) and 3 dev seeds.
OPTIONAL_TASKS = ("sst2",)
METRIC = {  # the task's GLUE objective, as iwtrainer's objective_metric maps it
    "rte": "eval_accuracy",
    "mrpc": "eval_combined_score",
    "stsb": "eval_combined_score",
    "cola": "eval_matthews_correlation",
    "sst2": "eval_accuracy",
}
METRIC_NAME = {
    "rte": "accuracy",
    "mrpc": "combined_score",
    "stsb": "combined_score",
    "cola": "matthews_correlation",
    "sst2": "accuracy",
}
LRS = ("2e-4", "5e-4", "1e-3")
STAGE1_SEEDS = (1, 2)
ALPHAS = ("1e-4", "1e-3", "1e-2", "1e-1")
PENALTIES = ("dl2", "iwlora_sum", "iwlora_max")
STAGE2_SEED = 1
# Stage 3: the initialisation variants whose adapter is not a small zero-started update at the family's lr (PiSSA,
# which collapses there with the family's dropout; EVA) get their own lr, chosen the way stage 1 chose LoRA's.
INIT_FAMILIES = ("pissa_d0", "eva")
INIT_LRS = ("1e-4", "3e-4", "1e-3")
INIT_SEEDS = (1, 2)
# Stage 4: WSA's gate L1 λ and pruning threshold τ (the specified λ = 1e-3, τ = 0.05 prunes every direction) at the
# family's selected lr, then at lower lrs (glue_table.wsa_points), one seed each: WSA is a diagnostic row, its
# configuration still chosen without the dev set.
WSA_SEEDS = (1,)
STAGE_SEEDS = {1: STAGE1_SEEDS, 2: (STAGE2_SEED,), 3: INIT_SEEDS, 4: WSA_SEEDS}
DEV_SEEDS = (1, 2, 3, 4, 5)
MODEL = "all-mpnet-base-v2"


def load(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in recs if "error" not in r}


def score(recs: dict[str, dict], task: str, name: str, seed: int) -> float | None:
    rec = recs.get(f"{task}/{name}/{seed}")
    return None if rec is None else rec["results"][METRIC[task]]


def fmt(x: float | None, digits: int = 4) -> str:
    # NaN: a seed predicted one constant value, so STS-B's Pearson correlation is undefined (a collapsed run).
    if x is None:
        return "not run"
    return "NaN (collapsed)" if math.isnan(x) else f"{x:.{digits}f}"


def mean(xs: list[float | None]) -> float | None:
    return None if not xs or None in xs else statistics.fmean(xs)


def reported_tasks(recs: dict[str, dict]) -> tuple[str, ...]:
    """The small tasks, then each optional task that has a held-out run (absent before: the report of the small
    tasks stays as it was)."""
    return TASKS + tuple(t for t in OPTIONAL_TASKS if any(k.startswith(f"{t}/") for k in recs))


def stage1_rows(recs: dict[str, dict], task: str) -> dict[str, dict]:
    """Stage 1 of ``task``: per lr, plain LoRA's held-out score of each seed and their mean (None while one is
    missing)."""
    rows = {}
    for lr in LRS:
        seeds = {s: score(recs, task, tune_name("lora", lr), s) for s in STAGE1_SEEDS}
        rows[lr] = {"seeds": seeds, "mean": mean(list(seeds.values()))}
    return rows


def stage1_lr(rows: dict[str, dict]) -> str | None:
    """Stage 1's rule: the lr with the best mean held-out score, the first of LRS on ties; None until complete."""
    if any(rows[lr]["mean"] is None for lr in LRS):
        return None
    return max(LRS, key=lambda x: (rows[x]["mean"], -LRS.index(x)))


def _check_stages(stages: list[int]) -> None:
    unknown = sorted(set(stages) - set(STAGE_SEEDS))
    if unknown:
        raise ValueError(f"no stage {unknown}: the stages are 1 (LoRA lr), 2 (α), 3 (PiSSA-d0/EVA lr), 4 (WSA)")


def stage_seeds(stages: list[int]) -> tuple[int, ...]:
    """The seeds of ``stages`` (1 and 3: two seeds; 2 and 4: one), which one device call runs × every cell."""
    _check_stages(stages)
    seeds = {STAGE_SEEDS[x] for x in stages}
    if len(seeds) != 1:
        raise ValueError(f"stages {stages} run different seeds {sorted(seeds)}: list them in separate calls")
    return seeds.pop()


def stage_cells(recs: dict[str, dict] | None, task: str, stages: list[int], lr: str | None = None) -> list[str]:
    """The held-out selection's TASK/NAME cells of ``stages`` for ``task``: 1 plain LoRA at every lr, 3 PiSSA
    without dropout and EVA at every lr of their own, 2 each penalty × α and 4 WSA's (λ, τ, lr) points at stage 1's
    lr — ``lr`` if given, else selected from the run lines ``recs`` (ValueError until stage 1 is complete)."""
    _check_stages(stages)
    cells = []
    if 1 in stages:
        cells += [f"{task}/{tune_name('lora', x)}" for x in LRS]
    if 3 in stages:
        cells += [f"{task}/{tune_name(family, x)}" for family in INIT_FAMILIES for x in INIT_LRS]
    if (2 in stages or 4 in stages) and lr is None:
        rows = stage1_rows(recs or {}, task)
        lr = stage1_lr(rows)
        if lr is None:
            done = sum(v is not None for row in rows.values() for v in row["seeds"].values())
            raise ValueError(f"{task}: stage 1 has {done} of {len(LRS) * len(STAGE1_SEEDS)} runs; stages 2 and 4 "
                             "run at its lr")  # fmt: skip
    if 2 in stages:
        cells += [f"{task}/{tune_name(method, lr, a)}" for method in PENALTIES for a in ALPHAS]
    if 4 in stages:
        cells += [f"{task}/{wsa_name(*point)}" for point in wsa_points(lr)]
    return cells


def summarize(recs: dict[str, dict], dev: dict[str, dict], split: dict | None) -> dict:
    tasks = reported_tasks(recs)
    out: dict = {
        "model": MODEL,
        "protocol": {
            "common_flags": COMMON,
            "task_flags": PROTOCOL,
            "family_flags": TUNE_FAMILIES,
            "lora": "r=8, lora_alpha=16, dropout 0.1, the 72 block linears (run_glue_iw.py defaults)",
            "iw_calib_steps": 150,
            "dl2": "--iw_beta 0: every coefficient (1-w)^0 = 1 (the uniform Delta-L2 penalty)",
            "stage1": {"family": "lora (--iw_alpha 0)", "lrs": LRS, "seeds": STAGE1_SEEDS, "select": "best mean"},
            "stage2": {"methods": PENALTIES, "alphas": ALPHAS, "seed": STAGE2_SEED, "select": "best score"},
            "stage3": {"families": INIT_FAMILIES, "lrs": INIT_LRS, "seeds": INIT_SEEDS, "select": "best mean"},
            "stage4": {
                "wsa_lambda_tau_at_family_lr": WSA_SWEEP,
                "wsa_lambda_tau_lr": WSA_LOW_LR,
                "seeds": WSA_SEEDS,
                "select": "best mean",
            },  # fmt: skip
            "selection_metric": {t: METRIC_NAME[t] for t in tasks},
            "data": "train on 85 % of each task's train.tsv, score on the other 15 % (never the GLUE dev set)",
            "code": ".gpu/code: a frozen copy of run_glue_iw.py + iwtrainer (commit 7c4490b)",
        },
        "split": split,
        "stage1": {},
        "stage2": {},
        "stage3": {},
        "stage4": {},
        "selection": {},
        "dev_cells": [],
    }
    if "sst2" in tasks:  # its own held-out protocol and code (absent before its first run: the record stays as it was)
        out["protocol"]["heldout_task_flags"] = TUNE_PROTOCOL
        out["protocol"]["sst2"] = (
            "held out: 1,500 of a 10,000-row subsample of train.tsv, trained on the other 8,500 for 3 epochs (798 "
            "steps; the dev runs: 1 epoch of 67,349 rows, 2,105 steps); this checkout's code, dl2 = "
            + " ".join(DL2_FLAGS[2:])
            + "; its dev runs (every row, 3 seeds) go through mpnet_grid.sh, not dev_cells"
        )
    for task in tasks:
        rows = stage1_rows(recs, task)
        out["stage1"][task] = rows
        lr = stage1_lr(rows)
        if lr is None:
            out["selection"][task] = {"lr": None, "note": "stage 1 incomplete"}
            continue
        sel: dict = {"lr": lr, "lr_heldout_mean": rows[lr]["mean"]}
        sel["lora_reference_seed1"] = rows[lr]["seeds"][STAGE2_SEED]
        if task in TASKS:  # dev_cells: mpnet_dev.sh's 5-seed runs (frozen code); SST-2's dev runs go with the grid
            out["dev_cells"].append(f"{task}/{tune_name('lora', lr)}")
        stage2 = {}
        for method in PENALTIES:
            by_alpha = {a: score(recs, task, tune_name(method, lr, a), STAGE2_SEED) for a in ALPHAS}
            stage2[method] = by_alpha
            done = [a for a in ALPHAS if by_alpha[a] is not None]
            if not done:
                sel[method] = {"alpha": None, "note": "not run"}
                continue
            best = max(done, key=lambda a: (by_alpha[a], -ALPHAS.index(a)))
            sel[method] = {
                "alpha": best,
                "heldout": by_alpha[best],
                "minus_lora": by_alpha[best] - sel["lora_reference_seed1"],
                "complete": len(done) == len(ALPHAS),
            }
            if task in TASKS:
                out["dev_cells"].append(f"{task}/{tune_name(method, lr, best)}")
        out["stage2"][task] = {"lr": lr, "lora_alpha0": sel["lora_reference_seed1"], **stage2}
        out["stage3"][task] = {}
        for family in INIT_FAMILIES:
            means = {x: mean([score(recs, task, tune_name(family, x), s) for s in INIT_SEEDS]) for x in INIT_LRS}
            out["stage3"][task][family] = means
            if None not in means.values():
                best = max(INIT_LRS, key=lambda x: (means[x], -INIT_LRS.index(x)))
                sel[family] = {"lr": best, "heldout_mean": means[best]}
        out["stage4"][task] = {}
        for lam, tau, wlr in wsa_points(lr):
            runs = [recs.get(f"{task}/{wsa_name(lam, tau, wlr)}/{x}") for x in WSA_SEEDS]
            done = None not in runs
            out["stage4"][task][f"{lam}/{tau}/{wlr}"] = {
                "heldout_mean": mean([r["results"][METRIC[task]] for r in runs]) if done else None,
                # the directions left after pruning, summed over the targets: 0 is the "prunes everything" failure
                "r_eff_total": [r.get("wsa", {}).get("r_eff_total") for r in runs] if done else None,
            }
        wsa = out["stage4"][task]
        if all(v["heldout_mean"] is not None for v in wsa.values()):
            best = max(wsa, key=lambda k: (wsa[k]["heldout_mean"], -list(wsa).index(k)))
            lam, tau, wlr = best.split("/")
            sel["wsa"] = {"lambda": lam, "tau": tau, "lr": wlr, "heldout_mean": wsa[best]["heldout_mean"]}
        out["selection"][task] = sel
    out["runs"] = {
        key: {
            "heldout": r["results"][METRIC[r["task"]]],
            "wall_s": r["wall_s"],
            "train_runtime_s": r["results"].get("train_runtime"),
            **(
                {"coef_min": r["iw"]["coef_min"], "coef_max": r["iw"]["coef_max"], "K": r["iw"]["K"]}
                if "iw" in r
                else {}
            ),
            **({"last_log": r["last_log"]} if "last_log" in r else {}),
        }
        for key, r in sorted(recs.items())
    }
    out["device_seconds"] = None  # filled by --device_s
    if dev:
        out["dev"] = dev_table(dev, out["dev_cells"])
    return out


def dev_table(dev: dict[str, dict], cells: list[str]) -> dict:
    """Per selected config: the dev score of each seed, mean/sd/median, and the same-seed difference to LoRA."""
    table = {}
    lora = {c.split("/")[0]: c.split("/")[1] for c in cells if c.split("/")[1].startswith("lora_")}
    for cell in cells:
        task, name = cell.split("/")
        seeds = {s: score(dev, task, name, s) for s in DEV_SEEDS}
        done = [v for v in seeds.values() if v is not None]
        ref = {s: score(dev, task, lora[task], s) for s in DEV_SEEDS}
        diffs = [seeds[s] - ref[s] for s in DEV_SEEDS if seeds[s] is not None and ref[s] is not None]
        table[cell] = {
            "seeds": seeds,
            "mean": statistics.fmean(done) if done else None,
            "std": statistics.stdev(done) if len(done) > 1 else None,
            "median": statistics.median(done) if done else None,
            "n": len(done),
            "minus_lora_mean": statistics.fmean(diffs) if diffs and name != lora[task] else None,
            "minus_lora_std": statistics.stdev(diffs) if len(diffs) > 1 and name != lora[task] else None,
            "above_lora_seeds": sum(d > 0 for d in diffs) if name != lora[task] else None,
            "collapsed_seeds": [
                s for s in DEV_SEEDS if seeds[s] is not None and task == "cola" and seeds[s] == 0.0
            ],  # MCC exactly 0: one class predicted for every sentence
        }
    return table


def dev_reading(dev: dict) -> str:
    """A plain reading of the dev table: the same-seed differences to LoRA against their spread."""
    parts = []
    for task in TASKS:
        cells = [(c, r) for c, r in dev.items() if c.startswith(f"{task}/") and r["minus_lora_mean"] is not None]
        diffs = ", ".join(
            f"{c.split('/')[1].split('_a')[0]} {r['minus_lora_mean'] * 100:+.1f} ± {r['minus_lora_std'] * 100:.1f} "
            f"(above on {r['above_lora_seeds']}/{r['n']})"
            for c, r in cells
        )
        parts.append(f"{task}: {diffs}")
    return (
        "differences to LoRA in points (mean ± sd of the 5 same-seed differences; seeds above LoRA): "
        + "; ".join(parts)
        + ". Only RTE shows all three penalties above LoRA on average, by about one to two points with a seed spread "
        "of the same size (RTE dev has 277 examples: one example is 0.36 points); on MRPC and STS-B every "
        "penalty is within a few tenths of a point of LoRA; on CoLA the IW variants are within one sd above "
        "LoRA and dl2 has one collapsed seed. Five seeds of a single selected configuration per method do not "
        "separate the methods, nor do they show the IW penalty hurting at the selected α (no IW mean is more than "
        "about one sd of its differences below LoRA)."
    )


def markdown(s: dict) -> str:
    tasks = list(s["stage1"])  # the small tasks, then SST-2 once it has runs
    lines = [
        f"# IW-LoRA on {MODEL}: hyperparameters chosen on held-out training data",
        "",
        "No GLUE dev set was used for tuning. For each task, 15 % of the training rows are held out (seed "
        f"{(s['split'] or {}).get('seed')}, fraction {(s['split'] or {}).get('fraction')}: "
        "`benchmarks/tuning_split.py`), the runs train on the other 85 % and are scored on the held-out rows with "
        "the task's GLUE metric (RTE accuracy, MRPC/STS-B combined score, CoLA Matthews correlation).",
        "",
        "Protocol: LoRA r=8, lora_alpha 16, dropout 0.1 on the 72 block linears of all-mpnet-base-v2 "
        "(`attention.attn.{q,k,v,o}`, `intermediate.dense`, `output.dense` × 12 layers; every IW run's "
        "`iw_importance.json` lists K = 72), batch 32, bf16, AdamW, warm-up 6 %, weight decay 0.01, linear decay, "
        "dynamic padding, no checkpoint selection (the final model is scored); RTE 10 epochs, MRPC/STS-B/CoLA 5 "
        "epochs, sequence length 128 (CoLA 64); 150 calibration steps for the importance weights. The GPU runs used "
        "`.gpu/code`, a frozen copy of run_glue_iw.py + iwtrainer at commit 7c4490b, on 2× H200 (12 runs at a time "
        "per GPU).",
        "",
        "Every run is one line of `glue_mpnet_tuning.jsonl` (dev-set runs: `glue_mpnet_dev.jsonl`): its metrics, "
        "wall time, the coefficient spread (`iw.coef_min/max`) and the last training log (`last_log`: `loss`, "
        "`loss_task` and the α-scaled `iw_penalty`).",
        "",
        "Methods: `lora` = `--iw_alpha 0`; `dl2` = the uniform penalty α·Σ‖ΔW_k‖² (`--iw_beta 0`: every "
        "c_k = (1−w_k)^0 = 1); `iwlora_sum` / `iwlora_max` = IW-LoRA with sum / max normalisation of the "
        "sensitivities (c_k = 1 − w_k).",
        "",
        "## Stage 1: the LoRA family's learning rate (plain LoRA, seeds 1 and 2)",
        "",
        "| task | metric | " + " | ".join(f"lr {lr}: seed 1 / seed 2 / mean" for lr in LRS) + " | selected lr |",
        "|---|---|" + "---|" * len(LRS) + "---|",
    ]
    for task in tasks:
        row = s["stage1"][task]
        cells = [
            f"{fmt(row[lr]['seeds'][1])} / {fmt(row[lr]['seeds'][2])} / **{fmt(row[lr]['mean'])}**"
            if lr == s["selection"][task].get("lr")
            else f"{fmt(row[lr]['seeds'][1])} / {fmt(row[lr]['seeds'][2])} / {fmt(row[lr]['mean'])}"
            for lr in LRS
        ]
        lines.append(f"| {task} | {METRIC_NAME[task]} | " + " | ".join(cells) + f" | {s['selection'][task]['lr']} |")
    lines += [
        "",
        "## Stage 2: α per penalty at the selected lr (seed 1)",
        "",
        "Held-out score per α; `lora (α=0)` is stage 1's seed-1 run at the same lr. Bold: the selected α "
        "(the best held-out score; ties go to the smaller α).",
        "",
        "| task (lr) | method | α=0 (lora) | " + " | ".join(f"α={a}" for a in ALPHAS) + " | selected α | − lora |",
        "|---|---|---|" + "---|" * len(ALPHAS) + "---|---|",
    ]
    for task in tasks:
        st = s["stage2"].get(task)
        if not st:
            lines.append(f"| {task} | all | not run |" + " not run |" * (len(ALPHAS) + 2))
            continue
        sel = s["selection"][task]
        for method in PENALTIES:
            best = sel[method].get("alpha")
            vals = [f"**{fmt(st[method][a])}**" if a == best else fmt(st[method][a]) for a in ALPHAS]
            diff = sel[method].get("minus_lora")
            lines.append(
                f"| {task} ({st['lr']}) | {method} | {fmt(st['lora_alpha0'])} | " + " | ".join(vals)
                + f" | {best} | {'' if diff is None else f'{diff:+.4f}'} |"
            )  # fmt: skip
    lines += [
        "",
        "## Stage 3: the initialisation variants' own lr (PiSSA without dropout, EVA; mean of seeds 1 and 2)",
        "",
        "| task | family | " + " | ".join(f"lr {x}" for x in INIT_LRS) + " | selected lr |",
        "|---|---|" + "---|" * len(INIT_LRS) + "---|",
    ]
    for task in tasks:
        for family, means in s["stage3"].get(task, {}).items():
            chosen = s["selection"][task].get(family, {}).get("lr", "–")
            lines.append(f"| {task} | {family} | " + " | ".join(fmt(means[x]) for x in INIT_LRS) + f" | {chosen} |")
    lines += [
        "",
        "## Stage 4: WSA's gate L1 λ, pruning threshold τ and lr (seed 1)",
        "",
        "Held-out score (in brackets: the directions left after pruning, r_eff summed over the 72 matrices; 0 = WSA "
        "pruned everything, 1152 = nothing pruned). The first rows are at the family's selected lr, the others at "
        "WSA's own lower lrs.",
        "",
        "| λ, τ, lr | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]

    def wsa_cell(task: str, key: str) -> str:
        v = s["stage4"].get(task, {}).get(key, {})
        kept = v.get("r_eff_total")
        return fmt(v.get("heldout_mean")) + (f" ({', '.join(map(str, kept))})" if kept else "")

    for lam, tau in WSA_SWEEP:
        keys = [f"{lam}/{tau}/{s['selection'][t]['lr']}" for t in tasks]
        lines.append(f"| λ {lam}, τ {tau}, family lr | " + " | ".join(map(wsa_cell, tasks, keys)) + " |")
    for lam, tau, wlr in WSA_LOW_LR:
        keys = [f"{lam}/{tau}/{wlr}"] * len(tasks)
        lines.append(f"| λ {lam}, τ {tau}, lr {wlr} | " + " | ".join(map(wsa_cell, tasks, keys)) + " |")
    picked = [s["selection"][t].get("wsa") for t in tasks]
    lines.append("| **selected** | " + " | ".join(
        f"λ {w['lambda']}, τ {w['tau']}, lr {w['lr']}" if w else "–" for w in picked) + " |")  # fmt: skip
    lines += [
        "",
        "## Selection",
        "",
        "| task | lr | lora held-out (mean of 2 seeds) | dl2 α | iwlora_sum α | iwlora_max α |",
        "|---|---|---|---|---|---|",
    ]
    for task in tasks:
        sel = s["selection"][task]
        alphas = [str(sel.get(m, {}).get("alpha", "not run")) for m in PENALTIES]
        lines.append(f"| {task} | {sel['lr']} | {fmt(sel.get('lr_heldout_mean'))} | " + " | ".join(alphas) + " |")
    lines += [
        "",
        "Reading: the held-out splits are small (RTE 374, MRPC 550, STS-B 862, CoLA 1,283 rows) and stage 2 is a "
        "single seed, so differences of a point or less between α values (or against LoRA) are within seed noise "
        "(compare the two stage-1 seeds of one lr). The selections fix the configurations for the dev-set runs; "
        "they are not evidence that a penalty helps.",
    ]
    lines += sst2_section(s)
    if "dev" in s:
        lines += [
            "",
            "## Dev-set runs at the selected configurations (full training set, GLUE dev)",
            "",
            "Trained on the whole train.tsv, scored once on the GLUE dev set at the end (no selection on dev).",
            "",
            "Every method of a task uses the task's selected lr, the same LoRA budget (1,919,234 trainable "
            "parameters; STS-B 1,918,465) and, per seed, the same head initialisation; `− lora` is the mean ± sd "
            "over seeds of the same-seed difference to LoRA. 5 seeds, 80 runs.",
            "",
            "| task | config | " + " | ".join(f"seed {x}" for x in DEV_SEEDS) + " | mean ± sd (n) | median | − lora |",
            "|---|---|" + "---|" * len(DEV_SEEDS) + "---|---|---|",
        ]
        for cell, row in s["dev"].items():
            task, name = cell.split("/")
            sd = "" if row["std"] is None else f" ± {row['std']:.4f}"
            vals = [fmt(row["seeds"][x]) for x in DEV_SEEDS]
            d = row["minus_lora_mean"]
            diff = (
                ""
                if d is None
                else f"{d:+.4f} ± {row['minus_lora_std']:.4f} ({row['above_lora_seeds']}/{row['n']} above)"
            )
            lines.append(
                f"| {task} | {name} | " + " | ".join(vals) + f" | {fmt(row['mean'])}{sd} ({row['n']}) | "
                f"{fmt(row['median'])} | {diff} |"
            )
        collapsed = [f"{c}/{x}" for c, row in s["dev"].items() for x in row["collapsed_seeds"]]
        if collapsed:
            lines += [
                "",
                f"Collapsed runs: {', '.join(collapsed)} (CoLA MCC exactly 0: a constant prediction; its mean "
                "training loss, 0.612, is the class-prior entropy of CoLA, so it never left the majority-class "
                "solution). Kept in the mean; the median is given beside it.",
            ]
        lines += ["", "Reading: " + dev_reading(s["dev"])]
    else:
        lines += ["", "## Dev-set runs", "", "not run"]
    if s.get("device_seconds"):
        lines += ["", f"Device time of this session (staging + runs): {s['device_seconds']}"]
    lines += [
        "",
        "## Rerun",
        "",
        "Split (deterministic; reads ../shared/data/glue, writes .gpu/tune_glue, never committed):",
        "",
        "    python benchmarks/tuning_split.py --src ../shared/data/glue --out .gpu/tune_glue",
        "    for t in RTE MRPC STS-B CoLA; do mkdir -p .gpu/glue/$t && cp ../shared/data/glue/$t/{train,dev}.tsv "
        ".gpu/glue/$t/; done   # the dev-set runs' data",
        "",
        "On the device: the model from the four chunks in .mp/ (`sh reassemble.sh DIR /tmp/models`, "
        "../shared/tools/README.md), datasets/evaluate wheels from .whl/ on PYTHONPATH, then "
        "`bash benchmarks/mpnet_tuning.sh 530` (resumable; repeat until no cell is left) and "
        "`bash benchmarks/mpnet_dev.sh 520 1,2,3,4,5`.",
        "",
        "One cell's command (here the selected RTE dl2 config, seed 1; any `TASK/NAME/SEED` of the tables, names "
        "`lora_lr5e-4`, `dl2_a1e-4_lr5e-4`, `iwlora_sum_a…`, `iwlora_max_a…`; `--glue_dir .gpu/glue` for the "
        "dev-set version):",
        "",
        f"    python benchmarks/glue_table.py --show {s['dev_cells'][1]}/1 --model /tmp/models/all-mpnet-base-v2 \\",
        "        --glue_dir .gpu/tune_glue --code_dir .gpu/code",
        "",
        "Every missing cell of the grid, resumably (what the device calls ran; `bash benchmarks/mpnet_tuning.sh` "
        "wraps it with the device paths):",
        "",
        "    python benchmarks/glue_table.py --tune --model /tmp/models/all-mpnet-base-v2 \\",
        "        --glue_dir .gpu/tune_glue --code_dir .gpu/code --tasks rte,mrpc,stsb,cola --gpus 0,1 \\",
        "        --parallel 12 --deadline_s 530 \\",
        "        --results benchmarks/results/glue_mpnet_tuning.jsonl",
        "",
        "To rerun one cell through the runner, delete its line from the results file and run the line above (only "
        "missing cells run). The dev-set runs: `bash benchmarks/mpnet_dev.sh 520 1,2,3,4,5` (the `dev_cells` of "
        "glue_mpnet_tuning.json × seeds on .gpu/glue, a copy of the four tasks' train/dev.tsv from "
        "../shared/data/glue; results in glue_mpnet_dev.jsonl).",
        "",
    ]
    return "\n".join(lines)


def sst2_section(s: dict) -> list[str]:
    """SST-2's held-out protocol, how far its selection has run, and the device calls that run it (and its dev
    runs), in order."""
    runs, sel = s["runs"], s["selection"].get("sst2", {})
    lr = sel.get("lr")
    stages = [(1, "LoRA lr"), (3, "PiSSA-d0/EVA lr"), (2, "α of the three penalties"), (4, "WSA λ/τ/lr")]
    status, complete = [], bool(lr)
    for stage, what in stages:
        if stage in (2, 4) and not lr:  # they run at stage 1's lr
            status.append(f"stage {stage} ({what}): waits for stage 1")
            continue
        cells = stage_cells(None, "sst2", [stage], lr)
        keys = [f"{c}/{x}" for c in cells for x in STAGE_SEEDS[stage]]
        done = sum(k in runs for k in keys)
        complete &= done == len(keys)
        status.append(f"stage {stage} ({what}): {done}/{len(keys)} runs")
    ran = any(k.startswith("sst2/") for k in runs)
    head = "Selection complete: " if complete else "Selection so far: " if ran else "Not run yet: "
    lines = [
        "",
        "## SST-2 (the fifth task, 3 dev seeds)",
        "",
        "Held-out protocol (`glue_table.TUNE_PROTOCOL`, `--heldout`): 1,500 rows held out of a 10,000-row subsample "
        "of SST-2's 67,349 training rows (`tuning_split.py --tasks sst2`, seed 0), the runs train 3 epochs on the "
        "other 8,500 (798 steps; the dev runs train 1 epoch of every row, 2,105 steps), length 64, batch 32, scored "
        "by accuracy. The same four stages, seeds and rules as the small tasks, run with this checkout's code "
        "(`dl2` = `--iw_normalize uniform`). Its dev runs (every row of GLUE_MPNET.md at its held-out choice, seeds "
        "1–3) go through `mpnet_grid.sh`, so SST-2 is not in `dev_cells`.",
        "",
        head + "; ".join(status)
        + (f"; lr {lr}." if lr else "."),
        "",
        "Device calls, in order, with /tmp/models staged and `.gpu` carried (as they ran on 2× H200, wall time "
        "after `#`; each resumable: repeat a call until its cells are done; after each, copy the returned "
        "`glue_mpnet_tuning.jsonl` / `glue_mpnet_grid.jsonl` over the committed one). Between the tuning and the "
        "dev calls regenerate this report with `--split .gpu/tune_glue/split.json`: `mpnet_grid.sh` takes SST-2's "
        "cells from the selection in `glue_mpnet_tuning.json` (on the device: run this script there, as the "
        "device's working copy has no later commit). The dev data: `mkdir -p .gpu/glue/SST-2 && cp "
        "../shared/data/glue/SST-2/{train,dev}.tsv .gpu/glue/SST-2/`.",
        "",
        "    bash benchmarks/mpnet_tuning.sh 490 0,1 9 sst2:1,3    # stages 1 + 3: 18 runs (seeds 1, 2); 152 s",
        "    bash benchmarks/mpnet_tuning.sh 560 0,1 11 sst2:2,4   # stages 2 + 4 at stage 1's lr: 21 runs; 264 s",
        "    bash benchmarks/mpnet_grid.sh 560 1,2,3 0,1 6 sst2 lora,dl2,iwlora   # dev: 12 runs; 239 s",
        "    bash benchmarks/mpnet_grid.sh 575 1,2,3 0,1 11 sst2 gradnorm,pissa,full,dora,adalora,eva,wsa",
        "    # dev: 21 runs (every other row; AdaLoRA's 523 s the longest); 527 s",
    ]  # fmt: skip
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results/glue_mpnet_tuning.jsonl")
    p.add_argument("--dev_results", default="benchmarks/results/glue_mpnet_dev.jsonl")
    p.add_argument("--split", default=".gpu/tune_glue/split.json")
    p.add_argument("--device_s", default="", help="device seconds used, as text for the record")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    split = json.loads(Path(args.split).read_text()) if Path(args.split).is_file() else None
    summary = summarize(load(Path(args.results)), load(Path(args.dev_results)), split)
    summary["device_seconds"] = args.device_s or None
    for cell in summary["dev_cells"]:
        method_flags(cell.split("/")[1])  # every selected config is a runnable cell name
    out = Path(args.out)
    (out / "glue_mpnet_tuning.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "GLUE_MPNET_TUNING.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()

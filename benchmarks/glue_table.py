"""Run a (method × task × seed) grid through run_glue_iw.py, several runs at once on one GPU, resumably.

Every cell is one ``run_glue_iw.py`` process with the flags of ``METHODS[method]`` + ``PROTOCOL[task]``; its
numbers (dev metrics, train time, ms/step, peak memory, trainable parameters and the method's own record:
importance coefficients, AdaLoRA's final rank pattern, WSA's effective ranks, allocated ranks) are appended as one
JSON line to ``--results``. Cells already there are skipped, so the grid completes over several GPU sessions.

    python benchmarks/glue_table.py --model MINILM_DIR --glue_dir GLUE_DIR --tasks rte,mrpc --seeds 1,2,3 \\
        --results benchmarks/results/glue_minilm.jsonl --parallel 8
    python benchmarks/glue_table.py --concurrency_probe 1,2,4,8,12 ...   # runs/s at each concurrency
    python benchmarks/glue_table.py --show rte/lora/1                    # the command of one cell, to rerun it

Tuning mode (``--tune``) chooses hyperparameters on held-out splits of the training sets (benchmarks/tuning_split.py
writes them as a GLUE folder): stage 1 runs plain LoRA at each lr of ``--tune_lrs`` and seed of ``--tune_seeds``;
as soon as a task's stage 1 is complete its lr with the best mean held-out score is selected from the results file
and its stage-2 cells (``--tune_methods`` × ``--tune_alphas`` at that lr, seed ``--tune_stage2_seed``) are queued.
Cells are named ``lora_lr5e-4`` and ``dl2_a1e-3_lr5e-4`` (``--show rte/dl2_a1e-3_lr5e-4/1`` prints one).

    python benchmarks/glue_table.py --tune --model MPNET_DIR --glue_dir .gpu/tune_glue --code_dir .gpu/code \
        --tasks rte,mrpc,stsb,cola --gpus 0,1 --parallel 12 --deadline_s 540 --results /tmp/work/tuning.jsonl

``--gpus 0,1`` gives each GPU its own ``--parallel`` workers (CUDA_VISIBLE_DEVICES per run); ``--deadline_s`` starts
a cell only if its estimated wall time (the slowest finished run of the task, or a default) ends before the deadline
and kills what still runs at the deadline (not recorded: the next call reruns it), so a device call ends by itself.
``--code_dir`` runs that copy's run_glue_iw.py and iwtrainer (a frozen copy while the package changes).
``--cells rte/lora_lr5e-4,cola/dl2_a1e-4_lr1e-3`` runs those TASK/METHOD pairs × ``--seeds`` (the selected configs on
the dev set: benchmarks/mpnet_dev.sh); ``--est_results`` takes first wall-time estimates from another results file.

``--heldout`` marks runs on a held-out split (a ``--glue_dir`` written by tuning_split.py, with its ``split.json``;
``--tune`` implies it): a task with an entry in ``TUNE_PROTOCOL`` then trains with that protocol instead of its dev
one. Only SST-2 has one (3 epochs on its 8,500-row tuning subsample); the small tasks tune with their dev protocol.
A TUNE_PROTOCOL task refuses to run when ``--heldout`` and the folder's ``split.json`` disagree.

SST-2's held-out selection runs stage by stage through ``--cells`` (this checkout's code), the cells of each stage
printed from the runs so far by ``--tune_stage_cells`` (stages 2 and 4 need stage 1's lr), its seeds by
``--tune_stage_seeds``; ``bash benchmarks/mpnet_tuning.sh 540 0,1 9 sst2:1,3`` wraps both:

    python benchmarks/glue_table.py --tune_stage_cells 1,3 --tasks sst2 \\
        --results benchmarks/results/glue_mpnet_tuning.jsonl   # stage 1 (LoRA lr) + stage 3 (PiSSA-d0/EVA lr)
    python benchmarks/glue_table.py --tune_stage_seeds 1,3     # 1,2 (stages 2 and 4: 1)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def objective_metric(task: str) -> str:
    """The task's GLUE metric, as the search maximises it (iwtrainer.hpo of --code_dir if given, else of ROOT)."""
    import importlib

    for module in ("iwtrainer.hpo", "iwtrainer.glue.tasks", "iwtrainer.search"):  # its home before / after the move
        try:
            return importlib.import_module(module).objective_metric(task)
        except (ImportError, AttributeError):
            continue
    raise ImportError("no objective_metric in iwtrainer.hpo, iwtrainer.glue.tasks or iwtrainer.search")


# One protocol per task (epochs, sequence length, warm-up); batch 32, AdamW, linear decay, dynamic padding, the
# dev metric of the final model (no checkpoint selection on dev). Sizes: RTE 2.5k, MRPC 3.7k, STS-B 5.7k,
# CoLA 8.6k, SST-2 67k training rows.
PROTOCOL: dict[str, list[str]] = {
    "rte": ["--num_train_epochs", "10", "--max_seq_length", "128"],
    "mrpc": ["--num_train_epochs", "5", "--max_seq_length", "128"],
    "stsb": ["--num_train_epochs", "5", "--max_seq_length", "128"],
    "cola": ["--num_train_epochs", "5", "--max_seq_length", "64"],
    "sst2": ["--num_train_epochs", "1", "--max_seq_length", "64"],
}
# Held-out (tuning) runs whose dev protocol would not fit the tuning split: SST-2's selection trains on the 8,500 kept
# rows of a 10,000-row subsample (tuning_split.MAX_ROWS), where one epoch is 266 steps against the dev run's 2,105 (one
# epoch of 67,349 rows); 3 epochs (798 steps) bring the number of updates the lr and α are chosen at closer to the dev
# run's at 38 % of its cost. Used only with --heldout (--tune implies it); the small tasks tune on 85 % of their rows
# with their dev protocol, so they have no entry and their tuning flags are PROTOCOL's.
TUNE_PROTOCOL: dict[str, list[str]] = {
    "sst2": ["--num_train_epochs", "3", "--max_seq_length", "64"],
}


def task_protocol(task: str, heldout: bool = False) -> list[str]:
    """The epoch/length flags of ``task``: TUNE_PROTOCOL's on a held-out split where it has one, else PROTOCOL's."""
    return TUNE_PROTOCOL[task] if heldout and task in TUNE_PROTOCOL else PROTOCOL[task]


COMMON = [
    "--do_train", "--do_eval", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "128",
    "--warmup_steps", "0.06", "--weight_decay", "0.01", "--lr_scheduler_type", "linear", "--pad_to_max_length",
    "false", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--logging_steps", "50",
    "--bf16", "true", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
]  # fmt: skip
LORA_LR = "5e-4"  # LoRA family (same budget r=8, alpha 16, same targets, same lr for every member)
FULL_LR = "5e-5"
METHODS: dict[str, list[str]] = {
    "full": ["--adapter", "full", "--learning_rate", FULL_LR],
    "lora": ["--adapter", "lora", "--iw_alpha", "0", "--learning_rate", LORA_LR],
    "adalora": ["--adapter", "adalora", "--learning_rate", LORA_LR],
    "iwlora_sum": ["--adapter", "lora", "--iw_alpha", "1e-4", "--iw_normalize", "sum", "--learning_rate", LORA_LR],
    "iwlora_max": ["--adapter", "lora", "--iw_alpha", "1e-4", "--iw_normalize", "max", "--learning_rate", LORA_LR],
    "gradnorm": ["--adapter", "lora", "--iw_alpha", "0", "--rank_allocation", "gradnorm", "--learning_rate", LORA_LR],
    "wsa": ["--adapter", "wsa", "--learning_rate", LORA_LR],
}
# The α sweep on one small task: IW-LoRA at α ∈ {1e-5, 1e-3} besides the grid's 1e-4.
for _a in ("1e-5", "1e-3"):
    for _n in ("sum", "max"):
        METHODS[f"iwlora_{_n}_a{_a}"] = [
            "--adapter", "lora", "--iw_alpha", _a, "--iw_normalize", _n, "--learning_rate", LORA_LR
        ]  # fmt: skip
# WSA without its post-training pruning (τ = 0 keeps every direction): is the adapter or the pruning at fault?
METHODS["wsa_tau0"] = [*METHODS["wsa"], "--wsa_prune_threshold", "0"]


def with_value(flags: list[str], flag: str, value: str) -> list[str]:
    """``flags`` with the value after ``flag`` replaced (the flag must be there: a sweep changes one setting)."""
    i = flags.index(flag)
    return [*flags[: i + 1], value, *flags[i + 2 :]]


# A small lr sweep for the LoRA family on one small task (the grid's lr is LORA_LR for every member).
for _lr in ("1e-3", "2e-3"):
    for _m in ("lora", "adalora", "iwlora_sum"):
        METHODS[f"{_m}_lr{_lr}"] = with_value(METHODS[_m], "--learning_rate", _lr)
# Per-(method, task) additions to the protocol. gradnorm's default warm-up is one epoch, the whole of SST-2's one-epoch
# run (the script refuses it: the ranks would never be re-allocated); 421 steps = 20 % of the run, the share the
# one-epoch warm-up is on the 5-epoch tasks.
CELL_EXTRA: dict[tuple[str, str], list[str]] = {("gradnorm", "sst2"): ["--rank_warmup_steps", "421"]}
SIDE_FILES = ("iw_importance.json", "adalora_ranks.json", "wsa_ranks.json", "rank_allocation.json")

# Tuning mode: the LoRA family's lr (stage 1, plain LoRA), then α per penalty (stage 2) at the selected lr.
# dl2 = uniform coefficients (every c_k = (1-w_k)^0 = 1): the plain ‖ΔW‖² penalty, the IW ablation.
# The 2026-11-30 tuning used a frozen copy of the code without --iw_normalize uniform, so its dl2 runs were
# `--iw_beta 0` (every (1-w_k)^0 = 1, the same penalty; calibration ran but leaves no trace in training): those cells
# keep their names; later runs use the package's own spelling, which skips the calibration.
DL2_FLAGS = ["--adapter", "lora", "--iw_normalize", "uniform"]
TUNE_FAMILIES: dict[str, list[str]] = {
    "lora": ["--adapter", "lora", "--iw_alpha", "0"],
    "dl2": ["--adapter", "lora", "--iw_beta", "0"] if os.environ.get("IW_FROZEN_DL2") else DL2_FLAGS,
    "iwlora_sum": ["--adapter", "lora", "--iw_normalize", "sum"],
    "iwlora_max": ["--adapter", "lora", "--iw_normalize", "max"],
    # The rest of the evidence grid (GLUE_MPNET.md): LoRA-family members at the family's selected lr, no α.
    "gradnorm": ["--adapter", "gradnorm", "--iw_alpha", "0"],
    "pissa": ["--adapter", "pissa"],
    # PiSSA as its authors and peft's example run it: no dropout on the adapter. With the family's dropout 0.1 the
    # adapter carries W's top-r singular directions, so dropout noises the principal part of every target.
    "pissa_d0": ["--adapter", "pissa", "--lora_dropout", "0"],
    "dora": ["--adapter", "dora"],
    "eva": ["--adapter", "eva", "--iw_alpha", "0"],
}
ALPHA_FREE = ("lora", "gradnorm", "pissa", "pissa_d0", "dora", "eva")  # families whose cells carry no _a<alpha>
TUNE_NAME = re.compile(
    r"^(?P<family>lora|dl2|iwlora_sum|iwlora_max|gradnorm|pissa_d0|pissa|dora|eva)(?:_a(?P<alpha>[0-9.e+-]+))?"
    r"_lr(?P<lr>[0-9.e+-]+)$"
)


def cell_extra(task: str, method: str) -> list[str]:
    """CELL_EXTRA of ``method`` on ``task``, looked up by the grid method's name or by a tuning name's family: the
    evidence grid names gradnorm ``gradnorm_lr1e-3``, and SST-2's one-epoch run needs its warm-up under that name."""
    if (method, task) in CELL_EXTRA:
        return CELL_EXTRA[(method, task)]
    m = TUNE_NAME.match(method)
    return CELL_EXTRA.get((m["family"], task), []) if m else []


# AdaLoRA with its own paper's recipe (AdaLoRA, App. C / Table 8, DeBERTaV3-base, batch 32): lr, orthogonality γ,
# ΔT, and tinit/tfinal as fractions of the paper's run (steps at batch 32 × its epochs: RTE 600/1800 of 50 × 78,
# MRPC 600/1800 of 30 × 115, STS-B 800/2000 of 25 × 180, CoLA 800/3500 of 25 × 268, SST-2 6000/22000 of 24 × 2105),
# so the schedule keeps its shape at our epoch counts; b(0) = 1.5·b(T) is the package's init_r = ceil(1.5·r).
ADALORA_PAPER: dict[str, dict[str, str]] = {
    "rte": {"lr": "1.2e-3", "orth": "0.3", "delta_t": "1", "tinit": "0.154", "tfinal": "0.462"},
    "mrpc": {"lr": "1e-3", "orth": "0.1", "delta_t": "1", "tinit": "0.174", "tfinal": "0.522"},
    "stsb": {"lr": "2.2e-3", "orth": "0.1", "delta_t": "10", "tinit": "0.178", "tfinal": "0.444"},
    "cola": {"lr": "5e-4", "orth": "0.5", "delta_t": "10", "tinit": "0.119", "tfinal": "0.522"},
    "sst2": {"lr": "8e-4", "orth": "0.1", "delta_t": "100", "tinit": "0.119", "tfinal": "0.435"},
}
GRID_FULL_LR = "2e-5"  # full fine-tuning of a base-size encoder (not tuned: the usual value)
# WSA diagnostic sweep: λ of the gate L1 × τ of the pruning (the specified λ=1e-3, τ=0.05 prunes every direction).
WSA_SWEEP = [("1e-3", "0.05"), ("1e-4", "0.01"), ("1e-5", "0.001"), ("0", "0")]  # λ, τ at the family's lr
# Every point of that sweep collapsed on every task, λ = 0 / τ = 0 included (the family's lr is too large for updates
# of the top singular vectors): WSA's own lr, without the gate penalty and with the mildest pruning that still prunes.
WSA_LOW_LR = [("0", "0", lr) for lr in ("1e-5", "3e-5", "1e-4")] + [("1e-4", "0.01", lr) for lr in ("3e-5", "1e-4")]


def wsa_points(family_lr: str) -> list[tuple[str, str, str]]:
    """Stage 4's (λ, τ, lr) points of a task whose family lr is ``family_lr``."""
    points = [(lam, tau, family_lr) for lam, tau in WSA_SWEEP]
    return points + [p for p in WSA_LOW_LR if p not in points]


def wsa_name(lam: str, tau: str, lr: str) -> str:
    """The run name of WSA with gate L1 ``lam``, pruning threshold ``tau`` and learning rate ``lr``."""
    return f"wsa_l{lam}_t{tau}_lr{lr}"


def _adalora_paper_flags(task: str) -> list[str]:
    r = ADALORA_PAPER[task]
    return [
        "--adapter", "adalora", "--learning_rate", r["lr"], "--adalora_orth_reg_weight", r["orth"],
        "--adalora_delta_t", r["delta_t"], "--adalora_tinit_frac", r["tinit"], "--adalora_tfinal_frac", r["tfinal"],
    ]  # fmt: skip


# Wall-time guesses (s) of one 85 %-train run of a base-size encoder at 12 runs per H200, before any run is measured;
# runs with the penalty add the 150 calibration steps (× IW_TIME_FACTOR).
DEFAULT_EST_S = {"rte": 330, "mrpc": 260, "stsb": 360, "cola": 450}
IW_TIME_FACTOR = 1.3
# SST-2's runs are long next to a device call (600 s), so its first guess follows its step count and the concurrency
# instead of one number: an all-mpnet-base-v2 SST-2 step among K runs on one H200 took ~0.088 s up to K = 9 (the
# runs are CPU-bound below that) and ~0.15 s at K = 11 (the SST-2 calls of glue_mpnet_grid/tuning.jsonl: 1-epoch LoRA
# 220–228 s at K = 6, gradnorm 328–372 s at K = 11), modelled as max(0.09, 0.014·K), plus ~40 s of start-up,
# tokenisation and evaluation. Steps: 798 held out (3 × ceil(8,500/32)), 2,105 on dev (ceil(67,349/32)). On CoLA's
# dev runs (the same length 64) DoRA's and AdaLoRA's steps took 1.56× and 1.43× LoRA's and a penalty ~8 % of LoRA's
# 1,340 steps (its 150 calibration steps and ~2 % a step); EVA's initialisation (forward passes and SVDs) added
# 110–155 s at 12 runs a GPU on RTE/MRPC/CoLA, taken to shrink with the concurrency like a step.
SST2_STEPS = {True: 798, False: 2105}  # heldout -> optimizer steps
# WSA's rank-16 spectral adapter: 376–411 s next to gradnorm's 328–372 s in the same SST-2 call.
STEP_FACTOR = {"dora": 1.56, "adalora": 1.43, "wsa": 1.2}  # method-name prefix -> step time × LoRA's
EVA_INIT_S = 130  # at 12 runs a GPU


def step_s(parallel: int) -> float:
    """Seconds per training step of one all-mpnet-base-v2 run among ``parallel`` on one H200 (SST-2 batches)."""
    return max(0.09, 0.014 * parallel)


def _sst2_s(heldout: bool, parallel: int, factor: float = 1.0, iw: bool = False, eva: bool = False) -> float:
    per_step = step_s(parallel)
    train = SST2_STEPS[heldout] * per_step * factor * (1.02 if iw else 1.0) + (150 * per_step if iw else 0.0)
    return 40 + train + (EVA_INIT_S * per_step / step_s(12) if eva else 0)


def penalty_factor(task: str, heldout: bool = False, parallel: int = 12) -> float:
    """A penalised run's wall time ÷ a plain one's: IW_TIME_FACTOR on the small tasks, where the 150 calibration
    steps are a large part of a run; SST-2's from its step model (~1.08 on dev, where 1.3 would keep every penalised
    cell from starting in a call once its plain runs are measured)."""
    return _sst2_s(heldout, parallel, iw=True) / _sst2_s(heldout, parallel) if task == "sst2" else IW_TIME_FACTOR


def first_estimate_s(task: str, method: str, heldout: bool = False, parallel: int = 12) -> float:
    """Wall time of a cell before any run of its task is measured (without estimate_s's 5 % margin)."""
    iw = uses_penalty(method)
    if task != "sst2":
        return DEFAULT_EST_S.get(task, 600) * (IW_TIME_FACTOR if iw else 1.0)
    factor = next((f for prefix, f in STEP_FACTOR.items() if method.startswith(prefix)), 1.0)
    return _sst2_s(heldout, parallel, factor, iw, method.startswith("eva"))


def tune_name(family: str, lr: str, alpha: str | None = None) -> str:
    return f"{family}_lr{lr}" if alpha is None else f"{family}_a{alpha}_lr{lr}"


def method_flags(method: str) -> list[str]:
    """The flags of a grid method (METHODS) or of a tuning cell name (``lora_lr5e-4``, ``dl2_a1e-3_lr5e-4``)."""
    if method in METHODS:
        return METHODS[method]
    m = TUNE_NAME.match(method)
    if not m or (m["family"] in ALPHA_FREE) != (m["alpha"] is None):
        raise KeyError(method)
    flags = list(TUNE_FAMILIES[m["family"]])
    if m["alpha"] is not None:
        flags[flags.index("--adapter") + 2 : flags.index("--adapter") + 2] = ["--iw_alpha", m["alpha"]]
    return [*flags, "--learning_rate", m["lr"]]


def flag_value(flags: list[str], flag: str) -> str | None:
    return flags[flags.index(flag) + 1] if flag in flags else None


def cell_key(task: str, method: str, seed: int) -> str:
    return f"{task}/{method}/{seed}"


def code_root(args: argparse.Namespace) -> Path:
    return Path(args.code_dir).resolve() if getattr(args, "code_dir", "") else ROOT


def task_method_flags(task: str, method: str) -> list[str]:
    """Flags of ``method`` on ``task``: the per-task recipes (``adalora_paper``, ``wsa_l<λ>_t<τ>``) or
    :func:`method_flags`."""
    if method == "adalora_paper":
        return _adalora_paper_flags(task)
    wsa = re.fullmatch(r"wsa_l(?P<lam>[0-9.e+-]+)_t(?P<tau>[0-9.e+-]+)_lr(?P<lr>[0-9.e+-]+)", method)
    if wsa:
        return ["--adapter", "wsa", "--wsa_gate_l1", wsa["lam"], "--wsa_prune_threshold", wsa["tau"],
                "--learning_rate", wsa["lr"]]  # fmt: skip
    if method == f"full_lr{GRID_FULL_LR}":
        return ["--adapter", "full", "--learning_rate", GRID_FULL_LR]
    return method_flags(method)


def _known(task: str, method: str) -> bool:
    try:
        task_method_flags(task, method)
    except KeyError:
        return False
    return True


SMALL_TASKS = ("rte", "mrpc", "stsb", "cola")


def grid_cells(selection: dict) -> list[str]:
    """Every TASK/METHOD of the all-mpnet-base-v2 evidence grid from the held-out selection
    (``glue_mpnet_tuning.json``): LoRA and the three penalties at their selected α, the LoRA-family members at the
    family's lr, AdaLoRA's paper recipe, full fine-tuning and WSA at its held-out τ/λ (stage 4), once selected."""
    cells = []
    for task, chosen in selection["selection"].items():
        lr = chosen["lr"]
        if lr is None:  # stage 1 not complete (SST-2 while its selection runs): no cell of the task is defined yet
            continue
        cells.append(f"{task}/{tune_name('lora', lr)}")
        cells += [f"{task}/{tune_name(m, lr, chosen[m]['alpha'])}" for m in ("dl2", "iwlora_sum", "iwlora_max")
                  if chosen.get(m, {}).get("alpha") is not None]  # fmt: skip
        # PiSSA and EVA at the family's lr collapsed on the small tasks (3-seed diagnostics there): SST-2 runs only
        # their own-lr rows below.
        families = ("gradnorm", "pissa", "dora", "eva") if task in SMALL_TASKS else ("gradnorm", "dora")
        cells += [f"{task}/{tune_name(m, lr)}" for m in families]
        # Initialisation variants at their own held-out lr (stage 3 of the selection), once it is selected.
        cells += [f"{task}/{tune_name(m, chosen[m]['lr'])}" for m in ("pissa_d0", "eva") if m in chosen]
        cells += [f"{task}/adalora_paper", f"{task}/full_lr{GRID_FULL_LR}"]
        if "wsa" in chosen:
            w = chosen["wsa"]
            cells.append(f"{task}/{wsa_name(w['lambda'], w['tau'], w.get('lr', lr))}")
    return cells


def wsa_tune_cells(selection: dict) -> list[str]:
    """The WSA sweep's held-out cells (stage 4 of the selection) of every task whose lr is selected."""
    return [f"{task}/{wsa_name(*point)}" for task, chosen in selection["selection"].items()
            if chosen.get("lr") for point in wsa_points(chosen["lr"])]  # fmt: skip


def is_heldout(args: argparse.Namespace) -> bool:
    """Whether these runs are on a held-out split (--heldout, or --tune, which only ever runs on one)."""
    return bool(getattr(args, "heldout", False) or getattr(args, "tune", False))


def command(args: argparse.Namespace, task: str, method: str, seed: int, out: Path) -> list[str]:
    return [
        sys.executable, str(code_root(args) / "run_glue_iw.py"), "--model_name_or_path", args.model, "--glue_dir",
        args.glue_dir, "--task_name", task, "--seed", str(seed), "--output_dir", str(out), *COMMON,
        *task_protocol(task, is_heldout(args)), *task_method_flags(task, method), *cell_extra(task, method),
        *shlex.split(args.extra),
    ]  # fmt: skip


def summarize_side_files(out: Path, compact: bool = False) -> dict:
    """The method's own record, kept small: coefficient spread, final ranks, effective ranks."""
    rec: dict = {}
    if (out / "iw_importance.json").is_file():
        mods = json.loads((out / "iw_importance.json").read_text())["modules"]
        coefs = [m["coefficient"] for m in mods.values()]
        rec["iw"] = {"K": len(coefs), "coef_min": min(coefs), "coef_max": max(coefs), "modules": mods}
        if compact:  # the spread only (72 modules × many runs would swamp the file)
            rec["iw"].pop("modules")
            rec["iw"]["coef_mean"] = sum(coefs) / len(coefs)
    if (out / "trainer_state.json").is_file():  # the last training log: task loss vs the α-scaled penalty
        logs = [h for h in json.loads((out / "trainer_state.json").read_text()).get("log_history", []) if "loss" in h]
        if logs:
            rec["last_log"] = {k: logs[-1][k] for k in ("step", "loss", "loss_task", "iw_penalty") if k in logs[-1]}
    if (out / "adalora_ranks.json").is_file():
        ada = json.loads((out / "adalora_ranks.json").read_text())
        rec["adalora"] = {k: ada.get(k) for k in ("target_r", "init_r", "total_step", "final_budget")}
        rec["adalora"]["final_rank_pattern"] = ada.get("final_rank_pattern")
        rec["adalora"]["mask_updates"] = len(ada.get("history", []))
    if (out / "wsa_ranks.json").is_file():
        ranks = json.loads((out / "wsa_ranks.json").read_text())
        r_eff = {k: v["r_eff"] for k, v in ranks.items()}
        gates = [abs(g) for v in ranks.values() for g in v.get("gates", [])]
        rec["wsa"] = {"r_eff": r_eff, "r_eff_total": sum(r_eff.values())}
        if gates:  # |tanh(s)| before pruning: how far the gates got from 0 (pruned below τ)
            rec["wsa"].update(gate_abs_max=max(gates), gate_abs_mean=sum(gates) / len(gates))
    if (out / "rank_allocation.json").is_file():
        alloc = json.loads((out / "rank_allocation.json").read_text())
        ranks = {k: v["rank"] for k, v in alloc.get("modules", {}).items()}
        rec["rank_allocation"] = {
            "budget": alloc.get("budget"),
            "ranks": ranks,
            "rank_zero": sum(r == 0 for r in ranks.values()),
        }
    return rec


def run_cell(
    args: argparse.Namespace, task: str, method: str, seed: int, gpu: str | None = None, timeout: float | None = None
) -> dict:
    """Run one cell; ``timeout`` (s) kills it (record with ``killed``: not written, rerun by the next call)."""
    out = Path(args.runs_dir) / task / method / str(seed)
    shutil.rmtree(out, ignore_errors=True)
    cmd = command(args, task, method, seed, out)
    t0 = time.time()
    # One intra-op thread per run: K concurrent runs with a thread per core each oversubscribe the host ~K-fold.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    if getattr(args, "code_dir", ""):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code_root(args)), env.get("PYTHONPATH", "")) if p)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    record: dict = {"key": cell_key(task, method, seed), "task": task, "method": method, "seed": seed}
    # A tuning-style cell (--tune/--cells; lora_lr1e-3 is a grid name too): method = the family, config = the name.
    tuning_style = method not in METHODS or getattr(args, "tune", False) or getattr(args, "cells", "")
    m = TUNE_NAME.match(method) if tuning_style else None
    if m:
        record.update(method=m["family"], config=method)
    flags = task_method_flags(task, method)
    record["lr"] = flag_value(flags, "--learning_rate")
    record["alpha"] = flag_value(flags, "--iw_alpha")
    record["wall_s"] = time.time() - t0
    record["concurrency"] = args.parallel
    if gpu is not None:
        record["gpu"] = gpu
    if proc.returncode != 0:
        record["error"] = (stderr or stdout)[-2000:]
        if timeout is not None and time.time() - t0 >= timeout:
            record["killed"] = True
        return record
    results = json.loads((out / "all_results.json").read_text())
    record["results"] = results
    record.update(summarize_side_files(out, compact=bool(m)))
    if not args.keep_runs:
        shutil.rmtree(out, ignore_errors=True)
    return record


def load_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def done_keys(path: Path) -> set[str]:
    return {rec["key"] for rec in load_records(path) if "error" not in rec}


Cell = tuple[str, str, int]
# Longest first (SST-2, AdaLoRA) so the pool does not end on one straggler.
WEIGHT = {"sst2": 8, "cola": 3, "stsb": 2, "mrpc": 1.5, "rte": 1}


def uses_penalty(method: str) -> bool:
    try:
        alpha = flag_value(method_flags(method), "--iw_alpha")
    except KeyError:  # a method no longer defined
        return False
    return alpha is not None and float(alpha) > 0


def estimate_s(cell: Cell, records: list[dict], heldout: bool = False, parallel: int = 12) -> float:
    """Wall-time estimate of a cell: the slowest finished run of its task (same penalty or not), else a guess
    (:func:`first_estimate_s`; ``heldout`` and ``parallel`` only matter to SST-2's)."""
    task, method, _ = cell
    iw = uses_penalty(method)
    same = [
        r["wall_s"]
        for r in records
        if r["task"] == task and "error" not in r and uses_penalty(r["key"].split("/")[1]) == iw
    ]
    if same:
        return 1.05 * max(same)
    plain = [r["wall_s"] for r in records if r["task"] == task and "error" not in r]
    if not plain:
        return 1.05 * first_estimate_s(task, method, heldout, parallel)
    return 1.05 * max(plain) * (penalty_factor(task, heldout, parallel) if iw else 1.0)


def mean_scores(records: list[dict], task: str, methods: list[str], seeds: list[int]) -> dict[str, float | None]:
    """Mean held-out objective over ``seeds`` of each method (None if a seed is missing)."""
    metric = objective_metric(task)
    by_key = {r["key"]: r for r in records if "error" not in r}
    out: dict[str, float | None] = {}
    for method in methods:
        recs = [by_key.get(cell_key(task, method, s)) for s in seeds]
        out[method] = None if None in recs else sum(r["results"][metric] for r in recs) / len(recs)
    return out


def select_lr(records: list[dict], task: str, lrs: list[str], seeds: list[int]) -> str | None:
    """Stage 1's choice: the lr with the best mean held-out score (ties: the first in ``lrs``); None until complete."""
    scores = mean_scores(records, task, [tune_name("lora", lr) for lr in lrs], seeds)
    if None in scores.values():
        return None
    return max(lrs, key=lambda lr: (scores[tune_name("lora", lr)], -lrs.index(lr)))


def tune_cells(args: argparse.Namespace, records: list[dict]) -> list[Cell]:
    """Stage-1 cells, then the stage-2 cells of every task whose stage 1 is complete."""
    lrs, seeds = args.tune_lrs.split(","), [int(x) for x in args.tune_seeds.split(",")]
    stage1 = [(t, tune_name("lora", lr), s) for t in args.tasks.split(",") for lr in lrs for s in seeds]
    stage2 = []
    for task in args.tasks.split(","):
        lr = select_lr(records, task, lrs, seeds)
        if lr is not None:
            stage2 += [
                (task, tune_name(family, lr, alpha), args.tune_stage2_seed)
                for family in args.tune_methods.split(",")
                for alpha in args.tune_alphas.split(",")
            ]
    key = lambda c: -estimate_s(c, records, True, args.parallel)  # noqa: E731
    return sorted(stage1, key=key) + sorted(stage2, key=key)


def run_grid(args: argparse.Namespace) -> None:
    """Workers (``--parallel`` per GPU of ``--gpus``) take the first ready cell that fits before the deadline."""
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    records = load_records(results)
    done = {r["key"] for r in records if "error" not in r}
    # Wall times of another results file (e.g. the tuning runs), × --est_scale: estimates before any run here.
    prior = [
        {**r, "wall_s": r["wall_s"] * args.est_scale}
        for r in (load_records(Path(args.est_results)) if args.est_results else [])
        if "error" not in r
    ]
    seeds = [int(x) for x in args.seeds.split(",")]
    if args.cells:  # explicit TASK/METHOD pairs (e.g. each task's selected configs), × --seeds
        static = [(*c.split("/"), s) for c in args.cells.split(",") for s in seeds]
    else:
        static = [(t, m, s) for t in args.tasks.split(",") for m in args.methods.split(",") for s in seeds]
    static.sort(key=lambda c: -WEIGHT.get(c[0], 1) * (2.5 if c[1] in ("adalora", "wsa") else 1))
    held, par = is_heldout(args), args.parallel
    if prior:  # measured wall times: longest first by estimate
        static.sort(key=lambda c: -estimate_s(c, records + prior, held, par))
    gpus: list[str | None] = args.gpus.split(",") if args.gpus else [None]
    t0 = time.time()
    deadline = t0 + args.deadline_s if args.deadline_s else None
    start_by = t0 + args.budget_s if args.budget_s else None
    lock = threading.Lock()
    taken: set[str] = set(done)  # done, running, or failed in this call
    running = [0]

    def ready() -> list[Cell]:
        cells = tune_cells(args, records) if args.tune else static
        return [c for c in cells if cell_key(*c) not in taken]

    n_ready = len(ready())
    print(f"{len(done)} cells done, {n_ready} ready to run, {args.parallel} at a time on each of {gpus}", flush=True)

    def pick() -> Cell | None | bool:
        """A cell to run, True to wait (cells still running may queue more), False when this worker is done."""
        with lock:
            now = time.time()
            if start_by is None or now < start_by:
                for cell in ready():
                    if deadline is None or now + estimate_s(cell, records + prior, held, par) <= deadline:
                        taken.add(cell_key(*cell))
                        running[0] += 1
                        return cell
            return running[0] > 0 and (deadline is None or now < deadline)

    def worker(gpu: str | None) -> None:
        while True:
            cell = pick()
            if cell is False:
                return
            if cell is True:
                time.sleep(2)
                continue
            timeout = max(1.0, deadline - time.time()) if deadline else None
            rec = run_cell(args, *cell, gpu=gpu, timeout=timeout)
            with lock:
                running[0] -= 1
                if not rec.get("killed"):
                    records.append(rec)
                    with open(results, "a") as f:  # one line per finished cell: a killed session keeps them
                        f.write(json.dumps(rec) + "\n")
            if rec.get("killed"):
                print(f"{rec['key']}: killed at the deadline after {rec['wall_s']:.0f}s (not recorded)", flush=True)
                continue
            status = "ERROR" if "error" in rec else rec["results"].get(objective_metric(rec["task"]), "")
            print(f"{rec['key']}: {rec['wall_s']:.0f}s gpu {gpu} {status}", flush=True)
            if "error" in rec:
                print(rec["error"][-600:], flush=True)

    threads = [threading.Thread(target=worker, args=(g,)) for _ in range(args.parallel) for g in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    left = len(ready())
    print(f"finished after {time.time() - t0:.0f}s; {left} ready cells not run in this call", flush=True)


def concurrency_probe(args: argparse.Namespace) -> None:
    """Runs per minute with K identical short LoRA runs at once, for each K: the throughput-maximising K."""
    probe = []
    for k in (int(x) for x in args.concurrency_probe.split(",")):
        sub = argparse.Namespace(**{**vars(args), "extra": args.extra + " --max_steps 150", "parallel": k})
        t0 = time.time()
        with ThreadPoolExecutor(k) as pool:
            recs = list(pool.map(run_cell, [sub] * k, ["rte"] * k, ["lora"] * k, [100 + s for s in range(k)]))
        wall = time.time() - t0
        errors = [r["error"] for r in recs if "error" in r]
        if errors:
            raise SystemExit(f"concurrency probe failed: {errors[0][-800:]}")
        probe.append({"concurrency": k, "wall_s": wall, "runs_per_min": 60 * k / wall})
        print(probe[-1], flush=True)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(probe, indent=1))


def heldout_mismatch(args: argparse.Namespace, tasks: list[str]) -> str | None:
    """Why these runs must not start, if a task with a held-out protocol (TUNE_PROTOCOL) would train with the wrong
    one: --heldout (or --tune) on a folder without tuning_split.py's split.json, or a held-out split without it (an
    SST-2 tuning run at its dev protocol would take 1 epoch, 266 steps). The small tasks have no held-out protocol, so
    their runs are never refused here."""
    split = (Path(args.glue_dir) / "split.json").is_file()
    for task in dict.fromkeys(tasks):
        if task in TUNE_PROTOCOL and is_heldout(args) != split:
            if split:
                return f"{task}: {args.glue_dir} is a held-out split (split.json): add --heldout (TUNE_PROTOCOL)"
            return f"{task}: {args.glue_dir} has no split.json (not a held-out split): drop --heldout"
    return None


def tune_stage_output(args: argparse.Namespace) -> str:
    """--tune_stage_cells: the stages' TASK/METHOD list of --tasks from the runs in --results; --tune_stage_seeds:
    their seeds. The selection rule is mpnet_tuning_report's (the report the selection is read from)."""
    import mpnet_tuning_report as report  # imports this module: not at the top

    stages = [int(x) for x in (args.tune_stage_cells or args.tune_stage_seeds).split(",")]
    seeds = report.stage_seeds(stages)  # refuses stages of different seeds: one call runs every cell × one seed list
    if args.tune_stage_seeds:
        return ",".join(map(str, seeds))
    recs = report.load(Path(args.results))
    return ",".join(c for task in args.tasks.split(",") for c in report.stage_cells(recs, task, stages))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="model folder or hub id (the real encoder: all-MiniLM-L6-v2)")
    p.add_argument("--glue_dir", default="")
    p.add_argument("--tasks", default="rte,mrpc,stsb,cola,sst2")
    p.add_argument("--methods", default="full,lora,adalora,iwlora_sum,iwlora_max,gradnorm,wsa")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--parallel", type=int, default=8, help="runs at once on the one GPU")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--results", default="benchmarks/results/glue_minilm.jsonl")
    p.add_argument("--runs_dir", default="/tmp/iw_glue_runs")
    p.add_argument("--extra", default="", help="extra flags for every run (quoted)")
    p.add_argument("--budget_s", type=float, default=0, help="start no new cell after this many seconds")
    p.add_argument("--keep_runs", action="store_true")
    p.add_argument("--concurrency_probe", default="", help="e.g. 1,4,8,12: measure throughput, write --results")
    p.add_argument("--show", default="", help="print the command of one cell TASK/METHOD/SEED and exit")
    p.add_argument("--code_dir", default="", help="run this copy's run_glue_iw.py + iwtrainer (default: checkout)")
    p.add_argument("--gpus", default="", help="e.g. 0,1: --parallel runs on each (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--deadline_s", type=float, default=0, help="start only cells that fit; kill runs at this time")
    p.add_argument("--cells", default="", help="TASK/METHOD,... run instead of --tasks × --methods (× --seeds)")
    p.add_argument("--est_results", default="", help="a results file whose wall times give first estimates")
    p.add_argument("--est_scale", type=float, default=1.0, help="× those wall times (e.g. more training rows)")
    p.add_argument(
        "--grid_cells", default="", help="print the evidence grid's TASK/METHOD list of this selection file"
    )
    p.add_argument("--wsa_tune_cells", default="", help="print the WSA sweep's held-out TASK/METHOD list (stage 4)")
    p.add_argument(
        "--tune_stage_cells", default="", help="e.g. 1,3: print those selection stages' TASK/METHOD list of --tasks "
        "from the held-out runs in --results (stages 2 and 4 need stage 1's lr)"
    )  # fmt: skip
    p.add_argument("--tune_stage_seeds", default="", help="e.g. 2,4: print those selection stages' seeds")
    p.add_argument(
        "--heldout", action="store_true", help="runs on a held-out split (--glue_dir from tuning_split.py): "
        "TUNE_PROTOCOL's flags for its tasks (SST-2: 3 epochs); --tune implies it"
    )  # fmt: skip
    p.add_argument("--tune", action="store_true", help="tuning mode: stage 1 lr, stage 2 alpha (see above)")
    p.add_argument("--tune_lrs", default="2e-4,5e-4,1e-3")
    p.add_argument("--tune_seeds", default="1,2")
    p.add_argument("--tune_methods", default="dl2,iwlora_sum,iwlora_max")
    p.add_argument("--tune_alphas", default="1e-4,1e-3,1e-2,1e-1")
    p.add_argument("--tune_stage2_seed", type=int, default=1)
    args = p.parse_args()
    for flag, cells_of in (("grid_cells", grid_cells), ("wsa_tune_cells", wsa_tune_cells)):
        if getattr(args, flag):
            print(",".join(cells_of(json.loads(Path(getattr(args, flag)).read_text()))))
            return
    if args.tune_stage_cells or args.tune_stage_seeds:
        try:
            print(tune_stage_output(args))
        except ValueError as e:  # e.g. stage 2 before stage 1 is complete: nothing to run, and the caller must see it
            p.error(str(e))
        return
    if not args.model or not args.glue_dir:
        p.error("--model and --glue_dir are required")
    if args.code_dir:  # the metric mapping too comes from that copy
        sys.path.insert(0, str(code_root(args)))
    if args.show:
        task, method, seed = args.show.split("/")
        mismatch = heldout_mismatch(args, [task])
        if mismatch:
            p.error(mismatch)
        print(shlex.join(command(args, task, method, int(seed), Path(args.runs_dir) / task / method / seed)))
    elif args.concurrency_probe:
        concurrency_probe(args)
    else:
        pairs = [c.split("/") for c in args.cells.split(",")] if args.cells else []
        tasks = [t for t, _ in pairs] if pairs else args.tasks.split(",")
        if not pairs and not args.tune:
            pairs = [(t, m) for t in tasks for m in args.methods.split(",")]
        unknown = [t for t in tasks if t not in PROTOCOL]
        unknown += [m for t, m in pairs if t in PROTOCOL and not _known(t, m)]
        if unknown:
            raise SystemExit(f"glue_table.py: unknown method/task {unknown}; methods {list(METHODS)}")
        mismatch = heldout_mismatch(args, tasks)
        if mismatch:
            p.error(mismatch)
        run_grid(args)


if __name__ == "__main__":
    main()

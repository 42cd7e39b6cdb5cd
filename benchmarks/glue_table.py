"""Run a (method × task × seed) grid through run_glue_iw.py, several runs at once on one GPU, resumably.

Every cell is one ``run_glue_iw.py`` process with the flags of ``METHODS[method]`` + ``PROTOCOL[task]``; its
numbers (dev metrics, train time, ms/step, peak memory, trainable parameters and the method's own record:
importance coefficients, AdaLoRA's final rank pattern, WSA's effective ranks, allocated ranks) are appended as one
JSON line to ``--results``. Cells already there are skipped, so the grid completes over several GPU sessions.

    python benchmarks/glue_table.py --model MINILM_DIR --glue_dir GLUE_DIR --tasks rte,mrpc --seeds 1,2,3 \\
        --results benchmarks/results/glue_minilm.jsonl --parallel 8
    python benchmarks/glue_table.py --concurrency_probe 1,2,4,8,12 ...   # runs/s at each concurrency
    python benchmarks/glue_table.py --show rte/lora/1                    # the command of one cell, to rerun it
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from iwtrainer.hpo import objective_metric  # noqa: E402  (the task's GLUE metric, as the search maximises it)

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


def cell_key(task: str, method: str, seed: int) -> str:
    return f"{task}/{method}/{seed}"


def command(args: argparse.Namespace, task: str, method: str, seed: int, out: Path) -> list[str]:
    return [
        sys.executable, str(ROOT / "run_glue_iw.py"), "--model_name_or_path", args.model, "--glue_dir",
        args.glue_dir, "--task_name", task, "--seed", str(seed), "--output_dir", str(out), *COMMON,
        *PROTOCOL[task], *METHODS[method], *CELL_EXTRA.get((method, task), []), *shlex.split(args.extra),
    ]  # fmt: skip


def summarize_side_files(out: Path) -> dict:
    """The method's own record, kept small: coefficient spread, final ranks, effective ranks."""
    rec: dict = {}
    if (out / "iw_importance.json").is_file():
        mods = json.loads((out / "iw_importance.json").read_text())["modules"]
        coefs = [m["coefficient"] for m in mods.values()]
        rec["iw"] = {"K": len(coefs), "coef_min": min(coefs), "coef_max": max(coefs), "modules": mods}
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


def run_cell(args: argparse.Namespace, task: str, method: str, seed: int) -> dict:
    out = Path(args.runs_dir) / task / method / str(seed)
    shutil.rmtree(out, ignore_errors=True)
    cmd = command(args, task, method, seed, out)
    t0 = time.time()
    # One intra-op thread per run: K concurrent runs with a thread per core each oversubscribe the host ~K-fold.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    record = {"key": cell_key(task, method, seed), "task": task, "method": method, "seed": seed}
    record["wall_s"] = time.time() - t0
    record["concurrency"] = args.parallel
    if proc.returncode != 0:
        record["error"] = (proc.stderr or proc.stdout)[-2000:]
        return record
    results = json.loads((out / "all_results.json").read_text())
    record["results"] = results
    record.update(summarize_side_files(out))
    if not args.keep_runs:
        shutil.rmtree(out, ignore_errors=True)
    return record


def done_keys(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "error" not in rec:
                keys.add(rec["key"])
    return keys


def run_grid(args: argparse.Namespace) -> None:
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(results)
    cells = [
        (t, m, s)
        for t in args.tasks.split(",")
        for m in args.methods.split(",")
        for s in (int(x) for x in args.seeds.split(","))
        if cell_key(t, m, s) not in done
    ]
    # Longest first (SST-2, AdaLoRA) so the pool does not end on one straggler.
    weight = {"sst2": 8, "cola": 3, "stsb": 2, "mrpc": 1.5, "rte": 1}
    cells.sort(key=lambda c: -weight.get(c[0], 1) * (2.5 if c[1] in ("adalora", "wsa") else 1))
    print(f"{len(done)} cells done, {len(cells)} to run, {args.parallel} at a time", flush=True)
    deadline = time.time() + args.budget_s if args.budget_s else None

    def job(cell: tuple[str, str, int]) -> dict | None:
        if deadline and time.time() > deadline:
            return None  # leave it for the next session: only whole cells are recorded
        rec = run_cell(args, *cell)
        with open(results, "a") as f:  # one line per finished cell: a killed session keeps what it finished
            f.write(json.dumps(rec) + "\n")
        status = "ERROR" if "error" in rec else rec["results"].get(objective_metric(rec["task"]), "")
        print(f"{rec['key']}: {rec['wall_s']:.0f}s {status}", flush=True)
        if "error" in rec:
            print(rec["error"][-600:], flush=True)
        return rec

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(job, cells))


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder or hub id (the real encoder: all-MiniLM-L6-v2)")
    p.add_argument("--glue_dir", required=True)
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
    args = p.parse_args()
    if args.show:
        task, method, seed = args.show.split("/")
        print(shlex.join(command(args, task, method, int(seed), Path(args.runs_dir) / task / method / seed)))
    elif args.concurrency_probe:
        concurrency_probe(args)
    else:
        unknown = [m for m in args.methods.split(",") if m not in METHODS]
        unknown += [t for t in args.tasks.split(",") if t not in PROTOCOL]
        if unknown:
            raise SystemExit(f"glue_table.py: unknown method/task {unknown}; methods {list(METHODS)}")
        run_grid(args)


if __name__ == "__main__":
    main()

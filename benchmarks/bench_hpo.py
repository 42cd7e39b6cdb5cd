"""A real hyperparameter search: W workers of ``run_glue_iw.py configs/minilm_rte_hpo.yaml`` share one optuna study.

Every worker is one process (several trials run at once on one GPU) with ``--hpo_storage sqlite:///…`` pointing at
the same file and the same output folder; each runs ``ceil(trials / W)`` trials of the source documents' space
(lr, batch size, iw_alpha), every trial on a fresh model with its own calibration. Afterwards the study is read back
from the storage and written, with the search's wall time, to OUT.json and OUT.md.

    python benchmarks/bench_hpo.py --model MINILM_DIR --glue_dir GLUE_DIR --trials 8 --workers 4 \\
        --out benchmarks/results/hpo_rte
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from iwtrainer.search import load_search_space, study_summary  # noqa: E402


def markdown(report: dict) -> str:
    s = report["summary"]
    best = s["best"]
    lines = [
        f"# Hyperparameter search: IW-LoRA on {report['task'].upper()} ({report['device']})",
        "",
        f"`benchmarks/bench_hpo.py`: {report['workers']} workers of `run_glue_iw.py {report['config']}` at once on "
        f"one device, one shared optuna study (sqlite), {s['n_complete']}/{s['n_trials']} trials complete in "
        f"{report['wall_s']:.0f} s. Objective: dev {report['objective']} of the final model.",
        "",
        "| trial | learning_rate | batch | iw_alpha | objective | worker host |",
        "|---|---|---|---|---|---|",
    ]
    for t in sorted(s["trials"], key=lambda t: t["number"]):
        p = t["params"]
        obj = f"{t['objective']:.4f}" if t["objective"] is not None else t["state"]
        mark = " **(best)**" if best and t["number"] == best["trial"] else ""
        lines.append(
            f"| {t['number']}{mark} | {p.get('learning_rate', float('nan')):.2e} | "
            f"{p.get('per_device_train_batch_size', '')} | {p.get('iw_alpha', float('nan')):.2e} | {obj} | "
            f"{t.get('host') or ''} |"
        )
    if best:
        lines += ["", f"Best: trial {best['trial']}, objective {best['objective']:.4f}: `{s['best_flags']}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--glue_dir", required=True)
    p.add_argument("--config", default="configs/minilm_rte_hpo.yaml")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each worker")
    p.add_argument("--work_dir", default="/tmp/iw_hpo", help="the shared output folder and sqlite file")
    p.add_argument("--extra", default="", help="extra flags for every worker (quoted)")
    p.add_argument("--out", default="benchmarks/results/hpo_rte", help="writes OUT.json and OUT.md")
    args = p.parse_args()
    if args.trials < 1 or args.workers < 1:
        raise SystemExit("bench_hpo.py: --trials and --workers must be >= 1")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    db = work / "study.db"
    if db.exists():
        raise SystemExit(f"bench_hpo.py: {db} exists; remove it or pick another --work_dir (a fresh study)")
    storage = f"sqlite:///{db.resolve()}"
    per_worker = math.ceil(args.trials / args.workers)
    cmd = [
        sys.executable, str(ROOT / "run_glue_iw.py"), str(ROOT / args.config), "--model_name_or_path", args.model,
        "--glue_dir", args.glue_dir, "--output_dir", str(work / "search"), "--hpo_storage", storage,
        "--hpo_study_name", "rte-hpo", "--hpo_trials", str(per_worker), "--disable_tqdm", "true",
        *shlex.split(args.extra),
    ]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.time()
    procs = []
    for w in range(args.workers):
        log = open(work / f"worker{w}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(2)  # the first worker creates the study; the others load it
    codes = [proc.wait() for proc, _ in procs]
    wall = time.time() - t0
    for _, log in procs:
        log.close()
    failed = [w for w, c in enumerate(codes) if c != 0]
    if failed:
        tail = (work / f"worker{failed[0]}.log").read_text()[-3000:]
        print(f"bench_hpo.py: worker(s) {failed} failed; worker {failed[0]}'s log ends:\n{tail}", file=sys.stderr)

    import torch

    config = Path(ROOT / args.config).read_text()
    space_file = "configs/hpo_space.yaml"
    space = load_search_space(ROOT / space_file)
    report = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
        "task": "rte",
        "config": args.config,
        "space_file": space_file,
        "workers": args.workers,
        "trials_per_worker": per_worker,
        "wall_s": wall,
        "worker_exit_codes": codes,
        "objective": "accuracy",
        "command": shlex.join(cmd),
        "config_text": config,
        "summary": study_summary(storage, "rte-hpo", space, "maximize"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

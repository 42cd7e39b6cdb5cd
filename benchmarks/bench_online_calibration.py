"""Online vs separate calibration: do the first N training steps' own gradients rank the matrices as the separate
pass does? Two ``iwtrainer-glue`` runs of the same recipe (all-mpnet-base-v2, real SST-2, batch 32, lr 1e-3 with the
learning-rate warm-up of a 3-epoch run, IW-LoRA α = 1e-3, dynamic padding) differing only in
``--iw_calibration``: the separate run stops after one step (its record is written before step 0), the online run
after its N training steps. Writes the per-matrix sensitivities, Spearman/Kendall of the two
rankings, the largest relative difference and the coefficient spread to ``--results`` (JSON + markdown).

    python benchmarks/bench_online_calibration.py --model /tmp/models/all-mpnet-base-v2 --glue_dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(mode: str, ns: argparse.Namespace, out: Path) -> dict:
    cmd = [
        sys.executable, str(ROOT / "run_glue_iw.py"), "--model_name_or_path", ns.model, "--glue_dir", ns.glue_dir,
        "--task_name", ns.task, "--output_dir", str(out), "--do_train", "--pad_to_max_length", "false",
        "--max_steps", str(ns.steps if mode == "online" else 1),
        "--per_device_train_batch_size", "32", "--learning_rate", "1e-3", "--warmup_steps", str(ns.warmup),
        "--iw_alpha", "1e-3", "--iw_calib_steps", str(ns.steps), "--iw_calibration", mode, "--seed", str(ns.seed),
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--max_seq_length", "128",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    record = json.loads((out / "iw_importance.json").read_text())
    return {"seconds": time.perf_counter() - start, "record": record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--glue_dir", required=True)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--steps", type=int, default=150, help="N: calibration batches = training steps run")
    parser.add_argument("--warmup", type=int, default=379, help="6 %% of a 3-epoch SST-2 run at batch 32")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "online_calibration"))
    ns = parser.parse_args()
    from scipy.stats import kendalltau, spearmanr

    with tempfile.TemporaryDirectory() as tmp:
        runs = {mode: run(mode, ns, Path(tmp) / mode) for mode in ("separate", "online")}
    sep, onl = (runs[m]["record"]["modules"] for m in ("separate", "online"))
    names = list(sep)
    a, b = [sep[n]["sensitivity"] for n in names], [onl[n]["sensitivity"] for n in names]
    coef_a, coef_b = [sep[n]["coefficient"] for n in names], [onl[n]["coefficient"] for n in names]
    rel = [abs(y / x - 1) for x, y in zip(a, b)]
    summary = {
        "model": ns.model, "task": ns.task, "calib_steps": ns.steps, "warmup_steps": ns.warmup, "seed": ns.seed,
        "batch": 32, "learning_rate": 1e-3, "matrices": len(names),
        "spearman": spearmanr(a, b).correlation, "kendall": kendalltau(a, b).correlation,
        "max_rel_diff": max(rel), "median_rel_diff": sorted(rel)[len(rel) // 2],
        "coefficient_range": {"separate": [min(coef_a), max(coef_a)], "online": [min(coef_b), max(coef_b)]},
        "wall_seconds_cpu": {m: runs[m]["seconds"] for m in runs},
        "sensitivities": {n: {"separate": x, "online": y} for n, x, y in zip(names, a, b)},
    }  # fmt: skip
    Path(ns.results + ".json").write_text(json.dumps(summary, indent=1))
    text = (
        f"# Online vs separate calibration ({Path(ns.model).name}, {ns.task.upper()})\n\n"
        f"`python benchmarks/bench_online_calibration.py` — the same IW-LoRA recipe (batch 32, lr 1e-3 after a "
        f"{ns.warmup}-step warm-up, α = 1e-3, seed {ns.seed}, real {ns.task.upper()} training rows) with "
        f"`--iw_calibration separate` (a pass over {ns.steps} batches before step 0) and `online` (the first "
        f"{ns.steps} training steps' own gradients, dropout on, LoRA moving under the warm-up).\n\n"
        f"| {len(names)} matrices | value |\n|---|---:|\n"
        f"| Spearman of the sensitivities | {summary['spearman']:.4f} |\n"
        f"| Kendall τ | {summary['kendall']:.4f} |\n"
        f"| largest / median relative difference | {max(rel):.3f} / {summary['median_rel_diff']:.3f} |\n"
        f"| coefficient range, separate | {min(coef_a):.4f}–{max(coef_a):.4f} |\n"
        f"| coefficient range, online | {min(coef_b):.4f}–{max(coef_b):.4f} |\n\n"
        "Wall times were taken on a 2-core CPU (the measurement of agreement needs no GPU); they are not speed "
        "claims.\n"
    )
    Path(ns.results + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Aggregate glue_table.py's per-run lines into the results table: JSON, markdown and a chart.

    python benchmarks/glue_report.py --results benchmarks/results/glue_minilm.jsonl --out benchmarks/results

Writes ``glue_minilm.json`` (every run + the aggregates), ``GLUE.md`` (mean ± std per cell, GLUE average over
the tasks every method has, paired IW-LoRA − LoRA differences over the same seeds, training time relative to LoRA)
and ``glue_minilm.png`` (score vs relative training time per method).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from iwtrainer.glue.tasks import objective_metric  # noqa: E402  (the task's GLUE metric: the one reported and searched)

# The grid's tasks in table order, with what their metric averages.
TASK_LABEL = {"rte": "acc", "mrpc": "acc/F1", "stsb": "Pearson/Spearman", "cola": "MCC", "sst2": "acc"}
METHOD_ORDER = ["full", "lora", "adalora", "iwlora_sum", "iwlora_max", "gradnorm", "wsa"]
LABEL = {
    "full": "Full FT",
    "lora": "LoRA r=8",
    "adalora": "AdaLoRA",
    "iwlora_sum": "IW-LoRA (sum)",
    "iwlora_max": "IW-LoRA (max)",
    "gradnorm": "Grad-norm ranks",
    "wsa": "WSA",
}


def load(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "error" not in r]


def score(run: dict) -> float:
    return 100 * run["results"][objective_metric(run["task"])]


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def runtime_ratio(runs: dict[int, dict], ref: dict[int, dict]) -> float:
    """Mean ``train_runtime`` of ``runs`` over that of ``ref`` (both: seed -> run of one task)."""
    mean = lambda rs: statistics.mean(r["results"]["train_runtime"] for r in rs.values())  # noqa: E731
    return mean(runs) / mean(ref)


def paired_diffs(runs: dict[int, dict], ref: dict[int, dict]) -> tuple[list[int], list[float]]:
    """Score differences ``runs − ref`` over the seeds both have."""
    seeds = sorted(set(runs) & set(ref))
    return seeds, [score(runs[s]) - score(ref[s]) for s in seeds]


def aggregate(rows: list[dict]) -> dict:
    cells: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for r in rows:
        cells[(r["task"], r["method"])][r["seed"]] = r
    tasks = [t for t in TASK_LABEL if any(k[0] == t for k in cells)]
    methods = [m for m in METHOD_ORDER if any(k[1] == m for k in cells)]
    table = {m: {t: [score(run) for run in cells[(t, m)].values()] for t in tasks if (t, m) in cells} for m in methods}
    # Relative training time: train_runtime against LoRA's on the same task, averaged over tasks. All runs of a
    # chunk ran 14 at a time on one GPU, so this is indicative; bench_step.py's isolated ms/step is the reference.
    rel_time = {}
    for m in methods:
        ratios = []
        for t in tasks:
            if (t, m) in cells and (t, "lora") in cells:
                ratios.append(runtime_ratio(cells[(t, m)], cells[(t, "lora")]))
        rel_time[m] = statistics.mean(ratios) if ratios else None
    complete = [t for t in tasks if all((t, m) in cells and len(cells[(t, m)]) >= 3 for m in methods)]
    average = {
        m: statistics.mean(statistics.mean(table[m][t]) for t in complete) if complete else None for m in methods
    }
    paired = {}
    for m in ("iwlora_sum", "iwlora_max", "gradnorm", "adalora"):
        for t in tasks:
            if (t, m) in cells and (t, "lora") in cells:
                seeds, diffs = paired_diffs(cells[(t, m)], cells[(t, "lora")])
                if diffs:
                    paired[f"{m}/{t}"] = {"seeds": seeds, "diffs": diffs}
    # Sweeps and diagnostics (α and lr sweeps, WSA without pruning): every other method, per task, paired against
    # its reference run (LoRA, or LoRA at the same lr).
    extra = {}
    for (t, m), runs in sorted(cells.items()):
        if m in METHOD_ORDER:
            continue
        # An lr-sweep run is paired with LoRA at the same lr (e.g. iwlora_sum_lr1e-3 with lora_lr1e-3).
        lr = m[m.index("_lr") :] if "_lr" in m else ""
        ref = f"lora{lr}" if m != f"lora{lr}" and (t, f"lora{lr}") in cells else "lora"
        lora = cells.get((t, ref), {})
        extra[f"{m}/{t}"] = {
            "reference": ref,
            "scores": [score(runs[s]) for s in sorted(runs)],
            "seeds": sorted(runs),
            "paired_diffs_vs_reference": paired_diffs(runs, lora)[1],
            "train_time_x_reference": runtime_ratio(runs, lora) if lora else None,
        }
    params = {m: next(iter(cells[(tasks[0], m)].values()))["results"]["trainable_params"] for m in methods}
    return {
        "tasks": tasks,
        "methods": methods,
        "complete_tasks": complete,
        "table": table,
        "average": average,
        "relative_train_time": rel_time,
        "paired_vs_lora": paired,
        "trainable_params": params,
        "sweeps": extra,
        "missing": [f"{t}/{m}" for t in TASK_LABEL for m in METHOD_ORDER if (t, m) not in cells],
    }


def chart(agg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in agg["methods"]:
        x, y = agg["relative_train_time"][m], agg["average"][m]
        if x is None or y is None:
            continue
        ax.scatter(x, y, s=60, label=f"{LABEL[m]} ({y:.1f})")
    ax.set_xlabel("training time relative to LoRA (train_runtime, same task)")
    ax.set_ylabel(f"mean dev score over {', '.join(agg['complete_tasks']).upper()} (×100)")
    ax.set_title("all-MiniLM-L6-v2 on GLUE: score vs training time (3 seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(agg: dict, step_time: dict | None) -> str:
    tasks = agg["tasks"]
    head = "| method | trainable params | " + " | ".join(f"{t.upper()} ({TASK_LABEL[t]})" for t in tasks)
    head += f" | avg ({'+'.join(t.upper() for t in agg['complete_tasks'])}) | train time × LoRA |"
    lines = [head, "|---|---:|" + "---:|" * len(tasks) + "---:|---:|"]
    for m in agg["methods"]:
        avg = agg["average"][m]
        rel = agg["relative_train_time"][m]
        cells = " | ".join(fmt(agg["table"][m].get(t, [])) for t in tasks)
        lines.append(
            f"| {LABEL[m]} | {agg['trainable_params'][m]:,} | {cells} | {avg:.1f} | {rel:.2f} |"
            if avg is not None and rel is not None
            else f"| {LABEL[m]} | {agg['trainable_params'][m]:,} | {cells} | – | – |"
        )
    lines += ["", "Paired differences against LoRA over the same seeds (points ×100):", ""]
    lines += ["| method / task | seeds | differences | mean |", "|---|---|---|---:|"]
    for key, v in agg["paired_vs_lora"].items():
        m, t = key.split("/")
        lines.append(
            f"| {LABEL[m]} / {t.upper()} | {v['seeds']} | {', '.join(f'{d:+.2f}' for d in v['diffs'])} "
            f"| {statistics.mean(v['diffs']):+.2f} |"
        )
    if agg["sweeps"]:
        lines += [
            "",
            "Sweeps and diagnostics (the protocol with one flag changed; paired against a reference run):",
            "",
        ]
        lines += [
            "| run / task | scores | mean ± std | reference | paired − reference (mean) | time × reference |",
            "|---|---|---:|---|---|---:|",
        ]
        for key, v in agg["sweeps"].items():
            m, t = key.split("/")
            diffs = v["paired_diffs_vs_reference"]
            paired = f"{', '.join(f'{d:+.2f}' for d in diffs)} ({statistics.mean(diffs):+.2f})" if diffs else "–"
            rel = f"{v['train_time_x_reference']:.2f}" if v["train_time_x_reference"] else "–"
            scores = ", ".join(f"{x:.1f}" for x in v["scores"])
            lines.append(
                f"| {m} / {t.upper()} | {scores} | {fmt(v['scores'])} | {v['reference']} | {paired} | {rel} |"
            )
    if step_time:
        lines += ["", "Isolated step time (bench_step.py, same process, batch 32, seq 128, H100):", ""]
        for model in step_time["models"]:
            ratios = ", ".join(f"{k} {v['ratio_vs_lora']:.2f}×" for k, v in model["methods"].items())
            lines.append(f"- {model['model']}: {ratios}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results/glue_minilm.jsonl")
    p.add_argument("--step_time", default="benchmarks/results/step_time.json")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    rows = load(Path(args.results))
    agg = aggregate(rows)
    out = Path(args.out)
    (out / "glue_minilm.json").write_text(json.dumps({"aggregate": agg, "runs": rows}, indent=1))
    step = json.loads(Path(args.step_time).read_text()) if Path(args.step_time).is_file() else None
    (out / "glue_table.md").write_text(markdown(agg, step) + "\n")
    chart(agg, out / "glue_minilm.png")
    print(markdown(agg, step))
    print("missing cells:", agg["missing"])


if __name__ == "__main__":
    main()

"""The committed results tables regenerate from their committed per-run lines (the report scripts do not rot), and
the evidence report's statistics agree with independent computations."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
from scipy import stats

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))
import glue_mpnet_report as mpnet  # noqa: E402
import glue_report  # noqa: E402


def test_minilm_table_regenerates() -> None:
    rows = glue_report.load(RESULTS / "glue_minilm.jsonl")
    step = json.loads((RESULTS / "step_time.json").read_text())
    text = glue_report.markdown(glue_report.aggregate(rows), step) + "\n"
    assert text == (RESULTS / "glue_table.md").read_text()


def _mpnet() -> tuple[dict, dict, dict]:
    selection = json.loads((RESULTS / "glue_mpnet_tuning.json").read_text())["selection"]
    runs = {**mpnet.load(RESULTS / "glue_mpnet_dev.jsonl"), **mpnet.load(RESULTS / "glue_mpnet_grid.jsonl")}
    return runs, selection, mpnet.aggregate(runs, selection)


def test_mpnet_table_regenerates() -> None:
    runs, selection, agg = _mpnet()
    text = mpnet.markdown(agg, selection) + "\n" + (RESULTS / "GLUE_MPNET_READING.md").read_text()
    assert text == (RESULTS / "GLUE_MPNET.md").read_text()
    assert json.loads((RESULTS / "glue_mpnet.json").read_text()) == json.loads(json.dumps(agg))


def test_mpnet_paired_interval_matches_scipy() -> None:
    runs, _, agg = _mpnet()
    c = agg["comparisons"]["iwlora_sum - lora"]["rte"]
    # Independently: the same seeds' scores straight from the run lines, and scipy's t interval.
    a = {r["seed"]: r for r in runs.values() if r["key"].startswith("rte/iwlora_sum_a1e-3_lr5e-4/")}
    b = {r["seed"]: r for r in runs.values() if r["key"].startswith("rte/lora_lr5e-4/")}
    diffs = [100 * (a[s]["results"]["eval_accuracy"] - b[s]["results"]["eval_accuracy"]) for s in sorted(a)]
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=statistics.fmean(diffs), scale=stats.sem(diffs))
    assert c["seeds"] == [1, 2, 3, 4, 5]
    assert c["mean"] == pytest.approx(statistics.fmean(diffs), abs=1e-9)
    assert (c["low"], c["high"]) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9))


def test_mpnet_collapse_is_the_constant_prediction() -> None:
    runs, _, _ = _mpnet()
    # A constant "equivalent" prediction on MRPC dev scores exactly the run PiSSA collapsed to.
    pissa = runs["mrpc/pissa_lr1e-3/1"]["results"]
    assert 100 * pissa["eval_accuracy"] == pytest.approx(100 * 279 / 408)
    assert 100 * pissa["eval_combined_score"] == pytest.approx(mpnet.CONSTANT["mrpc"])
    assert mpnet.collapsed(runs["mrpc/pissa_lr1e-3/1"]) and not mpnet.collapsed(runs["mrpc/lora_lr1e-3/1"])
    assert mpnet.score(runs["stsb/pissa_lr1e-3/1"]) == 0.0  # an undefined (NaN) correlation scores 0
    assert math.isnan(runs["stsb/pissa_lr1e-3/1"]["results"]["eval_pearson"])


def test_wsa_stage4_selects_the_best_held_out_point_of_every_task() -> None:
    """Stage 4's selection, recomputed from the tuning runs by hand: the best seed-1 held-out score over the (λ, τ)
    sweep at the family lr and the lower-lr points, earliest point on ties; the grid's WSA cell is that point."""
    import glue_table

    tuning = json.loads((RESULTS / "glue_mpnet_tuning.json").read_text())
    runs = {json.loads(line)["key"]: json.loads(line) for line in (RESULTS / "glue_mpnet_tuning.jsonl").open()}
    cells = glue_table.grid_cells(tuning)
    for task, chosen in tuning["selection"].items():
        points = [(lam, tau, chosen["lr"]) for lam, tau in glue_table.WSA_SWEEP] + glue_table.WSA_LOW_LR
        assert glue_table.wsa_points(chosen["lr"]) == points  # no family lr is one of the low ones here
        scores = {}
        for lam, tau, lr in points:
            value = runs[f"{task}/wsa_l{lam}_t{tau}_lr{lr}/1"]["results"][mpnet.METRIC[task]]
            scores[(lam, tau, lr)] = -math.inf if math.isnan(value) else value
        best = max(points, key=lambda p: (scores[p], -points.index(p)))
        assert (chosen["wsa"]["lambda"], chosen["wsa"]["tau"], chosen["wsa"]["lr"]) == best
        assert f"{task}/wsa_l{best[0]}_t{best[1]}_lr{best[2]}" in cells


README_MPNET_ROWS = {  # README headline row label -> glue_mpnet.json method
    "Full fine-tuning (lr 2e-5)": "full",
    "LoRA r=8": "lora",
    "ΔL2 (`--iw_normalize uniform`)": "dl2",
    "**IW-LoRA (sum)**": "iwlora_sum",
    "**IW-LoRA (max)**": "iwlora_max",
    "Gradient-norm ranks": "gradnorm",
    "DoRA": "dora",
    "AdaLoRA (its paper's recipe)": "adalora",
    "EVA (its own lr²)": "eva_own",
    "PiSSA (no dropout, its own lr²)": "pissa_d0",
    "WSA (λ 0, τ 0, its own lr⁴; diagnostic)": "wsa",
}


def test_readme_headline_table_is_the_committed_mpnet_table() -> None:
    """Every cell of the README's all-mpnet-base-v2 table (mean ± sd, the four-task average, SST-2, step time) is
    glue_mpnet.json's value rounded as printed: the headline cannot drift from the results."""
    table = json.loads((RESULTS / "glue_mpnet.json").read_text())["table"]
    lines = (BENCH.parent / "README.md").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| all-mpnet-base-v2 |")))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    assert set(rows) == set(README_MPNET_ROWS)
    for label, method in README_MPNET_ROWS.items():
        row = table[method]
        want = [f"{row[t]['mean']:.1f} ± {row[t]['std']:.1f}" for t in ("rte", "mrpc", "stsb", "cola")]
        want += [f"{row['average']:.1f}", f"{row['sst2']['mean']:.1f} ± {row['sst2']['std']:.1f}"]
        ms = statistics.fmean(row[t]["ms_per_step_x_lora"] for t in ("rte", "mrpc", "stsb", "cola"))
        got = [c.rstrip("¹²³⁴") for c in rows[label]]
        assert got[:6] == want, label
        assert got[6] == f"{ms:.2f}", label

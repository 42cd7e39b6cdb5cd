"""SST-2 as the optional fifth task of the all-mpnet-base-v2 evidence (glue_table.py, mpnet_tuning_report.py,
glue_mpnet_report.py): its held-out selection follows the small tasks' rules on its own 3-epoch protocol, its dev
runs get their own columns and never enter the small tasks' average or pooled intervals, and without SST-2 runs the
committed reports come out as they are. SST-2 records here are fakes in the committed lines' shape (copies of real
records with SST-2's key and score), written to tmp_path."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import pytest
from scipy import stats

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))
import glue_mpnet_report as mpnet  # noqa: E402
import glue_table  # noqa: E402
import mpnet_tuning_report as tuning  # noqa: E402

# Metric keys of the small tasks that an SST-2 record (accuracy only) does not have.
OTHER_METRICS = ("eval_matthews_correlation", "eval_combined_score", "eval_f1", "eval_pearson", "eval_spearmanr")
FROZEN_DL2 = ["--adapter", "lora", "--iw_beta", "0"]  # TUNE_FAMILIES["dl2"] under IW_FROZEN_DL2=1 (the committed run)

# Held-out scores of the fake SST-2 selection (binary fractions: means and ties are exact).
# Stage 1: lr 5e-4 and 1e-3 tie on the mean (0.9140625) -> the first in LRS, 5e-4.
STAGE1 = {
    "2e-4": (0.875, 0.890625),
    "5e-4": (0.90625, 0.921875),
    "1e-3": (0.921875, 0.90625),
}
# Stage 2 at 5e-4, seed 1: dl2's 1e-3 and 1e-2 tie -> the smaller α, 1e-3.
STAGE2 = {
    "dl2": {"1e-4": 0.90625, "1e-3": 0.9375, "1e-2": 0.9375, "1e-1": 0.75},
    "iwlora_sum": {"1e-4": 0.875, "1e-3": 0.90625, "1e-2": 0.9375, "1e-1": 0.8125},
    "iwlora_max": {"1e-4": 0.9375, "1e-3": 0.90625, "1e-2": 0.875, "1e-1": 0.75},
}
EXPECTED_ALPHA = {"dl2": "1e-3", "iwlora_sum": "1e-2", "iwlora_max": "1e-4"}
# Stage 3 (seeds 1, 2): PiSSA-d0 best at 3e-4, EVA at 1e-4.
STAGE3 = {
    "pissa_d0": {"1e-4": (0.875, 0.875), "3e-4": (0.90625, 0.890625), "1e-3": (0.5, 0.5)},
    "eva": {"1e-4": (0.921875, 0.90625), "3e-4": (0.90625, 0.90625), "1e-3": (0.5, 0.5)},
}
BEST_WSA = ("0", "0", "1e-4")  # stage 4: this point scores 0.90625, every other 0.5


def _committed(name: str) -> dict[str, dict]:
    """The committed runs of the four small tasks (the base the fake SST-2 runs are added to)."""
    recs = map(json.loads, (RESULTS / name).read_text().splitlines())
    return {r["key"]: r for r in recs if "error" not in r and r["task"] != "sst2"}


def _small_runs() -> dict[str, dict]:
    """The committed dev-set runs (dev + grid) of the four small tasks, as glue_mpnet_report loads them."""
    runs = {**mpnet.load(RESULTS / "glue_mpnet_dev.jsonl"), **mpnet.load(RESULTS / "glue_mpnet_grid.jsonl")}
    return {k: r for k, r in runs.items() if not k.startswith("sst2/")}


def _small_selection() -> dict:
    selection = json.loads((RESULTS / "glue_mpnet_tuning.json").read_text())["selection"]
    return {t: v for t, v in selection.items() if t != "sst2"}


def _fake(template: dict, task: str, name: str, seed: int, value: float) -> dict:
    """A copy of a committed record as SST-2's run ``name``/``seed`` scoring ``value`` (accuracy)."""
    rec = copy.deepcopy(template)
    rec.update(key=f"{task}/{name}/{seed}", task=task, seed=seed)
    if "config" in rec:
        rec["config"] = name
    for key in OTHER_METRICS:
        rec["results"].pop(key, None)
    rec["results"]["eval_accuracy"] = value
    return rec


def _write(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _sst2_tuning_records() -> list[dict]:
    """Every cell of SST-2's four selection stages, shaped like the committed CoLA tuning runs of each family."""
    cola = _committed("glue_mpnet_tuning.jsonl")
    recs = []
    for lr, seeds in STAGE1.items():
        recs += [_fake(cola["cola/lora_lr1e-3/1"], "sst2", f"lora_lr{lr}", s, v) for s, v in zip((1, 2), seeds)]
    for method, by_alpha in STAGE2.items():
        template = cola[f"cola/{method}_a1e-4_lr1e-3/1"]
        recs += [_fake(template, "sst2", f"{method}_a{a}_lr5e-4", 1, v) for a, v in by_alpha.items()]
    for family, by_lr in STAGE3.items():
        template = cola[f"cola/{family}_lr1e-4/1"]
        for lr, seeds in by_lr.items():
            recs += [_fake(template, "sst2", f"{family}_lr{lr}", s, v) for s, v in zip((1, 2), seeds)]
    for point in glue_table.wsa_points("5e-4"):
        value = 0.90625 if point == BEST_WSA else 0.5
        recs.append(_fake(cola["cola/wsa_l0_t0_lr1e-4/1"], "sst2", glue_table.wsa_name(*point), 1, value))
    return recs


@pytest.fixture
def frozen_dl2(monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed tuning report was written with IW_FROZEN_DL2=1 (dl2 = --iw_beta 0 in its protocol record)."""
    monkeypatch.setitem(glue_table.TUNE_FAMILIES, "dl2", FROZEN_DL2)


@pytest.fixture
def with_sst2(tmp_path: Path) -> dict:
    """The committed tuning runs + SST-2's fake ones, in a results file, and their summary."""
    recs = [*_committed("glue_mpnet_tuning.jsonl").values(), *_sst2_tuning_records()]
    path = _write(tmp_path / "tuning.jsonl", recs)
    committed = json.loads((RESULTS / "glue_mpnet_tuning.json").read_text())
    summary = tuning.summarize(tuning.load(path), tuning.load(RESULTS / "glue_mpnet_dev.jsonl"), committed["split"])
    return {"path": path, "summary": summary, "committed": committed}


# (a) the selection ------------------------------------------------------------------------------------------------


def test_sst2_selection_follows_the_documented_rule(with_sst2: dict) -> None:
    sel = with_sst2["summary"]["selection"]["sst2"]
    assert sel["lr"] == "5e-4"  # the tie of means goes to the first lr of LRS
    assert sel["lr_heldout_mean"] == statistics.fmean(STAGE1["5e-4"])
    assert sel["lora_reference_seed1"] == STAGE1["5e-4"][0]
    for method, alpha in EXPECTED_ALPHA.items():
        assert sel[method]["alpha"] == alpha and sel[method]["complete"]
        assert sel[method]["minus_lora"] == STAGE2[method][alpha] - STAGE1["5e-4"][0]
    assert sel["pissa_d0"]["lr"] == "3e-4" and sel["eva"]["lr"] == "1e-4"
    assert (sel["wsa"]["lambda"], sel["wsa"]["tau"], sel["wsa"]["lr"]) == BEST_WSA


def test_small_tasks_selection_is_unchanged_by_sst2(with_sst2: dict) -> None:
    summary = json.loads(json.dumps(with_sst2["summary"]))  # as written: int keys become strings
    committed = with_sst2["committed"]
    for part in ("stage1", "stage2", "stage3", "stage4", "selection"):
        assert {t: summary[part][t] for t in tuning.TASKS} == {t: committed[part][t] for t in tuning.TASKS}, part
    # SST-2's dev runs go through the grid (3 seeds, this checkout's code), not mpnet_dev.sh's 5-seed dev_cells.
    assert summary["dev_cells"] == committed["dev_cells"] and summary["dev"] == committed["dev"]
    assert list(summary["selection"]) == [*tuning.TASKS, "sst2"]
    assert summary["protocol"]["heldout_task_flags"]["sst2"] == ["--num_train_epochs", "3", "--max_seq_length", "64"]


def test_stage_cells_follow_stage_1(with_sst2: dict, tmp_path: Path) -> None:
    recs = tuning.load(with_sst2["path"])
    stage24 = tuning.stage_cells(recs, "sst2", [2, 4])
    penalties = [f"sst2/{m}_a{a}_lr5e-4" for m in tuning.PENALTIES for a in tuning.ALPHAS]
    assert stage24 == penalties + [f"sst2/{glue_table.wsa_name(*p)}" for p in glue_table.wsa_points("5e-4")]
    assert len(stage24) == 21 and tuning.stage_seeds([2, 4]) == (1,)
    stage13 = tuning.stage_cells({}, "sst2", [1, 3])  # need no runs
    assert len(stage13) == 9 and tuning.stage_seeds([1, 3]) == (1, 2)
    with pytest.raises(ValueError, match="stage 1 has 0 of 6 runs"):
        tuning.stage_cells({}, "sst2", [2])
    with pytest.raises(ValueError, match="different seeds"):
        tuning.stage_seeds([1, 2])
    with pytest.raises(ValueError, match="no stage"):
        tuning.stage_seeds([5])
    # The CLI the device wrapper calls (mpnet_tuning.sh sst2:2,4) prints the same list and the stage's seeds.
    args = argparse.Namespace(
        tune_stage_cells="2,4", tune_stage_seeds="", tasks="sst2", results=str(with_sst2["path"])
    )
    assert glue_table.tune_stage_output(args) == ",".join(stage24)
    args = argparse.Namespace(tune_stage_cells="", tune_stage_seeds="1,3", tasks="sst2", results="")
    assert glue_table.tune_stage_output(args) == "1,2"


def test_tuning_report_shows_sst2_stages(with_sst2: dict) -> None:
    text = tuning.markdown(with_sst2["summary"])
    assert "| sst2 | accuracy | 0.8750 / 0.8906 / 0.8828 | 0.9062 / 0.9219 / **0.9141** |" in text
    assert "| sst2 (5e-4) | dl2 | 0.9062 | 0.9062 | **0.9375** | 0.9375 | 0.7500 | 1e-3 | +0.0312 |" in text
    assert "| λ, τ, lr | rte | mrpc | stsb | cola | sst2 |" in text
    assert "Selection complete: stage 1 (LoRA lr): 6/6 runs; stage 3 (PiSSA-d0/EVA lr): 12/12 runs" in text
    assert "Not run yet" not in text


# (c) without SST-2: the committed reports, byte for byte ----------------------------------------------------------


def test_tuning_report_regenerates(frozen_dl2: None) -> None:
    """The committed report (four tasks + SST-2's real selection), byte for byte from its runs."""
    committed = json.loads((RESULTS / "glue_mpnet_tuning.json").read_text())
    summary = tuning.summarize(
        tuning.load(RESULTS / "glue_mpnet_tuning.jsonl"), tuning.load(RESULTS / "glue_mpnet_dev.jsonl"),
        committed["split"],
    )  # fmt: skip
    summary["device_seconds"] = committed["device_seconds"]
    assert json.dumps(summary, indent=1) + "\n" == (RESULTS / "glue_mpnet_tuning.json").read_text()
    text = tuning.markdown(summary)
    assert text == (RESULTS / "GLUE_MPNET_TUNING.md").read_text()
    assert "Selection complete: stage 1 (LoRA lr): 6/6 runs" in text


def test_tuning_report_without_sst2_runs_says_not_run(frozen_dl2: None, tmp_path: Path) -> None:
    committed = json.loads((RESULTS / "glue_mpnet_tuning.json").read_text())
    path = _write(tmp_path / "t.jsonl", list(_committed("glue_mpnet_tuning.jsonl").values()))
    summary = tuning.summarize(tuning.load(path), tuning.load(RESULTS / "glue_mpnet_dev.jsonl"), committed["split"])
    assert "sst2" not in summary["selection"] or summary["selection"]["sst2"].get("lr") is None
    assert {t: summary["selection"][t] for t in tuning.TASKS} == {t: committed["selection"][t] for t in tuning.TASKS}
    assert "Not run yet: stage 1 (LoRA lr): 0/6 runs" in tuning.markdown(summary)


# (b) the evidence table ---------------------------------------------------------------------------------------------


def _sst2_dev_runs(selection: dict, seeds: tuple[int, ...] = (1, 2, 3), rows: tuple[str, ...] = ()) -> list[dict]:
    """Fake dev runs of every row (or ``rows``) on SST-2 at its selected configs, shaped like the row's RTE run."""
    runs = _small_runs()
    out = []
    for i, method in enumerate(rows or mpnet.LABEL):
        template = runs[f"rte/{mpnet.config(method, 'rte', selection)}/1"]
        name = mpnet.config(method, "sst2", selection)
        out += [_fake(template, "sst2", name, s, (880 + 3 * i + 2 * s * (i % 3)) / 1000) for s in seeds]
    return out


def _table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of each line of the markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):  # the alignment row
            rows.append(line.split(" | "))
    return rows


def test_sst2_gets_its_own_columns_and_never_enters_the_average(with_sst2: dict, tmp_path: Path) -> None:
    selection = _small_selection()
    with_sel = {**selection, "sst2": with_sst2["summary"]["selection"]["sst2"]}
    committed = _small_runs()
    fake = _sst2_dev_runs(with_sel)
    runs = {**committed, **mpnet.load(_write(tmp_path / "grid.jsonl", fake))}
    base, agg = mpnet.aggregate(committed, selection), mpnet.aggregate(runs, with_sel)

    for method, row in base["table"].items():  # the small tasks' cells and average, as without SST-2
        assert {k: v for k, v in agg["table"][method].items() if k != "sst2"} == row
        assert agg["table"][method]["sst2"]["seeds"] == [1, 2, 3]
    assert agg["table"]["lora"]["average"] == base["table"]["lora"]["average"] is not None
    by_key = {r["key"]: r for r in fake}
    for name, c in base["comparisons"].items():
        assert {k: v for k, v in agg["comparisons"][name].items() if k != "sst2"} == c, name
        # SST-2's own paired interval, recomputed from the fake lines with scipy
        a, b = (mpnet.config(m, "sst2", with_sel) for m in name.split(" - "))
        acc = lambda name, seed: by_key[f"sst2/{name}/{seed}"]["results"]["eval_accuracy"]  # noqa: E731
        diffs = [100 * (acc(a, s) - acc(b, s)) for s in (1, 2, 3)]
        got = agg["comparisons"][name]["sst2"]
        assert got["n"] == 3 and got["mean"] == pytest.approx(statistics.fmean(diffs), abs=1e-9)
        if statistics.stdev(diffs) > 0:
            low, high = stats.t.interval(0.95, 2, loc=statistics.fmean(diffs), scale=stats.sem(diffs))
            assert (got["low"], got["high"]) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9))
    assert agg["missing"] == [m for m in base["missing"] if not m.startswith("sst2/")]

    text, before = mpnet.markdown(agg, with_sel), mpnet.markdown(base, selection)
    assert "| avg | SST2 | ms/step × LoRA |" in text and "not in `avg`, the pooled intervals" in text
    # Every row of both tables is the row without SST-2 plus its SST-2 cell (after avg; last in the paired table).
    for header, col in (("| method |", 7), ("| comparison |", -1)):
        new, old = _table_rows(text, header), _table_rows(before, header)
        assert len(new) == len(old)
        for n, o in zip(new, old):
            if col == -1:
                assert n[:-2] + [n[-2] + " |"] == o  # the last cell carries the closing " |"
            else:
                assert n[:col] + n[col + 1 :] == o
    assert "SST2 dl2 1e-3, iwlora_sum 1e-2, iwlora_max 1e-4" in text


def test_without_sst2_runs_its_cells_are_listed_as_missing() -> None:
    selection = {**_small_selection(), "sst2": {"lr": None}}  # SST-2's selection not run yet
    agg = mpnet.aggregate(_small_runs(), selection)
    sst2 = [m for m in agg["missing"] if m.startswith("sst2/")]
    # every row but the family-lr PiSSA/EVA diagnostics (collapsed on the small tasks; SST-2 runs their own-lr rows)
    assert len(sst2) == len(mpnet.LABEL) - len(mpnet.SUPERSEDED) and all(m.endswith("seeds [1, 2, 3]") for m in sst2)
    assert not any(m.startswith(("sst2/pissa ", "sst2/eva ", "sst2/pissa_lr", "sst2/eva_lr")) for m in sst2)
    assert "sst2/adalora_paper: seeds [1, 2, 3]" in sst2  # selection-free recipes are named
    assert "sst2/lora (config from sst2's held-out selection, not run yet): seeds [1, 2, 3]" in sst2
    assert all("sst2" not in row for row in agg["table"].values())
    assert "SST2" not in mpnet.markdown(agg, selection).split("## Not yet run")[0]


def test_partial_sst2_keeps_the_small_tasks_average(with_sst2: dict, tmp_path: Path) -> None:
    selection = _small_selection()
    with_sel = {**selection, "sst2": with_sst2["summary"]["selection"]["sst2"]}
    committed = _small_runs()
    fake = _sst2_dev_runs(with_sel, seeds=(1, 2), rows=("lora", "dl2"))
    agg = mpnet.aggregate({**committed, **mpnet.load(_write(tmp_path / "g.jsonl", fake))}, with_sel)
    base = mpnet.aggregate(committed, selection)
    assert agg["table"]["dora"]["average"] == base["table"]["dora"]["average"] is not None
    assert "sst2" not in agg["table"]["dora"] and agg["comparisons"]["dora - lora"]["sst2"]["n"] == 0
    assert agg["comparisons"]["dl2 - lora"]["sst2"]["n"] == 2
    assert agg["comparisons"]["dl2 - lora"]["pooled"] == base["comparisons"]["dl2 - lora"]["pooled"]
    assert "sst2/lora_lr5e-4: seeds [3]" in agg["missing"]
    assert "sst2/dora_lr5e-4: seeds [1, 2, 3]" in agg["missing"]
    dora = next(line for line in mpnet.markdown(agg, with_sel).splitlines() if line.startswith("| DoRA |"))
    assert dora.split(" | ")[7] == "not run"  # a row without SST-2 runs, beside rows with


# (d) the command lines --------------------------------------------------------------------------------------------


def _args(**kw: object) -> argparse.Namespace:
    base = {"model": "M", "glue_dir": "G", "extra": "", "code_dir": "", "heldout": False, "tune": False}
    return argparse.Namespace(**{**base, **kw})


def _flag(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_sst2_held_out_runs_train_3_epochs_and_dev_runs_1() -> None:
    out = Path("/tmp/x")
    for args in (_args(heldout=True), _args(tune=True)):
        cmd = glue_table.command(args, "sst2", "lora_lr5e-4", 1, out)
        assert (_flag(cmd, "--num_train_epochs"), _flag(cmd, "--max_seq_length")) == ("3", "64")
    for cell in glue_table.grid_cells({"selection": {"sst2": {"lr": "5e-4"}}}):  # the dev runs (mpnet_grid.sh)
        task, method = cell.split("/")
        cmd = glue_table.command(_args(), task, method, 1, out)
        assert (_flag(cmd, "--num_train_epochs"), _flag(cmd, "--max_seq_length")) == ("1", "64")
    # gradnorm's one-epoch warm-up would be the whole SST-2 run: its grid name gets the shorter one too.
    assert _flag(glue_table.command(_args(), "sst2", "gradnorm_lr5e-4", 1, out), "--rank_warmup_steps") == "421"


def test_small_tasks_tuning_flags_do_not_change() -> None:
    out = Path("/tmp/x")
    for task in tuning.TASKS:
        for method in ("lora_lr1e-3", "dl2_a1e-3_lr1e-3", "gradnorm_lr1e-3", "adalora_paper"):
            held = glue_table.command(_args(heldout=True), task, method, 1, out)
            assert held == glue_table.command(_args(), task, method, 1, out)
            i = held.index("--dataloader_num_workers") + 2
            assert held[i : i + 4] == glue_table.PROTOCOL[task]


def test_heldout_must_match_the_folder(tmp_path: Path) -> None:
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "split.json").write_text("{}")
    tune, dev = str(tmp_path / "tune"), str(tmp_path)
    assert "add --heldout" in glue_table.heldout_mismatch(_args(glue_dir=tune), ["sst2"])
    assert "drop --heldout" in glue_table.heldout_mismatch(_args(glue_dir=dev, heldout=True), ["sst2"])
    assert glue_table.heldout_mismatch(_args(glue_dir=tune, tune=True), ["sst2"]) is None
    assert glue_table.heldout_mismatch(_args(glue_dir=dev), ["sst2"]) is None
    for args in (_args(glue_dir=tune), _args(glue_dir=dev, heldout=True)):  # the small tasks run either way
        assert glue_table.heldout_mismatch(args, list(tuning.TASKS)) is None
    wrappers = {name: (BENCH / name).read_text() for name in ("mpnet_tuning.sh", "mpnet_grid.sh")}
    assert "--heldout" in wrappers["mpnet_tuning.sh"] and "--heldout" not in wrappers["mpnet_grid.sh"]


def test_the_sst2_calls_start_every_cell_and_cover_the_measured_walls() -> None:
    """The SST-2 device calls as they ran (GLUE_MPNET_TUNING.md): at each call's concurrency every cell's first
    wall-time estimate fits its deadline, so the runner starts them, and on dev (no other jobs on the GPUs) it is at
    least the wall time each committed run measured; the small tasks' estimates are as before."""
    sel = {"selection": {"sst2": json.loads((RESULTS / "glue_mpnet_tuning.json").read_text())["selection"]["sst2"]}}
    dev = [c.split("/")[1] for c in glue_table.grid_cells(sel) if c.startswith("sst2/")]
    pick = lambda *prefixes: [m for m in dev if m.startswith(prefixes)]  # noqa: E731  (mpnet_grid.sh's METHODS)
    calls = [  # (held out, runs per GPU, deadline, cells)
        (True, 9, 490, [c.split("/")[1] for c in tuning.stage_cells({}, "sst2", [1, 3])]),
        (True, 11, 560, [c.split("/")[1] for c in tuning.stage_cells(_fake_stage1(), "sst2", [2, 4])]),
        (False, 6, 560, pick("lora", "dl2", "iwlora")),
        (False, 11, 575, pick("gradnorm", "pissa", "full", "dora", "adalora", "eva", "wsa")),
    ]
    assert sorted(m for *_, cells in calls[2:] for m in cells) == sorted(dev)
    walls = {
        r["key"]: r["wall_s"]
        for r in map(json.loads, (BENCH / "results" / "glue_mpnet_grid.jsonl").read_text().splitlines())
        if r["key"].startswith("sst2/")
    }
    assert len(walls) == 3 * len(dev)
    for held, parallel, deadline, cells in calls:
        for method in cells:
            est = glue_table.estimate_s(("sst2", method, 1), [], held, parallel)
            assert est <= deadline, (method, parallel)
            if not held:
                assert est >= max(walls[f"sst2/{method}/{seed}"] for seed in (1, 2, 3)), method
    assert glue_table.first_estimate_s("rte", "lora_lr5e-4") == 330
    assert glue_table.first_estimate_s("cola", "dl2_a1e-3_lr1e-3") == 450 * glue_table.IW_TIME_FACTOR


def _fake_stage1() -> dict[str, dict]:
    return {r["key"]: r for r in _sst2_tuning_records() if "/lora_lr" in r["key"]}


def test_the_committed_grid_is_complete() -> None:
    """The issue's bar on the committed table: ≥ 5 seeds for every core row on the four small tasks and 3 on SST-2
    (the family-lr PiSSA/EVA diagnostics: 3 small-task seeds, not run on SST-2), nothing listed as missing, and the
    report regenerates from its runs."""
    agg = json.loads((RESULTS / "glue_mpnet.json").read_text())
    assert agg["missing"] == []
    for method, row in agg["table"].items():
        small = 3 if method in mpnet.SUPERSEDED else 5
        assert all(len(row[t]["seeds"]) >= small for t in tuning.TASKS), method
        assert (method in mpnet.SUPERSEDED) == ("sst2" not in row), method
        assert method in mpnet.SUPERSEDED or row["sst2"]["seeds"] == [1, 2, 3]
    selection = json.loads((RESULTS / "glue_mpnet_tuning.json").read_text())["selection"]
    runs = {**mpnet.load(RESULTS / "glue_mpnet_dev.jsonl"), **mpnet.load(RESULTS / "glue_mpnet_grid.jsonl")}
    assert json.loads(json.dumps(mpnet.aggregate(runs, selection))) == agg

"""benchmarks/bench_qlora.py in its CPU ``--tiny`` mode (a hidden-64 MPNet from its config; bitsandbytes' CPU backend):
the JSON has every field the GPU run fills, and its comparisons are computed from the sensitivity dicts it reports
(4-bit and 8-bit against bf16), not from some other pair."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
from scipy.stats import spearmanr

pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_qlora  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("qlora") / "qlora"
    returned = bench_qlora.main(["--tiny", "--out", str(prefix)])
    written = json.loads(prefix.with_name("qlora.json").read_text())
    assert written == json.loads(json.dumps(returned))
    return written, prefix.with_name("qlora.md").read_text()


def test_json_has_every_field(result):
    r, _ = result
    assert r["tiny"] is True and "--tiny" in r["command"] and r["device"]
    assert {"torch", "transformers", "peft", "bitsandbytes", "python"} <= set(r["versions"])
    s = r["setup"]
    assert (s["targets"], s["heads"], s["variants"]) == (12, ["classifier"], ["bf16", "nf4", "int8", "fp32"])
    phases = {"bf16_lora", "nf4_lora", "nf4_iw_lora_calibration", "nf4_iw_lora_calibration_ga2", "nf4_iw_lora"}
    assert set(r["memory"]) == phases
    assert all(m["peak_gib"] is None for m in r["memory"].values())  # no CUDA memory numbers on a CPU
    assert r["memory"]["nf4_iw_lora"]["calibration_buffer_gib"] == 4 * 2 * (4 * 64 * 64 + 2 * 64 * 128) / 2**30
    t = r["step_time"]
    assert set(t["rounds"]) == {"bf16_lora", "nf4_lora", "nf4_iw_lora"}
    assert t["rounds"]["nf4_lora"]["ratio_vs_nf4_lora"] == 1.0
    assert all(v["ms_per_step"] > 0 for v in t["rounds"].values())
    assert t["paired_nf4_iw_over_lora"]["ratio_median"] > 0 and t["nf4_calibration"]["calib_seconds"] > 0
    checks = {c["check"]: c for c in r["checks"]}
    assert len(checks) == 6
    memory_checks = [c for name, c in checks.items() if "peak" in name]
    assert len(memory_checks) == 2 and all(c["value"] is None and c["met"] is None for c in memory_checks)
    assert all(isinstance(c["met"], bool) for name, c in checks.items() if "peak" not in name)


def test_runs_are_the_quantized_models(result):
    runs = result[0]["sensitivity"]["runs"]
    expected = {"bf16": ["Linear"], "nf4": ["Linear4bit"], "int8": ["Linear8bitLt"], "fp32": ["Linear"]}
    assert {v: run["base_layers"] for v, run in runs.items()} == expected
    names = list(runs["bf16"]["sensitivities"])
    assert len(names) == 12 and all(list(run["sensitivities"]) == names for run in runs.values())
    assert all(run["batches"] == 2 for run in runs.values())
    # four different measurements, all positive: quantization moves every matrix a little
    values = {v: tuple(run["sensitivities"].values()) for v, run in runs.items()}
    assert len(set(values.values())) == 4 and all(x > 0 for vals in values.values() for x in vals)


@pytest.mark.parametrize("ref,variant", [("bf16", "nf4"), ("bf16", "int8"), ("bf16", "fp32"), ("fp32", "nf4")])
def test_comparisons_are_computed_from_the_reported_dicts(result, ref, variant):
    r, md = result
    runs, c = r["sensitivity"]["runs"], r["sensitivity"]["vs"][ref][variant]
    a, b = runs[ref]["sensitivities"], runs[variant]["sensitivities"]
    names = list(a)
    assert c["spearman"] == pytest.approx(spearmanr([a[n] for n in names], [b[n] for n in names]).statistic, abs=1e-12)
    rel = {n: abs(b[n] / a[n] - 1) for n in names}
    assert c["rel_diff"] == pytest.approx(rel, rel=1e-12)
    assert c["max_rel_diff"] == pytest.approx(max(rel.values()), rel=1e-12)
    assert c["max_rel_diff_matrix"] == max(rel, key=rel.get)
    assert c["median_rel_diff"] == pytest.approx(statistics.median(rel.values()), rel=1e-12)
    if ref == "bf16" and variant in ("nf4", "int8"):
        check = next(
            x for x in r["checks"] if x["check"].startswith("Spearman") and bench_qlora.LABELS[variant] in x["check"]
        )
        assert check["value"] == c["spearman"]
        assert f"{c['max_rel_diff']:.2e}" in md


def test_compare_on_a_known_pair():
    c = bench_qlora.compare({"a": 1.0, "b": 2.0, "c": 4.0, "d": 8.0}, {"a": 8.0, "b": 4.0, "c": 2.2, "d": 1.0})
    assert c["spearman"] == pytest.approx(-1.0)
    assert c["max_rel_diff"] == pytest.approx(7.0) and c["max_rel_diff_matrix"] == "a"
    assert c["top_quarter_overlap"] == 0.0


def test_markdown_states_the_checks(result):
    r, md = result
    assert "TINY CPU MODE" in md and "mean nothing" in md
    for c in r["checks"]:
        assert c["check"] in md
    assert md.count("not measured") >= 2 + 5  # the two memory checks and the five peak cells

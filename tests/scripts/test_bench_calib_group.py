"""benchmarks/bench_calib_group.py on CPU (MiniLM, real SST-2 rows, a few batches): every group's sensitivities
equal group 1's, the report's rows and table are complete, bad flags give one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import GLUE, HAVE_SHARED_GLUE, MODEL, needs_shared

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_calib_group  # noqa: E402


@needs_shared
@pytest.mark.skipif(not HAVE_SHARED_GLUE, reason="needs ../shared's SST-2 rows")
def test_groups_agree_and_the_report_is_complete(tmp_path):
    argv = ["--model", str(MODEL), "--sst2", str(GLUE / "SST-2"), "--groups", "1,3", "--calib_steps", "6",
            "--batch", "4", "--repeats", "2", "--steps", "2", "--tmp", str(tmp_path / "tmp"), "--out", str(tmp_path),
            "--name", "cg"]  # fmt: skip
    bench_calib_group.main(argv)
    r = json.loads((tmp_path / "cg.json").read_text())
    assert r["batches"] == 6 and list(r["groups"]) == ["1", "3"]
    one, three = r["groups"]["1"], r["groups"]["3"]
    assert one["max_rel_diff"] == 0 and one["vs_first"] == 1
    assert three["max_rel_diff"] < 1e-4 and three["spearman"] > 0.999  # the same numbers, stacked
    assert len(three["seconds"]) == 2 and 0 < three["share_of_sst2_3epoch_lora_run"] < 1
    md = (tmp_path / "cg.md").read_text()
    assert md.startswith("# Calibration with stacked batches") and md.count("\n| ") == 3  # header + 2 rows


@pytest.mark.parametrize("groups", ["1,x", "0,2", ""])
def test_bad_groups_give_one_line(groups, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_calib_group.main(["--model", "m", "--sst2", "s", "--groups", groups])
    assert exc.value.code == 2 and "--groups: expected a comma list of integers >= 1" in capsys.readouterr().err

"""``benchmarks/check_penalty_graph.py`` (a GPU check of the penalty's CUDA graph) runs end to end: its CPU smoke mode
goes through every step with the penalty's eager path, so the GPU session does not find a broken script."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import check_penalty_graph  # noqa: E402


def test_cpu_smoke_run_writes_every_check(tmp_path):
    report = check_penalty_graph.main(["--device", "cpu", "--out", str(tmp_path / "pg")])
    assert [c["ok"] for c in report["checks"]] == [True] * 5
    assert report["targets"] == 72 and report["gradient_mib"] > 5  # mpnet-base's 72 matrices, r = 8: 5.06 MiB
    assert json.loads((tmp_path / "pg.json").read_text()) == json.loads(json.dumps(report))
    rows = [line for line in (tmp_path / "pg.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 5  # header + one row per check


def test_forms_table_renders_one_row_per_capture():
    rows = [{"rank": 8, "form": "broadcast", "default_form": "broadcast", "outputs_mib": 5.06,
             "allocated_beyond_outputs_mib": 0.0, "reserved_added_mib": 20.0, "replay_us": 120.0,
             "broadcast_over_matmul": 1.05},
            {"rank": 8, "form": "matmul", "default_form": "broadcast", "outputs_mib": 5.06,
             "allocated_beyond_outputs_mib": 32.0, "reserved_added_mib": 40.0, "replay_us": 114.0}]  # fmt: skip
    lines = check_penalty_graph.forms_table(rows, rounds=3, replays=10)
    body = [line for line in lines if line.startswith("| 8 ")]
    assert body == ["| 8 | broadcast | yes | 5.06 | 0.00 | 20.0 | 120.0 | 1.050 |",
                    "| 8 | matmul | no | 5.06 | 32.00 | 40.0 | 114.0 |  |"]  # fmt: skip
    assert check_penalty_graph.forms_table([], 3, 10) == []

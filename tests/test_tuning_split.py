"""benchmarks/tuning_split.py: the held-out split that every tuned choice of the evidence grid is made on — its
documented rule, SST-2's subsample, and that the committed selection's split still comes out byte for byte."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

from helpers import GLUE, has_task

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import tuning_split  # noqa: E402

LINES = [f"row{i}\t{i % 2}" for i in range(40)]


def expected(n: int, fraction: float, seed: int, limit: int | None) -> tuple[set[int], set[int]]:
    """The rule as the docstring states it: shuffle 0..n-1 with random.Random(seed); the pool is the first ``limit``
    (or all); its first round(fraction·|pool|) indices are held out, the rest kept."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    pool = order if limit is None else order[:limit]
    cut = round(fraction * len(pool))
    return set(pool[cut:]), set(pool[:cut])


def test_split_follows_the_documented_rule():
    kept, held = tuning_split.split_lines(LINES, 0.15, 0)
    want_kept, want_held = expected(len(LINES), 0.15, 0, None)
    assert kept == [LINES[i] for i in sorted(want_kept)] and held == [LINES[i] for i in sorted(want_held)]
    assert len(held) == 6 and len(kept) == 34 and not set(kept) & set(held)


def test_a_row_limit_splits_a_subsample():
    kept, held = tuning_split.split_lines(LINES, 0.25, 3, limit=20)
    want_kept, want_held = expected(len(LINES), 0.25, 3, 20)
    assert len(held) == 5 and len(kept) == 15
    assert kept == [LINES[i] for i in sorted(want_kept)] and held == [LINES[i] for i in sorted(want_held)]
    assert tuning_split.split_lines(LINES, 0.25, 3, limit=100) == tuning_split.split_lines(LINES, 0.25, 3)


def test_make_split_writes_the_files_and_records_the_subsample(tmp_path):
    src = tmp_path / "src"
    (src / "SST-2").mkdir(parents=True)
    (src / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(LINES) + "\n")
    info = tuning_split.make_split(src, tmp_path / "out", "sst2", 0.25, 3, limit=20)
    assert (info["source_rows"], info["train_rows"], info["heldout_rows"], info["subsample_rows"]) == (40, 15, 5, 20)
    for name in ("train.tsv", "dev.tsv"):
        body = (tmp_path / "out" / "SST-2" / name).read_bytes()
        assert body.startswith(b"sentence\tlabel\n") and hashlib.sha256(body).hexdigest() == info[f"{name}_sha256"]


def test_the_committed_selection_split_is_reproduced(tmp_path):
    """The split the held-out selection was made on (glue_mpnet_tuning.json) — its counts always, its files'
    sha256 wherever ../shared holds the task's train.tsv."""
    committed = json.loads((BENCH / "results" / "glue_mpnet_tuning.json").read_text())["split"]
    assert (committed["seed"], committed["fraction"]) == (tuning_split.SEED, tuning_split.FRACTION)
    for task, info in committed["tasks"].items():
        pool = info.get("subsample_rows", info["source_rows"])
        assert info["heldout_rows"] == round(tuning_split.FRACTION * pool)
        assert info["train_rows"] + info["heldout_rows"] == pool
        if has_task(task):
            again = tuning_split.make_split(GLUE, tmp_path, task, limit=tuning_split.MAX_ROWS.get(task))
            assert again == info, task

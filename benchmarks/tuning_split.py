"""Carve a tuning split out of each GLUE task's TRAINING set, so hyperparameters are chosen without the dev set.

For each task the data lines of ``<src>/<Folder>/train.tsv`` (every line but the header; CoLA's train.tsv has no
header, so all its lines are data) are shuffled by index with ``random.Random(seed)``; the first
``round(fraction * n)`` shuffled indices are held out. ``<out>/<Folder>/dev.tsv`` gets the held-out lines and
``train.tsv`` the others, each in the source file's order, the header (if any) kept on both. The real dev sets are
never read.

    python benchmarks/tuning_split.py --src ../shared/data/glue --out .gpu/tune_glue   # writes a manifest too
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

FOLDERS = {"rte": "RTE", "mrpc": "MRPC", "stsb": "STS-B", "cola": "CoLA", "sst2": "SST-2"}
HEADERLESS = {"cola"}  # CoLA train/dev have no header row
SEED = 0
FRACTION = 0.15


def split_lines(lines: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(kept, held_out): a deterministic ``fraction`` of ``lines`` held out, both in the original order."""
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    held = set(order[: round(fraction * len(lines))])
    kept = [line for i, line in enumerate(lines) if i not in held]
    return kept, [line for i, line in enumerate(lines) if i in held]


def make_split(src: Path, out: Path, task: str, fraction: float = FRACTION, seed: int = SEED) -> dict:
    """Write ``out/<Folder>/{train,dev}.tsv`` for ``task``; returns the row counts and the files' sha256."""
    folder = FOLDERS[task]
    text = (src / folder / "train.tsv").read_text(encoding="utf-8")
    lines = [line for line in text.split("\n") if line.strip()]  # blank lines are no rows (the reader skips them)
    header = [] if task in HEADERLESS else lines[:1]
    data = lines[len(header) :]
    kept, held = split_lines(data, fraction, seed)
    (out / folder).mkdir(parents=True, exist_ok=True)
    info: dict = {"folder": folder, "source_rows": len(data), "train_rows": len(kept), "heldout_rows": len(held)}
    for name, rows in (("train.tsv", kept), ("dev.tsv", held)):
        body = "\n".join(header + rows) + "\n"
        (out / folder / name).write_text(body, encoding="utf-8")
        info[f"{name}_sha256"] = hashlib.sha256(body.encode()).hexdigest()
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="../shared/data/glue", help="GLUE folder with the original train.tsv files")
    p.add_argument("--out", default=".gpu/tune_glue")
    p.add_argument("--tasks", default="rte,mrpc,stsb,cola")
    p.add_argument("--fraction", type=float, default=FRACTION)
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args()
    out = Path(args.out)
    manifest = {
        "rule": "random.Random(seed).shuffle of the data-line indices of train.tsv; the first round(fraction*n) "
        "are dev.tsv, the rest train.tsv, both in source order, header kept (CoLA: none)",
        "seed": args.seed,
        "fraction": args.fraction,
        "tasks": {t: make_split(Path(args.src), out, t, args.fraction, args.seed) for t in args.tasks.split(",")},
    }
    (out / "split.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
